"""The behaviour loop end to end: shuffled exploration, propensities from randomised pages, the
service keeping aggregates and drift current, `behaviour status|rebuild`, training on behaviour."""
from __future__ import annotations

import json
import time

import httpx
import pytest
import numpy as np

from ltr.behaviour import MIN_RANDOMISED_PAGES, BehaviourStore
from indexing.home import behaviour_store_path
from search.event_store import Event, EventStore, ServedRequest, ServedResult
from ltr.registry import ModelRegistry
from search.rules import request_rng, shuffle_page
from eval.propensity import fit_propensities
from tests.conftest import run_cli, running_service
from tests.test_ltr import trained  # noqa: F401 - the module-scoped trained home (a model promoted)


def test_shuffle_page_propensities_and_replay():
    order = np.arange(30)
    explored = [shuffle_page(order, request_rng(f"r{i}", 0), 0.5, 0, 10) for i in range(400)]
    assert 150 < sum(e.explored for e in explored) < 250  # epsilon 0.5 of requests
    for e in explored:
        assert sorted(e.order[:10].tolist()) == list(range(10)) and (e.order[10:] == order[10:]).all()
        stay, move = 0.5 + 0.05, 0.05
        expected = np.where(e.order[:10] == order[:10], stay, move) if e.explored else np.full(10, stay)
        np.testing.assert_allclose(e.propensities[:10], expected)
        assert (e.propensities[10:] == 1.0).all()
    again = shuffle_page(order, request_rng("r7", 0), 0.5, 0, 10)
    assert (again.order == explored[7].order).all()  # reproducible from the request id
    assert not shuffle_page(order, request_rng("x", 0), 0.0, 0, 10).explored


def test_propensities_from_shuffled_pages_recover_the_examination_curve(tmp_path):
    rng = np.random.default_rng(3)
    examination = 1.0 / np.arange(1, 11)
    events = EventStore(tmp_path / "events.sqlite3")
    attractiveness = {f"d{i}": a for i, a in enumerate(rng.uniform(0.05, 0.9, 40))}
    now = time.time() - 3600
    requests, clicks = [], []
    for k in range(1500):  # every page shuffled: position is independent of the document
        docs = rng.choice(list(attractiveness), 10, replace=False)
        request_id = f"r{k}"
        results = [ServedResult(str(d), p, 1.0, 0.1 if p % 2 else 0.55) for p, d in enumerate(docs, start=1)]
        requests.append(ServedRequest(request_id, now, f"q{k % 50}", "ltr", "i", "g", None, None, None, 0, results))
        for p, d in enumerate(docs, start=1):
            if rng.random() < examination[p - 1] * attractiveness[str(d)]:
                clicks.append(Event(request_id, "click", str(d), p, now + 1))
    events.log_requests(requests)
    for i in range(0, len(clicks), 1000):
        events.append_events(clicks[i:i + 1000])
    store = BehaviourStore(tmp_path / "behaviour.sqlite3")
    fit = fit_propensities(store, events, max_position=10)
    assert fit.method == "randomised" and fit.randomised_pages == 1500 >= MIN_RANDOMISED_PAGES
    assert np.mean(np.abs(np.array(fit.propensities) - examination)) < 0.03
    assert store.propensities() == fit.propensities


def test_the_loop_through_the_http_api(trained, tmp_path):  # noqa: F811
    home, dataset = trained["home"], trained["dataset"]
    config = tmp_path / "service.toml"
    config.write_text(trained["config"].read_text().replace("epsilon = 0.0", 'epsilon = 0.5\nmode = "shuffle"'))
    events_db = home / "events" / "topics.sqlite3"
    with running_service(home, "--name", "topics", "--config", str(config)) as (url, _):
        result = run_cli(home, "simulate", "--dataset", str(dataset), "--split", "train", "--sessions", "72",
                         "--click-model", "pbm", "--noise", "0.1", "--through-api", url, "--events-db", str(events_db),
                         "--quiet")
        assert "events sent" in result.stdout
        metrics = httpx.get(f"{url}/metrics").text
    stored = EventStore(events_db)
    assert sum(stored.count_events().values()) > 72  # impressions and clicks of every session
    assert 'ltr_search_feature_psi{feature="bm25_all"}' in metrics and "ltr_search_score_psi" in metrics
    # the service applied every stored event to the aggregates as it arrived
    with BehaviourStore(behaviour_store_path(home, "topics")) as aggregates:
        assert aggregates.watermark == stored.last_event_seq()
        assert aggregates.status()["clicks"] == stored.count_events()["click"] > 0
    status = json.loads(run_cli(home, "behaviour", "status", "--name", "topics", "--json").stdout)
    assert status["lag_events"] == 0 and status["impressions"] > 0
    assert status["drift"]["model"] == "m0001" and status["drift"]["report"]["rows"] > 0
    rebuilt = run_cli(home, "behaviour", "rebuild", "--name", "topics").stdout
    assert "propensities fitted" in rebuilt and "rebuilt from" in rebuilt

    # behaviour features: trained point in time on the logged history, served from the live store
    result = run_cli(home, "train", "--dataset", str(dataset), "--split", "train", "--config", str(config),
                     "--feature-set", "text+behaviour", "--valid-fraction", "0.25")
    # staged: a text model (m0002) first, then behaviour trees on top of it (m0003)
    assert "point in time" in result.stderr and "model m0003" in result.stdout
    assert "behaviour stage on text model m0002" in result.stdout
    manifest = ModelRegistry(home).manifest("m0003")
    assert manifest.feature_set["name"] == "text+behaviour" and manifest.reference is not None
    assert manifest.base_model["version"] == "m0002" and ModelRegistry(home).manifest("m0002").feature_set["name"] == "text"
    assert manifest.training["queries"] == 24 < manifest.training["row_groups"]  # cold + served moments per query
    again = run_cli(home, "train", "--dataset", str(dataset), "--split", "train", "--config", str(config),
                    "--feature-set", "text+behaviour", "--base-model", "m0002")  # on a stored text model
    assert "behaviour stage on text model m0002" in again.stdout and "model m0004" in again.stdout
    assert ModelRegistry(home).manifest("m0004").base_model["version"] == "m0002"
    run_cli(home, "models", "delete", "m0004")
    run_cli(home, "models", "promote", "m0003", "--force")
    with running_service(home, "--name", "topics", "--config", str(config)) as (url, _):
        page = httpx.post(f"{url}/search", json={"query": "volcano lava eruption", "explain": True}).json()
    assert page["model_version"] == "m0003"
    stages = page["results"][0]["explain"]["stages"]  # the score by stage: fusion margin, text model, behaviour trees
    assert set(stages) == {"fusion", "text", "behaviour"}
    assert sum(stages.values()) == pytest.approx(page["results"][0]["score"], abs=1e-3)
    features = page["results"][0]["explain"]["features"]
    assert features["qd_impressions"] > 0  # the query was searched in the simulated sessions
    run_cli(home, "models", "rollback")
