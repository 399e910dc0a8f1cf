"""The delta segment: what a served generation adds from the update journal, as immutable views.

Rows of the live index are the generation's rows [0, n_base) followed by one row per upsert
read from the journal [n_base, n_base + n_delta), in journal order. Rows are append-only for
the life of a segment: an upsert of a live id marks that id's old row dead and appends a new
one, a delete marks it dead. So a row read from one view means the same document version in
every later view, and a request that straddles a refresh stays consistent.

BM25 statistics are frozen at the base generation until compaction (as Lucene's lag until
segments merge): delta documents are scored with the base's idf, document count and average
length (a term the base never saw: its delta document frequency over the base count), and
deleted documents still count in the base's statistics. Compaction rebuilds them exactly.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from indexing.analysis import Analyzer
from indexing.bm25 import SOURCE_FIELDS, BM25Builder, BM25Index, BM25Settings, CandidateStats, accumulate_scores
from indexing.delta import DELETE, JournalTruncatedError, Update, journal_path, read_updates

DEAD = -1  # an id's row in `LiveView.rows` when it is deleted
DENSE_DELTA_ROWS = 4096  # up to this many delta rows, a query term's delta weights are summed as dense rows
DENSE_CACHE_BYTES = 32 << 20  # per view, the most those cached dense rows take


class LiveIds(Sequence[str]):
    """The row -> id table of a live view: the base generation's ids, then the delta's."""

    def __init__(self, base: Sequence[str], delta: Sequence[str]):
        self._base, self._delta, self._n = base, delta, len(base)

    def __len__(self) -> int:
        return self._n + len(self._delta)

    def __getitem__(self, row: int) -> str:  # type: ignore[override]
        return self._base[row] if row < self._n else self._delta[row - self._n]


@dataclass(frozen=True)
class LiveView:
    """One consistent state of the delta segment; never mutated, replaced on refresh."""

    n_base: int
    offset: int  # journal position read up to
    dead: np.ndarray  # bool per live row: deleted, or superseded by a later upsert
    dead_base_rows: np.ndarray  # int64, the base rows in `dead`
    dead_rows: np.ndarray  # int64, every row in `dead` (base and delta): masked out of scores in one assignment
    ids: LiveIds
    rows: dict[str, int]  # ids the journal touched -> their live row (DEAD when deleted)
    docs: list[dict[str, Any]]  # stored fields of the delta rows
    bm25: BM25Index | None  # the delta rows' postings, frozen statistics; None when no row
    vectors: np.ndarray | None  # (n_delta, dim) float32 on a dense index
    upserts: int = 0
    deletes: int = 0
    live_delta: int = 0  # delta rows still alive
    base_row_of: dict[str, int] = field(default_factory=dict, repr=False)
    # (field, delta term id) -> that term's delta postings (rows, weights) or None: filled by
    # queries, dropped with the view (a write publishes a new view, so it is never stale)
    _postings: dict[tuple[str, int], tuple[np.ndarray, np.ndarray] | None] = field(default_factory=dict, repr=False)
    _dense: dict[tuple[str, int], np.ndarray | None] = field(default_factory=dict, repr=False)  # the same, as dense rows

    @property
    def n_rows(self) -> int:
        return len(self.ids)

    @property
    def n_delta(self) -> int:
        return len(self.docs)

    def row_of(self, doc_id: str) -> int | None:
        """The live row of an id, None when it is unknown or deleted."""
        row = self.rows.get(doc_id)
        if row is None:
            row = self.base_row_of.get(doc_id)
        return None if row is None or row == DEAD else row

    def document(self, doc_id: str) -> dict[str, Any] | None | bool:
        """The delta's stored fields of an id; None when deleted; False when the delta never touched it."""
        row = self.rows.get(doc_id)
        if row is None:
            return False
        return None if row == DEAD else self.docs[row - self.n_base]

    def bm25_scores(self, tokens: Sequence[str], field_name: str, out: np.ndarray | None = None) -> np.ndarray:
        """The delta rows' BM25 (`self.bm25.scores(tokens, field_name)`, bit for bit) at a fraction
        of its cost on a small segment, where one `np.add.at` per term was mostly call overhead.
        The query's term ids are counted in Python (no `np.unique` for a few tokens); terms are
        added in id order, as the per-term loop adds them, so every row's float32 sum is the same:
        - up to DENSE_DELTA_ROWS rows, each term's delta weights are a dense row vector (made once
          per view), added with one `+=` (adding the 0.0 of a row without the term changes nothing);
        - beyond, each term's postings are sliced once per view and all go through one `np.add.at`.
        `out`: add into these zeros (the delta's part of a live score vector), not a new array."""
        index = self.bm25
        scores = np.zeros(self.n_delta, dtype=np.float32) if out is None else out
        if index is None:
            return scores
        counts: dict[int, int] = {}
        lookup = index.term_to_id.get
        for token in tokens:
            term = lookup(token)
            if term is not None:
                counts[term] = counts.get(term, 0) + 1
        if self.n_delta <= DENSE_DELTA_ROWS:
            for term in sorted(counts):
                row = self._dense_row(field_name, term)
                if row is not None:
                    scores += row if counts[term] == 1 else float(counts[term]) * row
            return scores
        rows: list[np.ndarray] = []
        values: list[np.ndarray] = []
        cache = self._postings
        for term in sorted(counts):
            key = (field_name, term)
            postings = cache.get(key, False)
            if postings is False:
                postings = cache[key] = _postings(index, field_name, term)
            if postings is None:
                continue
            rows.append(postings[0])
            values.append(postings[1] if counts[term] == 1 else float(counts[term]) * postings[1])
        if len(rows) == 1:
            np.add.at(scores, rows[0], values[0])
        elif rows:
            np.add.at(scores, np.concatenate(rows), np.concatenate(values))
        return scores

    def _dense_row(self, field_name: str, term: int) -> np.ndarray | None:
        """A term's weight in every delta row (0 where absent), cached for this view; the cache is
        emptied when it would pass DENSE_CACHE_BYTES."""
        key = (field_name, term)
        row = self._dense.get(key, False)
        if row is False:
            postings = _postings(self.bm25, field_name, term)
            row = None
            if postings is not None:
                row = np.zeros(self.n_delta, dtype=np.float32)
                row[postings[0]] = postings[1]
            if (len(self._dense) + 1) * 4 * self.n_delta > DENSE_CACHE_BYTES:
                self._dense.clear()
            self._dense[key] = row
        return row

    def describe(self) -> dict[str, Any]:
        return {"journal_offset": self.offset, "upserts": self.upserts, "deletes": self.deletes,
                "delta_rows": self.n_delta, "live_delta_rows": self.live_delta,
                "dead_base_rows": int(len(self.dead_base_rows))}


class DeltaSegment:
    """Follows an index's journal from a generation's `through` offset and publishes `LiveView`s.
    `refresh` is cheap when nothing changed (one stat); threads share one segment."""

    def __init__(self, index_dir: Path, through: int, base_ids: Sequence[str], base_row_of: dict[str, int],
                 analyzer: Analyzer, base_bm25: BM25Index, bm25_settings: BM25Settings, dim: int | None,
                 source: int | None = None):
        """`source`: the generation's source offset, where a truncated journal's folded net
        operations start (a segment that fell behind a truncation catches up from them)."""
        self.index_dir = Path(index_dir)
        self._source = source
        self._path = journal_path(self.index_dir)
        self._base_ids, self._base_row_of = base_ids, base_row_of
        self._analyzer, self._frozen, self._settings, self._dim = analyzer, base_bm25, bm25_settings, dim
        self._lock = threading.Lock()
        self._offset = through
        self._seen: tuple[int, int, int] | None = None  # (inode, size, mtime) of the journal file read up to
        self._builder = BM25Builder(SOURCE_FIELDS)
        self._docs: list[dict[str, Any]] = []
        self._ids: list[str] = []
        self._vectors: list[np.ndarray] = []
        self._rows: dict[str, int] = {}
        self._dead_base: set[int] = set()
        self._dead_delta: list[bool] = []
        self._upserts = self._deletes = 0
        self.view = self._publish()
        self.refresh()

    def refresh(self) -> LiveView:
        """Read the journal's new batches (if any) and return the current view. The journal file's
        (inode, size, mtime) says whether anything changed: offsets are logical, and a truncation at
        compaction replaces the file with a shorter one holding the same batches from its base."""
        try:
            stat = os.stat(self._path)
        except FileNotFoundError:
            return self.view
        if (stat.st_ino, stat.st_size, stat.st_mtime_ns) == self._seen:
            return self.view
        with self._lock:
            try:
                updates, offset = read_updates(self.index_dir, self._offset)
            except JournalTruncatedError:
                if self._source is None:
                    raise
                # Compaction dropped batches this segment had not read yet. The folded net operations
                # of (source, base] give every id they touched its state at base; applied over what
                # was read, they only re-add rows (the old ones die), so the live documents are exact.
                updates, offset = read_updates(self.index_dir, self._source)
            if offset != self._offset:
                for update in updates:
                    self._apply(update)
                self._offset = offset
                self.view = self._publish()
            self._seen = (stat.st_ino, stat.st_size, stat.st_mtime_ns)  # what was read covers this file's batches
        return self.view

    def _apply(self, update: Update) -> None:
        row = self._rows.get(update.doc_id, self._base_row_of.get(update.doc_id))
        if row is not None and row != DEAD:
            self._kill(row)
        if update.op == DELETE:
            self._deletes += 1
            if row is not None:
                self._rows[update.doc_id] = DEAD
            return
        self._upserts += 1
        doc = update.doc
        analyze = self._analyzer.analyze
        self._builder.add({"title": analyze(doc.title), "text": analyze(doc.text)})
        self._docs.append({"id": doc.id, "title": doc.title, "text": doc.text, "metadata": doc.metadata})
        self._ids.append(doc.id)
        self._dead_delta.append(False)
        if self._dim is not None:
            if update.vector is None or update.vector.shape != (self._dim,):
                raise ValueError(f"{self._path}: upsert of '{doc.id}' has no {self._dim}-d vector; the index is dense")
            self._vectors.append(update.vector)
        self._rows[doc.id] = len(self._base_ids) + len(self._docs) - 1

    def _kill(self, row: int) -> None:
        n_base = len(self._base_ids)
        if row < n_base:
            self._dead_base.add(row)
        else:
            self._dead_delta[row - n_base] = True

    def _publish(self) -> LiveView:
        n_base = len(self._base_ids)
        dead = np.zeros(n_base + len(self._docs), dtype=bool)
        dead_base = np.fromiter(sorted(self._dead_base), dtype=np.int64, count=len(self._dead_base))
        dead[dead_base] = True
        dead[n_base:] = self._dead_delta
        bm25 = self._builder.build(self._settings, frozen=self._frozen) if self._docs else None
        vectors = None
        if self._dim is not None:
            vectors = np.stack(self._vectors).astype(np.float32) if self._vectors else np.empty((0, self._dim), np.float32)
        return LiveView(n_base=n_base, offset=self._offset, dead=dead, dead_base_rows=dead_base, dead_rows=np.flatnonzero(dead),
                        ids=LiveIds(self._base_ids, list(self._ids)), rows=dict(self._rows), docs=list(self._docs),
                        bm25=bm25, vectors=vectors, upserts=self._upserts, deletes=self._deletes,
                        live_delta=len(self._docs) - int(sum(self._dead_delta)), base_row_of=self._base_row_of)


def _postings(index: BM25Index, field_name: str, term: int) -> tuple[np.ndarray, np.ndarray] | None:
    weights = index.fields[field_name].weights  # an unknown field was refused by the base's scores first
    start, end = weights.indptr[term], weights.indptr[term + 1]
    return None if start == end else (weights.indices[start:end], weights.data[start:end])


def live_bm25_scores(base: BM25Index, view: LiveView, tokens: Sequence[str], field_name: str) -> np.ndarray:
    """BM25 of every live row, the generation's then the delta's, dead rows 0 (what a top k of
    positive scores drops). The base's postings are summed as `BM25Index.scores` sums them
    (`accumulate_scores`, same order, same float32 values) straight into a vector with room for
    the delta rows, whose scores are added in place: no concatenated copy per query."""
    term_ids, counts = base.query_term_ids(tokens)
    scores = accumulate_scores(base._field(field_name).weights, term_ids, counts, view.n_rows)
    if view.n_delta:
        view.bm25_scores(tokens, field_name, out=scores[view.n_base:])
    scores[view.dead_rows] = 0.0
    return scores


def live_scores(base: np.ndarray, delta: np.ndarray | None, dead_rows: np.ndarray, fill: float) -> np.ndarray:
    """One score per live row, the generation's then the delta's, with every dead row set to
    `fill` (a value the top k drops): one vector, so one top k serves base and delta alike."""
    scores = base if delta is None or not len(delta) else np.concatenate((base, delta))
    scores[dead_rows] = fill
    return scores


def top_k_finite(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best finite scores (dead rows hold -inf), best first, ties by the lower row, also at
    the cut (an argpartition alone would keep an arbitrary part of a tie straddling it)."""
    n = len(scores)
    k = min(k, n)
    if k <= 0:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    if k < n:
        cut = scores[np.argpartition(-scores, k - 1)[k - 1]]  # the k-th best score
        above = np.flatnonzero(scores > cut)
        rows = np.concatenate([above, np.flatnonzero(scores == cut)[:k - len(above)]])
    else:
        rows = np.arange(n)
    rows = rows[np.lexsort((rows, -scores[rows]))]
    top = scores[rows]
    keep = np.isfinite(top)
    return rows[keep].astype(np.int64, copy=False), top[keep].astype(np.float32, copy=False)


def merge_candidate_stats(rows: np.ndarray, base: np.ndarray, of_base: CandidateStats, of_delta: CandidateStats) -> CandidateStats:
    """One `CandidateStats` for live rows from the generation's (rows where `base`) and the delta's
    (the others); both were computed for the same analysed query, so terms and counts agree."""
    def merged(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *a.shape[1:]), dtype=np.result_type(a, b))
        out[base], out[~base] = a, b
        return out

    return CandidateStats(
        doc_indices=np.asarray(rows, dtype=np.int64),
        terms=of_base.terms,
        term_counts=of_base.term_counts,
        known=of_base.known | of_delta.known,
        query_length=of_base.query_length,
        bm25={k: merged(v, of_delta.bm25[k]) for k, v in of_base.bm25.items()},
        term_freqs={k: merged(v, of_delta.term_freqs[k]) for k, v in of_base.term_freqs.items()},
        # per term, not per row: the delta's idf is the base's wherever the base knows the term
        idf={k: np.where(of_base.known, v, of_delta.idf[k]).astype(np.float32) for k, v in of_base.idf.items()},
        field_lengths={k: merged(v, of_delta.field_lengths[k]) for k, v in of_base.field_lengths.items()},
        bigram_coverage={k: merged(v, of_delta.bigram_coverage[k]) for k, v in of_base.bigram_coverage.items()},
    )
