"""Feature sets and extraction: every value checked against a plain reference, NaN where missing."""
from __future__ import annotations

from pathlib import Path

import time

import numpy as np
import pytest

from indexing.bm25 import bigram_coverage
from ltr.features import FEATURES, FEATURE_SETS, extract_features, feature_set, leaves_query_out, make_feature_set
from ltr.training import candidate_window
from search.embedded import EmbeddedIndex
from search.fusion import fuse_reciprocal_rank
from search.hybrid import FusionSettings
from tests.conftest import SMALL_DOCS, run_cli

WINDOW = FusionSettings(bm25_candidates=3, dense_candidates=3)


@pytest.fixture
def bm25_index(small_corpus: Path, home: Path) -> EmbeddedIndex:
    run_cli(home, "index", "build", "--dataset", str(small_corpus), "--name", "f", "--no-dense", "--quiet")
    return EmbeddedIndex.open(home, "f")


def _reference_bigrams(index: EmbeddedIndex, query: str, text: str) -> float:
    terms = index.analyzer.analyze(query)
    wanted = list(dict.fromkeys(zip(terms, terms[1:])))
    tokens = index.analyzer.analyze(text)
    present = set(zip(tokens, tokens[1:]))
    return sum(pair in present for pair in wanted) / len(wanted) if wanted else float("nan")


@pytest.mark.parametrize("query", ["dogs chase cats", "chase mice garden early", "quantum theory photons", "mint cats unknownword plants"])
def test_bigram_coverage_matches_a_plain_reference(bm25_index, query):
    ids = [d["_id"] for d in SMALL_DOCS]
    stats = bm25_index.candidate_stats(query, bm25_index.rows_of(ids))
    for field in ("title", "text"):
        expected = [_reference_bigrams(bm25_index, query, d[field]) for d in SMALL_DOCS]
        np.testing.assert_allclose(stats.bigram_coverage[field], expected, rtol=1e-6)
    assert stats.bigram_coverage["text"].max() > 0 or "unknownword" in query


def test_bigram_coverage_is_nan_when_it_cannot_be_measured(bm25_index):
    ids = [d["_id"] for d in SMALL_DOCS]
    assert np.isnan(bm25_index.candidate_stats("cats", bm25_index.rows_of(ids)).bigram_coverage["text"]).all()  # one term: no pair
    field = bm25_index.bm25.fields["text"]
    assert field.token_ids is not None  # new generations carry the forward index
    no_forward = bigram_coverage(np.array([[0, 1]]), None, None, np.arange(3))
    assert np.isnan(no_forward).all()  # a generation built before it existed: missing, not zero


def test_forward_index_round_trips_the_analysed_text(bm25_index):
    field = bm25_index.bm25.fields["text"]
    vocabulary = bm25_index.bm25.vocabulary
    for i, doc in enumerate(SMALL_DOCS):
        tokens = [vocabulary[t] for t in field.token_ids[field.token_offsets[i]:field.token_offsets[i + 1]].tolist()]
        assert tokens == bm25_index.analyzer.analyze(doc["text"])


def test_feature_values_against_their_definitions(dense_index):
    query = "dogs chase cats in the garden"
    window = candidate_window(dense_index, query, WINDOW)
    features = make_feature_set("every feature", 1, FEATURES)
    matrix = extract_features(dense_index, query, window, features)
    assert matrix.dtype == np.float32 and matrix.shape == (len(window), len(FEATURES))
    column = {name: matrix[:, i] for i, name in enumerate(features.names)}
    stats = dense_index.candidate_stats(query, window.rows)
    np.testing.assert_array_equal(column["bm25_all"], stats.bm25["all"])
    np.testing.assert_array_equal(column["dense_cosine"], window.dense.astype(np.float32))
    np.testing.assert_array_equal(column["bm25_rank"], window.bm25_rank.astype(np.float32))  # NaN outside the top-k
    assert np.isnan(column["bm25_rank"]).sum() == len(window) - 3
    np.testing.assert_allclose(column["rrf_score"], fuse_reciprocal_rank([window.bm25_rank, window.dense_rank]), rtol=1e-6)
    matched = stats.term_freqs["all"] > 0
    idf = stats.idf["all"]
    for row in range(len(window)):
        if matched[row].any():
            assert column["idf_max_matched"][row] == pytest.approx(idf[matched[row]].max(), rel=1e-6)
            assert column["idf_mean_matched"][row] == pytest.approx(idf[matched[row]].mean(), rel=1e-6)
        else:  # nothing matched: no max, no mean
            assert np.isnan(column["idf_max_matched"][row]) and np.isnan(column["idf_mean_matched"][row])
    assert column["coverage_all"].max() <= 1.0 and column["bm25_ratio_to_best"].max() == pytest.approx(1.0)
    assert column["dense_gap_to_best"].max() == 0.0
    assert (column["query_terms"] == len(stats.terms)).all()
    for name in ("qd_impressions", "qd_clicks", "qd_decayed_clicks", "doc_impressions", "query_impressions",
                 "doc_other_impressions", "doc_other_clicks"):
        assert (column[name] == 0).all(), name  # no history: counts are 0 ...
    for name in ("qd_ctr", "qd_coec", "qd_last_click_share", "doc_ctr", "doc_coec", "doc_other_coec"):
        assert np.isnan(column[name]).all(), name  # ... and rates unknown


def test_behaviour_features_read_the_aggregates_of_the_query(dense_index, tmp_path):
    from ltr.behaviour import PRIOR_STRENGTH, BehaviourStore
    from search.event_store import Event, EventStore, ServedRequest, ServedResult

    query = "dogs chase cats in the garden"
    window = candidate_window(dense_index, query, WINDOW)
    shown = window.doc_ids[:3]
    now = time.time()
    events = EventStore(tmp_path / "events.sqlite3")
    for r, clicked in (("r1", 1), ("r2", 2)):  # two pages of the same 3 docs; r1 clicks position 1, r2 position 2
        events.log_request(ServedRequest(r, now - 100, f"  {query.upper()} ", "ltr", "i", "g", None, None, None, 0,
                                         [ServedResult(d, p, 1.0) for p, d in enumerate(shown, start=1)]))
        events.append_events([Event(r, "click", shown[clicked - 1], clicked, now - 50)])
    events.log_request(ServedRequest("other", now - 100, "another query", "ltr", "i", "g", None, None, None, 0,
                                     [ServedResult(shown[0], 1, 1.0)]))
    events.append_events([Event("other", "impression", shown[0], 1, now - 50)])
    behaviour = BehaviourStore(tmp_path / "behaviour.sqlite3")
    behaviour.update(events)
    matrix = extract_features(dense_index, query, window, feature_set("text+behaviour"), behaviour, now=now)
    column = {name: matrix[:, i] for i, name in enumerate(feature_set("text+behaviour").names)}
    row = {d: i for i, d in enumerate(window.doc_ids)}
    first, second = row[shown[0]], row[shown[1]]
    # r1: click at 1 -> position 1 impressed; r2: click at 2 -> positions 1, 2 impressed
    assert column["qd_impressions"][first] == 2 and column["qd_clicks"][first] == 1
    assert column["qd_impressions"][second] == 1 and column["qd_clicks"][second] == 1
    assert column["doc_impressions"][first] == 3  # the other query's impression counts for the doc
    prior = 2 / 4  # 2 clicks over 4 impressions in the whole store
    assert column["qd_ctr"][first] == pytest.approx((1 + PRIOR_STRENGTH * prior) / (2 + PRIOR_STRENGTH), rel=1e-6)
    assert column["query_impressions"][0] == 3
    never_shown = [i for d, i in row.items() if d not in shown]
    assert np.isnan(column["qd_ctr"][never_shown]).all() and (column["qd_impressions"][never_shown] == 0).all()


def test_leave_query_out_document_features_never_read_the_querys_own_clicks(dense_index, tmp_path):
    from ltr.behaviour import BehaviourStore
    from search.event_store import Event, EventStore, ServedRequest, ServedResult

    query = "dogs chase cats in the garden"
    window = candidate_window(dense_index, query, WINDOW)
    doc = window.doc_ids[0]
    now = time.time()
    events = EventStore(tmp_path / "events.sqlite3")
    for r, text, clicked in (("own1", query, True), ("own2", query, True), ("other", "cats", True), ("other2", "dogs", False)):
        events.log_request(ServedRequest(r, now - 100, text, "hybrid", "i", "g", None, None, None, 0, [ServedResult(doc, 1, 1.0)]))
        events.append_events([Event(r, "click" if clicked else "impression", doc, 1, now - 50)])
    behaviour = BehaviourStore(tmp_path / "behaviour.sqlite3")
    behaviour.update(events)
    features = feature_set("text+doc-clicks")
    assert leaves_query_out(features) and not leaves_query_out(feature_set("text+behaviour"))
    column = dict(zip(features.names, extract_features(dense_index, query, window, features, behaviour, now=now).T))
    assert column["doc_other_impressions"][0] == 2 and column["doc_other_clicks"][0] == 1  # "cats" and "dogs" only
    assert column["doc_other_coec"][0] == pytest.approx(1 / (2 + 1))  # no propensities fitted: one exam per impression
    unseen = extract_features(dense_index, "cats", window, features, behaviour, now=now)
    assert dict(zip(features.names, unseen.T))["doc_other_clicks"][0] == 2  # for "cats", the two own-query clicks are other
    cold = dict(zip(features.names, extract_features(dense_index, query, window, features).T))
    assert (cold["doc_other_impressions"] == 0).all() and np.isnan(cold["doc_other_coec"]).all()


def test_extraction_is_deterministic_and_per_candidate(dense_index):
    query = "quantum entanglement"
    window = candidate_window(dense_index, query, WINDOW)
    features = feature_set("text")
    first = extract_features(dense_index, query, window, features)
    again = extract_features(dense_index, query, candidate_window(dense_index, query, WINDOW), features)
    assert first.tobytes() == again.tobytes()


def test_feature_sets_and_ablations():
    text = feature_set("text")
    assert text.describe() == {"name": "text", "version": 1, "features": list(text.names)}
    assert len(FEATURE_SETS["basic"].names) == 10
    ablated = feature_set("text-without-dense")
    assert ablated.name == "text-without-dense" and "dense_cosine" not in ablated.names
    assert set(ablated.names) | {"dense_cosine", "dense_gap_to_best"} == set(text.names)
    with pytest.raises(ValueError, match="unknown feature set 'nope'"):
        feature_set("nope")
    with pytest.raises(ValueError, match="has no 'behaviour' group"):
        feature_set("text-without-behaviour")
