"""Per-stage latency of the query hot path, for pipelines bm25, hybrid, hybrid-convex and the
active registry model (ltr), on an embedded index with dense vectors.

    .venv/bin/python bench/bench_stages.py --home /tmp/h4 --name scifact \
        --dataset /work/shared/datasets/scifact --out bench/results/bench_stages.json

Each query's stages are run one after the other as the pipeline runs them, each timed on its
own (perf_counter); then the real pipeline is timed end to end (`pipeline.search(query, 10)` plus
fetching the page's documents; the ltr window cache is cleared before each call). nDCG@10 and a
digest of every query's top 10 (ids and scores) are recorded so that a change of the hot path
can show it left rankings identical. Peer (context only): rank-bm25's BM25Okapi `get_scores` +
argsort over the same analysed documents (another formula, a pure-Python/numpy library).
Main thread, one query at a time, `--warmup` untimed queries first.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np

from eval.datasets import load_dataset
from eval.metrics import evaluate_run
from ltr.features import extract_features
from ltr.ranker import LtrPipeline, registry_pipeline
from search.embedded import EmbeddedIndex
from search.backend import Hit
from search.hybrid import Candidates, FusionSettings, HybridPipeline, fused_scores, page_hits, union_rows
from search.pipelines import BM25Pipeline, Pipeline

K = 10
STAGES = ("analysis", "bm25_retrieval", "query_encoding", "dense_retrieval", "candidate_union", "exact_rescoring",
          "fusion", "features", "model_scoring", "page_assembly")


class StageClock:
    """Collects per-stage milliseconds for one query."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    def __call__(self, stage: str, fn: Callable, *args, **kwargs):
        started = time.perf_counter()
        out = fn(*args, **kwargs)
        self.ms[stage] = self.ms.get(stage, 0.0) + (time.perf_counter() - started) * 1000
        return out


def page(backend: EmbeddedIndex, window: Candidates, scores: np.ndarray) -> list[tuple[Hit, dict | None]]:
    """The returned page: Hits (string ids for the page only) and stored documents."""
    hits = page_hits(window, scores, K)
    return list(zip(hits, backend.documents([h.doc_id for h in hits])))


def stages(backend: EmbeddedIndex, query: str, kind: str, fusion: FusionSettings, ltr: LtrPipeline | None) -> dict[str, float]:
    """One query through the stages of `kind`, as the pipeline runs them (the integer hot path:
    one analysis, rows until the page, one RRF fusion). The bench at commit 8335fd5 timed the
    string-id path the same way (bench/results/bench_stages_before.json)."""
    clock = StageClock()
    analysed = clock("analysis", backend.analyse, query)
    if kind == "bm25":
        got = clock("bm25_retrieval", backend.retrieve_bm25, analysed, K)
        clock("page_assembly", lambda: list(zip(hits := got.hits(K), backend.documents([h.doc_id for h in hits]))))
        return clock.ms
    lexical = clock("bm25_retrieval", backend.retrieve_bm25, analysed, fusion.bm25_candidates)
    vector = clock("query_encoding", backend.encode_query, query)
    semantic = clock("dense_retrieval", backend.retrieve_dense, vector, fusion.dense_candidates)

    def union() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rows, dense_position = union_rows(lexical.rows, semantic.rows)
        bm25_rank = np.full(len(rows), np.nan)
        bm25_rank[: len(lexical)] = np.arange(1, len(lexical) + 1)
        dense_rank = np.full(len(rows), np.nan)
        dense_rank[dense_position] = np.arange(1, len(semantic) + 1)
        return rows, dense_position, bm25_rank, dense_rank

    rows, dense_position, bm25_rank, dense_rank = clock("candidate_union", union)
    if kind != "hybrid":
        bm25, dense = clock("exact_rescoring", backend.exact_scores, analysed, vector, rows)
    else:
        bm25 = np.full(len(rows), np.nan, dtype=np.float32)
        bm25[: len(lexical)] = lexical.scores
        dense = np.full(len(rows), np.nan, dtype=np.float32)
        dense[dense_position] = semantic.scores
    window = Candidates(rows, bm25, dense, bm25_rank, dense_rank, lexical.id_table, analysed)
    if kind in ("hybrid", "hybrid-convex"):
        fused = clock("fusion", fused_scores, window, fusion)
        clock("page_assembly", page, backend, window, fused)
        return clock.ms
    assert ltr is not None and ltr.model is not None
    clock("fusion", lambda: window.rrf)
    window = window.take(np.argsort(-window.rrf, kind="stable"))
    features = clock("features", extract_features, backend, query, window, ltr.features)
    scores = clock("model_scoring", ltr.model.predict, features)
    clock("page_assembly", page, backend, window, scores)
    return clock.ms


def percentiles(values: list[float]) -> dict[str, float]:
    return {"p50": round(float(np.percentile(values, 50)), 3), "p95": round(float(np.percentile(values, 95)), 3)}


def run_pipeline(backend: EmbeddedIndex, pipeline: Pipeline, kind: str, fusion: FusionSettings, ltr: LtrPipeline | None,
                 queries: dict[str, str], warmup: int) -> tuple[dict, dict[str, dict[str, float]]]:
    per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
    totals: list[float] = []
    run: dict[str, dict[str, float]] = {}
    items = list(queries.items())
    for i, (query_id, text) in enumerate(items[:warmup] + items):
        timed = i >= warmup
        ms = stages(backend, text, kind, fusion, ltr)
        if isinstance(pipeline, LtrPipeline):
            pipeline._cache.clear()  # bench: time the work, not the window cache
        started = time.perf_counter()
        hits = pipeline.search(text, K)
        backend.documents([h.doc_id for h in hits])
        total = (time.perf_counter() - started) * 1000
        if timed:
            for stage, value in ms.items():
                per_stage[stage].append(value)
            totals.append(total)
            run[query_id] = {h.doc_id: float(h.score) for h in hits}
    summary = {stage: percentiles(values) for stage, values in per_stage.items() if values}
    summary["stage_sum"] = percentiles([sum(v) for v in zip(*(vals for vals in per_stage.values() if vals))])
    summary["end_to_end"] = percentiles(totals)
    return summary, run


def run_digest(run: dict[str, dict[str, float]]) -> str:
    """Digest of every query's top-k ids and scores (scores rounded to 1e-6)."""
    canonical = {q: [[d, round(s, 6)] for d, s in ranked.items()] for q, ranked in sorted(run.items())}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:16]


def peer_rank_bm25(backend: EmbeddedIndex, queries: dict[str, str], warmup: int) -> dict[str, float] | None:
    try:
        from rank_bm25 import BM25Okapi  # noqa: PLC0415 (optional peer)
    except ImportError:
        return None
    corpus = []
    for doc in backend.documents(backend.docs.ids):  # the whole corpus, once
        text = " ".join(filter(None, [(doc or {}).get("title", ""), (doc or {}).get("text", "")]))
        corpus.append(backend.analyzer.analyze(text))
    okapi = BM25Okapi(corpus)
    texts = list(queries.values())
    times = []
    for i, text in enumerate(texts[:warmup] + texts):
        started = time.perf_counter()
        scores = okapi.get_scores(backend.analyzer.analyze(text))
        np.argsort(-scores)[:K]
        if i >= warmup:
            times.append((time.perf_counter() - started) * 1000)
    return percentiles(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--name", default="scifact")
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench/results/bench_stages.json"))
    parser.add_argument("--no-peer", action="store_true")
    args = parser.parse_args()

    backend = EmbeddedIndex.open(args.home, args.name)
    data = load_dataset(args.dataset, args.split)
    ltr = registry_pipeline(backend, args.home, "active")
    pipelines: list[tuple[str, Pipeline, FusionSettings, LtrPipeline | None]] = [
        ("bm25", BM25Pipeline(backend), FusionSettings(), None),
        ("hybrid", HybridPipeline(backend), FusionSettings(), None),
        ("hybrid-convex", HybridPipeline(backend, FusionSettings(method="convex"), name="hybrid-convex"),
         FusionSettings(method="convex"), None),
        ("ltr", ltr, ltr.fusion, ltr),
    ]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report: dict = {"commit": commit, "index": args.name, "documents": len(backend), "split": args.split,
                    "queries": len(data.queries), "k": K, "model": ltr.version, "machine": platform.machine(),
                    "python": platform.python_version(), "unit": "ms", "pipelines": {}}
    for kind, pipeline, fusion, model in pipelines:
        summary, run = run_pipeline(backend, pipeline, kind, fusion, model, data.queries, args.warmup)
        ndcg = float(np.mean(evaluate_run(run, data.qrels, ["nDCG@10"]).values["nDCG@10"]))
        report["pipelines"][kind] = {"stages": summary, "nDCG@10": round(ndcg, 6), "top10_digest": run_digest(run)}
        print(f"\n{kind}  nDCG@10={ndcg:.4f}  digest={report['pipelines'][kind]['top10_digest']}")
        for stage, value in summary.items():
            print(f"  {stage:16s} p50 {value['p50']:8.3f}  p95 {value['p95']:8.3f}")
    if not args.no_peer:
        peer = peer_rank_bm25(backend, data.queries, args.warmup)
        if peer is not None:
            report["peer"] = {"rank_bm25 BM25Okapi get_scores+argsort (top 10)": peer}
            print(f"\npeer rank_bm25: p50 {peer['p50']:.3f}  p95 {peer['p95']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
