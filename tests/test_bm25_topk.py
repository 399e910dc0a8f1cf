"""BM25Index.top_k against a brute-force sort of BM25Index.scores on small random indexes.

The contract: the k documents with the highest strictly positive score, best first, ties broken
by the lower document index; fewer than k when fewer documents match.
"""
from __future__ import annotations

import numpy as np
import pytest

from indexing import bm25 as bm25_module
from indexing.bm25 import BM25Builder, BM25Index, BM25Settings, accumulate_scores, top_k_positive

WORDS = [f"w{i}" for i in range(40)]


def brute_force(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    matches = [d for d in range(len(scores)) if scores[d] > 0]
    best = sorted(matches, key=lambda d: (-float(scores[d]), d))[:k]
    return np.asarray(best, dtype=np.int64), scores[np.asarray(best, dtype=np.int64)]


def random_index(seed: int, n_docs: int = 300, duplicates: int = 60) -> BM25Index:
    """Random documents over a small Zipf-ish vocabulary; the last `duplicates` documents copy
    earlier ones (exact score ties), and a few documents are empty."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(WORDS) + 1)
    weights /= weights.sum()
    docs = []
    for i in range(n_docs - duplicates):
        if i % 37 == 5:
            docs.append(([], []))
            continue
        title = rng.choice(WORDS, size=int(rng.integers(0, 5)), p=weights).tolist()
        text = rng.choice(WORDS, size=int(rng.integers(1, 30)), p=weights).tolist()
        docs.append((title, text))
    for _ in range(duplicates):
        docs.append(docs[int(rng.integers(0, len(docs)))])
    builder = BM25Builder()
    for title, text in docs:
        builder.add({"title": title, "text": text})
    return builder.build(BM25Settings())


QUERIES = [
    ["w0"],
    ["w1", "w7"],
    ["w3", "w3", "w12"],  # repeated term counts twice
    ["w5", "unknown", "w20"],  # unknown terms are ignored
    ["w39", "w38", "w37", "w36"],  # rare terms: few matches
    ["nothing", "matches"],  # only unknown terms
    [],
    WORDS,  # everything: every non-empty document matches
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("field", ["all", "title", "text"])
@pytest.mark.parametrize("k", [1, 2, 5, 10, 50, 1000])
def test_top_k_matches_brute_force(seed: int, field: str, k: int) -> None:
    index = random_index(seed)
    for query in QUERIES:
        ids, scores = index.top_k(query, k, field=field)
        expected_ids, expected_scores = brute_force(index.scores(query, field=field), k)
        assert ids.dtype == np.int64 and scores.dtype == np.float32
        np.testing.assert_array_equal(ids, expected_ids, err_msg=f"query {query} k={k}")
        np.testing.assert_array_equal(scores, expected_scores)
        assert len(ids) <= k
        assert np.all(scores > 0)


def test_k_larger_than_matches_returns_only_matches() -> None:
    index = random_index(3)
    ids, scores = index.top_k(["w39"], 10_000)
    all_scores = index.scores(["w39"])
    assert len(ids) == np.count_nonzero(all_scores > 0) < index.n_docs
    assert list(ids) == sorted(ids, key=lambda d: (-all_scores[d], d))


def test_unknown_and_empty_queries_return_nothing() -> None:
    index = random_index(4)
    for query in (["unknown"], [], ["unknown", "also-unknown"]):
        ids, scores = index.top_k(query, 10)
        assert ids.shape == (0,) and scores.shape == (0,)
        assert not np.any(index.scores(query))


def test_repeated_terms_count_per_occurrence() -> None:
    index = random_index(5)
    once, twice = index.scores(["w2", "w9"]), index.scores(["w2", "w2", "w9"])
    w2 = index.scores(["w2"])
    np.testing.assert_allclose(twice, once + w2, rtol=1e-6)
    ids, _ = index.top_k(["w2", "w2", "w9"], 7)
    np.testing.assert_array_equal(ids, brute_force(twice, 7)[0])


def test_ties_cut_at_k_keep_lowest_document_indices() -> None:
    # 30 identical documents tie exactly; any k inside the tie group must take the lowest ids.
    builder = BM25Builder()
    for i in range(100):
        if i % 3 == 0:
            builder.add({"title": ["alpha"], "text": ["beta", "gamma"]})
        elif i % 3 == 1:
            builder.add({"title": [], "text": ["delta"] * (1 + i % 4)})
        else:
            builder.add({"title": ["alpha", "alpha"], "text": ["beta"]})
    index = builder.build(BM25Settings())
    for query in (["alpha"], ["beta"], ["alpha", "beta", "gamma"], ["delta"]):
        scores = index.scores(query)
        for k in (1, 2, 3, 10, 17, 33, 34, 35, 66, 67, 100):
            ids, top = index.top_k(query, k)
            expected_ids, expected_scores = brute_force(scores, k)
            np.testing.assert_array_equal(ids, expected_ids, err_msg=f"query {query} k={k}")
            np.testing.assert_array_equal(top, expected_scores)


def test_top_k_positive_on_handmade_scores() -> None:
    scores = np.array([0, 1, 1, 1, 2, 0, 1, -3, 0.5, 2], dtype=np.float32)
    ids, top = top_k_positive(scores, 3)
    assert ids.tolist() == [4, 9, 1] and top.tolist() == [2, 2, 1]
    ids, _ = top_k_positive(scores, 1)
    assert ids.tolist() == [4]
    ids, _ = top_k_positive(scores, 100)
    assert ids.tolist() == [4, 9, 1, 2, 3, 6, 8]
    ids, top = top_k_positive(np.zeros(5, dtype=np.float32), 3)
    assert ids.shape == (0,) and top.shape == (0,)
    with pytest.raises(ValueError):
        top_k_positive(scores, 0)
    with pytest.raises(ValueError):
        random_index(0).top_k(["w0"], 0)


@pytest.mark.parametrize("seed", range(5))
def test_top_k_positive_random_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for n in (1, 7, 100, 5000):
        # few distinct values -> many ties, zeros and negatives mixed in
        scores = rng.integers(-2, 6, n).astype(np.float32) / 4
        for k in (1, 3, 10, n, n + 5):
            ids, top = top_k_positive(scores, k)
            expected_ids, expected_scores = brute_force(scores, k)
            np.testing.assert_array_equal(ids, expected_ids)
            np.testing.assert_array_equal(top, expected_scores)


def test_scores_match_dense_reference() -> None:
    index = random_index(6)
    for field in ("all", "title", "text"):
        dense = index.fields[field].weights.toarray().astype(np.float64)
        for query in QUERIES:
            term_ids, counts = index.query_term_ids(query)
            expected = (dense[term_ids] * counts[:, None]).sum(axis=0) if len(term_ids) else np.zeros(index.n_docs)
            got = accumulate_scores(index.fields[field].weights, term_ids, counts, index.n_docs)
            assert got.dtype == np.float32 and got.shape == (index.n_docs,)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
            np.testing.assert_array_equal(index.scores(query, field=field), got)


def test_unknown_field_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown BM25 field"):
        random_index(0).top_k(["w0"], 5, field="body")


@pytest.mark.parametrize("seed", range(3))
def test_top_k_positive_large_arrays_take_the_sampled_path_exactly(seed: int) -> None:
    """Large score vectors use a sampled cut-off; results must still equal the brute force,
    including when the sample is misleading (the fallback) and with heavy ties."""
    rng = np.random.default_rng(seed)
    n = 200_000
    cases = {
        "ties": np.where(rng.random(n) < 0.3, rng.integers(1, 40, n) / 8, 0).astype(np.float32),
        "continuous": np.where(rng.random(n) < 0.25, rng.random(n), 0).astype(np.float32),
        "sparse": np.where(rng.random(n) < 0.001, rng.random(n), 0).astype(np.float32),
        "all_equal": np.ones(n, dtype=np.float32),
    }
    # Misleading sample: every sampled position holds the largest scores, the rest are small.
    misleading = np.where(rng.random(n) < 0.5, rng.random(n) * 0.1, 0).astype(np.float32)
    misleading[:: bm25_module.SAMPLE_STRIDE] = 5 + rng.random(len(misleading[:: bm25_module.SAMPLE_STRIDE]))
    cases["misleading_sample"] = misleading
    negatives = cases["continuous"].copy()
    negatives[rng.random(n) < 0.2] = -1
    cases["negatives"] = negatives
    for name, scores in cases.items():
        for k in (1, 3, 10, 100, 1000, 5000):
            ids, top = top_k_positive(scores, k)
            expected_ids, expected_scores = brute_force_fast(scores, k)
            np.testing.assert_array_equal(ids, expected_ids, err_msg=f"{name} k={k}")
            np.testing.assert_array_equal(top, expected_scores, err_msg=f"{name} k={k}")


def brute_force_fast(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    matches = np.flatnonzero(scores > 0)
    best = matches[np.lexsort((matches, -scores[matches]))][:k]
    return best.astype(np.int64), scores[best]


def test_top_k_on_a_larger_index_matches_brute_force() -> None:
    index = random_index(7, n_docs=20_000, duplicates=4_000)
    for query in QUERIES:
        scores = index.scores(query)
        for k in (1, 5, 10, 100, 1000):
            ids, top = index.top_k(query, k)
            expected_ids, expected_scores = brute_force_fast(scores, k)
            np.testing.assert_array_equal(ids, expected_ids, err_msg=f"query {query} k={k}")
            np.testing.assert_array_equal(top, expected_scores)


def test_top_k_positive_other_dtypes() -> None:
    rng = np.random.default_rng(11)
    for dtype in (np.float64, np.float16, np.int32):
        scores = (rng.integers(-3, 9, 30_000) / (1 if dtype is np.int32 else 4)).astype(dtype)
        for k in (1, 10, 1000, 40_000):
            ids, top = top_k_positive(scores, k)
            expected_ids, expected_scores = brute_force_fast(scores, k)
            np.testing.assert_array_equal(ids, expected_ids)
            np.testing.assert_array_equal(top, expected_scores)
            assert ids.dtype == np.int64 and top.dtype == scores.dtype


def test_builder_numbers_terms_by_first_occurrence_for_any_iterable() -> None:
    docs = [
        {"title": ["b", "a"], "text": ["c", "a", "d"]},
        {"text": ["e", "b", "e"]},  # no title field
        {"title": ("f",), "text": []},
    ]
    as_lists, as_generators = BM25Builder(), BM25Builder()
    for doc in docs:
        as_lists.add({name: list(tokens) for name, tokens in doc.items()})
        as_generators.add({name: (t for t in tokens) for name, tokens in doc.items()})
    for builder in (as_lists, as_generators):
        assert list(builder.term_to_id) == ["b", "a", "c", "d", "e", "f"]
        assert list(builder.term_to_id.values()) == list(range(6))
        index = builder.build(BM25Settings())
        assert index.vocabulary == ["b", "a", "c", "d", "e", "f"]
        np.testing.assert_array_equal(index.fields["title"].doc_lengths, [2, 0, 1])
        np.testing.assert_array_equal(index.fields["all"].doc_lengths, [5, 3, 1])
        np.testing.assert_array_equal(index.fields["all"].term_freqs[index.fields["all"].weights.indptr[4]:index.fields["all"].weights.indptr[5]], [2])
