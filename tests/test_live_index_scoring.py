"""The delta path scores base + delta rows in one vector (issue 18): the same rows and the same
float32 scores as scoring each segment with its own `BM25Index` and ranking them together, and
no write ever leaves a stale cached posting or a dead row servable."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from indexing.build import BuildSettings, build_index
from indexing.corpus import CorpusSpec, Document
from indexing.live import live_scores, top_k_finite
from indexing.updates import write_updates
from indexing.vectors import top_k_rows
from search.embedded import EmbeddedIndex
from tests.conftest import write_jsonl

WORDS = "cat dog mouse garden quantum photon qubit water mint owl night hunt river bank tree leaf".split()


def quiet(_: str) -> None:
    pass


def _reference(index: EmbeddedIndex, query: str, k: int, field: str) -> tuple[list[int], np.ndarray]:
    """Each segment scored by its own BM25Index (`scores`), dead rows dropped, one stable sort."""
    view = index._live()
    terms = index.analyse(query).terms
    scores = index.bm25.scores(terms, field)
    if view.bm25 is not None:
        scores = np.concatenate([scores, view.bm25.scores(terms, field)])
    rows = [r for r in np.flatnonzero(scores > 0).tolist() if not view.dead[r]]
    rows.sort(key=lambda r: (-scores[r], r))
    return rows[:k], scores[rows[:k]]


text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=10).map(" ".join)
write = st.one_of(st.tuples(st.just("upsert"), st.integers(0, 11), text), st.tuples(st.just("delete"), st.integers(0, 11)))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.lists(text, min_size=3, max_size=8), writes=st.lists(write, min_size=1, max_size=12),
       queries=st.lists(text, min_size=1, max_size=4))
def test_live_bm25_equals_each_segment_scored_alone(tmp_path_factory, start, writes, queries):
    tmp = tmp_path_factory.mktemp("scoring")
    home = tmp / "home"
    corpus = write_jsonl(tmp / "corpus.jsonl", [{"_id": f"d{i}", "title": t.split()[0], "text": t} for i, t in enumerate(start)])
    build_index(home, "t", BuildSettings(corpus=CorpusSpec(str(corpus)), dense=False), progress=False, log=quiet)
    index = EmbeddedIndex.open(home, "t")
    live = {f"d{i}" for i in range(len(start))}
    for write_ in writes:
        doc_id = f"d{write_[1]}"
        if write_[0] == "upsert":
            write_updates(home, "t", [Document(doc_id, "", write_[2])])
            live.add(doc_id)
        elif doc_id in live:
            write_updates(home, "t", deletes=[doc_id])
            live.discard(doc_id)
        for query in queries:  # after every write: the per-view posting caches are filled, then replaced
            for field in ("all", "title", "text"):
                got = index.retrieve_bm25(query, 5, field)
                rows, scores = _reference(index, query, 5, field)
                assert got.rows.tolist() == rows and np.array_equal(got.scores, scores.astype(np.float32))
                assert set(got.doc_ids) <= live


def test_a_rewritten_or_deleted_delta_document_is_never_served_from_a_cached_posting(tmp_path: Path, small_corpus: Path):
    home = tmp_path / "home"
    build_index(home, "t", BuildSettings(corpus=CorpusSpec(str(small_corpus)), dense=False), progress=False, log=quiet)
    index = EmbeddedIndex.open(home, "t")
    write_updates(home, "t", [Document("z1", "", "zebra zebra crossing")])
    assert index.retrieve_bm25("zebra", 5).doc_ids == ["z1"]  # caches the delta's "zebra" postings
    write_updates(home, "t", [Document("z1", "", "a lion now")])
    assert index.retrieve_bm25("zebra", 5).doc_ids == [] and index.retrieve_bm25("lion", 5).doc_ids == ["z1"]
    write_updates(home, "t", deletes=["z1"])
    assert index.retrieve_bm25("lion", 5).doc_ids == [] and index.document("z1") is None


def test_one_dense_top_k_over_base_and_delta_ranks_every_live_row_ties_by_the_lower_row():
    rng = np.random.default_rng(7)
    for _ in range(50):
        base, delta = rng.integers(0, 5, 40).astype(np.float32), rng.integers(0, 5, 15).astype(np.float32)  # ties
        dead = np.sort(rng.choice(55, size=rng.integers(0, 10), replace=False)).astype(np.int64)
        scores = live_scores(base.copy(), delta, dead, -np.inf)
        both = np.concatenate([base, delta])
        alive = sorted(set(range(55)) - set(dead.tolist()), key=lambda r: (-both[r], r))
        for k in (1, 7, 45, 60):
            rows, top = top_k_finite(scores, k)
            assert rows.tolist() == alive[:k] and np.array_equal(top, both[alive[:k]])
    scores = rng.random(30).astype(np.float32)  # distinct scores: the order of an exact search
    want_top, want_rows = top_k_rows(scores[None, :], np.arange(30), 10)
    rows, top = top_k_finite(scores.copy(), 10)
    assert rows.tolist() == want_rows[0].tolist() and np.array_equal(top, want_top[0])


@pytest.mark.parametrize("mode", ["sparse", "dense-evicting"])
def test_both_delta_scoring_paths_equal_each_segment_scored_alone(tmp_path: Path, monkeypatch, mode: str):
    import indexing.live as live

    if mode == "sparse":  # the path of deltas over DENSE_DELTA_ROWS rows
        monkeypatch.setattr(live, "DENSE_DELTA_ROWS", 0)
    else:  # a dense-row cache that fills up after two rows and is emptied
        monkeypatch.setattr(live, "DENSE_CACHE_BYTES", 2 * 4 * 40)
    rng = np.random.default_rng(11)
    words = np.array(WORDS)

    def sentence() -> str:
        return " ".join(rng.choice(words, size=rng.integers(1, 12)))

    home = tmp_path / "home"
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"_id": f"d{i}", "title": sentence(), "text": sentence()} for i in range(30)])
    build_index(home, "t", BuildSettings(corpus=CorpusSpec(str(corpus)), dense=False), progress=False, log=quiet)
    index = EmbeddedIndex.open(home, "t")
    for step in range(12):
        write_updates(home, "t", [Document(f"d{rng.integers(0, 40)}", sentence(), sentence()) for _ in range(3)],
                      [f"d{step}"] if step % 3 == 0 else [])
        for query in [sentence() + " " + sentence() for _ in range(4)]:
            for field in ("all", "title", "text"):
                got = index.retrieve_bm25(query, 8, field)
                rows, scores = _reference(index, query, 8, field)
                assert got.rows.tolist() == rows and np.array_equal(got.scores, scores.astype(np.float32))
