"""Vector indexes: exact top-k, HNSW recall against exact, save/load round trips, memory mapping."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from indexing.vectors import (
    ExactVectorIndex,
    HnswVectorIndex,
    VectorIndexSettings,
    build_vector_index,
    load_vector_index,
    top_k_rows,
)

DIM = 64


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, m: int, dim: int = DIM, clusters: int = 40, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((clusters, dim)))
    noise = 0.8 / np.sqrt(dim)  # within-cluster cosine ~0.6, like topical text embeddings
    x = unit(centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, dim)))
    q = unit(centres[rng.integers(0, clusters, m)] + noise * rng.standard_normal((m, dim)))
    return x, q


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = q @ x.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clustered(3000, 200)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return sum(len(np.intersect1d(f, t)) for f, t in zip(found, truth)) / truth.size


def test_exact_returns_true_top_k(data) -> None:
    x, q = data
    index = ExactVectorIndex(x)
    scores, ids = index.search(q, 10)
    want_scores, want_ids = brute_force(x, q, 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (200, 10)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 0)
    assert index.size == 3000 and index.kind == "exact"


def test_exact_blocked_search_matches_single_block(data) -> None:
    from indexing.vectors import exact_search

    x, q = data
    s1, i1 = exact_search(x, q, 7)
    s2, i2 = exact_search(x, q, 7, block_rows=128)  # many blocks merged
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-6)


def test_k_larger_than_corpus_and_single_query() -> None:
    x, q = clustered(5, 3)
    scores, ids = ExactVectorIndex(x).search(q, 50)
    assert ids.shape == (3, 5)
    assert sorted(ids[0].tolist()) == list(range(5))
    s1, i1 = ExactVectorIndex(x).search(q[0], 2)  # a 1-D query is one row
    assert i1.shape == (1, 2)
    with pytest.raises(ValueError):
        ExactVectorIndex(x).search(np.zeros((1, DIM + 1), np.float32), 2)


def test_top_k_ties_are_deterministic() -> None:
    scores = np.array([[0.5, 0.9, 0.5, 0.9, 0.1]], dtype=np.float32)
    s, i = top_k_rows(scores, np.arange(5), 3)
    assert i.tolist() == [[1, 3, 0]] and s.tolist()[0] == pytest.approx([0.9, 0.9, 0.5])


def test_hnsw_recall_at_10(data) -> None:
    x, q = data
    settings = VectorIndexSettings(kind="hnsw")
    index = HnswVectorIndex.build(x, settings)
    scores, ids = index.search(q, 10)
    _, truth = brute_force(x, q, 10)
    assert recall(ids, truth) >= 0.95
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    # Scores are cosines (inner products), not distances.
    np.testing.assert_allclose(scores[:, 0], np.einsum("ij,ij->i", q, x[ids[:, 0]]), atol=1e-4)
    assert index.size == 3000 and index.kind == "hnsw"


def test_hnsw_k_larger_than_corpus() -> None:
    x, q = clustered(6, 2)
    index = HnswVectorIndex.build(x, VectorIndexSettings(kind="hnsw"))
    scores, ids = index.search(q, 100)
    assert ids.shape == (2, 6)
    assert sorted(ids[0].tolist()) == list(range(6))


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_build_and_load_round_trip(data, tmp_path: Path, kind: str) -> None:
    x, q = data
    description = build_vector_index(x, VectorIndexSettings(kind=kind), tmp_path / "vectors")
    assert json.loads(json.dumps(description)) == description  # manifest-ready
    assert description["kind"] == kind and description["count"] == 3000 and description["dim"] == DIM
    assert "embeddings.npy" in description["files"]
    assert ("hnsw.bin" in description["files"]) == (kind == "hnsw")
    assert {p.name for p in (tmp_path / "vectors").iterdir()} == set(description["files"])
    built_scores, built_ids = (
        ExactVectorIndex(x) if kind == "exact" else HnswVectorIndex.build(x, VectorIndexSettings(kind="hnsw"))
    ).search(q, 10)
    loaded = load_vector_index(tmp_path / "vectors", description)
    assert loaded.kind == kind and loaded.size == 3000
    scores, ids = loaded.search(q, 10)
    if kind == "exact":
        np.testing.assert_array_equal(ids, built_ids)
    else:
        _, truth = brute_force(x, q, 10)
        assert recall(ids, truth) >= 0.95
    np.testing.assert_allclose(loaded.similarity(q[0], ids[0]), scores[0], atol=1e-4)


def test_load_is_memory_mapped(data, tmp_path: Path) -> None:
    x, q = data
    description = build_vector_index(x, VectorIndexSettings(kind="exact"), tmp_path)
    mapped = load_vector_index(tmp_path, description, mmap=True)
    assert isinstance(mapped.embeddings, np.memmap)
    in_memory = load_vector_index(tmp_path, description, mmap=False)
    assert not isinstance(in_memory.embeddings, np.memmap)
    np.testing.assert_array_equal(mapped.search(q, 5)[1], in_memory.search(q, 5)[1])


def test_auto_kind_uses_threshold(data, tmp_path: Path) -> None:
    x, _ = data
    assert build_vector_index(x, VectorIndexSettings(hnsw_threshold=3001), tmp_path / "a")["kind"] == "exact"
    assert build_vector_index(x, VectorIndexSettings(hnsw_threshold=3000), tmp_path / "b")["kind"] == "hnsw"


def test_bad_inputs_are_clear_errors(data, tmp_path: Path) -> None:
    x, _ = data
    with pytest.raises(ValueError, match="kind"):
        VectorIndexSettings(kind="ivf")
    description = build_vector_index(x, VectorIndexSettings(kind="exact"), tmp_path)
    with pytest.raises(ValueError, match="kind"):
        load_vector_index(tmp_path, {**description, "kind": "annoy"})
    with pytest.raises(ValueError, match="normalised"):
        build_vector_index(x * 2, VectorIndexSettings(kind="exact"), tmp_path / "c")
    with pytest.raises(ValueError, match="shape"):
        load_vector_index(tmp_path, {**description, "count": 10})


def test_settings_round_trip() -> None:
    s = VectorIndexSettings(kind="hnsw", M=8, ef_search=40)
    assert VectorIndexSettings.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError):
        VectorIndexSettings.from_dict({"kind": "exact", "nlist": 3})


def test_empty_corpus(tmp_path: Path) -> None:
    x = np.zeros((0, DIM), np.float32)
    description = build_vector_index(x, VectorIndexSettings(), tmp_path)
    index = load_vector_index(tmp_path, description)
    scores, ids = index.search(np.ones((2, DIM), np.float32) / np.sqrt(DIM), 10)
    assert scores.shape == (2, 0) and ids.shape == (2, 0)
