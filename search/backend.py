"""The retrieval backend interface: everything above it (fusion, features, ranking, rules) is
backend-agnostic. The embedded index (`search/embedded.py`) implements it today; an
Elasticsearch backend implements the same methods.

Documents are named by their string ids at this boundary, and scores travel as numpy arrays
aligned with those ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from indexing.bm25 import CandidateStats


@dataclass(frozen=True)
class Hit:
    """One ranked result of a pipeline."""

    doc_id: str
    score: float
    rank: int  # 1-based


@dataclass(frozen=True)
class Retrieved:
    """One retriever's top-k: ids best first, with their scores."""

    doc_ids: list[str]
    scores: np.ndarray  # float32, aligned with doc_ids

    def __len__(self) -> int:
        return len(self.doc_ids)

    def hits(self) -> list[Hit]:
        """As ranked `Hit`s (rank 1 first)."""
        return [Hit(d, s, rank) for rank, (d, s) in enumerate(zip(self.doc_ids, self.scores.tolist()), start=1)]


@runtime_checkable
class SearchBackend(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def generation_id(self) -> str: ...

    @property
    def has_dense(self) -> bool: ...

    def retrieve_bm25(self, query: str, k: int) -> Retrieved:
        """BM25 top-k over the combined field (only documents matching a query term)."""
        ...

    def encode_query(self, query: str) -> np.ndarray:
        """The query embedding (unit length), computed once and reused by the dense calls."""
        ...

    def retrieve_dense(self, query_vector: np.ndarray, k: int) -> Retrieved:
        """Nearest documents by cosine similarity."""
        ...

    def bm25_scores(self, query: str, doc_ids: Sequence[str]) -> np.ndarray:
        """Exact combined-field BM25 of the given documents (0 where no term matches)."""
        ...

    def dense_scores(self, query_vector: np.ndarray, doc_ids: Sequence[str]) -> np.ndarray:
        """Exact cosine similarity of the given documents with the query."""
        ...

    def candidate_stats(self, query: str, doc_ids: Sequence[str]) -> CandidateStats:
        """Per-field BM25, term frequencies, IDF and lengths for ranking features."""
        ...

    def document(self, doc_id: str) -> dict[str, Any] | None:
        """Stored fields of one document, None when the id is unknown."""
        ...
