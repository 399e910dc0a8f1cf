"""Training from clicks: the request log (feature log) joined with click events, negatives,
IPS weights, XGBoost's unbiased LambdaMART, refusals and counts, and `ltr-search train
--from-events` end to end. No encoder: synthetic feature rows, a BM25-only index for the CLI."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from ltr.behaviour import BehaviourStore
from ltr.click_training import (
    IPS_MAX_WEIGHT, ClickTrainingSettings, click_rows, join_clicks, logged_feature_set, parse_time, rows_from_clicks,
    train_from_clicks,
)
from search.event_store import Event, EventStore, ServedRequest, ServedResult
from ltr.features import Feature, FeatureSet, feature_set
from ltr.registry import ModelRegistry, predict_scores
from ltr.training import TrainingSettings
from eval.propensity import fit_propensities
from tests.conftest import SMALL_DOCS, run_cli, write_jsonl

SYNTHETIC = FeatureSet("synthetic", 1, (Feature("signal", "text", "true relevance"), Feature("noise", "text", "noise")))
T0 = time.time() - 86_400


def request(request_id: str, rows: list[dict[str, float] | None], timestamp: float = T0, offset: int = 0,
            index: str = "idx") -> ServedRequest:
    results = [ServedResult(f"{request_id}-d{i}", offset + i + 1, float(-i), 1.0, features) for i, features in enumerate(rows)]
    return ServedRequest(request_id, timestamp, f"query {request_id}", "ltr", index, "g000001", "m0001", None, None,
                         offset, results)


def click(served: ServedRequest, position: int) -> Event:
    doc = next(r.doc_id for r in served.results if r.position == position)
    return Event(served.request_id, "click", doc, position, served.timestamp + 1)


def row(signal: float, noise: float = 0.0) -> dict[str, float]:
    return {"signal": signal, "noise": noise}


@pytest.fixture
def store(tmp_path: Path):
    with EventStore(tmp_path / "events.sqlite3") as events:
        yield events


def log(events: EventStore, served: ServedRequest, *positions: int) -> ServedRequest:
    events.log_request(served)
    if positions:
        events.append_events([click(served, p) for p in positions])
    return served


def test_skip_above_and_examined_negatives(store):
    log(store, request("r", [row(float(i)) for i in range(6)]), 2, 4)
    above, join = click_rows(store, SYNTHETIC.names, negatives="skip-above")
    assert join.clicked_requests == 1 and join.clicks == 2
    assert above.positions.tolist() == [1, 2, 3, 4]
    assert above.rows.labels.tolist() == [0, 1, 0, 1]
    assert above.rows.features[:, 0].tolist() == [0, 1, 2, 3]  # the logged rows, in shown order
    assert above.rows.query_ids == ["r"] and above.rows.group_sizes.tolist() == [4] and above.group_weights is None
    assert (above.stats.rows_not_examined, above.stats.negatives, above.stats.clicks_used) == (2, 2, 2)

    examined, _ = click_rows(store, SYNTHETIC.names, negatives="examined")
    assert examined.positions.tolist() == [1, 2, 3, 4, 5]
    assert examined.rows.labels.tolist() == [0, 1, 0, 1, 0]
    assert examined.stats.rows_not_examined == 1


def test_ips_splits_a_request_into_one_group_per_click_weighted_one_over_p_clipped(store):
    log(store, request("r", [row(float(i)) for i in range(6)]), 2, 4)
    propensities = [1.0, 0.5, 0.2, 0.01]  # 1/0.01 = 100 is clipped
    ips, _ = click_rows(store, SYNTHETIC.names, debias="ips", propensities=propensities)
    assert ips.rows.query_ids == ["r#2", "r#4"] and ips.group_requests == ["r", "r"]
    assert ips.group_weights.tolist() == pytest.approx([2.0, IPS_MAX_WEIGHT])
    assert IPS_MAX_WEIGHT == pytest.approx(20.0)
    # each group: its click and the request's negatives (the other click is neither), in shown order
    assert ips.positions.tolist() == [1, 2, 3, 1, 3, 4]
    assert ips.rows.labels.tolist() == [0, 1, 0, 0, 0, 1]
    matrix = ips.rows.dmatrix(SYNTHETIC.names)
    assert matrix.get_weight().tolist() == pytest.approx([2.0, IPS_MAX_WEIGHT])  # one weight per group
    # positions beyond the fitted ones take the last propensity; weights survive a selection
    tail, _ = click_rows(store, SYNTHETIC.names, debias="ips", propensities=[1.0, 0.8])
    assert tail.group_weights.tolist() == pytest.approx([1.25, 1.25])
    assert tail.rows.select(["r#4"]).group_weights.tolist() == pytest.approx([1.25])
    with pytest.raises(ValueError, match="propensities"):
        click_rows(store, SYNTHETIC.names, debias="ips", propensities=None)


def test_requests_without_clicks_features_or_negatives_are_skipped_and_counted(store):
    log(store, request("used", [row(1.0), row(2.0), row(3.0)]), 3)
    log(store, request("no-clicks", [row(1.0), row(2.0)]))
    log(store, request("bm25-only", [None, None, None]), 2)  # a non-model pipeline logs no features
    log(store, request("top-click", [row(1.0), row(2.0)]), 1)  # skip-above: nothing skipped, no pair
    rows, join = click_rows(store, SYNTHETIC.names)
    assert (join.requests_read, join.requests_without_clicks, join.clicked_requests, join.clicks) == (4, 1, 3, 3)
    assert join.results_without_features == 3
    stats = rows.stats
    assert (stats.requests_used, stats.requests_without_features, stats.requests_without_negatives) == (1, 1, 1)
    assert stats.clicks_without_features == 1 and rows.rows.query_ids == ["used"]
    # under `examined` the top click gets the result below it as a negative
    examined, _ = click_rows(store, SYNTHETIC.names, negatives="examined")
    assert examined.rows.query_ids == ["used", "top-click"]


def test_missing_features_are_refused_naming_them(store):
    log(store, request("a", [{"signal": 1.0}, {"signal": 0.0}]), 2)
    log(store, request("b", [row(1.0), row(0.0)]), 2)
    with pytest.raises(ValueError) as refused:
        click_rows(store, SYNTHETIC.names)
    message = str(refused.value)
    assert "noise (1)" in message and "1 of 2 clicked requests" in message and "--feature-set" in message
    with pytest.raises(ValueError, match=r"lack feature\(s\) of feature set synthetic v1: noise"):
        train_from_clicks(store, SYNTHETIC)


def test_logged_feature_set_is_the_default(store):
    basic = feature_set("basic")
    log(store, request("a", [dict.fromkeys(basic.names, 0.5), dict.fromkeys(basic.names, 0.1)]), 1)
    clicked, _ = join_clicks(store)
    assert logged_feature_set(clicked) == basic
    log(store, request("b", [row(1.0), row(0.0)], timestamp=T0 + 1), 1)
    log(store, request("c", [row(1.0), row(0.0)], timestamp=T0 + 2), 1)
    with pytest.raises(ValueError, match="match no registered feature set"):
        logged_feature_set(join_clicks(store)[0])


def test_time_range_and_index_filter(store):
    for i in range(4):
        log(store, request(f"r{i}", [row(0.0), row(1.0)], timestamp=T0 + 10 * i, index="idx" if i < 3 else "other"), 2)
    clicked, join = join_clicks(store, since=T0 + 10, until=T0 + 30, index_name="idx")
    assert [c.request.request_id for c in clicked] == ["r1", "r2"]
    assert (join.requests_read, join.requests_other_index) == (2, 0)
    _, everything = join_clicks(store, index_name="idx")
    assert (everything.requests_read, everything.requests_other_index, everything.clicked_requests) == (4, 1, 3)
    assert parse_time("1700000000") == 1700000000.0
    assert parse_time("2023-11-14T22:13:20") == 1700000000.0  # no zone: UTC
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("yesterday")


def test_unbiased_lambdamart_needs_rows_at_positions_one_to_n(store):
    log(store, request("first-page", [row(0.0), row(1.0), row(2.0)]), 3)
    log(store, request("second-page", [row(0.0), row(1.0), row(2.0)], offset=10, timestamp=T0 + 1), 13)
    log(store, request("gap", [row(0.0), None, row(2.0), row(3.0)], timestamp=T0 + 2), 4)
    clicked, _ = join_clicks(store)
    rows = rows_from_clicks(clicked, SYNTHETIC.names, debias="unbiased-lambdamart")
    assert rows.rows.query_ids == ["first-page"] and rows.stats.requests_not_contiguous == 2
    assert rows.positions.tolist() == [1, 2, 3]  # row index in the group == shown position - 1
    plain = rows_from_clicks(clicked, SYNTHETIC.names, debias="none")
    assert plain.rows.query_ids == ["first-page", "second-page", "gap"]


def _position_biased_log(events: EventStore, n: int = 1000, k: int = 10, seed: int = 0) -> None:
    """A weak logging ranker (noisy `signal`), clicks from a PBM: P(click) = 1/position * signal^2."""
    rng = np.random.default_rng(seed)
    clicks = []
    for q in range(n):
        signal, noise = rng.random(k), rng.random(k)
        order = np.argsort(-(0.5 * signal + rng.random(k)))
        served = request(f"r{q}", [row(float(signal[i]), float(noise[i])) for i in order], timestamp=T0 + q)
        events.log_request(served)
        clicks += [click(served, r.position) for r in served.results
                   if rng.random() < r.features["signal"] ** 2 / r.position]
    for start in range(0, len(clicks), 1000):
        events.append_events(clicks[start:start + 1000])


@pytest.fixture(scope="module")
def biased_log(tmp_path_factory):
    root = tmp_path_factory.mktemp("clicks")
    with EventStore(root / "events.sqlite3") as events:
        _position_biased_log(events)
        with BehaviourStore(root / "behaviour.sqlite3") as behaviour:
            propensities = fit_propensities(behaviour, events).propensities
        yield events, propensities


@pytest.mark.parametrize("debias", ["none", "ips", "unbiased-lambdamart"])
def test_each_debias_mode_learns_the_relevance_feature(biased_log, debias):
    events, propensities = biased_log
    assert propensities[0] == 1.0 and propensities[4] < 0.5  # examination falls with position
    settings = ClickTrainingSettings(debias=debias, ranker=TrainingSettings(max_rounds=300, early_stopping_rounds=50))
    result = train_from_clicks(events, SYNTHETIC, settings, propensities=propensities)
    importance = result.trained.importance()
    assert max(importance, key=importance.get) == "signal", importance
    fresh = np.random.default_rng(1).random((500, 2)).astype(np.float32)
    scores = predict_scores(result.trained.booster, list(SYNTHETIC.names), fresh)
    spearman = np.corrcoef(np.argsort(np.argsort(scores)), np.argsort(np.argsort(fresh[:, 0])))[0, 1]
    assert spearman > 0.8, spearman
    record = result.training_record()
    assert record["source"] == "events" and record["debias"] == debias and record["negatives"] == "skip-above"
    assert record["requests"]["train"] + record["requests"]["valid"] == record["requests"]["used"]
    assert not set(result.train_requests) & set(result.valid_requests)  # held out by request
    assert result.trained.valid_score is not None
    if debias == "ips":
        assert record["propensities"] == propensities and record["groups"] > record["requests"]["used"]
        assert result.params.get("lambdarank_unbiased") is None
    elif debias == "unbiased-lambdamart":
        assert result.params["lambdarank_unbiased"] is True and result.params["lambdarank_pair_method"] == "topk"
        assert record["position_bias"]["ti+"][0] == pytest.approx(1.0) and record["propensities"] is None
    else:
        assert record["propensities"] is None and record["position_bias"] is None


def test_train_from_events_cli_lands_a_model_in_the_registry(tmp_path):
    home = tmp_path / "home"
    corpus = tmp_path / "small"
    corpus.mkdir()
    write_jsonl(corpus / "corpus.jsonl", SMALL_DOCS)
    run_cli(home, "index", "build", "--dataset", str(corpus), "--name", "small", "--no-dense", "--quiet")
    basic = feature_set("basic")
    (home / "events").mkdir()
    rng = np.random.default_rng(0)
    with EventStore(home / "events" / "small.sqlite3") as events:
        for q in range(120):
            docs = rng.permutation([d["_id"] for d in SMALL_DOCS]).tolist()
            rows = [{**{n: float(rng.random()) for n in basic.names}, "bm25_all": float(int(d[1:]) % 2)} for d in docs]
            served = ServedRequest(f"r{q}", T0 + q, f"query {q}", "ltr", "small", "g000001", "m0001", None, None, 0,
                                   [ServedResult(d, i + 1, 0.0, 1.0, f) for i, (d, f) in enumerate(zip(docs, rows))])
            events.log_request(served)
            clicks = [click(served, r.position) for r in served.results
                      if rng.random() < (0.1 + 0.8 * r.features["bm25_all"]) / r.position]
            events.append_events(clicks)
        events.log_request(ServedRequest("bm25", T0 + 500, "q", "bm25", "small", "g000001", None, None, None, 0,
                                         [ServedResult("d1", 1, 1.0)]))

    both = run_cli(home, "train", "--from-events", "--dataset", str(corpus), check=False)
    assert both.returncode != 0 and "mutually exclusive" in both.stderr
    neither = run_cli(home, "train", check=False)
    assert neither.returncode != 0 and "--from-events" in neither.stderr

    result = run_cli(home, "train", "--from-events", "--debias", "ips", "--name", "small", "--max-rounds", "50")
    assert "model m0001" in result.stdout and "debias ips" in result.stdout and "1/p clipped at 20" in result.stdout
    assert "fitted the position-based click model" in result.stderr  # no propensities were stored: fitted first
    manifest = ModelRegistry(home).manifest("m0001")
    assert manifest.feature_set == basic.describe()  # the feature set of the logged rows
    assert manifest.index["name"] == "small" and manifest.index["generation"] == "g000001"
    training = manifest.training
    assert training["source"] == "events" and training["debias"] == "ips" and training["negatives"] == "skip-above"
    assert training["event_store"] == str((home / "events" / "small.sqlite3").resolve())
    assert training["requests"]["read"] == 121 and training["skipped"]["requests_without_clicks"] >= 1
    assert len(training["propensities"]) == 10 and training["fingerprint"]
    assert training["time_range"]["first_ts"] == pytest.approx(T0, abs=1)
    assert manifest.metrics["valid click nDCG@10"] is not None
    assert ModelRegistry(home).load("m0001", basic.describe()).version == "m0001"  # parity sample verified

    again = run_cli(home, "train", "--from-events", "--debias", "unbiased-lambdamart", "--negatives", "examined",
                    "--name", "small", "--max-rounds", "50", "--until", "2999-01-01")
    assert "model m0002" in again.stdout and "propensities" not in again.stderr
    shown = json.loads(run_cli(home, "models", "show", "m0002").stdout)
    assert shown["params"]["lambdarank_unbiased"] is True and shown["training"]["negatives"] == "examined"
    assert shown["training"]["fingerprint"] != training["fingerprint"]
