"""Speed of the in-process click simulator (`ltr-search simulate --dataset D --split train`),
per-commit durable writes (the event store fsyncs every page and every event batch, the
behaviour aggregates every update, as before) against batched durable writes (no fsync per
commit, one checkpoint at the end: what the CLI now uses). Same app, same users, same seed; the two modes alternate, back to back, `--rounds`
times, so machine load hits both alike. Reports sessions/s for each run and their ratio.

    .venv/bin/python bench/bench_simulate.py --source-home H [--queries 50] [--sessions 400] [--rounds 2] [--disk-load]

H must hold a `scifact` index with dense vectors (hybrid-convex). The home is copied, so H is
never written. Each run first warms the app (one session per query: the query-vector cache and
the page cache) on an empty event store, then times `--sessions` sessions round-robin over `--queries` SciFact train
queries: the steady state of a long run, where every query has been seen before.

`--disk-load` repeats the comparison while a background process writes and fsyncs 1 MiB at a time
in the same file system, as another engineer's index build or bench would: an fsync then waits
behind the other writer's data, which is what made per-commit runs slow on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval.click_models import UserBehaviour  # noqa: E402
from eval.datasets import load_dataset  # noqa: E402
from eval.simulate import SimulationSettings, run_sessions  # noqa: E402
from indexing.home import behaviour_store_path  # noqa: E402
from ltr.behaviour import BehaviourStore  # noqa: E402
from search.app.config import load_service_config  # noqa: E402
from search.event_store import EventStore  # noqa: E402

DATASET = ROOT.parent / "shared" / "datasets" / "scifact"
RESULTS = ROOT / "bench" / "results"
BEHAVIOUR = UserBehaviour("pbm", eta=1.0, click_probs={0: 0.05, 1: 0.95, 2: 0.95}, noise=0.1)


def one_run(home: Path, durability: str, queries: dict[str, str], qrels: dict, sessions: int, seed: int, tag: str) -> dict:
    from fastapi.testclient import TestClient

    from search.app.service import create_app, limit_native_threads

    limit_native_threads()
    for derived in ("events", "behaviour"):  # every run starts from an empty event store and aggregates
        shutil.rmtree(home / derived, ignore_errors=True)
    config = load_service_config(home, None, {"index": "scifact"})
    config.event_store_path.parent.mkdir(parents=True, exist_ok=True)
    behaviour_path = behaviour_store_path(home, "scifact")
    behaviour_path.parent.mkdir(parents=True, exist_ok=True)
    synchronous = "FULL" if durability == "commit" else "NORMAL"  # as the CLI opens them
    with (EventStore(config.event_store_path, durability=durability) as store,  # type: ignore[arg-type]
          BehaviourStore(behaviour_path, synchronous=synchronous) as aggregates):
        with TestClient(create_app(config, event_store=store, behaviour_store=aggregates)) as client:
            warm = SimulationSettings(sessions=len(queries), seed=seed, pipeline="hybrid-convex", id_prefix=f"warm-{tag}",
                                      max_grade=2)
            run_sessions(client, queries, qrels, BEHAVIOUR, warm)
            settings = SimulationSettings(sessions=sessions, seed=seed, pipeline="hybrid-convex", id_prefix=f"bench-{tag}",
                                          max_grade=2)
            report = run_sessions(client, queries, qrels, BEHAVIOUR, settings)
        started = time.perf_counter()
    close_s = time.perf_counter() - started  # the final sync of a batched store
    wall = report.wall_s + close_s
    return {"durability": durability, "sessions": sessions, "events": report.events_stored, "wall_s": round(wall, 3),
            "sessions_per_s": round(sessions / wall, 2), "close_s": round(close_s, 4)}


DISK_WRITER = """
import os, sys
path = sys.argv[1]
block = os.urandom(1 << 20)
with open(path, "wb") as out:
    while True:
        for _ in range(64):
            out.write(block)
            out.flush()
            os.fsync(out.fileno())
        out.seek(0)
"""


def compare_modes(home: Path, args: argparse.Namespace, queries: dict[str, str], qrels: dict, label: str) -> list[dict]:
    runs = []
    for round_ in range(args.rounds):
        for durability in ("commit", "batched"):
            run = one_run(home, durability, queries, qrels, args.sessions, args.seed, f"{label}-{durability}-{round_}")
            run["disk_load"] = label == "disk-load"
            print(json.dumps(run), flush=True)
            runs.append(run)
    return runs


def summary(runs: list[dict]) -> dict:
    rate = {d: [r["sessions_per_s"] for r in runs if r["durability"] == d] for d in ("commit", "batched")}
    mean = {d: sum(v) / len(v) for d, v in rate.items()}
    return {"mean_sessions_per_s": {d: round(v, 2) for d, v in mean.items()},
            "speedup_batched_over_commit": round(mean["batched"] / mean["commit"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source-home", required=True, type=Path)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--sessions", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--disk-load", action="store_true", help="also compare under a concurrent fsync-heavy writer")
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_simulate.json")
    args = parser.parse_args()
    dataset = load_dataset(DATASET, "train")
    ids = sorted(dataset.queries)[: args.queries]
    queries = {q: dataset.queries[q] for q in ids}
    with tempfile.TemporaryDirectory(prefix="bench-simulate-") as tmp:
        home = Path(tmp) / "home"
        (home / "indexes").mkdir(parents=True)
        shutil.copytree(args.source_home / "indexes" / "scifact", home / "indexes" / "scifact", symlinks=True)
        shutil.copytree(args.source_home / "encoders", home / "encoders", symlinks=True)
        runs = compare_modes(home, args, queries, dataset.qrels, "as-is")
        result = {
            "what": "in-process simulate, SciFact train, hybrid-convex, PBM users (issue's click probs), exploration = service config",
            "queries": args.queries, "sessions_per_run": args.sessions, "rounds": args.rounds,
            "machine_load": os.getloadavg()[0], "runs": runs, **summary(runs),
            "note": "2-core machine shared with other work: absolute rates vary with load; the ratio is measured back to back",
        }
        if args.disk_load:
            writer = subprocess.Popen([sys.executable, "-c", DISK_WRITER, str(Path(tmp) / "disk-load.bin")])
            try:
                loaded = compare_modes(home, args, queries, dataset.qrels, "disk-load")
            finally:
                writer.kill()
                writer.wait()
            result["disk_load"] = {"runs": loaded, **summary(loaded)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("mean_sessions_per_s", "speedup_batched_over_commit")}))
    if args.disk_load:
        print("disk load:", json.dumps({k: result["disk_load"][k] for k in ("mean_sessions_per_s", "speedup_batched_over_commit")}))


if __name__ == "__main__":
    main()
