"""Parity and cost of the Elasticsearch backend against the embedded one, on the same corpus.

    docker compose up -d elasticsearch
    ES_URL=http://127.0.0.1:9200 .venv/bin/python bench/bench_es_parity.py --dataset ../shared/datasets/scifact

Needs a cluster (ES_URL); without one it says so and exits 0 having measured nothing. Steps:
1. the embedded index `--name` in `--home` (built from `--dataset` when absent) and the same
   corpus built on Elasticsearch with the same build settings (`--reuse-es` keeps an existing one);
2. features: for `--queries` test queries, the embedded rerank window (hybrid candidates) is
   featurised by both backends with feature set `text`; per feature: the share of rows equal
   to 1e-4 relative, the mean and max absolute difference. This is where analysis and BM25
   implementation details (README: Differences from the embedded backend) show up;
3. retrieval quality and cost: pipelines bm25, dense, hybrid and, when the home has an active
   model, ltr (that model, trained on the embedded backend) run on both backends; nDCG@10 on
   the test qrels and p50/p95 latency per query. ratio = elasticsearch p50 / embedded p50.
Results go to bench/results/bench_es_parity-TIMESTAMP.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval.datasets import load_dataset  # noqa: E402
from eval.metrics import evaluate_run, parse_metric_list  # noqa: E402
from indexing.bundle import IndexStore  # noqa: E402
from indexing.elastic import ElasticsearchSettings  # noqa: E402
from ltr.features import extract_features, feature_set  # noqa: E402
from search.backend_factory import BackendChoice, open_backend  # noqa: E402
from search.hybrid import generate_candidates  # noqa: E402
from search.app.pipelines import create_pipeline  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared" / "datasets" / "scifact"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--home", default=str(ROOT / ".ltr-search"))
    parser.add_argument("--name", default="scifact")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--window", type=int, default=100, help="candidates per retriever for the feature comparison")
    parser.add_argument("--reuse-es", action="store_true", help="do not rebuild the Elasticsearch index")
    args = parser.parse_args()
    url = os.environ.get("ES_URL")
    if not url:
        print("bench_es_parity: ES_URL is not set; nothing measured (start a cluster with `docker compose up -d "
              "elasticsearch` and run with ES_URL=http://127.0.0.1:9200)")
        return 0
    from search.app.cli import main as cli

    home = Path(args.home).resolve()
    os.environ["LTR_SEARCH_HOME"] = str(home)
    if args.name not in IndexStore(home).names():
        cli(["--home", str(home), "index", "build", "--dataset", args.dataset, "--name", args.name, "--quiet"])
    es = ElasticsearchSettings.from_sources(overrides={"url": url})
    if not args.reuse_es:
        status = cli(["--home", str(home), "index", "build", "--dataset", args.dataset, "--name", args.name, "--quiet",
                      "--backend", "elasticsearch", "--es-url", url])
        if status:
            return status
    embedded = open_backend(home, args.name, BackendChoice())
    elastic = open_backend(home, args.name, BackendChoice("elasticsearch", es))
    dataset = load_dataset(args.dataset, args.split)
    queries = dict(list(dataset.queries.items())[: args.queries])
    report = {"dataset": args.dataset, "split": args.split, "queries": len(queries), "es_url": url,
              "embedded_generation": embedded.generation_id, "es_index": elastic.index,
              "features": compare_features(embedded, elastic, queries, args.window),
              "pipelines": compare_pipelines(home, embedded, elastic, queries, dataset.qrels)}
    out = ROOT / "bench" / "results" / f"bench_es_parity-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print_report(report)
    print(f"written {out}")
    return 0


def compare_features(embedded, elastic, queries: dict[str, str], window: int) -> dict[str, dict[str, float]]:
    features = feature_set("text")
    rows_embedded, rows_elastic = [], []
    for text in queries.values():
        candidates = generate_candidates(embedded, text, window, window)
        rows_embedded.append(extract_features(embedded, text, candidates, features))
        rows_elastic.append(extract_features(elastic, text, candidates, features))
    a, b = np.vstack(rows_embedded).astype(np.float64), np.vstack(rows_elastic).astype(np.float64)
    out = {}
    for j, name in enumerate(features.names):
        both_nan = np.isnan(a[:, j]) & np.isnan(b[:, j])
        close = both_nan | np.isclose(a[:, j], b[:, j], rtol=1e-4, atol=1e-6)
        diff = np.abs(a[:, j] - b[:, j])
        diff = diff[~np.isnan(diff)]
        out[name] = {"rows": int(len(a)), "equal_share": float(close.mean()),
                     "mean_abs_diff": float(diff.mean()) if len(diff) else 0.0,
                     "max_abs_diff": float(diff.max()) if len(diff) else 0.0,
                     "nan_mismatch": int((np.isnan(a[:, j]) != np.isnan(b[:, j])).sum())}
    return out


def compare_pipelines(home: Path, embedded, elastic, queries: dict[str, str], qrels) -> dict[str, dict[str, float]]:
    from ltr.registry import ModelRegistry

    names = ["bm25", "dense", "hybrid"] + (["model:active"] if ModelRegistry(home).active() else [])
    metric = parse_metric_list("nDCG@10")
    out = {}
    for name in names:
        for label, backend in (("embedded", embedded), ("elasticsearch", elastic)):
            pipeline = create_pipeline(name, backend)
            run, latencies = {}, []
            for query_id, text in queries.items():
                started = time.perf_counter()
                hits = pipeline.search(text, 10)
                latencies.append((time.perf_counter() - started) * 1000)
                run[query_id] = {h.doc_id: h.score for h in hits}
            ndcg = evaluate_run(run, {q: qrels[q] for q in queries if q in qrels}, metric).mean()["nDCG@10"]
            out[f"{name} {label}"] = {"nDCG@10": float(ndcg), "p50_ms": float(np.percentile(latencies, 50)),
                                      "p95_ms": float(np.percentile(latencies, 95))}
        pair = out[f"{name} elasticsearch"], out[f"{name} embedded"]
        pair[0]["ratio_p50"] = pair[0]["p50_ms"] / pair[1]["p50_ms"]
    return out


def print_report(report: dict) -> None:
    print(f"features over {next(iter(report['features'].values()))['rows']} window rows ({report['queries']} queries)")
    print(f"  {'feature':<22} {'equal':>7} {'mean |d|':>10} {'max |d|':>10} {'NaN mismatch':>13}")
    for name, row in report["features"].items():
        print(f"  {name:<22} {row['equal_share']:7.1%} {row['mean_abs_diff']:10.4g} {row['max_abs_diff']:10.4g} "
              f"{row['nan_mismatch']:13d}")
    print(f"  {'pipeline':<28} {'nDCG@10':>8} {'p50 ms':>8} {'p95 ms':>8} {'ratio p50':>10}")
    for name, row in report["pipelines"].items():
        ratio = f"{row['ratio_p50']:10.2f}" if "ratio_p50" in row else ""
        print(f"  {name:<28} {row['nDCG@10']:8.4f} {row['p50_ms']:8.1f} {row['p95_ms']:8.1f} {ratio}")


if __name__ == "__main__":
    raise SystemExit(main())
