"""The vector cache: rebuilds encode only what changed, concurrent writers, pruning with generations."""
from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from indexing.build import BuildSettings, build_index, rebuild_index
from indexing.corpus import CorpusSpec
from indexing.vector_cache import VectorCache, content_keys, encoder_fingerprint, live_keys
from tests.conftest import SMALL_DOCS, home_sharing_encoder, write_jsonl




def quiet(_: str) -> None:
    pass


def _unit(rng: np.random.Generator, n: int, dim: int = 8) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_get_returns_what_put_stored_and_put_never_overwrites(tmp_path: Path):
    rng = np.random.default_rng(0)
    keys = content_keys(["a", "b", "c"])
    vectors = _unit(rng, 3)
    with VectorCache(tmp_path) as cache:
        assert cache.put("fp", keys[:2], vectors[:2]) == 2
        assert cache.put("fp", keys, _unit(rng, 3)) == 1  # only "c" is new; a and b keep their vectors
        found, got = cache.get("fp", content_keys(["b", "x", "a", "b"]), 8)
        assert found.tolist() == [True, False, True, True]
        np.testing.assert_array_equal(got[[0, 2, 3]], vectors[[1, 0, 1]])
        assert not cache.get("other-fingerprint", keys, 8)[0].any()
        assert not cache.get("fp", keys, 16)[0].any()  # a vector of another width is never returned


def _writer(home: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    texts = [f"text {i}" for i in range(300)]  # the same keys from every process
    with VectorCache(Path(home)) as cache:
        for start in range(0, 300, 30):
            keys = content_keys(texts[start:start + 30])
            cache.put("fp", keys, np.repeat(_unit(rng, 1), 30, axis=0))
            cache.get("fp", keys, 8)


def test_concurrent_writers_in_separate_processes(tmp_path: Path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(str(tmp_path), seed)) for seed in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    with VectorCache(tmp_path) as cache:
        assert cache.count() == 300
        found, vectors = cache.get("fp", content_keys([f"text {i}" for i in range(300)]), 8)
        assert found.all() and np.allclose(np.linalg.norm(vectors, axis=1), 1.0)


def test_prune_keeps_exactly_the_listed_keys(tmp_path: Path):
    rng = np.random.default_rng(1)
    keys = content_keys(["a", "b", "c", "d"])
    with VectorCache(tmp_path) as cache:
        cache.put("fp1", keys, _unit(rng, 4))
        cache.put("fp2", keys[:1], _unit(rng, 1))
        assert cache.prune([("fp1", keys[1:3]), ("fp2", keys[:1])]) == 2
        assert cache.get("fp1", keys, 8)[0].tolist() == [False, True, True, False]
        assert cache.get("fp2", keys, 8)[0].tolist() == [True, False, False, False]


def test_fingerprint_changes_with_what_decides_a_vector():
    meta = {"sha256": "m", "tokenizer_sha256": "t", "pooling": "mean", "normalize": True, "dim": 384}
    base = encoder_fingerprint(meta, 256)
    assert encoder_fingerprint(dict(meta), 256) == base
    assert encoder_fingerprint(meta, 128) != base
    assert encoder_fingerprint({**meta, "sha256": "compressed"}, 256) != base
    assert encoder_fingerprint({**meta, "form": "int8"}, 256) != base
    assert encoder_fingerprint({**meta, "form": "fp32"}, 256) == base  # encoder.json from before forms: fp32


def test_rebuild_from_a_changed_corpus_encodes_only_the_changes_and_equals_a_cold_build(
        tmp_path: Path, shared_encoder_home: Path):
    home = home_sharing_encoder(tmp_path / "home", shared_encoder_home)
    first = write_jsonl(tmp_path / "first.jsonl", SMALL_DOCS)
    changed_docs = [dict(d) for d in SMALL_DOCS]
    changed_docs[2]["text"] = "Water lilies float on the garden pond."
    changed_docs.append({"_id": "d7", "title": "Owls", "text": "Owls hunt mice at night.", "author": "eve"})
    changed = write_jsonl(tmp_path / "changed.jsonl", changed_docs)

    # the default (int8) form: each text is encoded alone, so its vector does not depend on its batch
    cold = build_index(home, "t", BuildSettings(corpus=CorpusSpec(str(first)), keep=0), progress=False,
                       log=quiet)
    assert (cold.vectors_encoded, cold.vectors_cached) == (6, 0)
    warm = rebuild_index(home, "t", progress=False, log=quiet, dataset=changed)
    assert (warm.vectors_encoded, warm.vectors_cached) == (2, 5)
    manifest = json.loads((warm.path / "manifest.json").read_text())
    assert manifest["build"]["corpus"]["path"] == str(changed.resolve())  # the next plain rebuild reads the new path
    assert manifest["dense"]["cache"]["encoded"] == 2

    peer_home = home_sharing_encoder(tmp_path / "peer", shared_encoder_home)
    peer = build_index(peer_home, "t", BuildSettings(corpus=CorpusSpec(str(changed))), progress=False,
                       log=quiet)
    files = json.loads((warm.path / "manifest.json").read_text())["files"]
    peer_files = json.loads((peer.path / "manifest.json").read_text())["files"]
    assert {f: v["sha256"] for f, v in files.items() if not f.startswith("vectors/")} == \
        {f: v["sha256"] for f, v in peer_files.items() if not f.startswith("vectors/")}
    np.testing.assert_array_equal(np.load(warm.path / "vectors" / "embeddings.npy"),
                                  np.load(peer.path / "vectors" / "embeddings.npy"))  # bit for bit

    # keep=0 pruned g000001, and with it the cache entries only it used (d3's old text)
    with VectorCache(home) as cache:
        assert cache.count() == 7
        cache_live = live_keys(home / "indexes")
        assert [len(keys) for _, keys in cache_live] == [7]
        assert cache.prune(cache_live) == 0  # after the build's own prune nothing is left to remove
        assert cache.count() == 7
    again = rebuild_index(home, "t", progress=False, log=quiet)
    assert (again.vectors_encoded, again.vectors_cached) == (0, 7)
    with VectorCache(home) as cache:
        assert cache.count() == 7


def test_a_build_without_dense_vectors_neither_reads_nor_writes_the_cache(tmp_path: Path, small_corpus: Path):
    home = tmp_path / "home"
    build_index(home, "t", BuildSettings(corpus=CorpusSpec(str(small_corpus)), dense=False), progress=False, log=quiet)
    assert not (home / "cache").exists()


@pytest.mark.parametrize("bad", ["not numpy", b"\x93NUMPY garbage"])
def test_unreadable_keys_files_keep_nothing_alive(tmp_path: Path, bad):
    generation = tmp_path / "t" / "generations" / "g000001"
    (generation / "vectors").mkdir(parents=True)
    (generation / "manifest.json").write_text(json.dumps({"dense": {"cache": {"fingerprint": "fp"}}}))
    (generation / "vectors" / "keys.npy").write_bytes(bad.encode() if isinstance(bad, str) else bad)
    assert [len(keys) for _, keys in live_keys(tmp_path)] == [0]
