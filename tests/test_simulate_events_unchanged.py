"""The in-process simulator's speed-ups must not change what it logs: for one seed, the CLI run
(batched durable writes) stores the same sessions, pages and clicks as the original path (the app
with its own per-commit event store), and both match the stream recorded from the code before the
speed-ups (a hash, so the fixture stays one line). Exploration is off: with it on, each page's
swaps are seeded by a random request id, so pages differ between runs by design."""
from __future__ import annotations

import hashlib
import json

from eval.click_models import UserBehaviour
from eval.simulate import SimulationSettings, run_sessions
from ltr.behaviour import BehaviourStore
from search.event_store import EventStore
from tests.test_simulate_live import INDEX, simulate, world  # noqa: F401 (the module's index fixture)

# sha256 of the canonical stream below for pbm users, seed 11, 30 sessions, recorded on main at c89bc6c
RECORDED_SHA256 = "be236db3439df0ac339e652aab59eac6ce3e6174e3ed55557db3f1eb1848f9c0"


def _stream(store_path, prefix: str) -> list[list]:
    """Per session in session order: query, then (type, doc, position) of every stored event."""
    with EventStore(store_path) as store:
        requests = {r.request_id: r for r in store.iter_requests() if (r.session_id or "").startswith(prefix + "-")}
        events: dict[str, list] = {rid: [] for rid in requests}
        for event in store.iter_events():
            if event.request_id in events:
                events[event.request_id].append((event.type, event.doc_id, event.position))
    ordered = sorted(requests.values(), key=lambda r: r.session_id)
    return [[r.query, [[x.doc_id, x.position] for x in r.results], sorted(events[r.request_id])] for r in ordered]


def _digest(stream: list[list]) -> str:
    return hashlib.sha256(json.dumps(stream, sort_keys=True).encode()).hexdigest()


def test_cli_run_logs_the_same_stream_as_the_per_commit_path(world, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from eval.datasets import load_dataset
    from search.app.config import load_service_config
    from search.app.service import create_app

    behaviour = UserBehaviour("pbm", eta=1.0, click_probs={0: 0.05, 1: 0.95, 2: 0.95}, noise=0.1)
    dataset = load_dataset(world["dataset"], "test")
    config = load_service_config(world["home"], world["config"], {"index": INDEX})
    settings = SimulationSettings(sessions=30, seed=11, id_prefix="orig-11", max_grade=2)
    with TestClient(create_app(config)) as client:  # the app's own store: an fsync per commit
        run_sessions(client, dataset.queries, dataset.qrels, behaviour, settings)
    original = _stream(world["store"], "orig-11")

    out = tmp_path / "run.json"
    assert simulate(world, "--sessions", "30", "--click-model", "pbm", "--eta", "1", "--click-probs", "0:0.05,1:0.95,2:0.95",
                    "--noise", "0.1", "--name", INDEX, "--config", str(world["config"]), "--seed", "11", "--quiet",
                    "--json", str(out)) == 0
    capsys.readouterr()
    report = json.loads(out.read_text())
    assert report["event_store"]["missing"] == 0 and report["events_stored"] == report["events_sent"]
    batched = _stream(world["store"], report["id_prefix"])

    assert len(original) == 30 and sum(len(s[2]) for s in original) > 100  # impressions and some clicks
    assert batched == original
    with BehaviourStore(world["home"] / "behaviour" / f"{INDEX}.sqlite3") as aggregates, EventStore(world["store"]) as store:
        incremental = aggregates.dump()  # as the runs left them (the CLI's store without an fsync per update)
        aggregates.rebuild(store)
        assert aggregates.dump() == incremental
    assert _digest(original) == RECORDED_SHA256
