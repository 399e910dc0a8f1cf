"""The retrieval backend interface: everything above it (fusion, features, ranking, rules) is
backend-agnostic. Two implementations: the embedded index (`search/embedded.py`, files in the
engine home) and Elasticsearch (`search/elastic_backend.py`); `search/backend_factory.py` opens one.

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
    kind: str  # "embedded" or "elasticsearch": recorded with trained models

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

    def retrieve_hybrid(self, query: str, bm25_k: int, dense_k: int) -> tuple[Retrieved, np.ndarray, Retrieved]:
        """BM25 top-k, the query embedding and dense top-k (one round trip where the backend can)."""
        ...

    def exact_scores(self, query: str, query_vector: np.ndarray, doc_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """`bm25_scores` and `dense_scores` together (one round trip where the backend can)."""
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

    def documents(self, doc_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Stored fields of many documents (one round trip where the backend can)."""
        ...

    def filter_mask(self, filters: Sequence[Any], doc_ids: Sequence[str]) -> np.ndarray:
        """True for each document that passes every `search.rules.FieldFilter` (all AND-ed)."""
        ...
