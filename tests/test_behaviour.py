"""Behaviour store: hand-computed counts, smoothing, COEC, decay, incremental == rebuild, atomic
updates, query normalisation, PBM propensity recovery, unknown docs."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

import ltr.behaviour as behaviour
from ltr.behaviour import DECAY_HALF_LIFE_S, PRIOR_STRENGTH, BehaviourStore, normalise_query
from search.event_store import Event, EventStore, ServedRequest, ServedResult
from eval.propensity import fit_propensities

T0 = time.time() - 100 * 86_400.0  # far enough back that a half-life later is still in the past


def served(request_id: str, query: str = "vitamin d", docs: tuple[str, ...] = ("a", "b", "c", "d"),
           at: float = T0, propensities: dict[int, float] | None = None) -> ServedRequest:
    propensities = propensities or {}
    results = [ServedResult(doc, i + 1, 10.0 - i, propensities.get(i + 1, 1.0)) for i, doc in enumerate(docs)]
    return ServedRequest(request_id, at, query, "bm25", "idx", "g1", None, None, None, 0, results)


def ev(request_id: str, kind: str, position: int, doc: str, at: float = T0 + 1.0) -> Event:
    return Event(request_id, kind, doc, position, at, 1000.0 if kind == "dwell" else None)


@pytest.fixture
def events(tmp_path: Path):
    with EventStore(tmp_path / "events.db") as store:
        yield store


@pytest.fixture
def beh(tmp_path: Path):
    with BehaviourStore(tmp_path / "behaviour.db") as store:
        yield store


def _scenario(events: EventStore) -> list[list[Event]]:
    """Three batches: r1 has impressions + clicks, r2 only clicks, r3 another spelling of the query."""
    events.log_request(served("r1"))
    events.log_request(served("r2", docs=("b", "a", "c", "d"), propensities={2: 0.5}))
    events.log_request(served("r3", query="Vitamin  D ", docs=("c", "a", "b", "d")))
    return [
        [ev("r1", "impression", p, d) for p, d in [(1, "a"), (2, "b"), (3, "c")]] + [ev("r1", "click", 2, "b", T0 + 2)],
        [ev("r1", "click", 1, "a", T0 + 3), ev("r2", "click", 3, "c", T0 + 4), ev("r2", "dwell", 3, "c", T0 + 5)],
        [ev("r3", "click", 2, "a", T0 + 6), ev("r2", "click", 1, "b", T0 + 7), ev("r1", "impression", 2, "b", T0 + 8)],
    ]


def test_counts_last_click_and_ctr_by_hand(events, beh):
    for batch in _scenario(events):
        events.append_events(batch)
    summary = beh.update(events)
    assert summary.events_applied == 10 and summary.unknown_requests == 0
    # impressions: r1 a,b,c (explicit; duplicate b ignored), r2 b,a,c (clicks to depth 3), r3 c,a (depth 2)
    stats = beh.query_doc_stats("VITAMIN D", ["a", "b", "c", "d"], now=T0 + 10)
    np.testing.assert_array_equal(stats["impressions"], [3, 2, 3, 0])
    np.testing.assert_array_equal(stats["clicks"], [2, 2, 1, 0])
    # last clicks: r1 -> a (T0+3 after b), r2 -> b (T0+7 after c), r3 -> a
    np.testing.assert_array_equal(stats["last_click_share"][:3], [1.0, 0.5, 0.0])
    assert math.isnan(stats["last_click_share"][3])
    prior = 5 / 8
    assert beh.prior_ctr() == pytest.approx(prior)
    expected_ctr = [(c + PRIOR_STRENGTH * prior) / (i + PRIOR_STRENGTH) for c, i in [(2, 3), (2, 2), (1, 3), (0, 0)]]
    np.testing.assert_allclose(stats["ctr"], expected_ctr)
    assert summary.explored_impressions == 1  # r2 position 2 (doc a) was swapped in with propensity 0.5
    status = beh.status()
    assert (status["pairs"], status["docs"], status["events_applied"], status["watermark"]) == (3, 3, 10, 10)
    assert status["propensities"] is None and status["fitted_at"] is None


def test_unknown_doc_gets_prior_and_nan_coec(events, beh):
    events.log_request(served("r1"))
    events.append_events([ev("r1", "click", 1, "a")])
    beh.update(events)
    stats = beh.doc_stats(["a", "zzz"], now=T0 + 10)
    assert beh.prior_ctr() == pytest.approx(1.0)
    assert stats["impressions"][1] == 0 and stats["ctr"][1] == pytest.approx(1.0)
    assert math.isnan(stats["coec"][1]) and stats["coec"][0] == pytest.approx(1.0)


def test_coec_uses_stored_propensities(events, beh):
    beh.set_propensities([1.0, 0.5, 0.25], fitted_at=123.0)
    events.log_request(served("r1"))
    events.log_request(served("r2", docs=("c", "b", "a", "d")))
    events.append_events([ev("r1", "click", 3, "c"), ev("r2", "impression", 1, "c")])
    beh.update(events)
    # c: impressions at position 3 (0.25) and position 1 (1.0) -> expected 1.25, one click
    stats = beh.doc_stats(["c", "b"], now=T0 + 10)
    assert stats["coec"][0] == pytest.approx(1 / 1.25)
    assert stats["coec"][1] == pytest.approx(0.0)  # b impressed at position 2 (0.5), never clicked
    assert beh.propensities() == [1.0, 0.5, 0.25] and beh.status()["fitted_at"] == 123.0


def test_decay_halves_after_one_half_life(events, beh):
    events.log_request(served("r1"))
    events.append_events([ev("r1", "click", 2, "b", T0 + 1)])
    beh.update(events)
    fresh = beh.doc_stats(["b"], now=T0 + 1)
    later = beh.doc_stats(["b"], now=T0 + 1 + DECAY_HALF_LIFE_S)
    assert fresh["decayed_clicks"][0] == pytest.approx(1.0)
    assert later["decayed_clicks"][0] == pytest.approx(0.5)
    assert later["decayed_impressions"][0] == pytest.approx(0.5)
    assert later["clicks"][0] == 1  # raw counts do not decay


def test_incremental_in_three_batches_equals_rebuild(events, tmp_path):
    with BehaviourStore(tmp_path / "incremental.db") as incremental:
        for batch in _scenario(events):
            events.append_events(batch)
            incremental.update(events)
        assert incremental.watermark == 10
        assert incremental.update(events).events_applied == 0  # nothing new
        with BehaviourStore(tmp_path / "rebuilt.db") as rebuilt:
            rebuilt.update(events)  # stale content that rebuild must drop
            rebuilt.rebuild(events)
            assert rebuilt.dump() == incremental.dump()
            assert len(rebuilt.dump()["pair_stats"]) == 3


def test_update_with_limit_is_a_batch(events, tmp_path):
    batches = _scenario(events)
    for batch in batches:
        events.append_events(batch)
    with BehaviourStore(tmp_path / "a.db") as stepped, BehaviourStore(tmp_path / "b.db") as whole:
        while stepped.update(events, limit=3).events_applied:
            pass
        whole.update(events)
        assert stepped.dump() == whole.dump()


def test_crash_mid_update_leaves_previous_state(events, beh, monkeypatch):
    first, second, third = _scenario(events)
    events.append_events(first)
    beh.update(events)
    before = beh.dump()
    events.append_events(second + third)

    def boom(db, docs):
        raise RuntimeError("simulated crash after the pair rows were written")

    monkeypatch.setattr(behaviour, "_write_docs", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        beh.update(events)
    assert beh.dump() == before and beh.watermark == 4
    monkeypatch.undo()
    assert beh.update(events).events_applied == 6 and beh.watermark == 10


def test_query_normalisation_merges_variants(events, beh):
    assert normalise_query("  Vitamin \t D\n") == "vitamin d" == normalise_query("vitamin d")
    assert normalise_query("ﬁsh") == "fish"  # NFKC folds the ligature
    events.log_request(served("r1", query="Vitamin  D"))
    events.log_request(served("r2", query="vitamin d"))
    events.append_events([ev("r1", "click", 1, "a"), ev("r2", "click", 1, "a")])
    beh.update(events)
    assert beh.query_doc_stats("vitamin d", ["a"])["clicks"][0] == 2
    assert beh.status()["pairs"] == 1


def test_pbm_fit_recovers_examination(events, beh):
    rng = np.random.default_rng(7)
    n_positions, n_queries, n_sessions = 10, 30, 3000
    true_exam = 1.0 / np.arange(1, n_positions + 1)
    docs = [f"d{i}" for i in range(n_positions)]
    relevance = rng.uniform(0.1, 0.9, size=(n_queries, n_positions))
    clicks: list[Event] = []
    for s in range(n_sessions):
        q = s % n_queries
        order = rng.permutation(n_positions)
        request = served(f"s{s}", query=f"q{q}", docs=tuple(docs[i] for i in order), at=T0 + s)
        events.log_request(request)
        hit = rng.random(n_positions) < true_exam * relevance[q, order]
        clicks += [ev(f"s{s}", "click", int(p) + 1, docs[order[p]], T0 + s + 1) for p in np.flatnonzero(hit)]
    for start in range(0, len(clicks), 1000):
        events.append_events(clicks[start:start + 1000])
    fit = fit_propensities(beh, events, max_position=n_positions)
    assert fit.sessions == n_sessions and fit.clicks == len(clicks)
    assert fit.propensities[0] == 1.0
    mae = float(np.mean(np.abs(np.array(fit.propensities) - true_exam)))
    print(f"PBM propensity MAE {mae:.4f}: {np.round(fit.propensities, 3).tolist()}")
    assert mae < 0.05
    assert beh.propensities() == fit.propensities and beh.status()["fitted_at"] == fit.fitted_at
