"""Hybrid candidates (BM25 top-k union dense top-k) and the fused pipelines built on them.

For convex fusion both retrievers score every candidate exactly (BM25 of a dense-only candidate
is computed, not assumed 0; its cosine likewise), so it compares like with like. RRF only sees
the ranks each retriever returned, so it skips that rescoring.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any, Mapping, Sequence

import numpy as np

from indexing.config import settings_from_dict
from search.backend import AnalysedQuery, Hit, Retrieved, SearchBackend
from search.fusion import DEFAULT_RRF_K, NORMALISATIONS, fuse_convex, fuse_reciprocal_rank

DEFAULT_CANDIDATES = 200  # per retriever; the union is the rerank window (a few hundred)
FUSION_METHODS = ("rrf", "convex")


@dataclass(frozen=True)
class FusionSettings:
    method: str = "rrf"
    rrf_k: float = DEFAULT_RRF_K
    dense_weight: float = 0.5  # convex: BM25 gets 1 - dense_weight
    normalisation: str = "min-max"
    bm25_candidates: int = DEFAULT_CANDIDATES
    dense_candidates: int = DEFAULT_CANDIDATES

    def __post_init__(self) -> None:
        if self.method not in FUSION_METHODS:
            raise ValueError(f"fusion method '{self.method}' unknown; choose {' or '.join(FUSION_METHODS)}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation '{self.normalisation}' unknown; choose {' or '.join(NORMALISATIONS)}")
        if not 0.0 <= self.dense_weight <= 1.0:
            raise ValueError(f"dense_weight must be in [0, 1], got {self.dense_weight}")
        if self.rrf_k < 0:
            raise ValueError(f"rrf_k must be >= 0, got {self.rrf_k}")
        for name in ("bm25_candidates", "dense_candidates"):
            if not 1 <= getattr(self, name) <= 10_000:
                raise ValueError(f"{name} must be between 1 and 10000, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FusionSettings":
        return settings_from_dict(cls, data)


@dataclass
class Candidates:
    """The rerank window of one query, aligned arrays indexed by candidate: BM25 hits in BM25
    order first, then dense-only hits in dense order. Candidates are backend rows; string ids
    are made only on demand (`doc_ids`), for what leaves the engine."""

    rows: np.ndarray  # int64 backend rows
    bm25: np.ndarray  # combined-field BM25 (NaN outside the BM25 top-k unless generated exact)
    dense: np.ndarray  # cosine similarity (NaN outside the dense top-k unless generated exact)
    bm25_rank: np.ndarray  # 1-based rank in the BM25 top-k, NaN outside it
    dense_rank: np.ndarray  # 1-based rank in the dense top-k, NaN outside it
    id_table: Sequence[str]  # the backend's row -> id table
    query: AnalysedQuery | None = None  # the request's analysed query, reused by feature extraction

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def doc_ids(self) -> list[str]:
        table = self.id_table
        return [table[i] for i in self.rows.tolist()]

    @cached_property
    def rrf(self) -> np.ndarray:
        """Reciprocal-rank fusion (k=60) of the two ranks: computed at most once per window, shared
        by the hybrid pipeline, the `rrf_score` feature and the ranker's first-stage order."""
        return fuse_reciprocal_rank([self.bm25_rank, self.dense_rank], DEFAULT_RRF_K)

    def take(self, order: np.ndarray) -> "Candidates":
        """The window reordered (or cut) by candidate positions."""
        taken = Candidates(self.rows[order], self.bm25[order], self.dense[order], self.bm25_rank[order],
                           self.dense_rank[order], self.id_table, self.query)
        if "rrf" in self.__dict__:  # already fused: carry it, do not fuse again
            taken.__dict__["rrf"] = self.rrf[order]
        return taken


def union_rows(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`first` then the rows of `second` not in it (in `second`'s order), and where each row of
    `second` sits in that union. Integer work only (two small sorts and binary searches): no
    per-candidate Python objects. Rows within each list are distinct (top-k lists)."""
    first = np.asarray(first, dtype=np.int64)
    second = np.asarray(second, dtype=np.int64)
    if len(first) and len(second):
        sorted_first = np.sort(first)
        at = np.minimum(np.searchsorted(sorted_first, second), len(first) - 1)
        union = np.concatenate([first, second[sorted_first[at] != second]])
    else:
        union = np.concatenate([first, second])
    order = np.argsort(union)
    return union, order[np.searchsorted(union[order], second)]


def generate_candidates(backend: SearchBackend, query: str | AnalysedQuery, bm25_k: int, dense_k: int,
                        exact: bool = True) -> Candidates:
    """The union of both top-k lists. With `exact`, each retriever scores every candidate (what
    convex fusion and ranking features need); without it a candidate outside a retriever's top-k
    gets NaN there, which is all RRF needs (bench_service: exact rescoring is 2 of 5 ms a query
    on 1M documents). The query is analysed once here and reused by every call."""
    analysed = query if isinstance(query, AnalysedQuery) else backend.analyse(query)
    lexical, query_vector, semantic = backend.retrieve_hybrid(analysed, bm25_k, dense_k)
    rows, dense_position = union_rows(lexical.rows, semantic.rows)
    bm25_rank = np.full(len(rows), np.nan)
    bm25_rank[: len(lexical)] = np.arange(1, len(lexical) + 1)
    dense_rank = np.full(len(rows), np.nan)
    dense_rank[dense_position] = np.arange(1, len(semantic) + 1)
    if exact:
        bm25, dense = backend.exact_scores(analysed, query_vector, rows)
    else:
        bm25 = np.full(len(rows), np.nan, dtype=np.float32)
        bm25[: len(lexical)] = lexical.scores
        dense = np.full(len(rows), np.nan, dtype=np.float32)
        dense[dense_position] = semantic.scores
    return Candidates(rows, bm25, dense, bm25_rank, dense_rank, lexical.id_table, analysed)


def fused_scores(candidates: Candidates, settings: FusionSettings) -> np.ndarray:
    if settings.method == "rrf":
        if settings.rrf_k == DEFAULT_RRF_K:
            return candidates.rrf  # fused once, when the window was made
        return fuse_reciprocal_rank([candidates.bm25_rank, candidates.dense_rank], settings.rrf_k)
    return fuse_convex(
        [candidates.bm25, candidates.dense], [1.0 - settings.dense_weight, settings.dense_weight], settings.normalisation
    )


def top_order(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the `k` best scores, best first; equal scores keep candidate order (a stable
    sort), so results are deterministic."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]


def top_hits(doc_ids: Sequence[str], scores: np.ndarray, k: int) -> list[Hit]:
    """Best first, as `Hit`s; equal scores keep candidate order."""
    return [Hit(doc_ids[i], float(scores[i]), rank) for rank, i in enumerate(top_order(scores, k).tolist(), start=1)]


def page_hits(window: Candidates, scores: np.ndarray, k: int) -> list[Hit]:
    """The page of a window: `Hit`s (and string ids) for the `k` best candidates only."""
    order = top_order(scores, k)
    table = window.id_table
    return [Hit(table[row], float(scores[i]), rank)
            for rank, (i, row) in enumerate(zip(order.tolist(), window.rows[order].tolist()), start=1)]


class HybridPipeline:
    """BM25 + dense candidates, fused with fixed settings (RRF by default)."""

    def __init__(self, backend: SearchBackend, settings: FusionSettings = FusionSettings(), name: str = "hybrid"):
        self.backend = backend
        self.settings = settings
        self.name = name

    def candidates(self, query: str) -> Candidates:
        return generate_candidates(
            self.backend, query, self.settings.bm25_candidates, self.settings.dense_candidates,
            exact=self.settings.method == "convex",
        )

    def retrieve(self, query: str, k: int) -> Retrieved:
        """The `k` best of the window by fused score, as rows (ties keep candidate order)."""
        window = self.candidates(query)
        scores = fused_scores(window, self.settings)
        order = top_order(scores, k)
        return Retrieved(window.rows[order], scores[order], window.id_table)

    def search(self, query: str, k: int) -> list[Hit]:
        return self.retrieve(query, k).hits()
