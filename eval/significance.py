"""Paired significance tests over per-query scores, with Holm's correction.

Two pipelines answered the same queries, so the tests are paired on the per-query
differences: Student's paired t-test (scipy), a paired randomisation test that flips the sign
of each difference at random (Fisher's test as Smucker et al. 2007 recommend for IR), and a
95% t confidence interval of the mean difference. Holm's step-down method controls the
family-wise error over the comparisons of one metric (every pipeline against the baseline).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

DEFAULT_ALPHA = 0.05
DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 20_261_121


@dataclass
class Comparison:
    """One metric of one pipeline against the baseline, over the same queries."""

    mean_difference: float  # pipeline minus baseline
    ci95: tuple[float, float]
    t_test_p: float
    randomisation_p: float
    t_test_p_holm: float = float("nan")
    randomisation_p_holm: float = float("nan")
    wins: int = 0
    losses: int = 0
    ties: int = 0

    def significant(self, alpha: float = DEFAULT_ALPHA) -> bool:
        """Both corrected tests agree below `alpha`."""
        return self.t_test_p_holm < alpha and self.randomisation_p_holm < alpha

    def to_dict(self, alpha: float = DEFAULT_ALPHA) -> dict:
        out = asdict(self)
        out["ci95"] = list(self.ci95)
        out["significant"] = self.significant(alpha)
        return out


def paired_t_test(scores: np.ndarray, baseline: np.ndarray) -> tuple[float, tuple[float, float]]:
    """Two-sided p-value and 95% confidence interval of the mean difference."""
    difference = np.asarray(scores, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    if len(difference) < 2:
        return float("nan"), (float("nan"), float("nan"))
    if np.all(difference == difference[0]):
        # No variance: the t statistic is undefined; identical runs are not different at all.
        mean = float(difference[0])
        return (1.0 if mean == 0 else 0.0), (mean, mean)
    result = stats.ttest_rel(scores, baseline)
    interval = result.confidence_interval(0.95)
    return float(result.pvalue), (float(interval.low), float(interval.high))


def paired_randomisation_test(
    scores: np.ndarray, baseline: np.ndarray, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> float:
    """Two-sided p-value of the mean difference under random sign flips of each query's difference."""
    difference = np.asarray(scores, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    if len(difference) < 2:  # one query: no test (NaN), as the t-test; `significant` is then False
        return float("nan")
    if not np.any(difference):
        return 1.0
    result = stats.permutation_test(
        (np.asarray(scores, dtype=np.float64), np.asarray(baseline, dtype=np.float64)),
        lambda a, b, axis: np.mean(a - b, axis=axis),
        permutation_type="samples",
        n_resamples=resamples,
        alternative="two-sided",
        vectorized=True,
        random_state=np.random.default_rng(seed),
    )
    return float(result.pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (monotone, capped at 1); NaN stays NaN."""
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def compare(scores: np.ndarray, baseline: np.ndarray, *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> Comparison:
    difference = np.asarray(scores, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    t_p, interval = paired_t_test(scores, baseline)
    return Comparison(
        mean_difference=float(difference.mean()) if len(difference) else float("nan"),
        ci95=interval,
        t_test_p=t_p,
        randomisation_p=paired_randomisation_test(scores, baseline, resamples, seed),
        wins=int(np.sum(difference > 0)),
        losses=int(np.sum(difference < 0)),
        ties=int(np.sum(difference == 0)),
    )


def compare_to_baseline(
    per_pipeline: Mapping[str, Mapping[str, np.ndarray]],
    baseline: str,
    metrics: Sequence[str],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict[str, dict[str, Comparison]]:
    """`{pipeline: {metric: Comparison}}` for every pipeline but the baseline; the Holm family
    of a metric is the set of pipelines compared on it."""
    if baseline not in per_pipeline:
        raise ValueError(f"baseline '{baseline}' is not among the evaluated pipelines ({', '.join(per_pipeline)})")
    others = [name for name in per_pipeline if name != baseline]
    table: dict[str, dict[str, Comparison]] = {name: {} for name in others}
    for metric in metrics:
        base = per_pipeline[baseline][metric]
        for name in others:
            table[name][metric] = compare(per_pipeline[name][metric], base, resamples=resamples, seed=seed)
        for attribute in ("t_test_p", "randomisation_p"):
            adjusted = holm([getattr(table[name][metric], attribute) for name in others])
            for name, value in zip(others, adjusted):
                setattr(table[name][metric], f"{attribute}_holm", value)
    return table


def mean_confidence_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """t interval of a mean (for one pipeline's metric, as plotted in reports)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float("nan"), float("nan")
    mean, sem = values.mean(), stats.sem(values)
    if sem == 0:
        return float(mean), float(mean)
    low, high = stats.t.interval(level, len(values) - 1, loc=mean, scale=sem)
    return float(low), float(high)
