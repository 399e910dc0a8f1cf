"""`BM25Index.candidate_stats`, the vectorised path ranking features come from, against a plain
per-document reference: term frequencies counted in each document's tokens, BM25 weights read
from the stored postings (the combined field's are recomputed from term frequencies), bigrams
from each document's adjacent pairs (`bigram_coverage`, the token scan, too). Bit for bit, on
random corpora with the awkward cases: unknown and repeated query terms, a repeated-term bigram,
empty fields, duplicate and unsorted candidates, a delta segment scored with frozen statistics,
and a term frequency past the stored uint16 ceiling."""
from __future__ import annotations

import numpy as np
import pytest

from indexing.bm25 import (COMBINED_FIELD, SCAN_FACTOR, SOURCE_FIELDS, TF_MAX, BM25Builder, BM25Index, BM25Settings,
                           bigram_coverage, successor_postings, term_sums)

VOCABULARY = [f"w{i}" for i in range(40)]


def random_docs(rng: np.random.Generator, n: int) -> list[dict[str, list[str]]]:
    docs = []
    for _ in range(n):
        # a small vocabulary with a skew, so pairs and repeats are common; some fields empty
        title = [VOCABULARY[int(i)] for i in rng.zipf(1.6, size=rng.integers(0, 6)) % 25]
        text = [VOCABULARY[int(i)] for i in rng.zipf(1.4, size=rng.integers(0, 60)) % 40]
        docs.append({"title": title, "text": text})
    return docs


def build(docs, settings=BM25Settings(k1=1.2, b=0.75), frozen: BM25Index | None = None) -> BM25Index:
    builder = BM25Builder()
    for doc in docs:
        builder.add(doc)
    return builder.build(settings, frozen=frozen)


def reference(index: BM25Index, docs, query: list[str], rows: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    distinct = list(dict.fromkeys(query))
    counts = np.array([query.count(t) for t in distinct], dtype=np.float32)
    pairs = list(dict.fromkeys(zip(query, query[1:])))
    tf, weights, bigrams = {}, {}, {}
    for field in SOURCE_FIELDS:
        tf[field] = np.array([[docs[r][field].count(t) for t in distinct] for r in rows.tolist()], dtype=np.float32).reshape(len(rows), len(distinct))
        present = [set(zip(docs[r][field], docs[r][field][1:])) for r in rows.tolist()]
        bigrams[field] = np.array([sum(p in seen for p in pairs) / len(pairs) if pairs else np.nan for seen in present], dtype=np.float32)
    tf[COMBINED_FIELD] = tf["title"] + tf["text"]
    for field, index_field in index.fields.items():
        stored = index_field.weights.toarray()
        weights[field] = np.array([[stored[index.term_to_id[t], r] if t in index.term_to_id else 0.0 for t in distinct]
                                   for r in rows.tolist()], dtype=np.float32).reshape(len(rows), len(distinct))
    bm25_scores = {f: (w * counts).sum(axis=1, dtype=np.float32) if len(distinct) else np.zeros(len(rows), np.float32)
                   for f, w in weights.items()}
    return {"tf": {f: np.minimum(v, TF_MAX) for f, v in tf.items()}, "bm25": bm25_scores, "bigram": bigrams}


def assert_matches_reference(index: BM25Index, docs, query: list[str], rows: np.ndarray) -> None:
    stats = index.candidate_stats(query, rows)
    expected = reference(index, docs, query, rows)
    for field in index.fields:
        np.testing.assert_array_equal(stats.term_freqs[field], expected["tf"][field], err_msg=f"tf {field} {query}")
        np.testing.assert_array_equal(stats.bm25[field], expected["bm25"][field], err_msg=f"bm25 {field} {query}")
        np.testing.assert_array_equal(stats.field_lengths[field], index.fields[field].doc_lengths[rows])
    # the query's distinct adjacent pairs as (first, second) term ids, -1 for an unknown term
    bigrams = np.array([(index.term_to_id.get(a, -1), index.term_to_id.get(b, -1))
                        for a, b in dict.fromkeys(zip(query, query[1:]))], dtype=np.int64).reshape(-1, 2)
    for field in SOURCE_FIELDS:
        np.testing.assert_array_equal(stats.bigram_coverage[field], expected["bigram"][field], err_msg=f"bigram {field} {query}")
        scanned = bigram_coverage(bigrams, index.fields[field].token_ids, index.fields[field].token_offsets, rows)
        np.testing.assert_array_equal(scanned, expected["bigram"][field], err_msg=f"scanned bigram {field} {query}")


QUERIES = [
    ["w1", "w2", "w3"],
    ["w1", "w1", "w2", "w1"],  # repeated terms, a repeated-term bigram
    ["w0", "nope", "w0", "w5", "w5"],  # an unknown term inside the pairs
    ["w7"],  # one term: no bigram
    [],  # nothing left after analysis
    ["nope", "never"],
    [f"w{i}" for i in range(12)],  # more terms than NumPy's unrolled sum: the row sums' order matters
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("settings", [BM25Settings(k1=1.2, b=0.75), BM25Settings(k1=0.9, b=1.0), BM25Settings(k1=0.0, b=0.4)],
                         ids=["lucene", "b=1: an empty field has norm 0", "k1=0: every norm is 0"])
def test_candidate_stats_equal_a_plain_reference(seed, settings):
    rng = np.random.default_rng(seed)
    docs = random_docs(rng, 60)
    index = build(docs, settings)
    rows = np.concatenate([rng.permutation(60)[:45], [3, 3, 59]])  # unsorted, with duplicates
    for query in QUERIES + [[VOCABULARY[int(i)] for i in rng.integers(0, 40, 8)] for _ in range(5)]:
        assert_matches_reference(index, docs, query, rows)
    assert_matches_reference(index, docs, ["w1", "w2"], np.empty(0, np.int64))  # an empty window


def test_windows_small_enough_that_long_posting_lists_are_searched_not_read():
    """A list longer than SCAN_FACTOR x the window is binary-searched, shorter ones are read
    through the window's table, both in one window: the hits of both ways agree with the reference."""
    rng = np.random.default_rng(21)
    docs = random_docs(rng, 60)
    index = build(docs)
    frequent = [t for t in VOCABULARY if t in index.term_to_id
                and index.fields["text"].document_frequencies[index.term_to_id[t]] > SCAN_FACTOR * 2]
    rare = [t for t in VOCABULARY if t in index.term_to_id
            and 0 < index.fields["text"].document_frequencies[index.term_to_id[t]] <= SCAN_FACTOR]
    assert frequent and rare
    for size in (1, 2, 3):
        for _ in range(10):
            rows = rng.permutation(60)[:size]
            assert_matches_reference(index, docs, [frequent[0], rare[0], frequent[-1], rare[-1], "nope"], rows)
            assert_matches_reference(index, docs, [VOCABULARY[int(i)] for i in rng.integers(0, 40, 8)], rows)


def test_a_field_without_forward_index_beside_one_with_it():
    """Bigrams of both fields are shared out of one computation: a field that cannot measure
    them is NaN, the other still equals the reference."""
    rng = np.random.default_rng(17)
    docs = random_docs(rng, 40)
    index = build(docs)
    index.fields["title"].token_ids = index.fields["title"].token_offsets = index.fields["title"].successors = None
    rows = rng.permutation(40)[:30]
    for query in (["w1", "w2", "w1", "w3"], [f"w{i}" for i in range(12)]):
        stats = index.candidate_stats(query, rows)
        assert np.isnan(stats.bigram_coverage["title"]).all()
        np.testing.assert_array_equal(stats.bigram_coverage["text"], reference(index, docs, query, rows)["bigram"]["text"])


def test_a_negative_document_index_is_refused():
    index = build(random_docs(np.random.default_rng(4), 10))
    with pytest.raises(IndexError, match="negative document index -1"):
        index.candidate_stats(["w1", "w2"], np.array([0, -1]))


def test_a_delta_segment_with_frozen_statistics():
    rng = np.random.default_rng(7)
    base = build(random_docs(rng, 40))
    docs = random_docs(rng, 15) + [{"title": ["brandnew"], "text": ["brandnew", "w1", "brandnew"]}]
    delta = build(docs, frozen=base)
    for query in (["w1", "w2", "w1"], ["brandnew", "w1"], ["w3", "w4", "w5", "w6"]):
        assert_matches_reference(delta, docs, query, np.arange(len(docs)))


def test_a_saturated_term_frequency_reads_the_stored_weight():
    docs = [{"title": ["spam"], "text": ["spam"] * (TF_MAX + 10) + ["eggs"]}, {"title": ["eggs"], "text": ["spam", "eggs"]}]
    index = build(docs)
    stats = index.candidate_stats(["spam", "eggs"], np.array([0, 1]))
    assert stats.term_freqs["text"][0, 0] == TF_MAX and stats.term_freqs[COMBINED_FIELD][0, 0] == TF_MAX
    for field in index.fields:  # the weights of the true frequency, as the index stores them
        np.testing.assert_allclose(stats.bm25[field], index.scores(["spam", "eggs"], field)[[0, 1]], rtol=1e-6)


def test_successor_postings_list_what_follows_every_occurrence_by_posting():
    rng = np.random.default_rng(3)
    docs = random_docs(rng, 30)
    index = build(docs)
    end = len(index.vocabulary)  # the successor of a document's last token
    for name in SOURCE_FIELDS:
        field = index.fields[name]
        successors, ptr = successor_postings(field.token_ids, field.token_offsets, len(index.vocabulary), field.weights.nnz)
        indptr, indices = field.weights.indptr, field.weights.indices
        for term_id in range(len(index.vocabulary)):
            for p in range(indptr[term_id], indptr[term_id + 1]):
                tokens = docs[int(indices[p])][name] + [None]
                expected = [index.term_to_id.get(tokens[i + 1], end) for i, t in enumerate(tokens[:-1])
                            if t == index.vocabulary[term_id]]
                assert successors[ptr[p]:ptr[p + 1]].tolist() == expected


def test_successors_are_stored_and_an_older_generation_derives_them(tmp_path):
    import json

    rng = np.random.default_rng(5)
    docs = random_docs(rng, 25)
    index = build(docs)
    description = json.loads(json.dumps(index.save(tmp_path / "bm25")))
    assert all(description["fields"][name]["successors"] for name in SOURCE_FIELDS)
    loaded = BM25Index.load(tmp_path / "bm25", description)
    assert loaded.fields["text"].successors is not None  # read from disk, not recomputed
    for name in SOURCE_FIELDS:
        for mine, theirs in zip(loaded.fields[name].successor_postings(), index.fields[name].successor_postings()):
            np.testing.assert_array_equal(mine, theirs)
    for name in SOURCE_FIELDS:  # a generation written before successors were stored
        description["fields"][name].pop("successors")
        (tmp_path / "bm25" / f"{name}.next.npy").unlink()
    older = BM25Index.load(tmp_path / "bm25", description)
    assert older.fields["text"].successors is None
    query, rows = ["w1", "w2", "w1", "w3"], np.arange(25)
    np.testing.assert_array_equal(older.candidate_stats(query, rows).bigram_coverage["text"],
                                  index.candidate_stats(query, rows).bigram_coverage["text"])
    assert_matches_reference(older, docs, query, rows)


def test_concurrent_windows_get_their_own_document_tables():
    """Threads extracting at once (the service's request threads) never see each other's window
    positions, and the tables are reused afterwards rather than multiplied per thread."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(11)
    docs = random_docs(rng, 50)
    index = build(docs)
    queries = [[VOCABULARY[int(i)] for i in rng.integers(0, 40, 6)] for _ in range(24)]
    windows = [rng.permutation(50)[:int(rng.integers(5, 50))] for _ in queries]  # each its own positions
    expected = [reference(index, docs, q, rows) for q, rows in zip(queries, windows)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda job: index.candidate_stats(*job), list(zip(queries, windows)) * 4))
    for stats, want in zip(got, expected * 4):
        np.testing.assert_array_equal(stats.bm25["all"], want["bm25"]["all"])
        np.testing.assert_array_equal(stats.bigram_coverage["text"], want["bigram"]["text"])
    assert 1 <= len(index._tables) <= 8 and all((t == -1).all() for t in index._tables)


def test_a_generation_without_forward_index_reads_weights_from_postings():
    """Fields built before forward indexes existed: weights and frequencies come from the stored
    postings, bigrams are missing (NaN), never zero."""
    rng = np.random.default_rng(13)
    docs = random_docs(rng, 30)
    index = build(docs)
    for name in SOURCE_FIELDS:
        index.fields[name].token_ids = index.fields[name].token_offsets = None
    query, rows = ["w1", "w2", "w1", "w3"], np.arange(30)
    stats = index.candidate_stats(query, rows)
    expected = reference(index, docs, query, rows)
    for field in index.fields:
        np.testing.assert_array_equal(stats.term_freqs[field], expected["tf"][field])
        np.testing.assert_array_equal(stats.bm25[field], expected["bm25"][field])
    assert all(np.isnan(stats.bigram_coverage[name]).all() for name in SOURCE_FIELDS)


@pytest.mark.parametrize("n_terms", [0, 1, 2, 7, 8, 9, 12, 15, 16, 17, 24, 31, 128, 129, 130, 300])
def test_term_sums_are_numpys_row_sums_bit_for_bit(n_terms):
    """Features are sums over terms of [term, candidate] arrays; they must be the very float32
    values NumPy's `sum(axis=1)` gives for the [candidate, term] matrix (its pairwise order)."""
    rng = np.random.default_rng(n_terms)
    matrix = (rng.random((300, n_terms)) * 10.0 ** rng.uniform(-4, 4, (300, n_terms))).astype(np.float32)
    matrix[rng.random(matrix.shape) < 0.4] = 0  # absent terms
    expected = matrix.sum(axis=1, dtype=np.float32)
    got = term_sums(np.ascontiguousarray(matrix.T))
    assert got.dtype == np.float32 and got.shape == (300,)
    np.testing.assert_array_equal(got.view(np.int32), expected.view(np.int32))  # the bits, signed zeros too
    other = (rng.random((300, n_terms)) * 3).astype(np.float32)
    side_by_side = term_sums(np.stack([matrix.T, other.T], axis=1))  # [term, array, candidate]: each as alone
    assert side_by_side.shape == (2, 300)
    np.testing.assert_array_equal(side_by_side[0].view(np.int32), expected.view(np.int32))
    np.testing.assert_array_equal(side_by_side[1].view(np.int32), other.sum(axis=1, dtype=np.float32).view(np.int32))
