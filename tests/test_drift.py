"""Feature drift: PSI, references, reports, served rows from the request log, the rolling monitor."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from ltr.drift import (
    PROMETHEUS_GAUGES,
    PSI_EPSILON,
    PSI_MODERATE,
    PSI_SIGNIFICANT,
    DriftMonitor,
    FeatureReference,
    binned_distribution,
    drift_level,
    drift_report,
    feature_reference,
    format_drift,
    population_stability_index,
    prometheus_samples,
    served_rows,
    set_gauges,
    top_rows,
)
from search.event_store import EventStore, ServedRequest, ServedResult
from ltr.registry import FeatureSetMismatchError, ModelManifest, ModelRegistry
from indexing.home import registry_dir
from tests.conftest import ROOT

NAMES = ["bm25_all", "coverage_all", "dense_cosine", "constant", "never_set"]


def training_rows(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.column_stack([
        rng.gamma(2.0, 3.0, n),  # bm25: skewed, positive
        rng.integers(0, 4, n) / 3.0,  # coverage: a few point masses
        rng.normal(0.4, 0.1, n),  # dense cosine
        np.full(n, 1.0),  # constant
        np.full(n, np.nan),  # never computed
    ]).astype(np.float32)
    x[rng.random(n) < 0.1, 2] = np.nan  # dense missing for 10% of the rows
    scores = 0.3 * np.nan_to_num(x[:, 0]) + rng.normal(size=n)
    return x, scores


@pytest.fixture(scope="module")
def reference() -> FeatureReference:
    x, scores = training_rows()
    return feature_reference(x, NAMES, scores)


def by_name(report):
    return {f.name: f for f in report.features}


# ----------------------------------------------------------------------------------- PSI


def test_psi_is_zero_for_identical_shares_and_grows_with_the_shift():
    shares = [0.1] * 10
    assert population_stability_index(shares, shares) == 0.0
    ref = binned_distribution(np.random.default_rng(1).normal(size=20000))
    rng = np.random.default_rng(2)
    psis = [population_stability_index(ref.expected(), ref.shares(rng.normal(loc=shift, size=5000)))
            for shift in (0.0, 0.1, 0.3, 1.0)]
    assert psis[0] < 0.01
    assert psis == sorted(psis)
    assert PSI_MODERATE > psis[1] > 0.005
    assert psis[3] > PSI_SIGNIFICANT
    assert (drift_level(psis[0]), drift_level(0.15), drift_level(psis[3])) == ("stable", "moderate", "significant")


def test_psi_floors_empty_bins_with_epsilon():
    # The empty bin on the expected side costs (0.5 - eps) * ln(0.5 / eps), finite.
    psi = population_stability_index([1.0, 0.0], [0.5, 0.5])
    expected = (0.5 - 1.0) * np.log(0.5 / 1.0) + (0.5 - PSI_EPSILON) * np.log(0.5 / PSI_EPSILON)
    assert psi == pytest.approx(expected)
    assert population_stability_index([0.0, 1.0], [0.0, 1.0]) == 0.0
    with pytest.raises(ValueError, match="one length"):
        population_stability_index([0.5, 0.5], [1.0])


# ----------------------------------------------------------------------------------- references


def test_reference_bins_are_quantiles_with_point_masses_and_degenerate_features(reference):
    bm25 = reference.feature("bm25_all")
    assert len(bm25.edges) == 9 and all(abs(p - 0.1) < 0.01 for p in bm25.proportions[1:])
    assert bm25.missing_share == 0.0
    coverage = reference.feature("coverage_all")  # 0, 1/3, 2/3, 1: each value its own bin
    assert sorted(p for p in coverage.proportions if p > 0) == pytest.approx(sorted([0.25] * 4), abs=0.03)
    assert sum(p > 0 for p in coverage.proportions) == 4
    assert reference.feature("dense_cosine").missing_share == pytest.approx(0.1, abs=0.015)
    constant = reference.feature("constant")  # one populated bin, open ones either side
    assert constant.proportions == [0.0, 1.0, 0.0] and constant.missing_share == 0.0
    never = reference.feature("never_set")
    assert never.edges == [] and never.proportions == [0.0] and never.missing_share == 1.0
    assert reference.rows == 4000 and reference.population == "all training rows"
    for dist in [*reference.features, reference.score]:
        assert sum(dist.proportions) + dist.missing_share == pytest.approx(1.0)


def test_reference_round_trips_through_json(reference):
    text = json.dumps(reference.to_dict(), allow_nan=False)
    again = FeatureReference.from_dict(json.loads(text))
    assert again == reference
    assert again.to_dict() == reference.to_dict()
    broken = reference.to_dict()
    broken["features"]["bm25_all"]["proportions"] = [0.5]
    with pytest.raises(ValueError, match=r"features\['bm25_all'\] has 9 edges but 1 proportions"):
        FeatureReference.from_dict(broken)
    with pytest.raises(ValueError, match="exactly the keys"):
        FeatureReference.from_dict({**reference.to_dict(), "extra": 1})


def test_top_k_reference_describes_the_first_page_of_each_query():
    scores = np.array([0.1, 0.9, 0.5, 0.3, 2.0, 1.0, 0.0])
    assert top_rows(scores, [4, 3], 2).tolist() == [1, 2, 4, 5]
    x = np.arange(7, dtype=np.float32)[:, None]
    ref = feature_reference(x, ["f"], scores, bins=4, group_sizes=[4, 3], top_k=2)
    assert ref.rows == 4 and ref.population == "top 2 rows per query by model score"
    with pytest.raises(ValueError, match="group_sizes"):
        feature_reference(x, ["f"], scores, top_k=2)


# ----------------------------------------------------------------------------------- reports


def test_no_drift_for_a_fresh_sample_of_the_training_distribution(reference):
    x, scores = training_rows(n=3000, seed=9)
    report = drift_report(reference, x, NAMES, scores, model_version="m0001")
    assert report.rows == 3000 and report.worst == []
    assert max(f.psi for f in report.features) < PSI_MODERATE
    assert report.score_psi < PSI_MODERATE
    assert by_name(report)["never_set"].psi == 0.0  # NaN-only on both sides
    lines = format_drift(report)
    assert lines[0].startswith("drift of model m0001: 3000 served rows vs 4000 training rows")
    assert not any("SHIFT" in line for line in lines)


def test_a_shifted_feature_is_flagged_and_ranked_first(reference):
    x, scores = training_rows(n=3000, seed=3)
    x[:, 0] *= 2.0  # bm25 doubles (say a new length normalisation)
    report = drift_report(reference, x, NAMES, scores)
    drift = by_name(report)
    assert drift["bm25_all"].psi > PSI_SIGNIFICANT and drift["bm25_all"].level == "significant"
    assert report.worst == ["bm25_all"]
    assert drift["dense_cosine"].psi < PSI_MODERATE
    lines = format_drift(report)
    assert lines[2].split()[0] == "bm25_all" and lines[2].endswith("SIGNIFICANT SHIFT")


def test_a_feature_missing_more_often_shows_in_missing_share_and_psi(reference):
    x, scores = training_rows(n=3000, seed=4)
    x[: len(x) // 2, 2] = np.nan  # dense cosine now missing for about 55% of rows
    drift = by_name(drift_report(reference, x, NAMES, scores))["dense_cosine"]
    assert drift.training_missing_share == pytest.approx(0.1, abs=0.015)
    assert drift.served_missing_share == pytest.approx(0.55, abs=0.02)
    assert drift.psi > PSI_SIGNIFICANT
    line = next(line for line in format_drift(drift_report(reference, x, NAMES, scores)) if "dense_cosine" in line)
    assert "missing  10." in line and "->  5" in line


def test_constant_and_nan_only_features_drift_when_they_take_values(reference):
    x, scores = training_rows(n=2000, seed=5)
    x[:200, 3] = 2.0  # the constant takes another value for 10% of rows
    x[:, 4] = 0.5  # the never-set feature is suddenly computed
    drift = by_name(drift_report(reference, x, NAMES, scores))
    assert drift["constant"].psi > PSI_SIGNIFICANT
    assert drift["never_set"].psi > PSI_SIGNIFICANT
    assert drift["never_set"].served_missing_share == 0.0 and drift["never_set"].training_missing_share == 1.0
    # a single training row, a constant score: nothing crashes
    one = feature_reference(np.array([[np.nan, 1.0]]), ["a", "b"], np.array([0.0]))
    assert drift_report(one, np.array([[np.nan, 1.0]]), ["a", "b"], np.array([0.0])).score_psi == 0.0


def test_report_matches_columns_by_name_and_refuses_missing_ones(reference):
    x, scores = training_rows(n=500, seed=6)
    order = [4, 2, 0, 3, 1]
    shuffled = drift_report(reference, x[:, order], [NAMES[i] for i in order], scores)
    straight = drift_report(reference, x, NAMES, scores)
    assert shuffled.features == straight.features
    with pytest.raises(ValueError, match=r"lack reference features \['never_set'\]"):
        drift_report(reference, x[:, :4], NAMES[:4], scores)


def test_prometheus_samples_cover_the_declared_gauges(reference):
    x, scores = training_rows(n=500, seed=7)
    samples = prometheus_samples(drift_report(reference, x, NAMES, scores))
    assert {name for name, _, _ in samples} == set(PROMETHEUS_GAUGES)
    for name, labels, _ in samples:
        assert set(labels) == set(PROMETHEUS_GAUGES[name][1])
    missing = {(labels["feature"], labels["source"]): value for name, labels, value in samples
               if name == "ltr_search_feature_missing_share"}
    assert missing[("never_set", "training")] == 1.0 and ("bm25_all", "served") in missing
    assert ("ltr_search_drift_rows", {}, 500.0) in samples
    assert prometheus_samples(None) == []


def test_set_gauges_clears_stale_series(reference):
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    gauges = {name: prometheus_client.Gauge(name, help_text, list(labels), registry=registry)
              for name, (help_text, labels) in PROMETHEUS_GAUGES.items()}
    x, scores = training_rows(n=500, seed=8)
    set_gauges(gauges, drift_report(reference, x, NAMES, scores))
    text = prometheus_client.generate_latest(registry).decode()
    assert 'ltr_search_feature_psi{feature="bm25_all"}' in text
    assert 'ltr_search_feature_missing_share{feature="never_set",source="training"} 1.0' in text
    assert "ltr_search_drift_rows 500.0" in text
    set_gauges(gauges, None)
    text = prometheus_client.generate_latest(registry).decode()
    assert "bm25_all" not in text
    # unlabelled gauges cannot be cleared: they read NaN, not the last report's values
    assert "ltr_search_drift_rows NaN" in text and "ltr_search_score_psi NaN" in text, text


MULTIPROCESS_SCRIPT = """
from ltr.drift import drift_report, feature_reference, set_gauges
from search.app.metrics import ServiceMetrics
from tests.test_drift import NAMES, training_rows
metrics = ServiceMetrics()
reference = feature_reference(*training_rows()[:1], NAMES, training_rows()[1])
x, scores = training_rows(n=500, seed=8)
set_gauges(metrics.drift, drift_report(reference, x, NAMES, scores))
before = metrics.exposition().decode()
set_gauges(metrics.drift, None)
print(before)
print("=====")
print(metrics.exposition().decode())
"""


def test_set_gauges_leaves_no_stale_value_across_workers(tmp_path):
    """Under `serve --workers N` clear() removes no series (each worker's samples stay in its file):
    a model or feature that went away must read NaN, not its last drift value."""
    pytest.importorskip("prometheus_client")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", MULTIPROCESS_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    before, after = out.split("=====")
    psi = [line for line in before.splitlines() if line.startswith('ltr_search_feature_psi{feature="bm25_all"')]
    assert psi and not psi[0].endswith("NaN"), before
    stale = [line for line in after.splitlines() if line.startswith("ltr_search_feature_psi{") or
             line.startswith("ltr_search_drift_rows") or line.startswith("ltr_search_score_psi")]
    assert stale and all(line.endswith("NaN") for line in stale), after


# ----------------------------------------------------------------------------------- served rows


def logged(request_id: str, at: float, model: str | None, rows: list[dict | None]) -> ServedRequest:
    results = [ServedResult(f"d{i}", i + 1, float(10 - i), 1.0, features) for i, features in enumerate(rows)]
    return ServedRequest(request_id, at, "q", "ltr" if model else "bm25", "idx", "g1", model, None, None, 0, results)


def test_served_rows_reads_only_the_models_complete_rows(tmp_path: Path):
    names = ["a", "b"]
    with EventStore(tmp_path / "events.db") as store:
        store.log_request(logged("r1", 100.0, "m0001", [{"a": 1.0, "b": float("nan")}, {"a": 2.0, "b": 3.0}]))
        store.log_request(logged("r2", 101.0, "m0002", [{"a": 9.0, "b": 9.0}]))
        store.log_request(logged("r3", 102.0, None, [None]))
        store.log_request(logged("r4", 103.0, "m0001", [{"a": 4.0}, None, {"a": 5.0, "b": 6.0, "c": 0.0}]))
        store.log_request(logged("r5", 104.0, "m0001", [{"a": 7.0, "b": 8.0}]))

        rows, scores, span = served_rows(store, "m0001", names)
        np.testing.assert_array_equal(rows, np.array([[1, np.nan], [2, 3], [5, 6], [7, 8]], dtype=np.float32))
        assert rows.dtype == np.float32 and scores.tolist() == [10.0, 9.0, 8.0, 10.0]
        assert span == (100.0, 104.0)

        rows, scores, span = served_rows(store, "m0001", names, limit_requests=2)  # the most recent two
        assert rows[:, 0].tolist() == [5.0, 7.0] and span == (103.0, 104.0)
        rows, _, span = served_rows(store, "m0001", names, since=104.0)
        assert rows.tolist() == [[7.0, 8.0]] and span == (104.0, 104.0)
        rows, scores, span = served_rows(store, "m0009", names)
        assert rows.shape == (0, 2) and scores.shape == (0,) and span is None


# ----------------------------------------------------------------------------------- the monitor


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_monitor_window_evicts_the_oldest_rows(reference):
    clock, wall = FakeClock(), FakeClock()
    monitor = DriftMonitor(reference, NAMES, model_version="m0001", window=1000, min_rows=300, refresh_s=5.0,
                           clock=clock, wall_clock=wall)
    assert monitor.report() is None
    x, scores = training_rows(n=2000, seed=11)
    wall.now = 1000.0
    monitor.observe(x[:250], scores[:250])
    assert monitor.report() is None  # under min_rows
    clock.now = wall.now = 10.0 + 1000.0
    shifted = x.copy()
    shifted[:, 0] *= 3.0
    monitor.observe(shifted[:1000], scores[:1000])
    assert len(monitor) == 1000 and monitor.observed == 1250
    report = monitor.report()
    assert report.rows == 1000 and report.time_range == (1010.0, 1010.0)  # the first 250 were evicted
    assert report.worst == ["bm25_all"] and report.model_version == "m0001"

    monitor.observe(x[1000:1700], scores[1000:1700])
    assert monitor.report() is report  # cached within refresh_s
    clock.now += 6.0
    fresher = monitor.report()
    assert fresher is not report and fresher.rows == 1000
    assert by_name(fresher)["bm25_all"].psi < by_name(report)["bm25_all"].psi
    rows, kept_scores, _ = monitor.snapshot()
    np.testing.assert_array_equal(rows[-700:], x[1000:1700])  # oldest first, newest last
    np.testing.assert_array_equal(kept_scores[:300], scores[700:1000])

    monitor.observe(x[:5000], scores[:5000])  # more than the window at once: its last rows are kept
    np.testing.assert_array_equal(monitor.snapshot()[0], x[1000:2000])


def test_monitor_is_safe_under_concurrent_observers_and_readers(reference):
    monitor = DriftMonitor(reference, NAMES, window=500, min_rows=1, refresh_s=0.0)
    x, scores = training_rows(n=40, seed=12)
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def observer(k: int) -> None:
        try:
            barrier.wait()
            for i in range(200):
                rows = x.copy()
                rows[:, 1] = k  # mark the thread, rows stay whole
                monitor.observe(rows[: 1 + i % 10], scores[: 1 + i % 10])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def reader() -> None:
        try:
            barrier.wait()
            for _ in range(50):
                report = monitor.report()
                assert report is None or report.rows <= 500
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=observer, args=(k,)) for k in range(4)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    expected_total = 4 * sum(1 + i % 10 for i in range(200))
    assert monitor.observed == expected_total and len(monitor) == 500
    rows, _, _ = monitor.snapshot()
    # every kept row is a whole row some thread wrote: its other columns match the source rows
    source = {tuple(np.nan_to_num(r[[0, 2]], nan=-1.0)) for r in x}
    assert all(tuple(np.nan_to_num(r[[0, 2]], nan=-1.0)) in source for r in rows)
    assert monitor.report().rows == 500


class Outcome:
    def __init__(self, model_version, feature_names, results):
        self.model_version, self.feature_names, self.results = model_version, feature_names, results


class Result:
    def __init__(self, features, score):
        self.features, self.score = features, score


def test_observe_outcome_takes_only_the_monitored_models_rows(reference):
    monitor = DriftMonitor(reference, NAMES, model_version="m0001", min_rows=1)
    x, scores = training_rows(n=3, seed=13)
    reversed_names = tuple(NAMES[::-1])
    monitor.observe_outcome(Outcome("m0001", reversed_names, [Result(r[::-1], s) for r, s in zip(x, scores)]
                                    + [Result(None, 0.0)]))
    monitor.observe_outcome(Outcome("m0002", tuple(NAMES), [Result(x[0], 1.0)]))
    monitor.observe_outcome(Outcome(None, None, [Result(None, 1.0)]))
    rows, kept, _ = monitor.snapshot()
    np.testing.assert_array_equal(rows, x)
    np.testing.assert_allclose(kept, scores)


# ----------------------------------------------------------------------------------- registry


def test_registry_round_trips_a_reference_and_the_monitor_reads_it(tmp_path: Path):
    from tests.test_registry import FEATURES, make_data, save, train

    registry = ModelRegistry(tmp_path)
    booster = train()
    x, _ = make_data(0)
    ref = feature_reference(x, FEATURES, booster.inplace_predict(x))
    saved = save(registry, booster, reference=ref.to_dict())
    assert saved.reference == ref.to_dict()
    assert registry.manifest(saved.version) == saved
    assert FeatureReference.from_dict(registry.load(saved.version).manifest.reference) == ref
    assert save(registry, booster, reference=ref).reference == ref.to_dict()  # the object is accepted too

    monitor = DriftMonitor.for_manifest(registry.manifest(saved.version))
    assert monitor.model_version == saved.version and monitor.names == FEATURES
    wrong = feature_reference(x, [f"f{i}" for i in range(5)], np.zeros(len(x)))
    with pytest.raises(FeatureSetMismatchError, match="drift reference describes features"):
        save(registry, booster, reference=wrong)


def test_manifests_without_a_reference_still_load(tmp_path: Path):
    from tests.test_registry import rewrite_manifest, save, train

    registry = ModelRegistry(tmp_path)
    saved = save(registry, train())
    assert saved.reference is None
    rewrite_manifest(registry, saved.version, lambda data: data.pop("reference"))  # as written before the field
    assert "reference" not in json.loads((registry_dir(tmp_path) / saved.version / "manifest.json").read_text())
    assert registry.load(saved.version).manifest.reference is None
    assert DriftMonitor.for_manifest(registry.manifest(saved.version)) is None
    data = saved.to_dict()
    data["reference"] = {"format": 99}
    manifest = ModelManifest.from_dict(data)  # the registry does not interpret the reference...
    assert DriftMonitor.for_manifest(manifest) is None  # ...the monitor refuses it, with a warning
