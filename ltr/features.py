"""Feature sets and the one feature-extraction path that training and serving share.

A feature set is a named, versioned list of features. `extract_features` computes every
feature of a set for a whole candidate window in one vectorised pass, from what the backend
already knows (per-field BM25, term statistics, the forward index, cosine similarities) and
the window itself (retriever ranks, fused score, scores relative to the window's best).

Missing is NaN end to end: a candidate outside a retriever's top-k has no rank there, a
query of one term has no bigram, a max over no matched term has no value. XGBoost learns a
default branch for NaN; a zero would claim something false (rank 0 is better than rank 1).

Behaviour features (the `behaviour` group) come from the behaviour aggregates of
`ltr.behaviour` as they stand at the moment of the request: serving reads the live store, and
training rows are built point in time (`ltr.point_in_time`), so a row never sees an event the
service had not received when the request it describes was served. With no history at all they
are NaN (rates) and 0 (counts): the counts are the confidence features that let a model trust a
rate only when it is well supported.

A change to a feature's meaning must bump its set's version: models record the set they were
trained on and refuse to serve against another.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np

from indexing.bm25 import COMBINED_FIELD, CandidateStats, term_sums, true_counts
from search.backend import SearchBackend
from search.hybrid import Candidates

FEATURE_GROUPS = ("text", "dense", "retrieval", "behaviour")


class BehaviourView(Protocol):
    """What behaviour features read: aggregates as of `now` (`ltr.behaviour.BehaviourStore`)."""

    def query_doc_stats(self, query: str, doc_ids: Sequence[str], now: float | None = None) -> dict[str, np.ndarray]: ...

    def doc_stats(self, doc_ids: Sequence[str], now: float | None = None) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class Feature:
    name: str
    group: str  # one of FEATURE_GROUPS, for ablations
    description: str


@dataclass(frozen=True)
class FeatureSet:
    name: str
    version: int
    features: tuple[Feature, ...]

    @cached_property  # read per window on the hot path (profiled: 2% of extract_features)
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    @cached_property  # read per window on the hot path (`uses_behaviour`)
    def groups(self) -> tuple[str, ...]:
        return tuple(g for g in FEATURE_GROUPS if any(f.group == g for f in self.features))

    def describe(self) -> dict[str, object]:
        """What a model manifest records (and a loaded model is checked against)."""
        return {"name": self.name, "version": self.version, "features": list(self.names)}

    def without_group(self, group: str) -> "FeatureSet":
        """The same set minus one group: an ablation, named so it cannot pass for the original."""
        if group not in self.groups:
            raise ValueError(f"feature set {self.name} has no '{group}' group; it has {', '.join(self.groups)}")
        kept = tuple(f for f in self.features if f.group != group)
        return FeatureSet(f"{self.name}-without-{group}", self.version, kept)


# Every feature the engine can compute, in one table: name -> (group, description).
FEATURES: dict[str, tuple[str, str]] = {
    "bm25_title": ("text", "BM25 of the title field"),
    "bm25_text": ("text", "BM25 of the text field"),
    "bm25_all": ("text", "BM25 of title + text (the retriever's own score)"),
    "coverage_title": ("text", "share of distinct query terms found in the title"),
    "coverage_text": ("text", "share of distinct query terms found in the text"),
    "coverage_all": ("text", "share of distinct query terms found in title + text"),
    "matched_terms": ("text", "distinct query terms found in title + text"),
    "idf_sum_matched": ("text", "sum of the IDF of matched query terms"),
    "idf_max_matched": ("text", "largest IDF among matched query terms (NaN: none matched)"),
    "idf_mean_matched": ("text", "mean IDF of matched query terms (NaN: none matched)"),
    "idf_share_matched": ("text", "IDF mass of matched terms over the query's IDF mass"),
    "tfidf_all": ("text", "sum over query terms of log(1 + tf) * idf in title + text"),
    "bigram_title": ("text", "share of the query's adjacent term pairs found adjacent in the title"),
    "bigram_text": ("text", "share of the query's adjacent term pairs found adjacent in the text"),
    "length_title": ("text", "title length in analysed tokens"),
    "length_text": ("text", "text length in analysed tokens"),
    "query_terms": ("text", "distinct analysed query terms"),
    "query_idf_sum": ("text", "sum of the IDF of the query's terms (how specific the query is)"),
    "dense_cosine": ("dense", "cosine similarity of query and document embeddings"),
    "dense_gap_to_best": ("dense", "cosine minus the best cosine in the window"),
    "bm25_rank": ("retrieval", "rank in the BM25 top-k (NaN: not retrieved by BM25)"),
    "dense_rank": ("retrieval", "rank in the dense top-k (NaN: not retrieved by dense)"),
    "rrf_score": ("retrieval", "reciprocal-rank-fused score (k=60) of the two retrievers"),
    "bm25_ratio_to_best": ("retrieval", "BM25 over the best BM25 in the window"),
    "qd_impressions": ("behaviour", "impressions of this document for this (normalised) query: the confidence of the qd rates"),
    "qd_clicks": ("behaviour", "clicks on this document for this query"),
    "qd_ctr": ("behaviour", "click-through rate for this query, smoothed towards the global rate (NaN: never shown)"),
    "qd_coec": ("behaviour", "clicks over expected clicks from position propensities: position-debiased CTR (NaN: never shown)"),
    "qd_last_click_share": ("behaviour", "share of its clicks that ended the session (NaN: never clicked)"),
    "qd_decayed_clicks": ("behaviour", "clicks for this query, halved every 30 days"),
    "doc_impressions": ("behaviour", "impressions of this document over all queries"),
    "doc_ctr": ("behaviour", "smoothed click-through rate of this document over all queries (NaN: never shown)"),
    "doc_coec": ("behaviour", "clicks over expected clicks of this document over all queries (NaN: never shown)"),
    "query_impressions": ("behaviour", "impressions of the window's documents for this query: how much history the query has"),
    # Leave-query-out document history: the document's aggregates minus this query's own. A model
    # trained on labels made from a query's clicks may read them without seeing its own labels.
    "doc_other_impressions": ("behaviour", "impressions of this document for OTHER queries than this one"),
    "doc_other_clicks": ("behaviour", "clicks on this document for other queries than this one"),
    "doc_other_coec": ("behaviour", "clicks over (expected examinations + 1) of this document for other queries (NaN: never shown)"),
}
# The behaviour features a click-trained model may use (`train --from-events`): none of them
# reads the query's own clicks, from which its labels come.
LEAVE_QUERY_OUT = ("doc_other_impressions", "doc_other_clicks", "doc_other_coec")
TEXT_GROUPS = ("text", "dense", "retrieval")


def make_feature_set(name: str, version: int, names: Iterable[str]) -> FeatureSet:
    return FeatureSet(name, version, tuple(Feature(n, *FEATURES[n]) for n in names))


FEATURE_SETS: dict[str, FeatureSet] = {
    fs.name: fs
    for fs in (
        # The engine's default: every text-match, dense and retrieval feature.
        make_feature_set("text", 1, (n for n, (group, _) in FEATURES.items() if group in TEXT_GROUPS)),
        # `text` plus user behaviour: click aggregates and their confidence (impression counts).
        make_feature_set("text+behaviour", 1, (n for n in FEATURES if n not in LEAVE_QUERY_OUT)),
        # `text` plus what other queries' users clicked on each document: the default of training
        # from clicks (a document relevant to one query is often relevant to the next).
        make_feature_set("text+doc-clicks", 1, (n for n, (group, _) in FEATURES.items()
                                                if group in TEXT_GROUPS or n in LEAVE_QUERY_OUT)),
        # The ten-feature reference the issue measures against (a plain LambdaMART).
        make_feature_set("basic", 1, (
            "bm25_title", "bm25_text", "bm25_all", "dense_cosine", "rrf_score",
            "bm25_rank", "dense_rank", "length_title", "length_text", "coverage_all",
        )),
    )
}
DEFAULT_FEATURE_SET = "text"
DEFAULT_CLICK_FEATURE_SET = "text+doc-clicks"  # measured: bench/results/bench_click_training.json


def feature_set(name: str) -> FeatureSet:
    """A registered set by name, or an ablation of one: `text-without-dense`."""
    if name in FEATURE_SETS:
        return FEATURE_SETS[name]
    base, _, group = name.partition("-without-")
    if group and base in FEATURE_SETS:
        return FEATURE_SETS[base].without_group(group)
    raise ValueError(
        f"unknown feature set '{name}'; choose from {', '.join(FEATURE_SETS)} "
        f"(or an ablation such as {DEFAULT_FEATURE_SET}-without-dense)"
    )


def uses_behaviour(features: FeatureSet) -> bool:
    return "behaviour" in features.groups


def leaves_query_out(features: FeatureSet) -> bool:
    """True when no behaviour feature of the set reads the query's own history, so rows of a
    query labelled by its own clicks can take their behaviour features from the live store."""
    return all(f.name in LEAVE_QUERY_OUT for f in features.features if f.group == "behaviour")


def extract_features(backend: SearchBackend, query: str, window: Candidates, features: FeatureSet,
                     behaviour: BehaviourView | None = None, now: float | None = None) -> np.ndarray:
    """The feature matrix of a candidate window: float32, [candidate, feature], NaN = missing.

    The only way features are computed: training rows, served requests and the feature log all
    come from here, so what a model learned from is what it is served. `behaviour` is read as of
    `now` (default: the current time); without one, behaviour features have their no-history
    values.
    """
    if not len(window):
        return np.empty((0, len(features.features)), dtype=np.float32)
    stats = backend.candidate_stats(window.query or query, window.rows)  # the window's analysed query
    columns = _all_columns(stats, window)
    if uses_behaviour(features):
        columns.update(_behaviour_columns(behaviour, query, window.doc_ids, now))
    matrix = np.empty((len(window), len(features.features)), dtype=np.float32)
    for j, name in enumerate(features.names):
        matrix[:, j] = columns[name]()  # a column, or one value for every candidate
    return matrix


def _behaviour_columns(behaviour: BehaviourView | None, query: str, doc_ids: Sequence[str],
                       now: float | None) -> dict[str, Callable[[], np.ndarray]]:
    n = len(doc_ids)
    if behaviour is None:  # no history: counts 0, rates unknown
        zeros, missing = np.zeros(n), np.full(n, np.nan)
        qd = {"impressions": zeros, "clicks": zeros, "expected_exams": zeros, "ctr": missing, "coec": missing,
              "last_click_share": missing, "decayed_clicks": zeros}
        doc = {"impressions": zeros, "clicks": zeros, "expected_exams": zeros, "ctr": missing, "coec": missing}
    else:
        qd = behaviour.query_doc_stats(query, doc_ids, now)
        doc = behaviour.doc_stats(doc_ids, now)

    def rate(stats: dict[str, np.ndarray], name: str) -> np.ndarray:
        return np.where(stats["impressions"] > 0, stats[name], np.nan)

    def other(name: str) -> np.ndarray:  # the document's aggregate minus this query's share
        return np.maximum(doc[name] - qd[name], 0.0)

    def other_coec() -> np.ndarray:
        shown = other("impressions") > 0
        return np.where(shown, other("clicks") / (other("expected_exams") + 1.0), np.nan)

    return {
        "qd_impressions": lambda: qd["impressions"],
        "qd_clicks": lambda: qd["clicks"],
        "qd_ctr": lambda: rate(qd, "ctr"),
        "qd_coec": lambda: rate(qd, "coec"),
        "qd_last_click_share": lambda: qd["last_click_share"],
        "qd_decayed_clicks": lambda: qd["decayed_clicks"],
        "doc_impressions": lambda: doc["impressions"],
        "doc_ctr": lambda: rate(doc, "ctr"),
        "doc_coec": lambda: rate(doc, "coec"),
        "query_impressions": lambda: np.full(n, float(np.sum(qd["impressions"]))),
        "doc_other_impressions": lambda: other("impressions"),
        "doc_other_clicks": lambda: other("clicks"),
        "doc_other_coec": other_coec,
    }


def _all_columns(stats: CandidateStats, window: Candidates) -> dict[str, Callable[[], np.ndarray | float]]:
    """Every feature as a lazily computed column (or one value for the whole window), so a set
    pays only for what it uses."""
    n = len(window)
    distinct = len(stats.terms)  # distinct analysed query terms, known to the index or not
    # [term, candidate] (the embedded backend's own layout: no copy), so that reductions over
    # terms are window-wide vector operations; sums as `term_sums`, bit for bit a row sum
    tf_by_term = np.ascontiguousarray(stats.term_freqs[COMBINED_FIELD].T)
    matched_by_term = tf_by_term > 0
    matched_count = true_counts(matched_by_term)
    idf = stats.idf[COMBINED_FIELD]  # per distinct query term
    matched_idf = np.where(matched_by_term, idf[:, None], np.float32(0))  # [term, candidate], 0 where unmatched
    query_idf = float(idf[stats.known].sum()) if stats.known.any() else np.nan

    @cache
    def sums_over_terms() -> np.ndarray:
        """[matched idf sum (float32, as NumPy's nanmean sums), tf-idf], from one `term_sums`."""
        return term_sums(np.stack([matched_idf, np.log1p(tf_by_term) * idf[:, None]], axis=1))

    def matched_idf_sum() -> np.ndarray:
        return sums_over_terms()[0]

    def coverage(field: str) -> np.ndarray | float:
        if not distinct:
            return np.nan
        return (matched_count if field == COMBINED_FIELD else stats.matched_terms(field)) / distinct

    def idf_max_matched() -> np.ndarray | float:
        if not distinct:
            return np.nan
        if idf.min() > 0:  # (Lucene's idf always is) an unmatched term's 0 never beats a matched idf
            best = matched_idf.max(axis=0)
        else:
            best = np.where(matched_by_term, idf[:, None], -np.inf).max(axis=0)
        return np.where(matched_count > 0, best, np.nan)

    def idf_mean_matched() -> np.ndarray:
        # NumPy's nanmean over the matched IDFs, without its NaN masks: the float32 sum over a
        # float64 division by the count, rounded to float32 (when the matrix is filled)
        return np.divide(matched_idf_sum().astype(np.float64), matched_count, out=np.full(n, np.nan), where=matched_count > 0)

    def gap_to_best(values: np.ndarray) -> np.ndarray | float:
        best = np.fmax.reduce(values)  # fmax skips NaN, as nanmax, in one pass: NaN only when all are
        # a finite best is a finite value; otherwise a gap needs some finite value to be measured from
        return values - best if np.isfinite(best) or np.isfinite(values).any() else np.nan

    def ratio_to_best(values: np.ndarray) -> np.ndarray | float:
        best = np.fmax.reduce(values)  # the finite best, or NaN or an infinity, which give no ratio
        return values / best if np.isfinite(best) and best > 0 else np.nan

    return {
        "bm25_title": lambda: stats.bm25["title"],
        "bm25_text": lambda: stats.bm25["text"],
        "bm25_all": lambda: stats.bm25[COMBINED_FIELD],
        "coverage_title": lambda: coverage("title"),
        "coverage_text": lambda: coverage("text"),
        "coverage_all": lambda: coverage(COMBINED_FIELD),
        "matched_terms": lambda: matched_count,
        "idf_sum_matched": matched_idf_sum,
        "idf_max_matched": idf_max_matched,
        "idf_mean_matched": idf_mean_matched,
        "idf_share_matched": lambda: matched_idf_sum() / query_idf if query_idf and np.isfinite(query_idf) else np.nan,
        "tfidf_all": lambda: sums_over_terms()[1],
        "bigram_title": lambda: stats.bigram_coverage["title"],
        "bigram_text": lambda: stats.bigram_coverage["text"],
        "length_title": lambda: stats.field_lengths["title"],
        "length_text": lambda: stats.field_lengths["text"],
        "query_terms": lambda: float(distinct) if distinct else np.nan,
        "query_idf_sum": lambda: query_idf,
        "dense_cosine": lambda: window.dense,
        "dense_gap_to_best": lambda: gap_to_best(window.dense),
        "bm25_rank": lambda: window.bm25_rank,
        "dense_rank": lambda: window.dense_rank,
        "rrf_score": lambda: window.rrf,  # fused once, when the window was made
        "bm25_ratio_to_best": lambda: ratio_to_best(stats.bm25[COMBINED_FIELD].astype(np.float64)),
    }
