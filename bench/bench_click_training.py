"""A ranker trained from clicks alone, measured with the protocol of issue 16, end to end through
the CLI as a user runs it (no qrels are read by training):

    ltr-search simulate --dataset D --split train --sessions N --click-model M --pipeline hybrid-convex \\
        --exploration 0.1 --eta 1 --click-probs 0:0.05,1:0.95,2:0.95 --noise 0.1 --seed S
    ltr-search train --from-events                  (defaults)
    ltr-search eval --dataset D --split test --pipeline hybrid-convex,model:latest --json F

The logging policy is fixed and `simulate` deals sessions round-robin over a seeded shuffle of the
train queries, so the first k x |queries| sessions of one run with the largest k are exactly a run
with k sessions per query: one simulation gives every point of the curve. Each smaller point is
trained in a home of its own whose event store holds only that prefix (and whose behaviour
aggregates are built from it), so no document click feature sees a later session. Each point: nDCG@10 of the click-trained model and of
hybrid-convex on the test split, the paired difference with its 95% CI and Holm-corrected
p-values (the eval's own significance block), the off-policy estimate train printed, and wall
times. The machine is shared: times are indicative; the figures that matter are the nDCG pairs,
measured on the same test queries back to back.

    python bench/bench_click_training.py --base-home /tmp/genbench_home --dataset scifact \\
        --sessions-per-query 1 5 20 --click-model pbm --work /tmp/ct16/bench --out bench/results/bench_click_training.json
    python bench/bench_click_training.py ... --merge bench/results/bench_click_training.json   # add runs
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("LTR_SEARCH_DATASETS", ROOT.parent / "shared" / "datasets"))
CLICK_PROBS = "0:0.05,1:0.95,2:0.95"


def cli(home: Path, *args: str, log: Path | None = None) -> subprocess.CompletedProcess:
    started = time.perf_counter()
    result = subprocess.run([str(ROOT / ".venv" / "bin" / "ltr-search"), *args], capture_output=True, text=True,
                            env={**os.environ, "LTR_SEARCH_HOME": str(home)}, cwd=ROOT)
    result.wall_s = time.perf_counter() - started  # type: ignore[attr-defined]
    if log is not None:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"$ ltr-search {' '.join(args)}  ({result.wall_s:.0f} s, exit {result.returncode})\n"
                         f"{result.stdout}\n{result.stderr[-4000:]}\n")
    if result.returncode != 0:
        raise RuntimeError(f"ltr-search {' '.join(args)} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


def fresh_home(base: Path, work: Path, name: str) -> Path:
    """A copy of the base home's index and encoder (no events, no models): runs never share state."""
    home = work / name / "home"
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    for part in ("indexes", "encoders"):
        if (base / part).exists():
            shutil.copytree(base / part, home / part)
    return home


def train_queries(dataset: Path) -> int:
    lines = (dataset / "qrels" / "train.tsv").read_text().splitlines()[1:]
    return len({line.split("\t")[0] for line in lines if line.strip()})


def prefix_end(events: Path, sessions: int) -> float | None:
    """Timestamp just after the first `sessions` logged requests (None: the whole log)."""
    connection = sqlite3.connect(f"file:{events}?mode=ro", uri=True)
    try:
        row = connection.execute("SELECT timestamp FROM requests ORDER BY timestamp, seq LIMIT 1 OFFSET ?",
                                 (sessions,)).fetchone()
    finally:
        connection.close()
    return None if row is None else float(row[0])


def prefix_home(home: Path, target: Path, until: float) -> Path:
    """A home sharing `home`'s index and encoder whose event store holds only the requests logged
    before `until` (and their events); no behaviour aggregates, no models."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for part in ("indexes", "encoders"):
        if (home / part).exists():
            (target / part).symlink_to((home / part).resolve(), target_is_directory=True)
    (target / "events").mkdir()
    for events in (home / "events").glob("*.sqlite3"):
        copy = target / "events" / events.name
        source = sqlite3.connect(f"file:{events}?mode=ro", uri=True)
        try:
            source.backup(sqlite3.connect(copy))
        finally:
            source.close()
        connection = sqlite3.connect(copy)
        try:
            with connection:
                late = "SELECT seq FROM requests WHERE timestamp >= ?"
                connection.execute(f"DELETE FROM events WHERE request_seq IN ({late})", (until,))
                connection.execute(f"DELETE FROM request_results WHERE request_seq IN ({late})", (until,))
                connection.execute("DELETE FROM requests WHERE timestamp >= ?", (until,))
        finally:
            connection.close()
    return target


def point(home: Path, dataset: Path, log: Path, out: Path) -> dict[str, Any]:
    try:
        trained = cli(home, "train", "--from-events", "--quiet", log=log)
    except RuntimeError as exc:  # too thin a log: nothing is trained, the logging policy stays
        if "too little click evidence" not in str(exc):
            raise
        cli(home, "eval", "--dataset", str(dataset), "--split", "test", "--pipeline", "hybrid-convex", "--json", str(out),
            "--quiet", log=log)
        pipes = json.loads(out.read_text())["pipelines"]
        return {"model": None, "not_trained": str(exc).split("ltr-search: error: ")[-1].strip(),
                "ndcg@10": {"hybrid-convex": pipes["hybrid-convex"]["metrics"]["nDCG@10"]}}
    estimate = next((line for line in trained.stdout.splitlines() if line.startswith("off-policy estimate")), None)
    model = next((line.split(":")[0].split()[1] for line in trained.stdout.splitlines() if line.startswith("model m")), None)
    evaluated = cli(home, "eval", "--dataset", str(dataset), "--split", "test", "--pipeline", "hybrid-convex,model:latest",
                    "--json", str(out), "--quiet", log=log)
    payload = json.loads(out.read_text())
    pipes = payload["pipelines"]
    comparison = payload["significance"]["comparisons"]["model:latest"]["nDCG@10"]
    return {
        "model": model, "off_policy": estimate,
        "ndcg@10": {name: pipes[name]["metrics"]["nDCG@10"] for name in pipes},
        "ci95": {name: pipes[name]["ci95"]["nDCG@10"] for name in pipes},
        "vs_hybrid_convex": comparison,
        "train_s": round(trained.wall_s, 1), "eval_s": round(evaluated.wall_s, 1),  # type: ignore[attr-defined]
    }


def run_curve(args: argparse.Namespace) -> dict[str, Any]:
    dataset = DATASETS / args.dataset
    work = Path(args.work)
    name = f"{args.dataset}-{args.click_model}-s{args.seed}"
    home = work / name / "home" if args.reuse_simulation else fresh_home(Path(args.base_home), work, name)
    log = work / name / "commands.log"
    n_queries = train_queries(dataset)
    biggest = max(args.sessions_per_query)
    simulate = ["simulate", "--dataset", str(dataset), "--split", "train", "--sessions", str(biggest * n_queries),
                "--click-model", args.click_model, "--pipeline", "hybrid-convex", "--exploration", "0.1", "--eta", "1",
                "--click-probs", CLICK_PROBS, "--noise", "0.1", "--seed", str(args.seed), "--quiet"]
    stored = list((home / "events").glob("*.sqlite3"))
    if args.reuse_simulation and stored and prefix_end(stored[0], biggest * n_queries - 1) is not None:
        simulated = None  # the log of an earlier run of this command (the same arguments)
    else:
        simulated = cli(home, *simulate, log=log)
    events = next(iter((home / "events").glob("*.sqlite3")))
    points = {}
    for k in sorted(args.sessions_per_query):
        until = prefix_end(events, k * n_queries)  # None: the log holds no more than k per query (a reused longer log is cut)
        where = home if until is None else prefix_home(home, work / name / f"prefix-{k}", until)
        points[str(k)] = point(where, dataset, log, work / name / f"eval-{k}.json")
        print(f"{args.dataset} {args.click_model} {k}/query: {json.dumps(points[str(k)]['ndcg@10'])} "
              f"diff {points[str(k)].get('vs_hybrid_convex', points[str(k)].get('not_trained'))}", file=sys.stderr)
    return {"dataset": args.dataset, "click_model": args.click_model, "seed": args.seed, "train_queries": n_queries,
            "simulate": " ".join(simulate),
            "simulate_s": None if simulated is None else round(simulated.wall_s, 1),  # type: ignore[attr-defined]
            "points": points}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-home", required=True, help="a home with the dataset's index (dense vectors)")
    parser.add_argument("--dataset", default="scifact")
    parser.add_argument("--sessions-per-query", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--click-model", default="pbm", choices=["pbm", "cascade", "dbn"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", default="/tmp/bench_click_training")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_click_training.json"))
    parser.add_argument("--merge", action="store_true", help="add to the runs already in --out")
    parser.add_argument("--reuse-simulation", action="store_true",
                        help="train and evaluate again on the log an earlier run left in --work (no new simulation)")
    args = parser.parse_args()
    out = Path(args.out)
    # --merge adds a run and keeps everything else the file holds (its protocol, earlier defaults' runs)
    report = json.loads(out.read_text()) if args.merge and out.exists() else {"protocol": "issue 16 (see the module docstring)"}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    report.setdefault("runs", []).append(
        {**run_curve(args), "commit": commit, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"json: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
