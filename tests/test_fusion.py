"""Fusion functions, hybrid candidates over the real embedded backend, and the hybrid pipelines."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from indexing.build import BuildSettings, build_index
from indexing.corpus import CorpusSpec
from search.backend import SearchBackend
from search.embedded import EmbeddedIndex
from search.fusion import fuse_convex, fuse_reciprocal_rank, normalise_min_max, normalise_z_score
from eval.fusion_tuning import TunedHybridPipeline
from search.hybrid import FusionSettings, HybridPipeline, fused_scores, generate_candidates, top_hits, union_rows
from search.pipelines import BM25Pipeline
from search.app.pipelines import create_pipeline, pipeline_spec
from tests.conftest import run_cli, write_jsonl

NAN = float("nan")


def test_reciprocal_rank_fusion_by_hand():
    bm25 = np.array([1, 2, NAN])
    dense = np.array([2, NAN, 1])
    fused = fuse_reciprocal_rank([bm25, dense], k=60)
    assert fused == pytest.approx([1 / 61 + 1 / 62, 1 / 62, 1 / 61])
    assert fuse_reciprocal_rank([bm25], k=0)[0] == 1.0
    with pytest.raises(ValueError, match="k must be >= 0"):
        fuse_reciprocal_rank([bm25], k=-1)


def test_normalisations():
    assert normalise_min_max(np.array([2.0, 4.0, 3.0])) == pytest.approx([0, 1, 0.5])
    assert normalise_min_max(np.array([5.0, 5.0])).tolist() == [0.0, 0.0]
    z = normalise_z_score(np.array([1.0, 2.0, 3.0]))
    assert z.mean() == pytest.approx(0) and z.std() == pytest.approx(1)
    mixed = normalise_min_max(np.array([1.0, NAN, 3.0]))
    assert mixed[0] == 0 and math.isnan(mixed[1]) and mixed[2] == 1


def test_convex_fusion_weights_and_missing_scores():
    bm25 = np.array([10.0, 0.0, 5.0])
    dense = np.array([0.2, 0.9, NAN])
    fused = fuse_convex([bm25, dense], [0.5, 0.5], "min-max")
    # dense normalised: [0, 1, nan -> lowest (0)]; bm25: [1, 0, 0.5]
    assert fused == pytest.approx([0.5, 0.5, 0.25])
    assert np.argmax(fuse_convex([bm25, dense], [1.0, 0.0])) == 0
    assert np.argmax(fuse_convex([bm25, dense], [0.0, 1.0])) == 1
    with pytest.raises(ValueError, match="normalisation 'softmax'"):
        fuse_convex([bm25], [1.0], "softmax")
    with pytest.raises(ValueError, match="2 score lists but 1 weights"):
        fuse_convex([bm25, dense], [1.0])


def test_fusion_settings_are_validated():
    with pytest.raises(ValueError, match="dense_weight must be in"):
        FusionSettings(dense_weight=1.5)
    with pytest.raises(ValueError, match="fusion method 'max'"):
        FusionSettings(method="max")
    with pytest.raises(ValueError, match="bm25_candidates must be between"):
        FusionSettings(bm25_candidates=0)
    assert FusionSettings.from_dict(FusionSettings(method="convex").to_dict()) == FusionSettings(method="convex")


def test_top_hits_is_stable_on_ties():
    hits = top_hits(["a", "b", "c"], np.array([1.0, 2.0, 1.0]), 3)
    assert [h.doc_id for h in hits] == ["b", "a", "c"] and [h.rank for h in hits] == [1, 2, 3]


# ---------------------------------------------------------------- over a real index with vectors

DOCS = [
    {"_id": "cat1", "title": "Cats", "text": "The domestic cat is a small carnivorous mammal kept as a pet."},
    {"_id": "cat2", "title": "Kittens", "text": "Young felines need warmth, milk and a lot of sleep."},
    {"_id": "dog1", "title": "Dogs", "text": "The dog is a domesticated descendant of the wolf."},
    {"_id": "car1", "title": "Cars", "text": "An automobile is a wheeled motor vehicle used for transport."},
    {"_id": "car2", "title": "Electric vehicles", "text": "Battery powered automobiles reduce tailpipe emissions."},
    {"_id": "sea1", "title": "Oceans", "text": "Salt water covers most of the surface of the planet."},
]
QUERIES = {"q1": "pet cat", "q2": "baby cats", "q3": "electric car", "q4": "motor vehicle transport", "q5": "the sea"}
QRELS = {"q1": {"cat1": 1}, "q2": {"cat2": 1}, "q3": {"car2": 1}, "q4": {"car1": 1}, "q5": {"sea1": 1}}


@pytest.fixture
def hybrid_index(dense_home: Path, tmp_path: Path) -> EmbeddedIndex:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    build_index(dense_home, "h", BuildSettings(corpus=CorpusSpec(str(corpus))), progress=False, log=lambda m: None)
    return EmbeddedIndex.open(dense_home, "h")


def test_embedded_index_implements_the_backend(hybrid_index: EmbeddedIndex):
    assert isinstance(hybrid_index, SearchBackend)
    lexical = hybrid_index.retrieve_bm25("wolf", 5)
    assert lexical.doc_ids == ["dog1"]  # only matching documents
    exact = hybrid_index.bm25_scores("wolf", hybrid_index.rows_of(["dog1", "cat1"]))
    assert exact[0] == pytest.approx(lexical.scores[0], rel=1e-6) and exact[1] == 0
    vector = hybrid_index.encode_query("kittens")
    semantic = hybrid_index.retrieve_dense(vector, 3)
    assert semantic.doc_ids[0] == "cat2"
    assert hybrid_index.dense_scores(vector, semantic.rows) == pytest.approx(semantic.scores, abs=1e-6)
    assert hybrid_index.doc_ids(semantic.rows) == semantic.doc_ids
    with pytest.raises(KeyError, match="unknown document id 'nope'"):
        hybrid_index.rows_of(["nope"])
    with pytest.raises(IndexError):
        hybrid_index.bm25_scores("x", np.array([len(hybrid_index)]))


def test_hybrid_candidates_are_the_union_scored_exactly(hybrid_index: EmbeddedIndex):
    window = generate_candidates(hybrid_index, "baby cats", bm25_k=2, dense_k=3)
    lexical = hybrid_index.retrieve_bm25("baby cats", 2)
    semantic = hybrid_index.retrieve_dense(hybrid_index.encode_query("baby cats"), 3)
    assert window.doc_ids[: len(lexical)] == lexical.doc_ids
    assert set(window.doc_ids) == set(lexical.doc_ids) | set(semantic.doc_ids)
    for i, doc_id in enumerate(window.doc_ids):
        assert (doc_id in lexical.doc_ids) == (not math.isnan(window.bm25_rank[i]))
        assert (doc_id in semantic.doc_ids) == (not math.isnan(window.dense_rank[i]))
    assert np.isfinite(window.bm25).all() and np.isfinite(window.dense).all()
    rrf = fused_scores(window, FusionSettings())
    assert np.all(rrf > 0)
    ranks_only = generate_candidates(hybrid_index, "baby cats", bm25_k=2, dense_k=3, exact=False)
    assert ranks_only.doc_ids == window.doc_ids
    np.testing.assert_array_equal(fused_scores(ranks_only, FusionSettings()), rrf)
    retrieved = ~np.isnan(ranks_only.dense_rank)
    np.testing.assert_allclose(ranks_only.dense[retrieved], window.dense[retrieved], atol=1e-6)
    assert np.isnan(ranks_only.dense[~retrieved]).all() and np.isnan(ranks_only.bm25[np.isnan(ranks_only.bm25_rank)]).all()


def test_hybrid_pipelines_through_the_registry(hybrid_index: EmbeddedIndex):
    for name in ("hybrid", "hybrid-convex"):
        hits = create_pipeline(name, hybrid_index).search("electric car", 3)
        assert hits[0].doc_id in {"car1", "car2"} and len(hits) == 3
    tuned = create_pipeline("hybrid-tuned", hybrid_index)
    assert pipeline_spec("hybrid-tuned").learned
    with pytest.raises(ValueError, match="tuned on judged training queries"):
        tuned.search("electric car", 3)
    tuned.fit(QUERIES, QRELS)
    assert isinstance(tuned, TunedHybridPipeline) and len(tuned.tuning) == 42
    chosen = tuned.fitted_parameters()
    assert chosen["train nDCG@10"] == max(row["nDCG@10"] for row in tuned.tuning)
    assert tuned.search("electric car", 2)[0].doc_id == "car2"


def test_cli_search_and_eval_with_hybrid(dense_home: Path, tmp_path: Path):
    root = tmp_path / "ds"
    (root / "qrels").mkdir(parents=True)
    write_jsonl(root / "corpus.jsonl", DOCS)
    write_jsonl(root / "queries.jsonl", [{"_id": q, "text": t} for q, t in QUERIES.items()])
    rows = "".join(f"{q}\t{d}\t1\n" for q, docs in QRELS.items() for d in docs)
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows)
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows)  # a toy: train = test texts
    run_cli(dense_home, "index", "build", "--dataset", str(root), "--name", "ds", "--quiet")
    payload = json.loads(run_cli(dense_home, "search", "kitten care", "--name", "ds", "--pipeline", "hybrid", "--json").stdout)
    assert payload["pipeline"] == "hybrid" and payload["hits"]
    result = json.loads(run_cli(
        dense_home, "eval", "--dataset", str(root), "--pipeline", "bm25,hybrid,hybrid-tuned", "--json", "-",
        "--resamples", "200", "--quiet",
    ).stdout)
    assert set(result["pipelines"]) == {"bm25", "hybrid", "hybrid-tuned"}
    assert result["pipelines"]["hybrid-tuned"]["trained_on"] == "train split (5 queries)"
    assert result["pipelines"]["hybrid-tuned"]["fitted"][0]["normalisation"] in ("min-max", "z-score")
    folds = json.loads(run_cli(
        dense_home, "eval", "--dataset", str(root), "--pipeline", "hybrid,hybrid-tuned", "--folds", "2", "--json", "-",
        "--resamples", "200", "--quiet",
    ).stdout)
    assert folds["folds"]["k"] == 2 and len(folds["pipelines"]["hybrid-tuned"]["fitted"]) == 2
    assert Path(folds["folds"]["file"]).is_file()


def test_union_rows_keeps_first_then_new_rows_of_second():
    union, where = union_rows(np.array([7, 3, 9]), np.array([3, 5, 7, 1]))
    assert union.tolist() == [7, 3, 9, 5, 1]
    assert union[where].tolist() == [3, 5, 7, 1]
    empty = np.empty(0, dtype=np.int64)
    assert union_rows(empty, np.array([4, 2]))[0].tolist() == [4, 2]
    assert union_rows(np.array([4, 2]), empty)[1].tolist() == []


def reference_bm25(index: EmbeddedIndex, query: str, k: int) -> list[tuple[str, float]]:
    """BM25 top k of matching documents, ties by row, from the whole-corpus score array."""
    scores = index.bm25.scores(index.analyzer.analyze(query))
    matching = sorted((i for i in range(len(index)) if scores[i] > 0), key=lambda i: (-scores[i], i))
    return [(index.docs.ids[i], float(scores[i])) for i in matching[:k]]


def reference_search(index: EmbeddedIndex, query: str, k: int, settings: FusionSettings) -> list[tuple[str, float]]:
    """The hybrid pipeline written the straightforward way: string ids, dicts, a fresh analysis
    per call, scores from whole-corpus arrays, Python sorting."""
    all_bm25 = index.bm25.scores(index.analyzer.analyze(query))
    lexical = [d for d, _ in reference_bm25(index, query, settings.bm25_candidates)]
    vector = index.encode_query(query)
    cosine = index.vectors.similarity(vector, np.arange(len(index)))
    semantic = [index.docs.ids[i] for i in sorted(range(len(index)), key=lambda i: -cosine[i])[:settings.dense_candidates]]
    ids = lexical + [d for d in semantic if d not in lexical]
    if settings.method == "rrf":
        fused = {d: (1 / (settings.rrf_k + lexical.index(d) + 1) if d in lexical else 0.0)
                 + (1 / (settings.rrf_k + semantic.index(d) + 1) if d in semantic else 0.0) for d in ids}
    else:
        rows = [index.docs.index_of[d] for d in ids]
        bm25 = [float(all_bm25[r]) for r in rows]
        dense = [float(cosine[r]) for r in rows]

        def norm(values: list[float]) -> list[float]:
            low, high = min(values), max(values)
            return [0.0 if high == low else (v - low) / (high - low) for v in values]

        w = settings.dense_weight
        fused = {d: (1 - w) * b + w * c for d, b, c in zip(ids, norm(bm25), norm(dense))}
    ranked = sorted(ids, key=lambda d: -fused[d])  # stable: ties keep candidate order
    return [(d, fused[d]) for d in ranked[:k]]


@pytest.mark.parametrize("settings", [FusionSettings(bm25_candidates=4, dense_candidates=4),
                                      FusionSettings(method="convex", bm25_candidates=4, dense_candidates=4)])
def test_integer_hot_path_ranks_as_the_reference(hybrid_index: EmbeddedIndex, settings: FusionSettings):
    """Rows instead of ids, one analysis and one fusion per request change no ranking: same top-k
    ids and scores as a straightforward implementation."""
    pipeline = HybridPipeline(hybrid_index, settings)
    for query in ("baby cats", "wolf howling at night", "kittens", "dog"):
        got = [(h.doc_id, h.score) for h in pipeline.search(query, 5)]
        expected = reference_search(hybrid_index, query, 5, settings)
        assert [d for d, _ in got] == [d for d, _ in expected]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], rtol=1e-5, atol=1e-6)
        bm25 = [(h.doc_id, h.score) for h in BM25Pipeline(hybrid_index).search(query, 3)]
        assert bm25 == reference_bm25(hybrid_index, query, 3)


def test_rrf_is_fused_once_per_window(hybrid_index: EmbeddedIndex):
    """The window fuses RRF on first use only; the pipeline, the ranker's reordering and the
    rrf_score feature share that one array (convex fusion never computes it)."""
    window = generate_candidates(hybrid_index, "baby cats", bm25_k=2, dense_k=3, exact=True)
    fused_scores(window, FusionSettings(method="convex"))
    assert "rrf" not in window.__dict__
    rrf = fused_scores(window, FusionSettings())
    assert rrf is window.rrf
    np.testing.assert_array_equal(rrf, fuse_reciprocal_rank([window.bm25_rank, window.dense_rank]))
    order = np.argsort(-rrf, kind="stable")
    taken = window.take(order)
    assert "rrf" in taken.__dict__ and taken.doc_ids == [window.doc_ids[i] for i in order]
    np.testing.assert_array_equal(taken.rrf, rrf[order])
