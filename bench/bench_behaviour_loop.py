"""The behaviour loop on SciFact, end to end: simulated traffic -> events -> aggregates ->
point-in-time behaviour features -> `text+behaviour` LambdaMART, against text-only.

    .venv/bin/python bench/bench_behaviour_loop.py [--levels 1,5,20,100] [--source-home .ltr-search]

What it does, in a fresh experiment home (a copy of the source home's `scifact` index, encoder
and active text model, which serves the traffic):
1. Cold start: with zero events, `ltr:text+behaviour` (trained on train) against the active
   text-only model on the test split.
2. For each history level N (sessions per query): simulated users (PBM, examination 1/rank,
   noise 0.1, exploration epsilon 0.1) search every train and test query until each has N
   sessions; propensities are refitted on the request log (PBM EM) and the aggregates rebuilt;
   `ltr:text+behaviour` is retrained on the TRAIN queries (labels from train qrels, behaviour
   features point in time) and evaluated on the TEST queries with the behaviour known now,
   against the same text-only model. The clicks on test queries come from the simulator, whose
   ground truth is the test qrels: that is the proxy for real users the issue asks for.
   Also printed: the fitted propensities' mean absolute error against the simulator's 1/rank.

Traffic is replayed through the service's own pieces, in process: `ServingState` builds the
pipelines exactly as `ltr-search serve` does, each session runs `RankingPipeline.run` (request id,
exploration, page) and is logged with `served_request`; clicks come from
`eval.click_models.simulate_page_clicks`; events go to the event store and the aggregates are
updated after each batch, as the service does after each POST /events. What differs from the
HTTP path: SQLite commits are batched (500 sessions per transaction) and events carry the
replay's clock. The HTTP path itself is measured by `ltr-search simulate --through-api`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval.click_models import UserBehaviour, simulate_page_clicks  # noqa: E402
from eval.datasets import load_dataset  # noqa: E402
from eval.experiment import ExperimentSettings, run_experiment  # noqa: E402
from eval.simulate import session_plan  # noqa: E402
from search.app.pipelines import pipeline_spec  # noqa: E402
from ltr.behaviour import BehaviourStore  # noqa: E402
from search.event_store import Event, EventStore  # noqa: E402
from ltr.point_in_time import behaviour_sources  # noqa: E402
from ltr.registry import ModelRegistry  # noqa: E402
from search.app.config import ExplorationSettings, ServiceConfig  # noqa: E402
from search.embedded import EmbeddedIndex  # noqa: E402
from search.ranking import RankingRequest, served_request  # noqa: E402
from search.app.service import ServingState  # noqa: E402
from eval.propensity import fit_propensities  # noqa: E402

INDEX = "scifact"
DATASET = ROOT.parent / "shared" / "datasets" / "scifact"
RESULTS = ROOT / "bench" / "results"
BATCH_SESSIONS = 500
PAGE = 10


def make_home(source: Path, home: Path) -> str:
    """A fresh home with the source's index, encoder and active model (which serves the traffic)."""
    if home.exists():
        shutil.rmtree(home)
    (home / "indexes").mkdir(parents=True)
    shutil.copytree(source / "indexes" / INDEX, home / "indexes" / INDEX)
    shutil.copytree(source / "encoders", home / "encoders")
    active = ModelRegistry(source).active()
    if active is None:
        raise SystemExit(f"{source} has no active model: train and promote a text model first (make demo does)")
    shutil.copytree(source / "models" / active, home / "models" / active)
    ModelRegistry(home).promote(active)
    return active


def replay(state: ServingState, events: EventStore, behaviour: BehaviourStore, queries: dict[str, str],
           grades: dict[str, dict[str, int]], user: UserBehaviour, sessions: int, seed: int, prefix: str) -> dict[str, float]:
    snapshot = state.require()
    name = snapshot.default_pipeline
    pipeline = snapshot.pipelines[name]
    plan = session_plan(list(queries), sessions, seed)
    max_grade = max((g for docs in grades.values() for g in docs.values()), default=1)
    started = time.perf_counter()
    clicks = impressions = 0
    for start in range(0, len(plan), BATCH_SESSIONS):
        records, batch = [], []
        for k in range(start, min(start + BATCH_SESSIONS, len(plan))):
            query_id = plan[k]
            request = RankingRequest(query=queries[query_id], request_id=f"{prefix}-{k:07d}", size=PAGE)
            outcome = pipeline.run(request)
            now = time.time()
            records.append(served_request(outcome, request, name, snapshot.index, now, f"{prefix}-u{k}", f"{prefix}-s{k}"))
            judged = grades.get(query_id, {})
            docs = [r.doc_id for r in outcome.results]
            clicked = simulate_page_clicks(user, [judged.get(d, 0) for d in docs], np.random.default_rng([seed, k]), max_grade)
            for r, c in zip(outcome.results, clicked.tolist()):
                batch.append(Event(request.request_id, "impression", r.doc_id, r.position, now))
                if c:
                    batch.append(Event(request.request_id, "click", r.doc_id, r.position, now))
                    clicks += 1
            impressions += len(docs)
        events.log_requests(records)
        for i in range(0, len(batch), 1000):
            events.append_events(batch[i:i + 1000])
        behaviour.update(events)  # what the service does after each POST /events
    seconds = time.perf_counter() - started
    return {"sessions": len(plan), "impressions": impressions, "clicks": clicks, "seconds": seconds,
            "sessions_per_s": len(plan) / seconds if seconds else float("nan")}


def serving_loop(home: Path, epsilon: float, mode: str) -> tuple[ServingState, EventStore, BehaviourStore]:
    """The service's state over `home` (its active model serves), and the event store and
    behaviour aggregates a replay writes to."""
    config = ServiceConfig(home=home, index=INDEX, exploration=ExplorationSettings(epsilon=epsilon, mode=mode))
    state = ServingState(config)
    state.reload()
    events_path, behaviour_path = behaviour_sources(home, INDEX)
    events_path.parent.mkdir(parents=True, exist_ok=True)
    behaviour_path.parent.mkdir(parents=True, exist_ok=True)
    return state, EventStore(events_path), BehaviourStore(behaviour_path)


def snapshot_train_clicks(events_path: Path, target: Path, test_queries: list[str]) -> None:
    """A copy of the event store (SQLite backup API) with every request of a TEST query, its
    results and its events deleted: training from clicks must never see test-query clicks."""
    import sqlite3

    target.unlink(missing_ok=True)
    with sqlite3.connect(events_path) as source, sqlite3.connect(target) as copy:
        source.backup(copy)
    copy = sqlite3.connect(target)
    with copy:
        copy.execute("CREATE TEMP TABLE test_queries (query TEXT PRIMARY KEY)")
        copy.executemany("INSERT OR IGNORE INTO test_queries VALUES (?)", [(q,) for q in test_queries])
        doomed = "SELECT seq FROM requests WHERE query IN (SELECT query FROM test_queries)"
        copy.execute(f"DELETE FROM events WHERE request_seq IN ({doomed})")
        copy.execute(f"DELETE FROM request_results WHERE request_seq IN ({doomed})")
        removed = copy.execute("DELETE FROM requests WHERE query IN (SELECT query FROM test_queries)").rowcount
    left = copy.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
    copy.close()
    print(f"train-query click log copied to {target}: {left} requests kept, {removed} test-query requests removed", flush=True)


def evaluate(home: Path, test, train, label: str, runs: Path) -> dict[str, object]:
    index = EmbeddedIndex.open(home, INDEX)
    settings = ExperimentSettings(pipelines=["model:active", "ltr:text+behaviour"], baseline="model:active")
    started = time.perf_counter()
    result = run_experiment(index, test, settings, runs / label, catalog=pipeline_spec, train=train,
                            log=lambda m: print(f"  {m}", flush=True))
    data = result.to_json()
    text = data["pipelines"]["model:active"]["metrics"]["nDCG@10"]
    both = data["pipelines"]["ltr:text+behaviour"]["metrics"]["nDCG@10"]
    comparison = data["significance"]["comparisons"]["ltr:text+behaviour"]["nDCG@10"]
    out = {"text nDCG@10": text, "text+behaviour nDCG@10": both, "difference": both - text,
           "comparison": comparison,
           "fitted": data["pipelines"]["ltr:text+behaviour"]["fitted"], "seconds": time.perf_counter() - started}
    print(f"[{label}] text {text:.4f}  text+behaviour {both:.4f}  difference {both - text:+.4f}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source-home", default=str(ROOT / ".ltr-search"))
    parser.add_argument("--home", default=str(RESULTS / "behaviour-loop-home"))
    parser.add_argument("--levels", default="1,5,20,100", help="sessions per query, cumulative")
    parser.add_argument("--exploration", type=float, default=0.1)
    parser.add_argument("--exploration-mode", default="shuffle", choices=["shuffle", "swap"])
    parser.add_argument("--clicks-snapshot-level", type=int, default=20,
                        help="copy the event store when the TRAIN queries reach this level (before any test traffic "
                             "of that level), for training from clicks without test-query clicks")
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-cold", action="store_true")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    home = Path(args.home)
    model = make_home(Path(args.source_home), home)
    test, train = load_dataset(DATASET, "test"), load_dataset(DATASET, "train")
    user = UserBehaviour(model="pbm", eta=args.eta, noise=args.noise)
    true_exam = user.examination_curve(PAGE)
    state, events, behaviour = serving_loop(home, args.exploration, args.exploration_mode)
    events_path = events.path
    runs = RESULTS / "behaviour-loop-runs"
    report: dict[str, object] = {
        "served_by": model, "simulator": {"model": "pbm", "examination": "1/rank**%g" % args.eta, "noise": args.noise,
                                          "click_probs": "0.05 + 0.9 * (2**g - 1) / (2**g_max - 1), then noise",
                                          "exploration_epsilon": args.exploration, "exploration_mode": args.exploration_mode,
                                          "page": PAGE},
        "levels": {},
    }
    print(f"serving {model}; simulator {report['simulator']}", flush=True)
    if not args.skip_cold:
        report["cold"] = evaluate(home, test, train, "cold", runs)
    done = 0
    for level in levels:
        traffic = {}
        for part, data in (("train", train), ("test", test)):
            traffic[part] = replay(state, events, behaviour, data.queries, data.qrels, user,
                                   (level - done) * len(data.queries), args.seed + level, f"{part}-l{level}")
            print(f"[{level}/query] {part}: {traffic[part]}", flush=True)
            if part == "train" and level == args.clicks_snapshot_level:
                snapshot_train_clicks(events_path, RESULTS / "behaviour-loop-train-clicks.sqlite3", list(test.queries.values()))
        fit = fit_propensities(behaviour, events, max_position=PAGE)
        behaviour.rebuild(events)
        mae = float(np.mean(np.abs(np.asarray(fit.propensities) - true_exam / true_exam[0])))
        print(f"[{level}/query] propensities ({fit.method}, {fit.randomised_pages} shuffled pages) "
              f"{np.round(fit.propensities, 3).tolist()} MAE vs 1/rank {mae:.4f}", flush=True)
        result = evaluate(home, test, train, f"level-{level}", runs)
        report["levels"][str(level)] = {"traffic": traffic, "propensities": fit.propensities, "propensity_mae": mae,
                                        "propensity_method": fit.method, "shuffled_pages": fit.randomised_pages,
                                        "events": events.count_events(), **result}
        done = level
        out = RESULTS / f"bench_behaviour_loop-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk in ("text nDCG@10", "text+behaviour nDCG@10", "difference",
                                                                   "propensity_mae")}
                      for k, v in report["levels"].items()}, indent=1))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
