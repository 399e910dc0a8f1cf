"""Drift alarms need a minimum sample: a handful of served rows must not flag every feature
(PSI of 5 rows over 10 bins is large by chance alone)."""
from __future__ import annotations

import numpy as np

from ltr.drift import DEFAULT_MIN_ROWS, drift_report, feature_reference, format_drift, prometheus_samples

NAMES = ["a", "b", "c"]


def _reference():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(5000, 3))
    return feature_reference(rows, NAMES, rows.sum(axis=1)), rng


def test_five_served_rows_from_the_training_distribution_flag_nothing() -> None:
    reference, rng = _reference()
    rows = rng.normal(size=(5, 3))
    report = drift_report(reference, rows, NAMES, rows.sum(axis=1))
    assert not report.enough_rows and report.worst == []
    text = "\n".join(format_drift(report))
    assert f"too few served rows to flag drift (5 < {DEFAULT_MIN_ROWS})" in text
    assert "SHIFT" not in text
    assert [name for name, _, _ in prometheus_samples(report)] == ["ltr_search_drift_rows"]
    # the same rows with the minimum lowered: the small-sample PSI alone flags features
    assert drift_report(reference, rows, NAMES, min_rows=1).worst


def test_a_real_shift_over_the_minimum_sample_is_still_flagged() -> None:
    reference, rng = _reference()
    rows = rng.normal(size=(DEFAULT_MIN_ROWS, 3))
    rows[:, 1] += 3.0
    report = drift_report(reference, rows, NAMES, rows.sum(axis=1))
    assert report.enough_rows and report.worst[0] == "b"
    assert "SIGNIFICANT SHIFT" in "\n".join(format_drift(report))
