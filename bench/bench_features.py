"""Feature extraction of one candidate window: this checkout against the code it replaced, back to back.

    .venv/bin/python bench/bench_features.py --home /tmp/genbench_home --name scifact \
        --dataset /work/shared/datasets/scifact --out bench/results/bench_features.json

The issue's goal: <= 1 ms for a 400-candidate window, no Python loop over candidates and no
recomputation across stages. Timed: `extract_features` (the `text` set, `CandidateStats` included)
on the windows the `ltr` pipeline scores, i.e. after retrieval and exact rescoring, which are not
part of the stage. Two window shapes per query: the pipeline's own (BM25 top-200 and dense
top-200 union, 272-392 candidates on SciFact) and exactly 400 candidates (top-400 of each
retriever, cut to the first 400 in RRF order).

The peer is the same stage as it stood at `--before` (default: the commit before the vectorised
path): indexing/bm25.py and ltr/features.py of that commit are loaded from git as modules of their
own and run on the same loaded postings. Every window is extracted by both, alternating which goes
first, for `--repeat` rounds, so machine load hits both alike; ratios are from this run. The
feature matrices of both are compared: they must be equal (max |difference| is reported).
`--before a79df29` measures against the stage as it stood before the window table, term-major
matrices and shared bigram pass (bench/results/bench_features_vs_a79df29.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval.datasets import load_dataset  # noqa: E402
from ltr.features import extract_features, feature_set  # noqa: E402
from ltr.training import candidate_window  # noqa: E402
from search.embedded import EmbeddedIndex  # noqa: E402
from search.hybrid import Candidates, FusionSettings, generate_candidates  # noqa: E402

BEFORE = "c89bc6c"  # main before the vectorised candidate statistics


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def module_at(commit: str, path: str, name: str) -> types.ModuleType:
    """A module's source as it was at `commit`, loaded under another name."""
    source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    module = types.ModuleType(name)
    module.__file__ = f"{commit}:{path}"
    sys.modules[name] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


class BeforeBackend:
    """The index with `candidate_stats` as the old indexing/bm25.py computed it: an index of the
    old module's class over the same loaded fields (so the old code finds the private state its
    constructor made)."""

    def __init__(self, index: EmbeddedIndex, old_bm25: types.ModuleType):
        self.index = index
        self.bm25 = old_bm25.BM25Index(index.bm25.vocabulary, index.bm25.fields, index.bm25.settings)

    def candidate_stats(self, query: Any, rows: np.ndarray) -> Any:
        return self.bm25.candidate_stats(self.index._terms(query), np.asarray(rows, dtype=np.int64))


def window_of_400(index: EmbeddedIndex, query: str) -> Candidates:
    window = generate_candidates(index, query, 400, 400, exact=True)
    order = np.argsort(-window.rrf, kind="stable")[:400]
    return window.take(order)


def pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1000
    return {"p50": round(float(np.percentile(a, 50)), 3), "p99": round(float(np.percentile(a, 99)), 3),
            "mean": round(float(a.mean()), 3)}


def compare(windows: list[tuple[str, Candidates]], ours: Callable, before: Callable, repeat: int) -> dict[str, Any]:
    timings: dict[str, list[float]] = {"ours": [], "before": []}
    cpu: dict[str, list[float]] = {"ours": [], "before": []}
    worst = 0.0
    for round_ in range(repeat):
        for i, (query, window) in enumerate(windows):
            pair = [("ours", ours), ("before", before)]
            if (i + round_) % 2:
                pair.reverse()
            got = {}
            for label, extract in pair:
                started, started_cpu = time.perf_counter(), time.thread_time()
                got[label] = extract(query, window)
                timings[label].append(time.perf_counter() - started)
                cpu[label].append(time.thread_time() - started_cpu)
            a, b = got["ours"], got["before"]
            if not np.array_equal(np.isnan(a), np.isnan(b)):
                raise AssertionError(f"missing values differ for {query!r}")
            worst = max(worst, float(np.nanmax(np.abs(np.nan_to_num(a) - np.nan_to_num(b)), initial=0.0)))
    ours_p, before_p = pct(timings["ours"]), pct(timings["before"])
    sizes = [len(w) for _, w in windows]
    return {"windows": len(windows), "candidates": {"min": min(sizes), "median": float(np.median(sizes)), "max": max(sizes)},
            "ms": {"ours": ours_p, "before": before_p},
            "ratio_p50": round(ours_p["p50"] / before_p["p50"], 3), "ratio_p99": round(ours_p["p99"] / before_p["p99"], 3),
            # CPU time of the extracting thread: what the stage costs when it is not preempted by
            # other processes on a loaded machine
            "cpu_ms": {"ours": pct(cpu["ours"]), "before": pct(cpu["before"])},
            "max_abs_difference": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--name", default="scifact")
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--feature-set", default="text")
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    old_bm25 = module_at(args.before, "indexing/bm25.py", "bm25_before")
    old_features = module_at(args.before, "ltr/features.py", "features_before")
    index = EmbeddedIndex.open(args.home, args.name, encoder_threads=1)
    before_backend = BeforeBackend(index, old_bm25)
    features = feature_set(args.feature_set)
    old_set = old_features.feature_set(args.feature_set)
    queries = list(load_dataset(args.dataset, args.split).queries.values())[: args.queries]
    log(f"{len(queries)} queries; building windows")

    def ours(query: str, window: Candidates) -> np.ndarray:
        return extract_features(index, query, window, features)

    def before(query: str, window: Candidates) -> np.ndarray:
        return old_features.extract_features(before_backend, query, window, old_set)

    results: dict[str, Any] = {}
    for shape, make in (("pipeline window (200 + 200)", lambda q: candidate_window(index, q, FusionSettings())),
                        ("400 candidates", lambda q: window_of_400(index, q))):
        windows = []
        for query in queries:
            window = make(query)
            window = window.take(np.argsort(-window.rrf, kind="stable"))  # as LtrPipeline.rank_window orders it
            windows.append((query, window))
        ours(*windows[0]), before(*windows[0])  # first use: positional postings, imports
        results[shape] = compare(windows, ours, before, args.repeat)
        r = results[shape]
        log(f"{shape}: ours p50 {r['ms']['ours']['p50']} ms p99 {r['ms']['ours']['p99']} ms | before p50 "
            f"{r['ms']['before']['p50']} ms p99 {r['ms']['before']['p99']} ms | ratio p50 {r['ratio_p50']} | "
            f"cpu p50 ours {r['cpu_ms']['ours']['p50']} ms, before {r['cpu_ms']['before']['p50']} ms | "
            f"max |diff| {r['max_abs_difference']}")
    report = {
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "before": args.before, "dataset": str(args.dataset.name), "split": args.split, "feature_set": args.feature_set,
        "repeat": args.repeat, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg()[0], "unit": "ms per window (extract_features)", "results": results,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
