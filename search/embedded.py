"""The embedded index: one verified generation on disk, memory-mapped, ready to answer queries.

This is the serving path: it loads BM25 postings, stored fields, vectors and the ONNX encoder,
and must never import torch (a test checks `sys.modules`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from indexing.analysis import Analyzer, AnalyzerSettings
from indexing.bm25 import COMBINED_FIELD, BM25Index, CandidateStats
from indexing.build import BM25_DIR, DOCS_DIR, VECTORS_DIR
from indexing.bundle import IndexCorruptError, IndexGeneration, IndexStore
from indexing.home import encoders_dir
from indexing.docstore import DocStore
from indexing.encoder import EncoderError, EncoderSettings, OnnxEncoder
from indexing.vectors import load_vector_index
from search.backend import AnalysedQuery, QueryInput, Retrieved
from search.rules import FieldFilter, filter_mask, filterable_fields

class DenseUnavailableError(RuntimeError):
    pass


class EmbeddedIndex:
    """Retrieval over one index generation (the embedded `SearchBackend`). Thread-safe for
    concurrent reads."""

    kind = "embedded"

    def __init__(self, home: Path, generation: IndexGeneration, encoder_threads: int | None = None):
        self.home = home
        self.generation = generation
        manifest = generation.manifest
        self.analyzer = Analyzer(AnalyzerSettings.from_dict(manifest["analyzer"]))
        try:
            self.bm25 = BM25Index.load(generation.path / BM25_DIR, manifest["bm25"])
            self.docs = DocStore(generation.path / DOCS_DIR)
        except (ValueError, KeyError, OSError) as exc:
            raise IndexCorruptError(generation.path, f"cannot load: {exc}") from exc
        self.vectors = None
        self.encoder = None
        dense = manifest.get("dense")
        if dense:
            self.vectors = load_vector_index(generation.path / VECTORS_DIR, dense["vectors"])
            encoder_settings = EncoderSettings.from_dict(manifest["build"]["encoder"])
            self.encoder = open_query_encoder(home, dense["encoder"], encoder_settings, encoder_threads)

    @classmethod
    def open(cls, home: Path, name: str, generation: str | None = None, verify: bool = True,
             encoder_threads: int | None = None) -> "EmbeddedIndex":
        """`encoder_threads`: ONNX Runtime intra-op threads for query encoding (default: all cores)."""
        return cls(home, IndexStore(home).open(name, generation, verify=verify), encoder_threads)

    @property
    def name(self) -> str:
        return self.generation.name

    @property
    def has_dense(self) -> bool:
        return self.vectors is not None

    @property
    def generation_id(self) -> str:
        return self.generation.generation

    def __len__(self) -> int:
        return self.bm25.n_docs

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "generation": self.generation_id, "backend": self.kind,
                "analyzer": self.analyzer.settings.to_dict()}

    # ----- the SearchBackend interface -----------------------------------------------------------
    def analyse(self, query: str) -> AnalysedQuery:
        return AnalysedQuery(query, tuple(self.analyzer.analyze(query)))

    def doc_ids(self, rows: np.ndarray) -> list[str]:
        ids = self.docs.ids
        return [ids[i] for i in np.asarray(rows).tolist()]

    def rows_of(self, doc_ids: Sequence[str]) -> np.ndarray:
        index_of = self.docs.index_of
        try:
            return np.fromiter((index_of[doc_id] for doc_id in doc_ids), dtype=np.int64, count=len(doc_ids))
        except KeyError as exc:
            raise KeyError(f"unknown document id '{exc.args[0]}' in index '{self.name}'") from None

    def retrieve_bm25(self, query: QueryInput, k: int, field: str = COMBINED_FIELD) -> Retrieved:
        rows, scores = self.bm25.top_k(self._terms(query), k, field)
        return Retrieved(rows, scores.astype(np.float32, copy=False), self.docs.ids)

    def encode_query(self, query: str) -> np.ndarray:
        self._require_dense()
        return self.encoder.encode([query])[0]

    def retrieve_dense(self, query_vector: np.ndarray, k: int) -> Retrieved:
        self._require_dense()
        scores, indices = self.vectors.search(query_vector, k)
        keep = indices[0] >= 0
        return Retrieved(indices[0][keep].astype(np.int64, copy=False), scores[0][keep].astype(np.float32, copy=False),
                         self.docs.ids)

    def retrieve_hybrid(self, query: QueryInput, bm25_k: int, dense_k: int) -> tuple[Retrieved, np.ndarray, Retrieved]:
        analysed = self._analysed(query)
        vector = self.encode_query(analysed.text)
        return self.retrieve_bm25(analysed, bm25_k), vector, self.retrieve_dense(vector, dense_k)

    def exact_scores(self, query: QueryInput, query_vector: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.bm25_scores(query, rows), self.dense_scores(query_vector, rows)

    def bm25_scores(self, query: QueryInput, rows: np.ndarray) -> np.ndarray:
        return self.bm25.scores_of(self._terms(query), self._checked(rows), COMBINED_FIELD)

    def dense_scores(self, query_vector: np.ndarray, rows: np.ndarray) -> np.ndarray:
        self._require_dense()
        return self.vectors.similarity(query_vector, self._checked(rows))

    def candidate_stats(self, query: QueryInput, rows: np.ndarray) -> CandidateStats:
        """Per-field BM25, term frequencies, IDF and lengths for (query, candidate) pairs."""
        return self.bm25.candidate_stats(self._terms(query), self._checked(rows))

    def document(self, doc_id: str) -> dict[str, Any] | None:
        return self.docs.get_by_id(doc_id)

    def documents(self, doc_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        return [self.docs.get_by_id(doc_id) for doc_id in doc_ids]

    def filter_mask(self, filters: Sequence[FieldFilter], doc_ids: Sequence[str]) -> np.ndarray:
        return filter_mask(filters, [filterable_fields(d or {}) for d in self.documents(doc_ids)], doc_ids=doc_ids)

    def _analysed(self, query: QueryInput) -> AnalysedQuery:
        return query if isinstance(query, AnalysedQuery) else self.analyse(query)

    def _terms(self, query: QueryInput) -> tuple[str, ...]:
        return self._analysed(query).terms

    def _checked(self, rows: np.ndarray) -> np.ndarray:
        """Rows as int64, refused when outside the index (a row is never silently wrapped)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row out of range for index '{self.name}' of {len(self)} documents")
        return rows

    def _require_dense(self) -> None:
        if self.vectors is None or self.encoder is None:
            raise DenseUnavailableError(
                f"index '{self.name}' generation {self.generation.generation} was built without dense vectors "
                "(--no-dense); rebuild it with dense vectors or use the bm25 pipeline"
            )


def open_query_encoder(home: Path, description: dict[str, Any], settings: EncoderSettings, threads: int | None) -> OnnxEncoder:
    """The index's ONNX encoder from the home, refused when its checksum is not the one the index recorded."""
    directory = encoders_dir(home) / description["directory"]
    try:
        encoder = OnnxEncoder(directory, threads, settings=settings)  # queries truncated as documents were
    except EncoderError as exc:
        raise EncoderError(
            f"{exc}; the index needs encoder {description['directory']} "
            "(run `ltr-search index rebuild` to export it again)"
        ) from exc
    if encoder.sha256 != description["sha256"]:
        raise EncoderError(
            f"encoder {directory} has sha256 {encoder.sha256[:12]}..., the index was built with "
            f"{description['sha256'][:12]}...; rebuild the index"
        )
    return encoder
