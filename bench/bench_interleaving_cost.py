"""What an interleaved request costs the service: `optimized_interleave` (uncached and cached)
next to `team_draft`, on two models' real rankings of each test query, back to back.

    .venv/bin/python bench/bench_interleaving_cost.py \
        --run model:m0001=H/runs/scifact-test/model:m0001.run --run hybrid-convex=H/runs/scifact-test/hybrid-convex.run \
        [--repeats 3] [--json bench/results/bench_interleaving_cost.json]

The rankings are the run files' full lists (the candidate window as `ltr-search eval` ranked it,
up to a few hundred documents per query), so each call orders a whole window as the service's
`InterleavingRanker` does (k = the window). Per query and repeat, the three methods run one after
the other in a rotating order: uncached (the distribution cache cleared first: a query seen for
the first time), cached (the same rankings again) and team draft. One thread, wall clock.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_interleaving import parse_runs  # noqa: E402
from eval.datasets import read_run, trec_order  # noqa: E402
from search import interleaving  # noqa: E402
from search.interleaving import candidate_pages, optimized_interleave, team_draft  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def time_calls(rankings_a: list[list[str]], rankings_b: list[list[str]], repeats: int) -> dict[str, list[float]]:
    """Milliseconds per call of each method, over every query and repeat."""
    rng = np.random.default_rng(0)
    optimized_interleave(["a"], ["b"], 2, rng)  # imports scipy.optimize once, as the service does at load

    def uncached(a: list[str], b: list[str]) -> None:
        interleaving._fair_pages.cache_clear()  # a query seen for the first time
        optimized_interleave(a, b, len(a), rng)

    methods = {
        "optimized, uncached": uncached,
        "optimized, cached": lambda a, b: optimized_interleave(a, b, len(a), rng),
        "team draft": lambda a, b: team_draft(a, b, len(a), rng),
    }
    names = list(methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for i, (a, b) in enumerate(zip(rankings_a, rankings_b)):
            turn = (i + repeat) % len(names)
            for name in names[turn:] + names[:turn]:
                if name == "optimized, cached":
                    optimized_interleave(a, b, len(a), rng)  # make sure this query's distribution is cached
                started = time.perf_counter()
                methods[name](a, b)
                times[name].append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="NAME=PATH of a TREC run file (two of them)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_interleaving_cost.json")
    args = parser.parse_args()
    paths = parse_runs(args.run)
    if len(paths) != 2 or args.repeats < 1:
        raise SystemExit("name exactly two --run files, and --repeats >= 1")
    (name_a, path_a), (name_b, path_b) = paths.items()
    run_a, run_b = read_run(path_a), read_run(path_b)
    queries = sorted(set(run_a) & set(run_b))
    rankings_a = [[d for d, _ in trec_order(run_a[q])] for q in queries]
    rankings_b = [[d for d, _ in trec_order(run_b[q])] for q in queries]
    pages = [len(candidate_pages(a, b, interleaving.OPTIMIZED_DEPTH)) for a, b in zip(rankings_a, rankings_b)]
    times = time_calls(rankings_a, rankings_b, args.repeats)
    report = {
        "runs": {name_a: str(path_a), name_b: str(path_b)}, "queries": len(queries), "repeats": args.repeats,
        "window_docs_median": float(np.median([len(a) for a in rankings_a])),
        "candidate_pages": {"median": float(np.median(pages)), "max": int(max(pages))},
        "unit": "ms per interleaved request (the whole window ordered), wall clock, one thread",
        "methods": {name: {"p50": round(float(np.percentile(t, 50)), 3), "p99": round(float(np.percentile(t, 99)), 3),
                           "mean": round(float(np.mean(t)), 3)} for name, t in times.items()},
    }
    for name, figures in report["methods"].items():
        print(f"{name:22s} p50 {figures['p50']:7.3f} ms  p99 {figures['p99']:7.3f} ms")
    print(f"{len(queries)} queries, window median {report['window_docs_median']:.0f} documents, "
          f"candidate pages median {report['candidate_pages']['median']:.0f} (max {report['candidate_pages']['max']})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"json: {args.json}")


if __name__ == "__main__":
    main()
