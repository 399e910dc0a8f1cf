"""Approximate nearest-neighbour libraries compared: faiss HNSW vs hnswlib vs usearch, and exact search.

Usage: .venv/bin/python bench/bench_ann.py [--n 200000] [--queries 1000] [--skip-scifact] [--skip-synthetic]

Datasets (inner product over unit vectors, k=10):
- SciFact: 5,183 document embeddings and its 1,109 real queries, encoded once with the ONNX
  encoder and cached in bench/results/ (git-ignored; keyed by the encoder's sha256).
- synthetic: --n clustered unit vectors in 384-d (seeded), queries drawn from the same
  clusters; embedding-like (most mass near a few thousand topics) but not real text.

For each library and setting: build time (2 threads), index file size, and for each
ef_search: recall@10 against exact search, queries/s one query at a time on one thread (the
serving case), and queries/s for the whole query batch on all threads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexing.vectors import ExactVectorIndex  # noqa: E402

DATASET = ROOT.parent / "shared" / "datasets" / "scifact"
RESULTS = ROOT / "bench" / "results"
K = 10
BUILD_THREADS = 2


@dataclass
class Row:
    dataset: str
    library: str
    setting: str
    build_s: float
    size_mb: float
    ef: int
    recall: float
    qps_single: float
    qps_batch: float


# ---------------------------------------------------------------- data


def scifact_embeddings() -> tuple[np.ndarray, np.ndarray] | None:
    if not (DATASET / "corpus.jsonl").exists():
        print(f"SKIP scifact: {DATASET / 'corpus.jsonl'} not found")
        return None
    from indexing.encoder import EncoderSettings, OnnxEncoder, ensure_onnx_encoder

    encoder = OnnxEncoder(ensure_onnx_encoder(RESULTS / "home", EncoderSettings(), progress=True))
    cache = RESULTS / f"scifact-{encoder.sha256[:12]}.npz"
    if cache.exists():
        data = np.load(cache, allow_pickle=False)
        return data["docs"], data["queries"]
    with open(DATASET / "corpus.jsonl", encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh]
    with open(DATASET / "queries.jsonl", encoding="utf-8") as fh:
        queries = [json.loads(line)["text"] for line in fh]
    print(f"encoding {len(docs)} SciFact docs and {len(queries)} queries once (cached in {cache.name}) ...")
    doc_vectors = encoder.encode([f"{d.get('title', '')} {d.get('text', '')}".strip() for d in docs], progress=True)
    query_vectors = encoder.encode(queries, progress=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    np.savez(cache, docs=doc_vectors, queries=query_vectors)
    return doc_vectors, query_vectors


def clustered_unit_vectors(n: int, m: int, dim: int = 384, clusters: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n corpus + m query unit vectors around random cluster centres (spread ~ real embeddings)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(count: int) -> np.ndarray:
        out = np.empty((count, dim), dtype=np.float32)
        for start in range(0, count, 50_000):
            size = min(50_000, count - start)
            x = centres[rng.integers(0, clusters, size)]
            x = x + rng.standard_normal((size, dim), dtype=np.float32) * np.float32(1.0 / np.sqrt(dim))
            out[start : start + size] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return draw(n), draw(m)


# ---------------------------------------------------------------- libraries
# Each adapter: build(x, M, efc) -> (search(q, k, ef, threads) -> ids, save(path)).


def faiss_build(x: np.ndarray, M: int, efc: int):
    import faiss

    faiss.omp_set_num_threads(BUILD_THREADS)
    index = faiss.IndexHNSWFlat(x.shape[1], M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = efc
    index.add(x)

    def search(q: np.ndarray, k: int, ef: int, threads: int) -> np.ndarray:
        faiss.omp_set_num_threads(threads)
        index.hnsw.efSearch = ef
        return index.search(q, k)[1]

    return search, lambda path: faiss.write_index(index, str(path))


def hnswlib_build(x: np.ndarray, M: int, efc: int):
    import hnswlib

    index = hnswlib.Index(space="ip", dim=x.shape[1])
    index.init_index(max_elements=len(x), M=M, ef_construction=efc, random_seed=0)
    index.add_items(x, np.arange(len(x)), num_threads=BUILD_THREADS)

    def search(q: np.ndarray, k: int, ef: int, threads: int) -> np.ndarray:
        index.set_ef(max(ef, k))
        return index.knn_query(q, k=k, num_threads=threads)[0]

    return search, lambda path: index.save_index(str(path))


def usearch_build(x: np.ndarray, M: int, efc: int):
    from usearch.index import Index

    index = Index(ndim=x.shape[1], metric="ip", dtype="f32", connectivity=M, expansion_add=efc)
    index.add(np.arange(len(x), dtype=np.uint64), x, threads=BUILD_THREADS)

    def search(q: np.ndarray, k: int, ef: int, threads: int) -> np.ndarray:
        index.expansion_search = ef
        result = index.search(q, k, threads=threads)
        return np.asarray(result.keys).reshape(len(q), -1)

    return search, lambda path: index.save(str(path))


LIBRARIES: dict[str, Callable] = {"faiss": faiss_build, "hnswlib": hnswlib_build, "usearch": usearch_build}


def lib_version(name: str) -> str:
    import importlib.metadata

    return importlib.metadata.version({"faiss": "faiss-cpu"}.get(name, name))


# ---------------------------------------------------------------- measuring


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth))
    return hits / truth.size


def qps_single(search: Callable, queries: np.ndarray, limit: int) -> float:
    sample = queries[:limit]
    start = time.perf_counter()
    for q in sample:
        search(q[None, :])
    return len(sample) / (time.perf_counter() - start)


def qps_batch(search: Callable, queries: np.ndarray) -> float:
    start = time.perf_counter()
    search(queries)
    return len(queries) / (time.perf_counter() - start)


def bench_dataset(name: str, x: np.ndarray, q: np.ndarray, settings: list[tuple[int, int]], efs: list[int],
                  single_limit: int) -> list[Row]:
    threads = os.cpu_count() or 1
    print(f"\n### {name}: corpus {x.shape[0]:,} x {x.shape[1]}, {len(q):,} queries, k={K}, loadavg {os.getloadavg()[0]:.2f}")
    exact = ExactVectorIndex(x)
    _, truth = exact.search(q, K)
    rows = [Row(name, "exact (numpy)", "-", 0.0, x.nbytes / 2**20, 0, 1.0,
                qps_single(lambda v: exact.search(v, K), q, single_limit),
                qps_batch(lambda v: exact.search(v, K), q))]
    print(f"  exact: single {rows[0].qps_single:,.0f} q/s, batch {rows[0].qps_batch:,.0f} q/s", flush=True)
    for lib, build in LIBRARIES.items():
        for M, efc in settings:
            start = time.perf_counter()
            search, save = build(x, M, efc)
            build_s = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as tmp:
                save(Path(tmp) / "index.bin")
                size_mb = (Path(tmp) / "index.bin").stat().st_size / 2**20
            for ef in efs:
                found = search(q, K, ef, threads)
                row = Row(name, lib, f"M={M} efC={efc}", build_s, size_mb, ef, recall_at_k(found, truth),
                          qps_single(lambda v: search(v, K, ef, 1), q, single_limit),
                          qps_batch(lambda v: search(v, K, ef, threads), q))
                rows.append(row)
                print(f"  {lib:8s} {row.setting:14s} build {build_s:7.1f}s  ef={ef:<4d} recall@10 {row.recall:.4f}  "
                      f"single {row.qps_single:8,.0f} q/s  batch {row.qps_batch:8,.0f} q/s", flush=True)
            del search, save
    return rows


def print_table(rows: list[Row]) -> None:
    print("\n== summary (recall@10 vs exact; q/s single = one query per call on 1 thread; "
          f"batch = all queries in one call on {os.cpu_count()} threads)")
    header = f"{'dataset':10s} {'library':14s} {'setting':14s} {'build s':>8s} {'MB':>7s} {'ef':>4s} {'recall':>7s} {'q/s 1':>9s} {'q/s batch':>10s} {'vs exact 1':>10s}"
    print(header)
    print("-" * len(header))
    exact_single = {r.dataset: r.qps_single for r in rows if r.library.startswith("exact")}
    for r in rows:
        print(f"{r.dataset:10s} {r.library:14s} {r.setting:14s} {r.build_s:8.1f} {r.size_mb:7.1f} "
              f"{r.ef if r.ef else '-':>4} {r.recall:7.4f} {r.qps_single:9,.0f} {r.qps_batch:10,.0f} "
              f"{r.qps_single / exact_single[r.dataset]:9.1f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="synthetic corpus size")
    parser.add_argument("--queries", type=int, default=1000, help="synthetic queries")
    parser.add_argument("--single", type=int, default=300, help="queries timed one at a time")
    parser.add_argument("--settings", default="16:100,32:200", help="M:ef_construction pairs")
    parser.add_argument("--ef", default="32,64,128", help="ef_search values")
    parser.add_argument("--libs", default=",".join(LIBRARIES))
    parser.add_argument("--skip-scifact", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    settings = [tuple(int(v) for v in pair.split(":")) for pair in args.settings.split(",")]
    efs = [int(v) for v in args.ef.split(",")]
    for lib in list(LIBRARIES):
        if lib not in args.libs.split(","):
            del LIBRARIES[lib]
    print("versions: " + ", ".join(f"{lib} {lib_version(lib)}" for lib in LIBRARIES) + f", numpy {np.__version__}")

    rows: list[Row] = []
    if not args.skip_scifact:
        data = scifact_embeddings()
        if data is not None:
            rows += bench_dataset("scifact", data[0], data[1], settings, efs, args.single)
    if not args.skip_synthetic:
        x, q = clustered_unit_vectors(args.n, args.queries)
        rows += bench_dataset("synthetic", x, q, settings, efs, args.single)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
