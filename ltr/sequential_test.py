"""Always-valid p-values: a comparison that may be read as often as one likes.

`ltr-search models compare` is read while the interleaved requests come in, day after day. A
fixed-sample test (t-test, sign test) read at every look and stopped at the first p < 0.05 says
"significant" far more often than 5% of the time when neither model is better: the more looks,
the more false verdicts. The mixture sequential probability ratio test (mSPRT; Robbins 1970,
Johari, Koomen, Pekelis & Walsh, "Always valid inference", Operations Research 2022) keeps its
error rate at alpha however often, and whenever, it is read:

    Lambda_n = sqrt(V / (V + tau^2)) * exp(tau^2 * theta_n^2 / (2 V (V + tau^2)))
    p_n      = min(1, min over m <= n of 1 / Lambda_m)

for an estimate theta_n of the effect with sampling variance V, and a normal mixture N(0, tau^2)
over the effect under the alternative. With z^2 = theta_n^2 / V and r = tau^2 / V this is
log Lambda = (r / (1 + r) * z^2 - log(1 + r)) / 2. `tau` is set in units of the per-observation
standard deviation (a standardised effect, Cohen's d): `SEQUENTIAL_EFFECT`. The variance is the
sample's own (plug-in), trusted from `SEQUENTIAL_MIN` observations on.

The price of reading at will: about 2-4x the sessions of a fixed-sample test read at growing
sizes (bench/bench_interleaving.py measures both, and the false verdicts of the latter: 22-49% of
comparisons between equally good rankers, against 0-6% for this test).
"""
from __future__ import annotations

import math

import numpy as np

# The mixture's standard deviation in per-observation standard deviations: the test is sharpest
# where n * effect**2 is about 10, i.e. around 1,000 observations at 0.1, and loses little within
# 10x of that (bench/bench_interleaving.py, `sequential` block, compares 0.03, 0.1 and 0.3).
SEQUENTIAL_EFFECT = 0.1
SEQUENTIAL_MIN = 20  # observations before the plug-in variance is trusted (p stays 1 before)


def mixture_log_likelihood_ratio(z2: np.ndarray, r: np.ndarray) -> np.ndarray:
    """log Lambda of the normal-mixture SPRT from z^2 = estimate^2 / variance and r = tau^2 /
    variance (the mixture's variance over the estimate's)."""
    z2, r = np.asarray(z2, dtype=np.float64), np.asarray(r, dtype=np.float64)
    return 0.5 * (r / (1.0 + r) * z2 - np.log1p(r))


def running_mean_variance(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, mean, sample variance with ddof 1) after each prefix of `values`; the variance is 0
    for a single value and where identical values leave only rounding."""
    x = np.asarray(values, dtype=np.float64)
    n = np.arange(1, len(x) + 1, dtype=np.float64)
    mean = np.cumsum(x) / n
    squares = np.cumsum(x * x)
    with np.errstate(invalid="ignore", divide="ignore"):
        variance = np.maximum(squares - n * mean**2, 0.0) / np.maximum(n - 1, 1)
        variance[variance <= 1e-12 * squares / n] = 0.0
    return n, mean, variance


def t_test_p_values(values: np.ndarray) -> np.ndarray:
    """The two-sided one-sample t-test's p of a mean of 0 after each prefix of `values`: what a
    reader of the fixed-sample test sees at every look (1 while the values do not vary)."""
    from scipy.stats import t as student_t  # scipy.stats: a few hundred ms to import, reports only

    n, mean, variance = running_mean_variance(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.abs(mean) / np.sqrt(variance / n)
    return np.where(variance > 0, 2 * student_t.sf(t, np.maximum(n - 1, 1)), 1.0)


def always_valid_p_values(values: np.ndarray, effect: float = SEQUENTIAL_EFFECT,
                          min_n: int = SEQUENTIAL_MIN) -> np.ndarray:
    """The always-valid p-value of "the mean of `values` is 0" after each prefix of `values` (in
    arrival order): element n-1 is the p-value a reader who looked after every observation would
    hold after n of them. Non-increasing; 1 before `min_n` and while the values do not vary."""
    if effect <= 0:
        raise ValueError(f"effect must be > 0, got {effect}")
    n, mean, variance = running_mean_variance(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        z2 = np.where(variance > 0, n * mean**2 / variance, 0.0)
    log_ratio = mixture_log_likelihood_ratio(z2, n * effect**2)
    log_ratio[(n < max(min_n, 2)) | ~(variance > 0)] = 0.0
    return np.minimum.accumulate(np.minimum(1.0, np.exp(-log_ratio)))


def always_valid_p_value(values: np.ndarray, effect: float = SEQUENTIAL_EFFECT, min_n: int = SEQUENTIAL_MIN) -> float:
    """The always-valid p-value after all of `values` (1.0 for none)."""
    p = always_valid_p_values(values, effect, min_n)
    return float(p[-1]) if len(p) else 1.0


def requests_to_decide(standardised_mean: float, alpha: float, effect: float = SEQUENTIAL_EFFECT,
                       limit: int = 1 << 40) -> int:
    """About how many observations with this mean (in standard deviations) the always-valid test
    needs to cross `alpha`: the smallest n whose expected z^2 = n * mean^2 does (no noise)."""
    d2 = float(standardised_mean) ** 2
    if d2 <= 0:
        return limit

    def crossed(n: int) -> bool:
        return float(mixture_log_likelihood_ratio(n * d2, n * effect**2)) >= math.log(1 / alpha)

    high = 1
    while not crossed(high):
        if high >= limit:
            return limit
        high *= 2
    low = high // 2  # not crossed (or 0)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if crossed(middle) else (middle, high)
    return high
