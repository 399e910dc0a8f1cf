"""Live click simulation (`ltr-search simulate --dataset --split`): simulated users search the real
query service (in process through a TestClient, and through a real uvicorn server), click on the
pages they get and post events; the event store must hold exactly what the service acknowledged.

The index is BM25-only (`--no-dense`) so the module needs no encoder export and stays fast; the
loop under test does not depend on the first stage."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from eval.click_models import UserBehaviour, simulate_page_clicks
from eval.simulate import SimulationError, SimulationReport, SimulationSettings, _post, run_sessions, session_plan
from search.event_store import EventStore
from search.app.cli import main as cli_main
from tests.conftest import SMALL_DOCS, running_service, write_jsonl

INDEX = "sim"
DOCS = SMALL_DOCS + [
    {"_id": "d7", "title": "Cat behaviour", "text": "Cats sleep most of the day and hunt mice at night."},
    {"_id": "d8", "title": "Feline health", "text": "Vets recommend vaccines for cats and kittens."},
    {"_id": "d9", "title": "Mice as pets", "text": "Pet mice are social animals and need company."},
]
QUERIES = {
    "q1": "cats and mice",
    "q2": "quantum entanglement",
    "q3": "dog training treats",
    "q4": "garden mint mice",
    "q5": "cats",
}
QRELS = [("q1", "d1", 2), ("q1", "d7", 1), ("q1", "d9", 1), ("q2", "d2", 2), ("q2", "d4", 2), ("q3", "d5", 2),
         ("q3", "d1", 0), ("q4", "d3", 2), ("q5", "d7", 2), ("q5", "d8", 1), ("q5", "d1", 1)]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("simulate-live")
    dataset = root / "toy"
    (dataset / "qrels").mkdir(parents=True)
    write_jsonl(dataset / "corpus.jsonl", DOCS)
    write_jsonl(dataset / "queries.jsonl", [{"_id": q, "text": t} for q, t in QUERIES.items()])
    (dataset / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in QRELS), encoding="utf-8")
    home = root / "home"
    assert cli_main(["--home", str(home), "index", "build", "--dataset", str(dataset), "--name", INDEX, "--no-dense", "--quiet"]) == 0
    config = root / "service.toml"
    config.write_text('default_pipeline = "bm25"\nrerank_window = 20\n[exploration]\nepsilon = 0.0\n')
    return {"root": root, "dataset": dataset, "home": home, "config": config,
            "store": home / "events" / f"{INDEX}.sqlite3"}


def simulate(world: dict, *args: str) -> int:
    return cli_main(["--home", str(world["home"]), "simulate", "--dataset", str(world["dataset"]), "--split", "test", *args])


def test_in_process_run_stores_exactly_what_it_sent(world, tmp_path, capsys):
    out = tmp_path / "report.json"
    status = simulate(world, "--sessions", "40", "--click-model", "pbm", "--name", INDEX, "--config", str(world["config"]),
                      "--seed", "3", "--quiet", "--json", str(out))
    printed = capsys.readouterr().out
    assert status == 0, printed
    report = json.loads(out.read_text())
    assert report["mode"] == "in-process" and report["sessions"] == 40 and report["searches"] == 40
    assert report["pipelines"] == {"bm25": 40}
    assert report["clicks"] > 0 and report["duplicates"] == 0
    store_counts = report["event_store"]
    assert report["events_sent"] == report["events_stored"] == store_counts["stored"] == store_counts["after"] - store_counts["before"]
    assert store_counts["missing"] == 0
    assert f"events sent {report['events_sent']:,}, stored {report['events_sent']:,}" in printed
    assert len(report["ctr_by_position"]) == 10

    # Every event of this run is in the store, on a document the service showed at that position.
    prefix = report["id_prefix"]
    with EventStore(world["store"]) as store:
        requests = {r.request_id: r for r in store.iter_requests() if (r.session_id or "").startswith(prefix)}
        assert len(requests) == 40
        assert sorted(r.query for r in requests.values()) == sorted(list(QUERIES.values()) * 8)  # 40 = 8 rounds of 5 queries
        events = [e for e in store.iter_events() if e.request_id in requests]
    assert len(events) == report["events_sent"]
    impressions = {(e.request_id, e.doc_id, e.position) for e in events if e.type == "impression"}
    clicks = [(e.request_id, e.doc_id, e.position) for e in events if e.type == "click"]
    assert len(clicks) == report["clicks"]
    for request_id, doc_id, position in clicks:
        assert (request_id, doc_id, position) in impressions
        shown = {(r.doc_id, r.position) for r in requests[request_id].results}
        assert (doc_id, position) in shown
    assert len({e.event_id for e in events}) == len(events)  # every event has its own id
    assert all(e.event_id and e.event_id.startswith(e.request_id) for e in events)


def test_same_seed_same_clicks(world):
    from fastapi.testclient import TestClient

    from eval.datasets import load_dataset
    from search.app.config import load_service_config
    from search.app.service import create_app

    dataset = load_dataset(world["dataset"], "test")
    config = load_service_config(world["home"], world["config"], {"index": INDEX})

    def clicks(model: str, seed: int) -> list[tuple[str, tuple[str, ...], tuple[int, ...]]]:
        settings = SimulationSettings(sessions=25, seed=seed, id_prefix=f"det-{seed}", record_pages=True)
        with TestClient(create_app(config)) as client:
            report = run_sessions(client, dataset.queries, dataset.qrels, UserBehaviour(model), settings)
        assert report.events_stored == report.events_sent
        return [(p.query_id, p.doc_ids, p.clicked) for p in report.pages]

    first = clicks("dbn", 7)
    assert first == clicks("dbn", 7)
    assert sum(len(c) for _, _, c in first) > 0
    assert first != clicks("dbn", 8)


def test_exploration_override_in_process(world, tmp_path, capsys):
    out = tmp_path / "explore.json"
    assert simulate(world, "--sessions", "5", "--model", "pbm", "--name", INDEX, "--config", str(world["config"]),
                    "--exploration", "1.0", "--depth", "4", "--quiet", "--json", str(out)) == 0
    report = json.loads(out.read_text())
    assert report["explored"] > 0 and report["events_sent"] == report["event_store"]["stored"]
    capsys.readouterr()


def test_failures_stop_with_the_reason(world, capsys):
    assert simulate(world, "--sessions", "3", "--model", "cascade", "--name", INDEX, "--pipeline", "nope", "--quiet") == 1
    error = capsys.readouterr().err
    assert "POST /search answered 400" in error and "pipeline 'nope'" in error
    assert simulate(world, "--model", "pbm", "--name", "no-such-index", "--quiet") == 1
    assert "not ready (503)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "x", "--split", "test", "--qrels", "q.tsv", "--run", "r.txt"], "--dataset, --split (live replay against the service) cannot be combined with --qrels, --run"),
        (["--sessions", "5", "--out", "e.jsonl"], "cannot be combined with --out"),
        ([], "choose a mode: --dataset PATH --split SPLIT"),
        (["--qrels", "q.tsv"], "offline simulation needs both --qrels and --run"),
        (["--dataset", "x", "--through-api", "http://127.0.0.1:1", "--exploration", "0.1"], "--exploration apply in process"),
        (["--dataset", "x", "--events-db", "e.sqlite3"], "--events-db and --timeout go with --through-api"),
    ],
)
def test_mixed_or_missing_modes_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["simulate", "--click-model", "pbm", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_through_a_real_server(world, tmp_path, capsys):
    out = tmp_path / "api.json"
    with running_service(world["home"], "--name", INDEX, "--config", str(world["config"]), "--threads", "1") as (url, _):
        status = cli_main(["simulate", "--dataset", str(world["dataset"]), "--split", "test", "--sessions", "15",
                           "--click-model", "dbn", "--through-api", url, "--events-db", str(world["store"]),
                           "--quiet", "--json", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    report = json.loads(out.read_text())
    assert report["mode"] == "through-api" and report["sessions"] == 15 and report["pipelines"] == {"bm25": 15}
    assert report["events_sent"] == report["events_stored"] == report["event_store"]["stored"] > 0
    with EventStore(world["store"]) as store:
        ids = {r.request_id for r in store.iter_requests() if (r.session_id or "").startswith(report["id_prefix"])}
        stored = [e for e in store.iter_events() if e.request_id in ids]
    assert len(ids) == 15 and len(stored) == report["events_sent"]


# ---------------------------------------------------------------------------------------------
# The pieces, without a service


def test_session_plan_is_round_robin_over_a_seeded_shuffle():
    plan = session_plan(["a", "b", "c"], 9, seed=1)
    assert sorted(plan) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert plan[:3] == plan[3:6] == plan[6:] and plan == session_plan(["a", "b", "c"], 9, seed=1)
    assert {tuple(session_plan(["a", "b", "c"], 3, seed=s)) for s in range(20)} != {tuple(plan[:3])}


def test_page_clicks_follow_the_behaviour():
    rng = np.random.default_rng(0)
    never = UserBehaviour("pbm", click_probs={0: 0.0, 1: 0.0, 2: 0.0})
    assert not simulate_page_clicks(never, [2, 1, 0], rng).any()
    always = UserBehaviour("pbm", click_probs={0: 1.0, 1: 1.0, 2: 1.0}, examination=[1.0] * 3)
    assert simulate_page_clicks(always, [0, 0, 0], rng).all()
    for _ in range(50):
        assert simulate_page_clicks("cascade", [2, 2, 1, 0], rng, max_grade=2).sum() <= 1
    assert simulate_page_clicks("dbn", [], rng).shape == (0,)


class FlakyClient:
    """Fails the first `failures` posts (connection error, then 503), then answers `final`."""

    def __init__(self, failures: int, final: httpx.Response):
        self.failures, self.final, self.calls = failures, final, 0

    def post(self, url: str, *, json=None) -> httpx.Response:
        self.calls += 1
        if self.calls <= self.failures:
            if self.calls % 2:
                raise httpx.ConnectError("connection refused")
            return httpx.Response(503, json={"error": {"code": "not_ready", "message": "loading", "details": []}})
        return self.final

    def get(self, url: str) -> httpx.Response:
        return httpx.Response(200, json={"ready": True})


def test_posts_retry_transient_failures_but_not_4xx():
    settings = SimulationSettings(sessions=1, retries=3, backoff_s=0.0)
    report = SimulationReport()
    client = FlakyClient(3, httpx.Response(200, json={"stored": 1, "duplicates": 0}))
    assert _post(client, "/events", {}, settings, report, "events") == {"stored": 1, "duplicates": 0}
    assert client.calls == 4 and report.retries == 3
    with pytest.raises(SimulationError, match="failed after 4 attempts; last: 503: loading"):
        _post(FlakyClient(9, httpx.Response(200, json={})), "/events", {}, settings, SimulationReport(), "events")
    refused = httpx.Response(422, json={"error": {"code": "invalid_events", "message": "1 problem(s)",
                                                  "details": [{"field": "events[0].position", "reason": "not shown"}]}})
    with pytest.raises(SimulationError, match=r"answered 422: 1 problem\(s\) \(events\[0\].position: not shown\)"):
        _post(FlakyClient(0, refused), "/events", {}, settings, SimulationReport(), "events")
