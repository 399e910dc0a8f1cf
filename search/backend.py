"""The retrieval backend interface: everything above it (fusion, features, ranking, rules) is
backend-agnostic. Two implementations: the embedded index (`search/embedded.py`, files in the
engine home) and Elasticsearch (`search/elastic_backend.py`); `search/backend_factory.py` opens one.

The hot path is integer: documents travel as row indices (int64 numpy arrays) into the backend's
document table, with scores as aligned numpy arrays. String ids are made only where they leave
the engine (the returned page, training rows, logs), through `doc_ids(rows)`. A query is analysed
once per request (`analyse`) and the analysed form is passed to every call that needs it.

Both backends also take document updates, outside this read-only protocol (so test and bench
backends need not): `write_documents(upserts, deletes)` returns once the batch is durable and
searchable (embedded: the update journal, `indexing.delta`; Elasticsearch: `_bulk` with
refresh=wait_for). The embedded index's rows are append-only while it is open, so rows handed out
by one call stay valid for the next; its `revision` changes with every update (caches key on it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
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
class AnalysedQuery:
    """A query analysed once per request. `terms` are the backend's analysed tokens in query order
    (empty where the backend analyses on its server, as Elasticsearch does)."""

    text: str
    terms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Retrieved:
    """One retriever's top-k: row indices best first, with their scores. `id_table` is the
    backend's row -> id table, read only when string ids are asked for."""

    rows: np.ndarray  # int64
    scores: np.ndarray  # float32, aligned with rows
    id_table: Sequence[str]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def doc_ids(self) -> list[str]:
        table = self.id_table
        return [table[i] for i in self.rows.tolist()]

    def hits(self, k: int | None = None) -> list[Hit]:
        """The first `k` (default all) as ranked `Hit`s (rank 1 first)."""
        rows, scores = self.rows[:k], self.scores[:k]
        table = self.id_table
        return [Hit(table[r], s, rank) for rank, (r, s) in enumerate(zip(rows.tolist(), scores.tolist()), start=1)]


QueryInput = str | AnalysedQuery  # a plain string is analysed by the call that receives it


@runtime_checkable
class SearchBackend(Protocol):
    kind: str  # "embedded" or "elasticsearch": recorded with trained models
    home: Path  # the engine home (behaviour store and event store of the index live there)

    @property
    def name(self) -> str: ...

    @property
    def generation_id(self) -> str: ...

    @property
    def has_dense(self) -> bool: ...

    def describe(self) -> dict[str, object]:
        """What a model manifest records of the index: name, generation, backend, analyzer (and
        where the backend has one, its physical index)."""
        ...

    def analyse(self, query: str) -> AnalysedQuery:
        """The query analysed once, for every call of one request."""
        ...

    def doc_ids(self, rows: np.ndarray) -> list[str]:
        """String ids of rows (only for what leaves the engine: pages, training rows, logs)."""
        ...

    def rows_of(self, doc_ids: Sequence[str]) -> np.ndarray:
        """Rows of string ids (int64); an id the index does not hold is a KeyError (Elasticsearch:
        when the rows are scored)."""
        ...

    def retrieve_bm25(self, query: QueryInput, k: int) -> Retrieved:
        """BM25 top-k over the combined field (only documents matching a query term)."""
        ...

    def encode_query(self, query: str) -> np.ndarray:
        """The query embedding (unit length), computed once and reused by the dense calls."""
        ...

    def retrieve_dense(self, query_vector: np.ndarray, k: int) -> Retrieved:
        """Nearest documents by cosine similarity."""
        ...

    def retrieve_hybrid(self, query: QueryInput, bm25_k: int, dense_k: int) -> tuple[Retrieved, np.ndarray, Retrieved]:
        """BM25 top-k, the query embedding and dense top-k (one round trip where the backend can)."""
        ...

    def exact_scores(self, query: QueryInput, query_vector: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`bm25_scores` and `dense_scores` together (one round trip where the backend can)."""
        ...

    def bm25_scores(self, query: QueryInput, rows: np.ndarray) -> np.ndarray:
        """Exact combined-field BM25 of the given rows (0 where no term matches)."""
        ...

    def dense_scores(self, query_vector: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact cosine similarity of the given rows with the query."""
        ...

    def candidate_stats(self, query: QueryInput, rows: np.ndarray) -> CandidateStats:
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
