"""Always-valid p-values (ltr/sequential_test.py) and the sequential verdict of `models compare`."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import ttest_1samp

from ltr.experiments import InterleavedRequest, TeamPick, compare_interleaved
from ltr.sequential_test import (
    SEQUENTIAL_EFFECT, SEQUENTIAL_MIN, always_valid_p_value, always_valid_p_values, mixture_log_likelihood_ratio,
    requests_to_decide,
)
from search.event_store import Event


def test_the_p_value_is_the_running_minimum_of_one_over_the_mixture_ratio():
    rng = np.random.default_rng(3)
    x = rng.normal(0.4, 1.0, 200)
    p = always_valid_p_values(x)
    assert np.all(np.diff(p) <= 0) and np.all(p[: SEQUENTIAL_MIN - 1] == 1.0)
    n = np.arange(1, 201)
    mean = np.cumsum(x) / n
    variance = np.array([x[:k].var(ddof=1) if k > 1 else 0.0 for k in n])
    with np.errstate(divide="ignore", invalid="ignore"):
        tau2, v = (SEQUENTIAL_EFFECT**2) * variance, variance / n
        ratio = np.sqrt(v / (v + tau2)) * np.exp(tau2 * mean**2 / (2 * v * (v + tau2)))  # Johari et al., eq. (11)
    expected = np.minimum.accumulate(np.where(n >= SEQUENTIAL_MIN, np.minimum(1.0, 1.0 / ratio), 1.0))
    assert p == pytest.approx(expected, rel=1e-9)
    assert always_valid_p_value(x) == p[-1] and always_valid_p_value(np.array([])) == 1.0
    assert always_valid_p_value(np.full(50, 0.3)) == 1.0  # no spread: nothing to test against
    with pytest.raises(ValueError, match="effect must be > 0"):
        always_valid_p_values(x, effect=0)


def test_reading_after_every_observation_keeps_false_verdicts_near_alpha_where_the_t_test_does_not():
    """Under no difference (credits like an interleaving log's: mostly 0, sometimes +-credit), the
    always-valid p read after each of 4,000 requests crosses 0.05 in about 5% of 300 logs; a t-test
    read at 17 growing sample sizes crosses in far more."""
    rng = np.random.default_rng(11)
    sequential = fixed = 0
    looks = [int(50 * 2 ** (i / 2)) for i in range(12)]  # 50 .. 2,263
    for _ in range(300):
        clicked = rng.random(4000) < 0.4
        x = np.where(clicked, rng.choice([-1.0, -0.5, 0.5, 1.0], 4000), 0.0)
        sequential += always_valid_p_value(x) < 0.05
        fixed += any(ttest_1samp(x[:k], 0.0).pvalue < 0.05 for k in looks)
    assert sequential / 300 <= 0.08
    assert fixed / 300 >= 0.15


def test_a_real_difference_is_found_at_about_the_predicted_size():
    rng = np.random.default_rng(5)
    d = 0.15  # mean in standard deviations
    predicted = requests_to_decide(d, 0.05)
    crossings = []
    for _ in range(40):
        p = always_valid_p_values(rng.normal(d, 1.0, 20 * predicted))
        crossings.append(int(np.argmax(p < 0.05)) + 1 if (p < 0.05).any() else math.inf)
    assert 0.4 * predicted <= np.median(crossings) <= 2.0 * predicted
    z = 1.96  # a fixed-sample test planned for 50% power needs (z / d)**2: the sequential one pays for reading at will
    assert (z / d) ** 2 < predicted < 5 * (z / d) ** 2
    assert mixture_log_likelihood_ratio(predicted * d**2, predicted * SEQUENTIAL_EFFECT**2) >= math.log(20)
    assert mixture_log_likelihood_ratio((predicted - 1) * d**2, (predicted - 1) * SEQUENTIAL_EFFECT**2) < math.log(20)
    assert requests_to_decide(0.0, 0.05) == 1 << 40


def _optimized(request_id: str, credit: float, t: float) -> InterleavedRequest:
    return InterleavedRequest(request_id, t, "m1", "m2", 0, (TeamPick(1, f"{request_id}-d", "A" if credit > 0 else "B", credit),))


def _log(credits: list[float]) -> tuple[list[InterleavedRequest], list[Event]]:
    pages = [_optimized(f"r{i}", c if c else 0.5, 1000.0 + i) for i, c in enumerate(credits)]
    clicks = [Event(p.request_id, "click", p.teams[0].doc_id, 1, p.timestamp + 1) for p, c in zip(pages, credits) if c]
    return pages, clicks


def test_models_compare_decides_by_the_always_valid_p_by_default():
    rng = np.random.default_rng(2)
    credits = list(np.where(rng.random(600) < 0.5, rng.choice([0.5, -0.5], 600, p=[0.7, 0.3]), 0.0))
    pages, clicks = _log(credits)
    sequential = compare_interleaved("m1", "m2", pages, clicks)
    assert sequential.reading == "sequential" and sequential.always_valid_p_value < 0.05
    assert sequential.preferred == "m1" and "m1 preferred (always-valid p = " in sequential.verdict()
    assert sequential.always_valid_p_value == always_valid_p_value(np.array(credits))
    report = sequential.to_dict()
    assert report["always_valid_p_value"] == sequential.always_valid_p_value and report["reading"] == "sequential"
    # A small lead the fixed-sample t-test calls significant is not yet enough when read at will.
    early_pages, early_clicks = _log(credits[:60])
    early = compare_interleaved("m1", "m2", early_pages, early_clicks)
    fixed = compare_interleaved("m1", "m2", early_pages, early_clicks, reading="fixed")
    assert fixed.p_value < 0.05 and fixed.preferred == "m1"
    assert early.p_value == fixed.p_value and early.always_valid_p_value >= 0.05 and early.preferred is None
    assert "would reach an always-valid p < 0.05" in early.note() and "fixed before the first look" in early.note()
    with pytest.raises(ValueError, match="reading must be one of"):
        compare_interleaved("m1", "m2", pages, clicks, reading="peek")


def test_the_sequential_verdict_keeps_the_direction_it_stopped_on():
    """The always-valid test stops at its first crossing: if the lead turns afterwards (a later
    reader still sees p < 0.05, the running minimum), the verdict stays the crossing's."""
    rng = np.random.default_rng(4)
    ahead = list(np.where(rng.random(300) < 0.6, rng.choice([0.5, -0.5], 300, p=[0.8, 0.2]), 0.0))
    behind = [-c for c in ahead] * 2  # then B leads for twice as long
    pages, clicks = _log(ahead + behind)
    result = compare_interleaved("m1", "m2", pages, clicks)
    assert result.mean_credit < 0 and result.always_valid_p_value < 0.05
    first = int(np.argmax(always_valid_p_values(np.array(ahead + behind)) < 0.05))
    assert first < 300 and np.mean((ahead + behind)[: first + 1]) > 0
    assert result.preferred == "m1"  # the crossing's direction, not today's mean
    assert compare_interleaved("m1", "m2", pages, clicks, reading="fixed").preferred == "m2"


def test_the_fixed_sample_p_path_is_the_t_test_at_every_prefix():
    from ltr.sequential_test import t_test_p_values

    x = np.random.default_rng(1).normal(0.1, 1.0, 300)
    p = t_test_p_values(x)
    assert p[0] == 1.0 and t_test_p_values(np.full(30, 0.5)).tolist() == [1.0] * 30
    for k in (2, 50, 300):
        assert p[k - 1] == pytest.approx(ttest_1samp(x[:k], 0.0).pvalue, rel=1e-9)
