"""Nearest-neighbour search over L2-normalised float32 embeddings (inner product = cosine).

Two index kinds behind one `search(queries, k) -> (scores, ids)` interface:
- `ExactVectorIndex`: blocked matmul + argpartition over a (memory-mapped) embeddings.npy.
  Exact, no build step, and fast enough below `hnsw_threshold` documents.
- `HnswVectorIndex`: approximate graph search for large corpora.

Why hnswlib for HNSW (bench/bench_ann.py, 2-core AMD EPYC VM, k=10, inner product; every
library builds the same kind of graph, so recall at equal M / ef_construction / ef_search
was the same within noise, and the choice came down to speed and fit):
- SciFact (5,183 real MiniLM embeddings, 1,109 real queries), M=16 efC=100 ef=64:
  recall@10 hnswlib 0.992 / faiss 0.991 / usearch 0.991; one-query-per-call throughput
  hnswlib 15.5k q/s, faiss 15.4k, usearch 7.8k; build 0.4 s / 1.6 s / 0.7 s.
- synthetic 200k x 384 clustered, M=16 efC=100 ef=64: recall 0.999 for all three;
  single-query hnswlib 3.3k q/s, faiss 1.5k, usearch 1.5k; build 116 s / 161 s / 201 s.
- hnswlib is already a core dependency (faiss-cpu and usearch are bench-only extras), has
  a small, stable file format and releases the GIL while searching (query batches run on
  parallel threads). Its one drawback: the graph is read fully into memory (usearch could
  memory-map it); at 384-d it is ~1.1x the size of embeddings.npy.
Defaults, measured with hnswlib on SciFact's real embeddings (recall@10 at ef_search
64 / 128 / 256):
- M=16: M=32 took 440 s to build 200k vectors against 176 s for M=16 (both efC=200, on
  differently loaded runs: roughly 2.5x) for +0.03 pt recall at ef_search=128 on SciFact.
- ef_construction=200: 0.9933 / 0.9989 / 0.9997 vs 0.9921 / 0.9983 / 0.9995 at 100, for
  ~1.5x build time (176 s for 200k x 384 on 2 busy cores).
- ef_search=128: recall >= 0.998 at ~0.1 ms (5k docs) to ~0.55 ms (200k) per query, which
  is noise next to the ~5 ms it takes to encode the query.
Exact search below DEFAULT_HNSW_THRESHOLD: exact, no build, and a memory-bound matvec —
0.5 ms per query at 5k docs, ~16 ms at 200k on this machine.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexing.config import DEFAULT_HNSW_THRESHOLD, settings_from_dict

KINDS = ("auto", "exact", "hnsw")
EMBEDDINGS_FILE = "embeddings.npy"
HNSW_FILE = "hnsw.bin"
# Corpus rows scored per matmul block: bounds the (queries x block) score matrix in memory.
_EXACT_BLOCK_ROWS = 65_536
# Rows checked for unit length when building (a full pass is cheap, but O(n d) of page-ins).
_NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class VectorIndexSettings:
    """Which vector index to build and its HNSW parameters; recorded in index manifests."""

    kind: str = "auto"  # auto | exact | hnsw ; auto -> hnsw when count >= hnsw_threshold
    hnsw_threshold: int = DEFAULT_HNSW_THRESHOLD
    M: int = 16  # see the module docstring for how these defaults were measured
    ef_construction: int = 200
    ef_search: int = 128

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown vector index kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        for name in ("hnsw_threshold", "M", "ef_construction", "ef_search"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"VectorIndexSettings.{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VectorIndexSettings:
        return settings_from_dict(cls, data)

    def resolve_kind(self, count: int) -> str:
        """'exact' or 'hnsw' for a corpus of `count` vectors."""
        if self.kind == "auto":
            return "hnsw" if count >= self.hnsw_threshold else "exact"
        return self.kind


# ---------------------------------------------------------------- small pure helpers


def as_query_matrix(queries: np.ndarray, dim: int) -> np.ndarray:
    """(d,) or (m, d) -> C-contiguous float32 (m, d); wrong width is a ValueError."""
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must have shape (m, {dim}), got {np.shape(queries)}")
    return np.ascontiguousarray(q)


def top_k_rows(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best (score, id) pairs sorted by descending score, ties by ascending id.

    `ids` has the shape of `scores` (or is a 1-D column map shared by every row).
    """
    m, n = scores.shape
    k = min(k, n)
    if ids.ndim == 1:
        ids = np.broadcast_to(ids, scores.shape)
    if k < n:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(scores, part, axis=1)
        ids = np.take_along_axis(ids, part, axis=1)
    order = np.lexsort((ids, -scores), axis=1) if m else np.empty((0, k), dtype=np.int64)
    return (
        np.take_along_axis(scores, order, axis=1).astype(np.float32, copy=False),
        np.take_along_axis(ids, order, axis=1).astype(np.int64, copy=False),
    )


def exact_search(
    embeddings: np.ndarray, queries: np.ndarray, k: int, block_rows: int = _EXACT_BLOCK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product, scoring the corpus block by block (works on memmaps)."""
    n = embeddings.shape[0]
    m = queries.shape[0]
    k = min(k, n)
    if k <= 0 or m == 0:
        return np.empty((m, max(k, 0)), np.float32), np.empty((m, max(k, 0)), np.int64)
    best_scores = best_ids = None
    for start in range(0, n, block_rows):
        block = np.asarray(embeddings[start : start + block_rows], dtype=np.float32)
        scores = _scores(queries, block)
        s, i = top_k_rows(scores, np.arange(start, start + len(block), dtype=np.int64), k)
        if best_scores is None:
            best_scores, best_ids = s, i
        else:
            best_scores, best_ids = top_k_rows(
                np.concatenate([best_scores, s], axis=1), np.concatenate([best_ids, i], axis=1), k
            )
    return best_scores, best_ids


def _scores(queries: np.ndarray, block: np.ndarray) -> np.ndarray:
    """queries @ block.T. One query goes through einsum, not BLAS: the product is memory-bound,
    and a multi-threaded BLAS gemv on a busy machine can be 10x slower than one thread
    (measured: 16 ms vs 1.1 ms for 5k x 384 with another process on the second core)."""
    if len(queries) == 1:
        return np.einsum("ij,j->i", block, queries[0])[None, :]
    return queries @ block.T


def check_unit_rows(embeddings: np.ndarray, tolerance: float = _NORM_TOLERANCE) -> None:
    """Refuse vectors that are not L2-normalised: inner product would not be cosine."""
    for start in range(0, embeddings.shape[0], _EXACT_BLOCK_ROWS):
        block = np.asarray(embeddings[start : start + _EXACT_BLOCK_ROWS], dtype=np.float32)
        norms = np.linalg.norm(block, axis=1)
        bad = np.flatnonzero(~(np.abs(norms - 1.0) <= tolerance))
        if bad.size:
            row = start + int(bad[0])
            raise ValueError(
                f"embeddings must be L2-normalised (row {row} has norm {norms[bad[0]]:.4f}); "
                "inner product is used as cosine"
            )


# ---------------------------------------------------------------- indexes


class ExactVectorIndex:
    """Brute-force inner-product search; exact, over an in-memory or memory-mapped array."""

    kind = "exact"

    def __init__(self, embeddings: np.ndarray) -> None:
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be 2-D, got shape {embeddings.shape}")
        self.embeddings = embeddings
        self.dim = int(embeddings.shape[1])

    @property
    def size(self) -> int:
        return int(self.embeddings.shape[0])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (m, k) float32, ids (m, k) int64), k clipped to size, best first."""
        return exact_search(self.embeddings, as_query_matrix(queries, self.dim), k)

    def similarity(self, query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Cosine of one query with the given rows (dense feature for arbitrary candidates)."""
        return _similarity(self.embeddings, query, ids, self.dim)


def _similarity(embeddings: np.ndarray, query: np.ndarray, ids: np.ndarray, dim: int) -> np.ndarray:
    q = as_query_matrix(query, dim)[0]
    return np.asarray(embeddings[np.asarray(ids, dtype=np.int64)], dtype=np.float32) @ q


class HnswVectorIndex:
    """Approximate inner-product search on an hnswlib graph (see the module docstring for why hnswlib).

    The graph holds its own copy of the vectors; `embeddings` (the memory-mapped
    embeddings.npy) is kept for `similarity()` and as an exact fallback.
    """

    kind = "hnsw"

    def __init__(self, graph: Any, ef_search: int, embeddings: np.ndarray | None = None,
                 threads: int | None = None) -> None:
        self._graph = graph
        self.dim = int(graph.dim)
        self.embeddings = embeddings
        self.threads = threads
        self.ef_search = ef_search

    @property
    def size(self) -> int:
        return int(self._graph.get_current_count())

    @property
    def ef_search(self) -> int:
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        """Candidates kept while searching: higher is slower and closer to exact."""
        if int(value) < 1:
            raise ValueError(f"ef_search must be >= 1, got {value}")
        self._ef_search = int(value)
        self._graph.set_ef(self._ef_search)

    @classmethod
    def build(cls, embeddings: np.ndarray, settings: VectorIndexSettings, threads: int | None = None) -> HnswVectorIndex:
        """Insert every row (row number = id); multi-threaded, so not bit-reproducible."""
        import hnswlib

        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        graph = hnswlib.Index(space="ip", dim=int(x.shape[1]))
        graph.init_index(max_elements=max(len(x), 1), M=settings.M, ef_construction=settings.ef_construction,
                         random_seed=_HNSW_SEED)
        if len(x):
            graph.add_items(x, np.arange(len(x), dtype=np.int64), num_threads=threads or _usable_cpus())
        return cls(graph, settings.ef_search, embeddings, threads)

    @classmethod
    def load(cls, path: Path, dim: int, ef_search: int, embeddings: np.ndarray | None = None,
             threads: int | None = None) -> HnswVectorIndex:
        import hnswlib

        graph = hnswlib.Index(space="ip", dim=dim)
        graph.load_index(str(path))
        return cls(graph, ef_search, embeddings, threads)

    def save(self, path: Path) -> None:
        self._graph.save_index(str(path))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (m, k) float32, ids (m, k) int64), k clipped to size, best first."""
        q = as_query_matrix(queries, self.dim)
        k = min(k, self.size)
        if k <= 0 or len(q) == 0:
            return np.empty((len(q), max(k, 0)), np.float32), np.empty((len(q), max(k, 0)), np.int64)
        labels, distances = self._knn(q, k)
        # hnswlib's "ip" distance is 1 - <q, x>; re-sort for a deterministic order among ties.
        return top_k_rows(1.0 - distances, labels.astype(np.int64), k)

    def similarity(self, query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Cosine of one query with the given rows (dense feature for arbitrary candidates)."""
        if self.embeddings is not None:
            return _similarity(self.embeddings, query, ids, self.dim)
        vectors = np.asarray(self._graph.get_items(np.asarray(ids, dtype=np.int64)), dtype=np.float32)
        return vectors @ as_query_matrix(query, self.dim)[0]

    def _knn(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        threads = self.threads or _usable_cpus()  # hnswlib's default ignores affinity masks
        if k > self._ef_search:  # hnswlib needs ef >= k to return k results
            self._graph.set_ef(k)
        try:
            return self._graph.knn_query(q, k=k, num_threads=threads)
        except RuntimeError:
            # Too few results reachable at this ef (tiny or oddly shaped graphs): widen to all.
            self._graph.set_ef(max(self.size, k))
            return self._graph.knn_query(q, k=k, num_threads=threads)
        finally:
            self._graph.set_ef(self._ef_search)


_HNSW_SEED = 100


def _usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)

VectorIndex = ExactVectorIndex | HnswVectorIndex


def build_vector_index(embeddings: np.ndarray, settings: VectorIndexSettings, out_dir: Path) -> dict[str, Any]:
    """Write embeddings.npy (+ hnsw.bin for HNSW) into out_dir; return the manifest description."""
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.dtype != np.float32:
        raise ValueError(f"embeddings must be a float32 (n, d) array, got {x.dtype} {x.shape}")
    check_unit_rows(x)
    count, dim = (int(v) for v in x.shape)
    kind = settings.resolve_kind(count) if count else "exact"  # nothing to build a graph over
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / EMBEDDINGS_FILE, np.ascontiguousarray(x), allow_pickle=False)
    params: dict[str, Any] = {}
    if kind == "hnsw":
        import importlib.metadata

        started = time.perf_counter()
        index = HnswVectorIndex.build(x, settings)
        index.save(out_dir / HNSW_FILE)
        params = {
            "library": "hnswlib",
            "library_version": importlib.metadata.version("hnswlib"),
            "space": "ip",
            "M": settings.M,
            "ef_construction": settings.ef_construction,
            "ef_search": settings.ef_search,
            "build_seconds": round(time.perf_counter() - started, 3),
        }
    files = [EMBEDDINGS_FILE] + ([HNSW_FILE] if kind == "hnsw" else [])
    return {
        "kind": kind,
        "metric": "inner_product",
        "count": count,
        "dim": dim,
        "dtype": "float32",
        "settings": settings.to_dict(),
        "params": params,
        "files": files,  # checksummed by the generation manifest, like every bundle file
    }


def load_vector_index(in_dir: Path, description: dict[str, Any], mmap: bool = True) -> VectorIndex:
    """The index `build_vector_index` wrote; embeddings memory-mapped unless mmap=False.

    File integrity (sizes, SHA-256) is the generation manifest's job (`indexing.bundle`);
    here the files must exist and the embeddings have the described shape.
    """
    in_dir = Path(in_dir)
    kind = description.get("kind")
    if kind not in ("exact", "hnsw"):
        raise ValueError(f"unknown vector index kind {kind!r} in {in_dir}; expected 'exact' or 'hnsw'")
    for name in description.get("files", []):
        if not (in_dir / name).is_file():
            raise ValueError(f"vector index file {in_dir / name} is missing")
    embeddings = np.load(in_dir / EMBEDDINGS_FILE, mmap_mode="r" if mmap else None, allow_pickle=False)
    expected = (int(description["count"]), int(description["dim"]))
    if embeddings.shape != expected or embeddings.dtype != np.float32:
        raise ValueError(
            f"{in_dir / EMBEDDINGS_FILE} has shape {embeddings.shape} {embeddings.dtype}, expected {expected} float32"
        )
    if kind == "exact":
        return ExactVectorIndex(embeddings)
    params = description["params"]
    return HnswVectorIndex.load(in_dir / HNSW_FILE, expected[1], int(params["ef_search"]), embeddings)
