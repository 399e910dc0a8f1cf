"""The service's in-process path, `RankingPipeline.run` (window -> filters -> ranker -> rules -> page),
timed per request for hybrid, hybrid-convex and the active model (ltr) on SciFact test queries.

    .venv/bin/python bench/bench_ranking_pipeline.py --home /tmp/h4 --name scifact \
        --dataset ../shared/datasets/scifact [--peer-src /tmp/prev_src] [--out bench/results/bench_ranking_pipeline.json]

With `--peer-src DIR` (an older tree of this repository, e.g. `git archive REV | tar -x -C DIR`)
the same measurement runs on that code too, in alternating subprocesses (best of `--rounds`), so
the two are comparable on one machine at one time; the script prints the ratio per pipeline and checks that both returned
the same pages (ids and scores). Window 200, page size 10, no exploration; one run without rules
and one with an exclusion (the rule path that needs the window's ids). The ltr window cache is
cleared before each request so every request scores its window.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WINDOW, SIZE = 200, 10


def measure(home: Path, name: str, dataset: Path, limit: int) -> dict:
    from eval.datasets import load_dataset
    from ltr.ranker import registry_pipeline
    from search.embedded import EmbeddedIndex
    from search.hybrid import FusionSettings, HybridPipeline
    from search.ranking import RankingPipeline, RankingRequest

    index = EmbeddedIndex.open(home, name)
    queries = list(load_dataset(dataset, "test").queries.values())[:limit]
    learned = registry_pipeline(index, home, "active")
    first_stages = {
        "hybrid": HybridPipeline(index),
        "hybrid-convex": HybridPipeline(index, FusionSettings(method="convex"), name="hybrid-convex"),
        "ltr": learned,
    }
    report = {}
    for label, first_stage in first_stages.items():
        pipeline = RankingPipeline(index, first_stage, WINDOW)
        for rules, exclude in (("none", frozenset()), ("exclude", frozenset({"no-such-doc"}))):
            for query in queries[:5]:  # warm-up
                pipeline.run(RankingRequest(query, "warm", size=SIZE, exclude=exclude))
            latencies, digest = [], hashlib.sha256()
            for i, query in enumerate(queries):
                if hasattr(learned, "_cache"):
                    learned._cache.clear()
                started = time.perf_counter()
                outcome = pipeline.run(RankingRequest(query, f"r{i}", size=SIZE, exclude=exclude))
                latencies.append((time.perf_counter() - started) * 1000)
                digest.update(json.dumps([(r.doc_id, round(r.score, 6)) for r in outcome.results]).encode())
            values = np.array(latencies)
            report[f"{label}/{rules}"] = {"p50_ms": round(float(np.percentile(values, 50)), 3),
                                          "p95_ms": round(float(np.percentile(values, 95)), 3),
                                          "queries": len(values), "pages_sha256": digest.hexdigest()[:16]}
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--name", default="scifact")
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--peer-src", type=Path, help="an older tree of this repository to measure right after")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per side; the best p50 counts")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)  # the subprocess mode
    args = parser.parse_args()
    if args.raw:
        print(json.dumps(measure(args.home, args.name, args.dataset, args.limit)))
        return 0
    # Each side runs in its own subprocess, alternating (peer, ours, peer, ours, ...), and each
    # figure is the best p50/p95 over the rounds: the machine's drift hits both sides alike.
    sides = {"ours": Path(__file__).resolve().parents[1]}
    if args.peer_src:
        sides["peer"] = args.peer_src.resolve()
    rounds: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(args.rounds):
        for side in reversed(list(sides)):
            env = {**os.environ, "PYTHONPATH": str(sides[side])}
            command = [sys.executable, str(Path(__file__).resolve()), "--home", str(args.home), "--name", args.name,
                       "--dataset", str(args.dataset), "--limit", str(args.limit), "--raw"]
            done = subprocess.run(command, env=env, cwd=sides[side], capture_output=True, text=True, check=True)
            rounds[side].append(json.loads(done.stdout.splitlines()[-1]))
    best = {side: {key: {**runs[0][key], "p50_ms": min(r[key]["p50_ms"] for r in runs),
                         "p95_ms": min(r[key]["p95_ms"] for r in runs)} for key in runs[0]}
            for side, runs in rounds.items()}
    ours = best["ours"]
    summary: dict = {"window": WINDOW, "size": SIZE, "rounds": args.rounds, "ours": ours}
    if args.peer_src:
        summary["peer"] = {"source": str(args.peer_src), **best["peer"]}
    print(f"{'pipeline/rules':<24}{'ours p50':>10}{'p95':>9}" + (f"{'peer p50':>10}{'p95':>9}{'ratio':>8}  same pages" if args.peer_src else ""))
    for key, row in ours.items():
        line = f"{key:<24}{row['p50_ms']:>10.3f}{row['p95_ms']:>9.3f}"
        if args.peer_src:
            other = summary["peer"][key]
            line += (f"{other['p50_ms']:>10.3f}{other['p95_ms']:>9.3f}{other['p50_ms'] / row['p50_ms']:>7.2f}x  "
                     f"{'yes' if other['pages_sha256'] == row['pages_sha256'] else 'NO'}")
        print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
