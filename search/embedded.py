"""The embedded index: one verified generation on disk, memory-mapped, ready to answer queries.

This is the serving path: it loads BM25 postings, stored fields, vectors and the ONNX encoder,
and must never import torch (a test checks `sys.modules`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from indexing.analysis import Analyzer, AnalyzerSettings
from indexing.bm25 import COMBINED_FIELD, BM25Index, BM25Settings, CandidateStats, top_k_positive
from indexing.build import BM25_DIR, DOCS_DIR, VECTORS_DIR, BuildSettings, compact_index
from indexing.bundle import IndexBundleError, IndexCorruptError, IndexGeneration, IndexStore
from indexing.home import encoders_dir
from indexing.corpus import Document
from indexing.docstore import DocStore
from indexing.encoder import EncoderError, EncoderSettings, OnnxEncoder
from indexing.live import DeltaSegment, LiveView, live_bm25_scores, live_scores, merge_candidate_stats, top_k_finite
from indexing.updates import MAX_BATCH, UpdateReceipt, pending_updates, read_upsert_file, write_updates
from indexing.vectors import load_vector_index, top_k_rows
from search.backend import AnalysedQuery, QueryInput, Retrieved
from search.rules import FieldFilter, filter_mask, filterable_fields

class DenseUnavailableError(RuntimeError):
    pass


class EmbeddedIndex:
    """Retrieval over one index generation plus the update journal's delta segment (the embedded
    `SearchBackend`; see `indexing.live`). Thread-safe for concurrent reads.

    Every call reads the current delta view (one `os.stat` of the journal to notice new batches,
    so an update written by another process is searchable on the next query). With an empty
    delta the generation is searched exactly as before; otherwise dead rows (deleted or
    superseded) are masked out and the delta rows are scored beside the generation's."""

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
        recorded = manifest.get("updates") or {}
        self.segment = DeltaSegment(generation.path.parent.parent, int(recorded.get("through", 0)), self.docs.ids,
                                    self.docs.index_of, self.analyzer, self.bm25,
                                    BM25Settings.from_dict(manifest["bm25"]["settings"]),
                                    self.vectors.dim if self.vectors is not None else None, int(recorded.get("source", 0)))

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
        """Rows of the live index (dead delta and deleted rows included: rows are never reused)."""
        return self._live().n_rows

    @property
    def revision(self) -> int:
        """Changes whenever the live documents do (the journal position read): caches key on it."""
        return self._live().offset

    def live_status(self) -> dict[str, object]:
        return self._live().describe()

    def _live(self) -> LiveView:
        return self.segment.refresh()

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "generation": self.generation_id, "backend": self.kind,
                "analyzer": self.analyzer.settings.to_dict()}

    # ----- the SearchBackend interface -----------------------------------------------------------
    def analyse(self, query: str) -> AnalysedQuery:
        return AnalysedQuery(query, tuple(self.analyzer.analyze(query)))

    def doc_ids(self, rows: np.ndarray) -> list[str]:
        ids = self._live().ids
        return [ids[i] for i in np.asarray(rows).tolist()]

    def rows_of(self, doc_ids: Sequence[str]) -> np.ndarray:
        view = self._live()
        out = np.empty(len(doc_ids), dtype=np.int64)
        for i, doc_id in enumerate(doc_ids):
            row = view.row_of(doc_id)
            if row is None:
                raise KeyError(f"unknown document id '{doc_id}' in index '{self.name}'")
            out[i] = row
        return out

    def retrieve_bm25(self, query: QueryInput, k: int, field: str = COMBINED_FIELD) -> Retrieved:
        view = self._live()
        terms = self._terms(query)
        if not view.n_delta and not len(view.dead_rows):
            rows, scores = self.bm25.top_k(terms, k, field)
            return Retrieved(rows, scores.astype(np.float32, copy=False), view.ids)
        # one score vector over base + delta rows, dead rows zeroed (top_k_positive keeps only
        # positive scores), one top k: ties fall to the lower row, as in a single index
        rows, top = top_k_positive(live_bm25_scores(self.bm25, view, terms, field), k)
        return Retrieved(rows, top.astype(np.float32, copy=False), view.ids)

    def encode_query(self, query: str) -> np.ndarray:
        self._require_dense()
        return self.encoder.encode_query(query)  # LRU-cached, read-only

    def retrieve_dense(self, query_vector: np.ndarray, k: int) -> Retrieved:
        self._require_dense()
        view = self._live()
        dead = len(view.dead_base_rows)
        if (view.n_delta or dead) and self.vectors.kind == "exact":
            # one score vector over base + delta rows, dead rows at -inf, one top k
            scores = live_scores(_matvec(self.vectors.embeddings, query_vector), _matvec(view.vectors, query_vector),
                                 view.dead_rows, -np.inf)
            rows, top = top_k_finite(scores, k)
            return Retrieved(rows, top, view.ids)
        scores, indices = self.vectors.search(query_vector, k + dead)  # HNSW: over-fetch what deletions may take
        rows, top = indices[0], scores[0]
        keep = rows >= 0
        if dead:
            keep &= ~view.dead[np.maximum(rows, 0)]
        rows, top = rows[keep].astype(np.int64, copy=False), top[keep].astype(np.float32, copy=False)
        if view.n_delta:
            alive = np.flatnonzero(~view.dead[view.n_base:])
            delta_top, delta_rows = top_k_rows(_matvec(view.vectors, query_vector)[alive][None, :], alive, k)
            rows, top = merge_top_k(rows, top, delta_rows[0] + view.n_base, delta_top[0], k)
            return Retrieved(rows, top, view.ids)
        return Retrieved(rows[:k], top[:k], view.ids)

    def retrieve_hybrid(self, query: QueryInput, bm25_k: int, dense_k: int) -> tuple[Retrieved, np.ndarray, Retrieved]:
        analysed = self._analysed(query)
        vector = self.encode_query(analysed.text)
        return self.retrieve_bm25(analysed, bm25_k), vector, self.retrieve_dense(vector, dense_k)

    def exact_scores(self, query: QueryInput, query_vector: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.bm25_scores(query, rows), self.dense_scores(query_vector, rows)

    def bm25_scores(self, query: QueryInput, rows: np.ndarray) -> np.ndarray:
        terms = self._terms(query)
        view, rows = self._live(), self._checked(rows)
        if not view.n_delta:
            return self.bm25.scores_of(terms, rows, COMBINED_FIELD)
        return _by_segment(rows, view.n_base, lambda r: self.bm25.scores_of(terms, r, COMBINED_FIELD),
                           lambda r: view.bm25.scores_of(terms, r, COMBINED_FIELD))

    def dense_scores(self, query_vector: np.ndarray, rows: np.ndarray) -> np.ndarray:
        self._require_dense()
        view, rows = self._live(), self._checked(rows)
        if not view.n_delta:
            return self.vectors.similarity(query_vector, rows)
        vector = np.asarray(query_vector, dtype=np.float32).reshape(-1)
        return _by_segment(rows, view.n_base, lambda r: self.vectors.similarity(query_vector, r),
                           lambda r: _matvec(view.vectors[r], vector))

    def candidate_stats(self, query: QueryInput, rows: np.ndarray) -> CandidateStats:
        """Per-field BM25, term frequencies, IDF and lengths for (query, candidate) pairs."""
        terms = self._terms(query)
        view, rows = self._live(), self._checked(rows)
        if not view.n_delta:  # every row is the generation's: no mask to make
            return self.bm25.candidate_stats(terms, rows)
        base = rows < view.n_base
        if base.all():
            return self.bm25.candidate_stats(terms, rows)
        return merge_candidate_stats(rows, base, self.bm25.candidate_stats(terms, rows[base]),
                                     view.bm25.candidate_stats(terms, rows[~base] - view.n_base))

    def document(self, doc_id: str) -> dict[str, Any] | None:
        found = self._live().document(doc_id)
        return self.docs.get_by_id(doc_id) if found is False else found

    def documents(self, doc_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        return [self.document(doc_id) for doc_id in doc_ids]

    def write_documents(self, upserts: Sequence[Document] = (), deletes: Sequence[str] = ()) -> dict[str, Any]:
        """Upsert and delete documents in one durable batch (the journal); searchable on return.
        A delete of an id this index does not serve raises `UnknownDocumentError`."""
        receipt = write_updates(self.home, self.name, upserts, deletes,
                                is_live=lambda doc_id: self._live().row_of(doc_id) is not None, encoder=self.encoder)
        self._live()  # this process sees its own write at once (others on their next query)
        return {**receipt.to_dict(), "durable": True}

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


def _matvec(vectors: np.ndarray, query_vector: np.ndarray) -> np.ndarray:
    """vectors @ query through einsum, not BLAS: a threaded gemv on a busy machine is up to 10x
    slower (see `indexing.vectors._scores`)."""
    return np.einsum("ij,j->i", vectors, np.asarray(query_vector, dtype=np.float32).reshape(-1))


def merge_top_k(rows_a: np.ndarray, scores_a: np.ndarray, rows_b: np.ndarray, scores_b: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of two (rows, scores) lists, best first, ties by the lower row (as one top k over
    both would order them)."""
    rows = np.concatenate([rows_a, rows_b]).astype(np.int64, copy=False)
    scores = np.concatenate([scores_a, scores_b]).astype(np.float32, copy=False)
    order = np.lexsort((rows, -scores))[:k]
    return rows[order], scores[order]


def _by_segment(rows: np.ndarray, n_base: int, base_fn: Any, delta_fn: Any) -> np.ndarray:
    """Scores of live rows, the generation's from `base_fn(rows)`, the delta's from `delta_fn(rows - n_base)`."""
    out = np.zeros(len(rows), dtype=np.float32)
    base = rows < n_base
    if base.any():
        out[base] = base_fn(rows[base])
    if not base.all():
        out[~base] = delta_fn(rows[~base] - n_base)
    return out


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


@dataclass(frozen=True)
class EmbeddedLiveAdmin:
    """`index upsert|delete-docs|compact` and the live part of `index status` on the embedded backend."""

    home: Path

    def upsert_file(self, name: str, path: Path) -> dict[str, Any]:
        settings = BuildSettings.from_dict(IndexStore(self.home).open(name, verify=False).manifest["build"])
        documents = read_upsert_file(path, settings)
        receipts = [write_updates(self.home, name, documents[start:start + MAX_BATCH])
                    for start in range(0, len(documents), MAX_BATCH)]
        return _receipts(receipts)

    def delete_ids(self, name: str, ids: Sequence[str]) -> dict[str, Any]:
        return _receipts([write_updates(self.home, name, deletes=list(ids[start:start + MAX_BATCH]))
                          for start in range(0, len(ids), MAX_BATCH)])

    def compact(self, name: str, log: Callable[[str], None]) -> Any:
        return compact_index(self.home, name, progress=False, log=log)

    def describe(self, name: str) -> dict[str, Any]:
        """The pending delta and the last compaction; an active generation that does not open is
        reported by `index status` itself, so here it is only named."""
        try:
            active = IndexStore(self.home).open(name, verify=False)
            return {"delta": pending_updates(self.home, name), "last_compaction": active.manifest.get("compacted")}
        except (IndexBundleError, ValueError, OSError) as exc:
            return {"delta": None, "last_compaction": None, "error": str(exc)}


def _receipts(receipts: list[UpdateReceipt]) -> dict[str, Any]:
    """One acknowledgement for the batches of one command."""
    last = receipts[-1]
    return {"index": last.index, "upserted": sum(r.upserted for r in receipts), "deleted": sum(r.deleted for r in receipts),
            "encoded": sum(r.encoded for r in receipts), "batches": len(receipts), "journal_end": last.journal_end,
            "durable": True}
