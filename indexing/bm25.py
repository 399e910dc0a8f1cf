"""BM25 inverted index on scipy.sparse, per field (title, text) and combined ("all").

Layout, after bm25s: one CSR matrix per field with a row per term and a column per document,
holding the *precomputed* BM25 weight of that term in that document, so a query is a sum of a
few rows. A parallel array keeps the raw term frequency for ranking features.

Scoring is Lucene's BM25 (Lucene >= 8, as Anserini and Elasticsearch use it):
    idf(t)   = ln(1 + (N - df + 0.5) / (df + 0.5))
    w(t, d)  = idf(t) * tf / (tf + k1 * (1 - b + b * dl / avgdl))
with N the number of documents that have the field (non-empty) and avgdl their mean length.
Differences from Lucene: document lengths are exact (Lucene stores them lossily in one byte),
and from rank-bm25's BM25Okapi: its idf is ln((N - df + 0.5) / (df + 0.5)) floored at
epsilon * mean idf, and its weight has an extra (k1 + 1) factor. Repeated query terms count
once per occurrence, like a Lucene BooleanQuery of their term queries.
"""
from __future__ import annotations

import dataclasses
import json
import threading
from array import array
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import scipy.sparse as sp

from indexing.config import DEFAULT_BM25_B, DEFAULT_BM25_K1

COMBINED_FIELD = "all"
SOURCE_FIELDS: tuple[str, ...] = ("title", "text")
TF_MAX = np.iinfo(np.uint16).max  # raw term frequencies are stored saturated at this value


@dataclass(frozen=True)
class BM25Settings:
    k1: float = DEFAULT_BM25_K1
    b: float = DEFAULT_BM25_B

    def __post_init__(self) -> None:
        if not (self.k1 >= 0):
            raise ValueError(f"BM25 k1 must be >= 0, got {self.k1}")
        if not (0 <= self.b <= 1):
            raise ValueError(f"BM25 b must be in [0, 1], got {self.b}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BM25Settings":
        return cls(k1=float(data["k1"]), b=float(data["b"]))


def lucene_idf(df: np.ndarray, doc_count: int) -> np.ndarray:
    """Lucene's always-positive BM25 idf, vectorised over document frequencies."""
    df = np.asarray(df, dtype=np.float64)
    return np.log1p((doc_count - df + 0.5) / (df + 0.5))


@dataclass
class FieldIndex:
    """The BM25 postings of one field. Rows are term ids, columns document indices."""

    name: str
    weights: sp.csr_matrix  # float32 precomputed BM25 weight per (term, doc)
    term_freqs: np.ndarray  # uint16, parallel to weights.data
    doc_lengths: np.ndarray  # int32 per document
    doc_count: int  # documents with a non-empty field
    avg_length: float
    idf: np.ndarray  # float32 per term
    # The field's analysed text as term ids in document order (a forward index), for phrase and
    # proximity features; None for the combined field and for generations built without it.
    token_ids: np.ndarray | None = None  # int32, every document's tokens back to back
    token_offsets: np.ndarray | None = None  # int64, n_docs + 1: document d is token_ids[o[d]:o[d+1]]
    # Successor postings, parallel to `weights` (see `successor_postings`): derived from the
    # forward index on first use unless the generation stored them.
    successors: np.ndarray | None = None  # int32: the term after each occurrence, grouped by posting
    successor_ptr: np.ndarray | None = None  # nnz + 1: posting p's are successors[ptr[p]:ptr[p+1]]
    # (settings, every document's length norm, whether all are > 0), made on first use
    _norms: tuple[BM25Settings, np.ndarray, bool] | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def document_frequencies(self) -> np.ndarray:
        return np.diff(self.weights.indptr)

    def length_norms(self, settings: BM25Settings) -> tuple[np.ndarray, bool]:
        """`length_norms` of every document (float64, computed once: elementwise, so a window's
        gather of them is bit for bit what the window's own computation gives) and whether all are
        > 0. Threads racing here compute the same array; either is kept."""
        cached = self._norms
        if cached is None or cached[0] != settings:
            norms = length_norms(self.doc_lengths, self.avg_length, settings)
            cached = self._norms = (settings, norms, bool((norms > 0).all()))
        return cached[1], cached[2]

    def successor_postings(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(successors, successor_ptr), made once from the forward index (None without one).
        Two threads racing here both compute the same arrays; either result is kept."""
        if self.token_ids is None or self.token_offsets is None:
            return None
        if self.successors is None or self.successor_ptr is None:
            self.successors, self.successor_ptr = successor_postings(
                self.token_ids, self.token_offsets, self.weights.shape[0], self.weights.nnz)
        return self.successors, self.successor_ptr


@dataclass
class CandidateStats:
    """Per-(query, candidate) statistics that later become ranking features.

    Arrays are indexed [candidate] or [candidate, term], terms being the distinct analysed query
    terms in query order (`terms`, with `term_counts` occurrences each; `known` says whether the
    index has seen a term at all).
    """

    doc_indices: np.ndarray
    terms: tuple[str, ...]
    term_counts: np.ndarray
    known: np.ndarray
    query_length: int
    bm25: dict[str, np.ndarray]
    term_freqs: dict[str, np.ndarray]
    idf: dict[str, np.ndarray]
    field_lengths: dict[str, np.ndarray]
    bigram_coverage: dict[str, np.ndarray]  # per source field; NaN where it cannot be measured

    def matched_terms(self, field: str) -> np.ndarray:
        """How many distinct query terms occur in each candidate's field."""
        return matched_counts(np.ascontiguousarray(self.term_freqs[field].T))  # no copy of the embedded backend's


class BM25Index:
    """Per-field BM25 over one shared vocabulary. Build with `BM25Builder`, or `load`."""

    def __init__(self, vocabulary: list[str], fields: dict[str, FieldIndex], settings: BM25Settings):
        self.vocabulary = vocabulary
        self.term_to_id = {term: i for i, term in enumerate(vocabulary)}
        self.fields = fields
        self.settings = settings
        self.n_docs = len(next(iter(fields.values())).doc_lengths)
        self._tables: list[np.ndarray] = []  # spare document -> window position tables (`_borrow_table`)
        self._tables_lock = threading.Lock()

    # ----- query side -------------------------------------------------------------------------
    def query_term_ids(self, tokens: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Distinct known term ids of an analysed query and how often each occurs in it."""
        ids = [self.term_to_id[t] for t in tokens if t in self.term_to_id]
        if not ids:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        unique, counts = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)
        return unique, counts.astype(np.float32)

    def scores(self, tokens: Sequence[str], field: str = COMBINED_FIELD) -> np.ndarray:
        """BM25 score of every document (float32, length n_docs)."""
        term_ids, counts = self.query_term_ids(tokens)
        return accumulate_scores(self._field(field).weights, term_ids, counts, self.n_docs)

    def top_k(self, tokens: Sequence[str], k: int, field: str = COMBINED_FIELD) -> tuple[np.ndarray, np.ndarray]:
        """Indices and scores of the k best matching documents (only documents that match)."""
        return top_k_positive(self.scores(tokens, field), k)

    def scores_of(self, tokens: Sequence[str], doc_indices: np.ndarray, field: str = COMBINED_FIELD) -> np.ndarray:
        """BM25 of the given documents only: a binary search per (term, candidate) instead of a
        pass over every posting, which matters for a few hundred candidates in a large index."""
        term_ids, counts = self.query_term_ids(tokens)
        doc_indices = np.asarray(doc_indices, dtype=np.int64)
        if not len(term_ids):
            return np.zeros(len(doc_indices), np.float32)
        field_index = self._field(field)
        weights, _ = gather_postings(field_index.weights, field_index.term_freqs, term_ids, doc_indices)
        return (weights * counts).sum(axis=1, dtype=np.float32)

    def candidate_stats(self, tokens: Sequence[str], doc_indices: np.ndarray) -> CandidateStats:
        """Per-field statistics of (query, candidate) pairs, as array operations over the whole
        window (no Python loop over candidates). Each source field's postings are searched once
        (`field_matches`); the combined field's term frequencies are the sum of the source fields'
        (as the builder makes them) and its BM25 weights are recomputed from them with the
        builder's own arithmetic (`bm25_weights`), bit for bit what the index stores, so the
        combined field costs no posting search at all."""
        doc_indices = np.asarray(doc_indices, dtype=np.int64)
        if len(doc_indices) and doc_indices.min() < 0:
            raise IndexError(f"negative document index {int(doc_indices.min())}")
        query = QueryTerms.of(tokens, self.term_to_id)
        table, positions = self._borrow_table(), np.arange(len(doc_indices), dtype=np.int32)
        try:
            table[doc_indices] = positions
            distinct = bool((table[doc_indices] == positions).all())  # else a later repeat took the slot
            window = CandidateWindow(doc_indices, table if distinct else None)
            sources = {name: field for name, field in self.fields.items() if name != COMBINED_FIELD}
            hits = fields_posting_hits([field.weights for field in sources.values()], query.term_ids, doc_indices, window)
            matches = {name: field_matches(field, query, field_hits, len(doc_indices))
                       for (name, field), field_hits in zip(sources.items(), hits)}
        finally:
            table[doc_indices] = -1
            with self._tables_lock:
                self._tables.append(table)
        if COMBINED_FIELD in self.fields:
            matches[COMBINED_FIELD] = combined_matches(self.fields[COMBINED_FIELD], matches, query.term_ids, doc_indices, self.settings)
        known, term_ids, counts = query.known, query.term_ids, query.counts
        all_known = bool(known.all())
        # every field's (weights * counts).sum(axis=1) of [candidate, term] weights, bit for bit, in
        # one `term_sums` of the fields' weights side by side ([term, field, candidate]); a term
        # counted once weighs w * 1 = w, so the product is skipped
        weights = np.stack([matches[name].weights for name in self.fields], axis=1)
        if query.repeated:
            weights *= counts[:, None, None]
        bm25 = dict(zip(self.fields, term_sums(weights)))
        tfs, idfs, lengths = {}, {}, {}
        for name, field in self.fields.items():
            tfs[name] = matches[name].term_freqs.T  # [candidate, term], as CandidateStats has them
            # The field's own idf (equal to lucene_idf(df, doc_count) as built; a delta segment's
            # is the base generation's, so its features agree with its scores).
            if all_known:
                idfs[name] = field.idf[term_ids]
            else:
                unseen = np.float32(np.log1p((field.doc_count + 0.5) / 0.5))  # lucene_idf of df 0, as Lucene reports it
                idfs[name] = np.where(known, field.idf[np.maximum(term_ids, 0)], unseen).astype(np.float32)
            lengths[name] = field.doc_lengths[doc_indices]
        return CandidateStats(
            doc_indices=doc_indices,
            terms=query.terms,
            term_counts=counts,
            known=known,
            query_length=len(tokens),
            bm25=bm25,
            term_freqs=tfs,
            idf=idfs,
            field_lengths=lengths,
            bigram_coverage=bigram_coverages(query, {name: m.bigram_pairs for name, m in matches.items() if name != COMBINED_FIELD},
                                             len(doc_indices)),
        )

    def _borrow_table(self) -> np.ndarray:
        """A document -> window position table, all -1, for one call's use (give it back with
        all -1): finding the candidates in a posting list is then one gather. Tables are reused,
        so there are only as many as calls ever ran at once, not one per thread."""
        with self._tables_lock:
            if self._tables:
                return self._tables.pop()
        return np.full(self.n_docs, -1, dtype=np.int32)

    def _field(self, field: str) -> FieldIndex:
        try:
            return self.fields[field]
        except KeyError:
            raise ValueError(f"unknown BM25 field '{field}'; index has {', '.join(self.fields)}") from None

    # ----- persistence --------------------------------------------------------------------------
    def save(self, directory: Path) -> dict[str, Any]:
        """Write the index as .npy files (memory-mappable) and return its manifest entry."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "vocab.json").write_text(json.dumps(self.vocabulary, ensure_ascii=False), encoding="utf-8")
        fields = {}
        for name, field in self.fields.items():
            arrays = {
                "data": field.weights.data.astype(np.float32, copy=False),
                "indices": field.weights.indices.astype(np.int32, copy=False),
                "indptr": field.weights.indptr.astype(np.int64, copy=False),
                "tf": field.term_freqs,
                "doclen": field.doc_lengths,
            }
            successors = field.successor_postings()  # stored: a large generation never derives them at query time
            if field.token_ids is not None and successors is not None:
                arrays["seq"] = field.token_ids
                arrays["next"], arrays["nextptr"] = successors
            for suffix, values in arrays.items():
                np.save(directory / f"{name}.{suffix}.npy", values)
            fields[name] = {"doc_count": field.doc_count, "avg_length": field.avg_length, "postings": int(field.weights.nnz),
                            "token_sequence": field.token_ids is not None, "successors": successors is not None}
        return {"settings": self.settings.to_dict(), "vocabulary": len(self.vocabulary), "documents": self.n_docs, "fields": fields}

    @classmethod
    def load(cls, directory: Path, description: Mapping[str, Any], mmap: bool = True) -> "BM25Index":
        mode = "r" if mmap else None
        vocabulary = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        n_docs = int(description["documents"])
        fields = {}
        for name, info in description["fields"].items():
            def part(suffix: str) -> np.ndarray:
                # a plain ndarray view of the mapping: np.memmap's per-slice Python hooks cost more
                # than the small slices the query path takes (the view keeps the mapping alive)
                return np.asarray(np.load(directory / f"{name}.{suffix}.npy", mmap_mode=mode))

            indptr = part("indptr")
            if len(indptr) != len(vocabulary) + 1:
                raise ValueError(f"{directory}: field '{name}' has {len(indptr) - 1} term rows, vocabulary has {len(vocabulary)}")
            weights = sp.csr_matrix((part("data"), part("indices"), indptr), shape=(len(vocabulary), n_docs), copy=False)
            weights.has_sorted_indices = True  # written sorted by the builder; skips a full scan
            doc_count = int(info["doc_count"])
            doc_lengths = part("doclen")
            token_ids = part("seq") if info.get("token_sequence") else None
            stored_successors = info.get("successors") and token_ids is not None  # older generations derive them on first use
            fields[name] = FieldIndex(
                name=name,
                weights=weights,
                term_freqs=part("tf"),
                doc_lengths=doc_lengths,
                doc_count=doc_count,
                avg_length=float(info["avg_length"]),
                idf=lucene_idf(np.diff(indptr), doc_count).astype(np.float32),
                token_ids=token_ids,
                token_offsets=token_offsets(doc_lengths) if token_ids is not None else None,
                successors=part("next") if stored_successors else None,
                successor_ptr=part("nextptr") if stored_successors else None,
            )
        return cls(vocabulary, fields, BM25Settings.from_dict(description["settings"]))


class BM25Builder:
    """Collects analysed documents one at a time (token strings are dropped right away, so a
    million documents fit in memory) and builds a `BM25Index`."""

    def __init__(self, fields: Sequence[str] = SOURCE_FIELDS):
        self.field_names = tuple(fields)
        self.term_to_id: dict[str, int] = {}
        self._term_ids = {name: array("i") for name in self.field_names}
        self._lengths = {name: array("i") for name in self.field_names}

    def add(self, tokens_by_field: Mapping[str, Iterable[str]]) -> None:
        # Term ids are numbered in order of first occurrence (title before text), as a
        # setdefault per token would, but the common case - every term already known - is a
        # single C-level map over the tokens.
        vocab = self.term_to_id
        lookup = vocab.__getitem__
        for name in self.field_names:
            tokens = tokens_by_field.get(name, ())
            if not isinstance(tokens, (list, tuple)):
                tokens = list(tokens)
            try:
                ids = list(map(lookup, tokens))
            except KeyError:
                for token in tokens:
                    if token not in vocab:
                        vocab[token] = len(vocab)
                ids = list(map(lookup, tokens))
            self._term_ids[name].fromlist(ids)
            self._lengths[name].append(len(ids))

    @property
    def n_docs(self) -> int:
        return len(self._lengths[self.field_names[0]])

    def build(self, settings: BM25Settings = BM25Settings(), frozen: BM25Index | None = None) -> BM25Index:
        """The index of the documents added so far (the builder can go on adding and build again).
        `frozen`: score with that index's collection statistics (idf per term, document count and
        average length per field) instead of these documents' own: a delta segment's documents are
        scored on the base generation's scale. A term the frozen index never saw gets the idf of
        its document frequency here over the frozen document count."""
        n_terms, n_docs = len(self.term_to_id), self.n_docs
        counts, sequences = {}, {}
        for name in self.field_names:
            ids = np.frombuffer(self._term_ids[name], dtype=np.int32)
            lengths = np.frombuffer(self._lengths[name], dtype=np.int32)
            if frozen is not None:  # a delta segment goes on adding: the index must not pin the builder's buffers
                ids, lengths = ids.copy(), lengths.copy()
            counts[name] = term_document_counts(ids, lengths, n_terms, n_docs)
            sequences[name] = (ids, token_offsets(lengths))
        counts[COMBINED_FIELD] = sum((counts[name] for name in self.field_names[1:]), counts[self.field_names[0]]).tocsr()
        counts[COMBINED_FIELD].sort_indices()
        fields = {}
        vocabulary = [""] * n_terms
        for term, i in self.term_to_id.items():
            vocabulary[i] = term
        for name in list(counts):  # pop: each count matrix is freed once its field is built
            stats = frozen_stats(frozen, name, vocabulary, counts[name]) if frozen is not None else None
            fields[name] = field_from_counts(name, counts.pop(name), settings, stats)
            if name in sequences:
                fields[name].token_ids, fields[name].token_offsets = sequences[name]
        return BM25Index(vocabulary, fields, settings)


@dataclass(frozen=True)
class FieldStats:
    """Collection statistics a field is scored with: idf per term, documents with the field, mean length."""

    idf: np.ndarray
    doc_count: int
    avg_length: float


def frozen_stats(frozen: BM25Index, name: str, vocabulary: list[str], counts: sp.csr_matrix) -> FieldStats:
    """The frozen index's statistics of field `name`, over another vocabulary (see BM25Builder.build)."""
    field = frozen.fields[name]
    base_ids = np.fromiter((frozen.term_to_id.get(t, -1) for t in vocabulary), dtype=np.int64, count=len(vocabulary))
    own = lucene_idf(np.diff(counts.indptr), field.doc_count).astype(np.float32)
    idf = np.where(base_ids >= 0, field.idf[np.maximum(base_ids, 0)], own).astype(np.float32)
    return FieldStats(idf, field.doc_count, field.avg_length)


def token_offsets(doc_lengths: np.ndarray) -> np.ndarray:
    """Where each document's tokens start in a forward index (n_docs + 1 offsets)."""
    offsets = np.zeros(len(doc_lengths) + 1, dtype=np.int64)
    np.cumsum(doc_lengths, out=offsets[1:])
    return offsets


def bigram_coverage(
    bigrams: np.ndarray, token_ids: np.ndarray | None, offsets: np.ndarray | None, doc_indices: np.ndarray
) -> np.ndarray:
    """Share of the query's adjacent term pairs that occur adjacent and in order in each
    candidate (an ordered-proximity signal that BM25's bag of words cannot see).

    NaN when it cannot be measured: no forward index, or a query of fewer than two terms.
    `bigrams` are (first, second) term ids (-1: unknown term). This form reads every candidate
    token (a single document's check, or a reference); `BM25Index.candidate_stats` gets the same
    from the successor postings of the query terms (`successor_pairs`, `bigram_coverages`).
    """
    doc_indices = np.asarray(doc_indices, dtype=np.int64)
    if token_ids is None or offsets is None or len(bigrams) == 0:
        return np.full(len(doc_indices), np.nan, dtype=np.float32)
    bigrams = np.asarray(bigrams, dtype=np.int64).reshape(-1, 2)
    known = bigrams[(bigrams >= 0).all(axis=1)]
    tokens, owner = candidate_tokens(token_ids, offsets, doc_indices)
    within = owner[1:] == owner[:-1]  # adjacent tokens of one candidate
    query_keys = np.unique(pair_keys(known[:, 0], known[:, 1]))
    slot, is_pair = find_pairs(query_keys, pair_keys(tokens[:-1][within], tokens[1:][within]))
    return bigram_share(len(query_keys), len(bigrams), slot[is_pair], owner[1:][within][is_pair], len(doc_indices))


PAIR_SHIFT = 32  # a pair of term ids (int32) as one int64 key: first << 32 | second


def pair_keys(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """int64 keys of (first, second) term id pairs, ordered by first, then second."""
    return (np.asarray(first, dtype=np.int64) << PAIR_SHIFT) | second


@dataclass(frozen=True)
class QueryTerms:
    """An analysed query as a window's columns: its distinct terms in query order (id -1: a term
    the index never saw), and its distinct adjacent pairs, the known ones as sorted `pair_keys`:
    a pair of term ids is then one comparison with the first term's second (`second_ids`) or,
    when a term starts two pairs, one binary search (no vocabulary-sized lookup table)."""

    terms: tuple[str, ...]
    term_ids: np.ndarray  # int64 per column, -1 for a term the index never saw
    counts: np.ndarray  # float32: occurrences of each column's term in the query
    repeated: bool  # some term occurs more than once
    n_bigrams: int  # distinct adjacent pairs, known or not: the coverage's denominator
    pair_keys: np.ndarray  # int64, sorted: the known pairs (`pair_keys`)
    starts_bigram: np.ndarray  # bool per column: the first term of a known pair
    # per column, the second term id of the one known pair its term starts (-1: none), and that
    # pair's slot in `pair_keys`; None when a term starts two pairs (the pairs are then searched)
    second_ids: np.ndarray | None
    pair_slots: np.ndarray

    @property
    def known(self) -> np.ndarray:
        return self.term_ids >= 0

    @classmethod
    def of(cls, tokens: Sequence[str], term_to_id: Mapping[str, int]) -> "QueryTerms":
        """One pass over the (few) tokens in plain Python, then one array of each kind: cheaper
        than array operations on arrays this small."""
        occurrences: dict[str, int] = {}
        for token in tokens:
            occurrences[token] = occurrences.get(token, 0) + 1
        lookup = term_to_id.get
        ids = [lookup(t, -1) for t in occurrences]
        pairs = dict.fromkeys(zip(tokens, tokens[1:]))  # distinct, in query order
        keys, seconds, one_each = [], [-1] * len(ids), True
        for a, b in pairs:
            first, second = lookup(a, -1), lookup(b, -1)
            if first >= 0 and second >= 0:
                keys.append(first << PAIR_SHIFT | second)
                column = ids.index(first)
                one_each &= seconds[column] < 0
                seconds[column] = second
        keys.sort()
        slots = [keys.index(ids[c] << PAIR_SHIFT | second) if second >= 0 else -1 for c, second in enumerate(seconds)]
        return cls(tuple(occurrences), np.array(ids, dtype=np.int64), np.array(list(occurrences.values()), dtype=np.float32),
                   len(occurrences) < len(tokens), len(pairs), np.array(keys, dtype=np.int64),
                   np.array([second >= 0 for second in seconds], dtype=bool),
                   np.array(seconds, dtype=np.int64) if one_each else None, np.array(slots, dtype=np.int64))


def candidate_tokens(token_ids: np.ndarray, offsets: np.ndarray, doc_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The candidates' token runs back to back and the candidate of each token, in one
    vectorised gather."""
    starts, ends = offsets[doc_indices], offsets[doc_indices + 1]
    lengths = ends - starts
    run_starts = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    positions = np.arange(int(lengths.sum()), dtype=np.int64) + run_starts
    return token_ids[positions], np.repeat(np.arange(len(doc_indices)), lengths)


def find_pairs(query_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which pair `keys` are query pairs (sorted `query_keys`), and their slots there."""
    if not len(query_keys):
        return np.zeros(len(keys), dtype=np.int64), np.zeros(len(keys), dtype=bool)
    slot = np.minimum(query_keys.searchsorted(keys), len(query_keys) - 1)
    return slot, query_keys[slot] == keys


def bigram_share(n_known: int, n_bigrams: int, slot: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """Share of the query's `n_bigrams` pairs found in each of `n` candidates, from the query
    pairs found (`slot` among the `n_known` known ones) and their `owner` candidates."""
    found = np.zeros((n_known, n), dtype=bool)  # [bigram, candidate]: the count runs over candidates
    found[slot, owner] = True
    return (true_counts(found) / n_bigrams).astype(np.float32)


@dataclass
class FieldMatches:
    """What one field says about a window: [term, candidate] BM25 weights and term frequencies
    (float32, saturated at TF_MAX as stored), and its `successor_pairs` (None: not measured here).
    Term-major, so that a reduction over terms is a few whole-window vector operations
    (`term_sums`) rather than one short reduction per candidate."""

    weights: np.ndarray
    term_freqs: np.ndarray
    bigram_pairs: tuple[np.ndarray, np.ndarray] | None = None  # `successor_pairs`


def field_matches(field: FieldIndex, query: QueryTerms, hits: PostingHits, n: int) -> FieldMatches:
    """A source field's `FieldMatches` for a window of `n` candidates from its postings of the
    query terms in the candidates (`hits`), read once for the weights, the term frequencies and
    the bigrams."""
    shape = (len(query.term_ids), n)
    return FieldMatches(*hits.by_term(shape, field.weights.data, field.term_freqs), successor_pairs(query, hits, field))


def combined_matches(field: FieldIndex, sources: Mapping[str, FieldMatches], term_ids: np.ndarray, doc_indices: np.ndarray,
                     settings: BM25Settings) -> FieldMatches:
    """The combined field's `FieldMatches`: its term frequencies are the source fields' sum (the
    builder adds the count matrices), its weights follow from them. Looked up in its postings
    when that sum may be saturated (a term over TF_MAX times in a document)."""
    if sources:
        first, *others = (m.term_freqs for m in sources.values())
        tf = first.copy()  # added in field order, as the builder adds them
        for other in others:
            tf += other
        if tf.max(initial=0) < TF_MAX:
            return FieldMatches(candidate_weights(field, term_ids, tf, doc_indices, settings), tf)
    hits = posting_hits(field.weights, term_ids, doc_indices)
    shape = (len(term_ids), len(doc_indices))
    return FieldMatches(*hits.by_term(shape, field.weights.data, field.term_freqs))


def length_norms(lengths: np.ndarray, avg_length: float, settings: BM25Settings) -> np.ndarray:
    """BM25's per-document length normalisation k1 * (1 - b + b * dl / avgdl), float64."""
    return settings.k1 * (1.0 - settings.b + settings.b * lengths / max(avg_length, 1e-9))


def matched_counts(tf_by_term: np.ndarray) -> np.ndarray:
    """How many of the terms of a [term, candidate] array occur (tf > 0) in each candidate."""
    return true_counts(tf_by_term > 0)


def true_counts(flags: np.ndarray) -> np.ndarray:
    """Per-column count of the True values of a [row, column] bool array: a vectorised count
    over columns, in bytes while it cannot overflow (an unsigned integer)."""
    if len(flags) < 256:
        return np.add.reduce(flags.view(np.uint8), axis=0, dtype=np.uint8)
    return flags.sum(axis=0)


def term_sums(by_term: np.ndarray) -> np.ndarray:
    """Per-candidate sums of a float32 [term, candidate] array (or [term, ..., candidate]: the
    sums of every array side by side, each bit for bit as alone), bit for bit NumPy's
    `sum(axis=1)` of the [candidate, term] matrix, so features stay equal to a plain
    `matrix.sum(axis=1)`: NumPy reduces each contiguous row by pairwise summation (sequentially
    under 8 terms, in 8 interleaved partial sums up to 128, by halves beyond), here applied to
    whole term rows at once: a dozen window-wide adds instead of one short reduction per candidate
    (a test pins this against NumPy's own sum)."""
    if not len(by_term):
        return np.zeros(by_term.shape[1:], dtype=np.float32)
    return _pairwise_rows(by_term)


def _pairwise_rows(rows: np.ndarray) -> np.ndarray:
    m = len(rows)
    if m == 1:
        return rows[0].copy()
    if m < 8:  # NumPy starts at -0.0, and -0.0 + x is x: a sequential sum from the first row
        total = rows[0] + rows[1]
        for i in range(2, m):
            total += rows[i]
        return total
    if m <= 128:
        end = m - m % 8
        partial = rows[:8] if end == 8 else rows[:8] + rows[8:16]  # 8 running sums, one per row mod 8
        for i in range(16, end, 8):
            partial += rows[i:i + 8]
        pairs = partial[0::2] + partial[1::2]  # ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)), by halves
        total = pairs[0::2] + pairs[1::2]
        total = total[0] + total[1]
        for i in range(end, m):  # the rows past the last block of 8, in order
            total += rows[i]
        return total
    half = m // 2
    half -= half % 8
    return _pairwise_rows(rows[:half]) + _pairwise_rows(rows[half:])


def bm25_weights(idf: np.ndarray, tf: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Lucene BM25 weights idf * tf / (tf + norm) with the index's arithmetic: float32 idf * tf,
    over float64 tf + norm, rounded to float32. The builder stores exactly these."""
    return (idf * tf / (tf + norms)).astype(np.float32)


def candidate_weights(field: FieldIndex, term_ids: np.ndarray, tf: np.ndarray, doc_indices: np.ndarray,
                      settings: BM25Settings) -> np.ndarray:
    """[term, candidate] BM25 weights of a field from exact [term, candidate] term frequencies:
    equal to the stored postings' weights (0 where the term is absent)."""
    idf = field.idf[np.maximum(term_ids, 0)][:, None]  # float32, as stored
    every_norm, all_positive = field.length_norms(settings)
    norms = every_norm[doc_indices][None, :]
    if all_positive:  # an absent term (tf 0) weighs 0 / norm = 0 exactly
        return bm25_weights(idf, tf, norms)
    with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0 where a norm is 0 (k1 = 0, or b = 1 and no tokens)
        return np.where(tf > 0, bm25_weights(idf, tf, norms), np.float32(0)).astype(np.float32, copy=False)


def successor_postings(token_ids: np.ndarray, offsets: np.ndarray, n_terms: int, n_postings: int) -> tuple[np.ndarray, np.ndarray]:
    """A field's successor postings, from its forward index: for every occurrence of every term,
    the term id that follows it in its document (`n_terms` at a document's end), ordered by
    (term, document, position), which is the order of the CSR postings; and where each posting's
    successors start. Adjacent pairs are then a gather away: the pairs starting with term a in
    document d are (a, successors[ptr[p]:ptr[p+1]]) for a's posting p in d.

    The grouping by term is a stable counting sort (scipy's COO -> CSR conversion, several times
    faster than a stable argsort); a posting starts wherever the term or the document changes.
    """
    n_tokens = len(token_ids)
    position_dtype = np.int32 if n_tokens <= np.iinfo(np.int32).max else np.int64
    token_ids = np.asarray(token_ids)
    by_term = sp.coo_matrix((np.ones(n_tokens, dtype=np.int8), (token_ids, np.arange(n_tokens, dtype=position_dtype))),
                            shape=(n_terms, n_tokens)).tocsr()
    positions = by_term.indices
    doc_lengths = np.diff(offsets)
    following = np.full(n_tokens, n_terms, dtype=np.int32)  # n_terms: the document ends here
    following[:-1] = token_ids[1:]
    following[offsets[1:][doc_lengths > 0] - 1] = n_terms
    doc_of = np.repeat(np.arange(len(doc_lengths), dtype=np.int32), doc_lengths)[positions]
    new_posting = np.ones(n_tokens, dtype=bool)
    new_posting[1:] = doc_of[1:] != doc_of[:-1]
    new_posting[by_term.indptr[:-1][np.diff(by_term.indptr) > 0]] = True
    ptr = np.append(np.flatnonzero(new_posting), n_tokens).astype(np.int64)
    if len(ptr) - 1 != n_postings:
        raise ValueError(f"forward index gives {len(ptr) - 1} postings, the field has {n_postings}")
    return following[positions], ptr


@dataclass
class PostingHits:
    """The (candidate, term) pairs of a window that have a posting, as parallel arrays: the
    candidate's position in the window, the term's column and the posting's position in the
    field's data."""

    candidate: np.ndarray
    column: np.ndarray
    posting: np.ndarray

    def dense(self, values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """float32 [candidate, term] matrix of the postings' `values`, 0 where no posting."""
        out = np.zeros(shape, dtype=np.float32)
        out[self.candidate, self.column] = np.asarray(values)[self.posting]
        return out

    def by_term(self, shape: tuple[int, int], *values: np.ndarray) -> list[np.ndarray]:
        """float32 [term, candidate] matrices of the postings' `values` (one per array), 0 where
        no posting: the flat position of every hit computed once for all of them."""
        flat = self.column * shape[1] + self.candidate
        matrices = []
        for array in values:
            out = np.zeros(shape[0] * shape[1], dtype=np.float32)
            out[flat] = np.asarray(array)[self.posting]
            matrices.append(out.reshape(shape))
        return matrices


@dataclass(frozen=True)
class SortedWindow:
    """A window's candidates in document order, sorted once for every field's posting search."""

    order: np.ndarray  # candidate positions by ascending document
    needles: np.ndarray  # their documents, int32 (the postings' dtype) when they fit

    @classmethod
    def of(cls, doc_indices: np.ndarray) -> "SortedWindow":
        order = np.argsort(doc_indices, kind="stable")
        needles = doc_indices[order]
        if len(needles) and needles[-1] <= np.iinfo(np.int32).max:
            needles = needles.astype(np.int32)
        return cls(order, needles)


SCAN_FACTOR = 16  # posting lists up to 16 x the window are read whole through the window's table (`posting_hits`)


class CandidateWindow:
    """A window's candidates as every field's posting search reads them: `table[doc]` is the
    document's position in the window, -1 for the other documents (None when a candidate is
    repeated: a table holds one position per document), and the candidates sorted by document,
    made on first use, for the lists too long to read whole."""

    def __init__(self, doc_indices: np.ndarray, table: np.ndarray | None):
        self.doc_indices, self.table = doc_indices, table

    @cached_property
    def sorted(self) -> SortedWindow:
        return SortedWindow.of(self.doc_indices)


def posting_hits(matrix: sp.csr_matrix, term_ids: np.ndarray, doc_indices: np.ndarray,
                 window: CandidateWindow | None = None) -> PostingHits:
    """Every (candidate, term) posting of a window in `matrix` (terms with id -1 have none):
    `fields_posting_hits` of one field."""
    return fields_posting_hits([matrix], term_ids, doc_indices, window)[0]


def fields_posting_hits(matrices: Sequence[sp.csr_matrix], term_ids: np.ndarray, doc_indices: np.ndarray,
                        window: CandidateWindow | None = None) -> list[PostingHits]:
    """`PostingHits` of a window in each of `matrices` (the fields' postings).

    A posting list up to SCAN_FACTOR times the window's size is read whole, every posting's
    document looked up in the window's table: one gather for all such lists of all fields (a
    lookup is cheaper than the log2(list) steps of a binary search per candidate). A longer
    list, or any list when the window has no table (a repeated candidate), has the sorted
    candidates binary-searched in it: one search per such term, the only loop, over terms.
    Needles take the postings' own dtype (int32), so no posting list is converted to int64."""
    n = len(doc_indices)
    window = window or CandidateWindow(doc_indices, None)
    known = term_ids >= 0
    columns, ids = np.flatnonzero(known).tolist(), term_ids[known]
    scanned, searched = [], []
    for matrix in matrices:
        # (column, first posting, end) of each query term with postings, as Python ints
        starts, ends = matrix.indptr[ids].tolist(), matrix.indptr[ids + 1].tolist()
        spans = [span for span in zip(columns, starts, ends) if span[2] > span[1]]
        short = [span for span in spans if span[2] - span[1] <= SCAN_FACTOR * n] if window.table is not None and n else []
        scanned.append(short)
        searched.append([span for span in spans if span[2] - span[1] > SCAN_FACTOR * n] if short else spans if n else [])
    read = postings_in_window([np.asarray(m.indices) for m in matrices], scanned, window.table) if any(scanned) else None
    found = []
    for f, matrix in enumerate(matrices):
        parts = [read[f]] if read is not None and scanned[f] else []
        if searched[f]:
            indices, order, needles = np.asarray(matrix.indices), window.sorted.order, window.sorted.needles
            parts.append(candidates_in_postings(indices, searched[f], order,
                                                needles if needles.dtype == indices.dtype else needles.astype(np.int64)))
        if not parts:
            empty = np.empty(0, dtype=np.int64)
            parts.append(PostingHits(empty, empty, empty))
        found.append(parts[0] if len(parts) == 1 else
                     PostingHits(*(np.concatenate([getattr(p, name) for p in parts]) for name in ("candidate", "column", "posting"))))
    return found


def candidates_in_postings(indices: np.ndarray, spans: list[tuple[int, int, int]], order: np.ndarray,
                           needles: np.ndarray) -> PostingHits:
    """Hits of the sorted candidates `needles` (window positions `order`) in the posting lists
    `spans` (column, start, end): each list searched for every candidate."""
    where = np.empty((len(spans), len(needles)), dtype=np.int64)
    for row, (_, start, end) in enumerate(spans):
        where[row] = indices[start:end].searchsorted(needles)
    columns, starts, ends = np.array(spans, dtype=np.int64).T
    where += starts[:, None]
    np.minimum(where, (ends - 1)[:, None], out=where)  # past a list's end: its last posting, which is no hit
    row, position = np.nonzero(indices[where] == needles)
    return PostingHits(order[position], columns[row], where[row, position])


def postings_in_window(indices: Sequence[np.ndarray], spans: Sequence[list[tuple[int, int, int]]], table: np.ndarray) -> list[PostingHits]:
    """Hits of the posting lists `spans[f]` (column, start, end) of each field f (postings
    `indices[f]`) in a window whose `table` gives each document's position (-1: not a
    candidate): every posting of every list of every field read back to back, at once."""
    documents = np.concatenate([indices[f][start:end] for f, field_spans in enumerate(spans) for _, start, end in field_spans])
    candidate = table[documents]
    hit = np.flatnonzero(candidate >= 0)
    run_ends, columns, shifts, field_ends = [], [], [], []
    end_of_run = 0
    for field_spans in spans:
        for column, start, end in field_spans:
            shifts.append(start - end_of_run)  # a posting read at run position p is posting p + shift
            end_of_run += end - start
            run_ends.append(end_of_run)
            columns.append(column)
        field_ends.append(end_of_run)
    run_ends_, columns_, shifts_ = np.array([run_ends, columns, shifts], dtype=np.int64)
    span = run_ends_.searchsorted(hit, side="right")
    candidate, column, posting = candidate[hit], columns_[span], hit + shifts_[span]
    cuts = [0, *hit.searchsorted(field_ends).tolist()]
    return [PostingHits(candidate[a:b], column[a:b], posting[a:b]) for a, b in zip(cuts, cuts[1:])]


def successor_pairs(query: QueryTerms, hits: PostingHits, field: FieldIndex) -> tuple[np.ndarray, np.ndarray] | None:
    """The query pairs adjacent in the candidates, as their slots in `query.pair_keys` and their
    candidates, from the successor postings: only the successors of the pairs' first terms in
    the candidates are read (their postings are found already, `hits`); no scan of every
    candidate token. None without a forward index (the bigrams cannot be measured)."""
    successors = field.successor_postings()
    if successors is None:
        return None
    following, ptr = successors
    first = query.starts_bigram[hits.column]
    posting = hits.posting[first]
    starts = ptr[posting]
    counts = ptr[posting + 1] - starts
    ends = counts.cumsum()
    column, owner = hits.column[first], hits.candidate[first]
    if len(ends) and int(ends[-1]) > len(posting):  # some term more than once in a document: expand the runs
        positions = np.arange(int(ends[-1]), dtype=np.int64) + (starts - ends + counts).repeat(counts)
        successor, column, owner = following[positions], column.repeat(counts), owner.repeat(counts)
    else:  # one occurrence per posting (titles, mostly)
        successor = following[starts]
    if query.second_ids is not None:  # each first term starts one pair: compare with its second term
        is_pair = successor == query.second_ids[column]
        return query.pair_slots[column[is_pair]], owner[is_pair]
    slot, is_pair = find_pairs(query.pair_keys, (query.term_ids[column] << PAIR_SHIFT) | successor)
    return slot[is_pair], owner[is_pair]


def bigram_coverages(query: QueryTerms, pairs: Mapping[str, tuple[np.ndarray, np.ndarray] | None], n: int) -> dict[str, np.ndarray]:
    """Each field's bigram coverage of `n` candidates from its `successor_pairs`, every field's
    in one `bigram_share` (a field's candidates numbered after the previous field's); NaN where
    it cannot be measured: no forward index, or a query without a bigram."""
    measured = [name for name, found in pairs.items() if found is not None] if query.n_bigrams else []
    coverage = {name: np.full(n, np.nan, dtype=np.float32) for name in pairs if name not in measured}
    if measured:
        slot = np.concatenate([pairs[name][0] for name in measured])
        owner = np.concatenate([pairs[name][1] + i * n for i, name in enumerate(measured)])
        shares = bigram_share(len(query.pair_keys), query.n_bigrams, slot, owner, len(measured) * n)
        coverage.update({name: shares[i * n:(i + 1) * n] for i, name in enumerate(measured)})
    return coverage


def term_document_counts(term_ids: np.ndarray, lengths: np.ndarray, n_terms: int, n_docs: int) -> sp.csr_matrix:
    """Term-frequency matrix (terms x docs, float32, sorted indices) from flat token ids."""
    doc_of_token = np.repeat(np.arange(n_docs, dtype=np.int32), lengths)
    ones = np.ones(len(term_ids), dtype=np.float32)
    matrix = sp.csr_matrix((ones, (term_ids, doc_of_token)), shape=(n_terms, n_docs))
    matrix.sum_duplicates()
    return matrix


def field_from_counts(name: str, counts: sp.csr_matrix, settings: BM25Settings, stats: FieldStats | None = None) -> FieldIndex:
    """Turn raw term frequencies into precomputed Lucene BM25 weights.

    The weights matrix shares `counts`' index arrays. The length normalisation is computed once
    per document and gathered, and the weights are computed in blocks of postings, which keeps
    the float64 temporaries small; the arithmetic (float32 idf * tf over float64 tf + norm,
    rounded to float32) is the same as one whole-array expression, so are the weights.
    """
    lengths = np.asarray(counts.sum(axis=0)).ravel().astype(np.int32)
    df = np.diff(counts.indptr)
    if stats is None:
        doc_count = int(np.count_nonzero(lengths))
        avg_length = float(lengths.sum() / doc_count) if doc_count else 0.0
        idf = lucene_idf(df, doc_count).astype(np.float32)
    else:
        doc_count, avg_length, idf = stats.doc_count, stats.avg_length, stats.idf
    tf = counts.data.astype(np.float32, copy=False)
    indices = counts.indices.astype(np.int32, copy=False)
    row_idf = np.repeat(idf, df)
    doc_norm = length_norms(lengths, avg_length, settings)
    weights = np.empty(len(tf), dtype=np.float32)
    block = 1 << 22
    for start in range(0, len(tf), block):
        end = min(start + block, len(tf))
        block_tf = tf[start:end]
        weights[start:end] = bm25_weights(row_idf[start:end], block_tf, doc_norm[indices[start:end]])
    del row_idf
    matrix = sp.csr_matrix((weights, indices, counts.indptr.astype(np.int64, copy=False)), shape=counts.shape)
    term_freqs = np.minimum(tf, TF_MAX).astype(np.uint16)
    return FieldIndex(name, matrix, term_freqs, lengths, doc_count, avg_length, idf)


def accumulate_scores(weights: sp.csr_matrix, term_ids: np.ndarray, counts: np.ndarray, n_docs: int) -> np.ndarray:
    """Sum the weight rows of the query terms into a dense score vector (the hot loop).

    Terms are added one row at a time in `term_ids` order with float32 arithmetic, so every score
    is the same float32 sum whichever way a row is added. `np.add.at` (NumPy >= 1.25 has a fast
    path for it) takes the int32 postings as they are; fancy `scores[idx] += w` first converts
    them to intp and gathers and scatters separately, which made it about twice as slow.
    """
    scores = np.zeros(n_docs, dtype=np.float32)
    indptr, indices, data = weights.indptr, weights.indices, weights.data
    for term, count in zip(term_ids.tolist(), counts.tolist()):
        start, end = indptr[term], indptr[term + 1]
        if start == end:
            continue
        values = data[start:end] if count == 1.0 else count * data[start:end]
        np.add.at(scores, indices[start:end], values)
    return scores


# top_k_positive estimates its cut-off from every SAMPLE_STRIDE-th score (see there).
SAMPLE_STRIDE = 64
SAMPLE_RANK_EXTRA = 16


def top_k_positive(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k of the strictly positive scores, best first, ties by document index.

    A large score vector (a million documents with a quarter of them matching) is mostly spent
    on listing and partitioning every positive score. Instead a cut-off is estimated from a
    strided sample: `threshold` = the `rank`-th best positive sample value, where rank is about
    twice k / SAMPLE_STRIDE, so roughly 2k documents (more with ties) score at least that much.
    Only those are listed and partitioned exactly. The result is exact whatever the sample: when
    at least k documents reach the threshold, the k best (and every document tied with the k-th)
    are among them; otherwise the full list of positive scores is used.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    n = scores.shape[0]
    rank = 2 * k // SAMPLE_STRIDE + SAMPLE_RANK_EXTRA
    if n >= 4 * SAMPLE_STRIDE * rank:
        sample = scores[::SAMPLE_STRIDE]
        positive = sample[sample > 0]
        if positive.size >= rank:
            threshold = np.partition(positive, positive.size - rank)[positive.size - rank]
            candidates = np.flatnonzero(scores >= threshold)
            if candidates.size >= k:
                return _top_k_of_candidates(candidates, scores[candidates], k)
    candidates = np.flatnonzero(scores > 0)
    return _top_k_of_candidates(candidates, scores[candidates], k)


_LOW_32 = np.int64(0xFFFFFFFF)


def _top_k_of_candidates(candidates: np.ndarray, candidate_scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top k of (ascending document indices, their positive scores): best first, ties by
    the lower index.

    float32 scores: a positive float32 orders like its bit pattern read as an int32, so the
    int64 key (score bits << 32) | (2**32 - 1 - index) is unique per document and orders by
    score, then by lower index; one partition and one sort of plain integers give the exact
    answer, ties included. Other dtypes: everything above the k-th best score, then as many of
    the documents tied with it as still fit, lowest indices first (argpartition alone would take
    an arbitrary part of a tie that straddles the cut).
    """
    size = candidates.size
    if candidate_scores.dtype == np.float32 and (size == 0 or candidates[-1] <= _LOW_32):
        keys = candidate_scores.view(np.int32).astype(np.int64) << 32
        keys |= _LOW_32 - candidates
        if size > k:
            keys = np.partition(keys, size - k)[size - k:]
        keys = np.sort(keys)[::-1]
        return _LOW_32 - (keys & _LOW_32), (keys >> 32).astype(np.int32).view(np.float32)
    if size > k:
        cut = np.partition(candidate_scores, size - k)[size - k]
        keep = candidate_scores > cut
        missing = k - int(np.count_nonzero(keep))
        if missing > 0:
            keep[np.flatnonzero(candidate_scores == cut)[:missing]] = True
        candidates, candidate_scores = candidates[keep], candidate_scores[keep]
    order = np.argsort(-candidate_scores, kind="stable")  # stable: ties stay in index order
    return candidates[order].astype(np.int64, copy=False), candidate_scores[order]


def gather_postings(
    weights: sp.csr_matrix, term_freqs: np.ndarray, term_ids: np.ndarray, doc_indices: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Weights and term frequencies of (candidate, term) pairs; terms with id -1 are all zero."""
    doc_indices = np.asarray(doc_indices, dtype=np.int64)
    hits = posting_hits(weights, term_ids, doc_indices)
    shape = (len(doc_indices), len(term_ids))
    return hits.dense(weights.data, shape), hits.dense(term_freqs, shape)
