"""Index generations end to end through the CLI: build, status, search, rebuild, rollback,
pruning, bad input, corruption, a build killed mid-way, and readers during a rebuild."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from indexing.build import BuildSettings, build_index
from indexing.bundle import IndexBusyError, IndexCorruptError, IndexStore
from indexing.corpus import CorpusSpec
from search.embedded import EmbeddedIndex
from tests.conftest import ROOT, SMALL_DOCS, run_cli, write_jsonl


def bm25_settings(path: Path, **kwargs) -> BuildSettings:
    return BuildSettings(corpus=CorpusSpec(str(path)), dense=False, **kwargs)


def status(home: Path, name: str) -> dict:
    return json.loads(run_cli(home, "index", "status", "--name", name, "--json").stdout)["indexes"][name]


def search_ids(home: Path, query: str, name: str = "t") -> list[str]:
    result = run_cli(home, "search", query, "--name", name, "--json")
    return [hit["id"] for hit in json.loads(result.stdout)["hits"]]


def test_build_status_search_rebuild_rollback(home, small_corpus):
    result = run_cli(home, "index", "build", "--dataset", str(small_corpus), "--name", "t", "--no-dense", "--quiet")
    assert "generation g000001 is active" in result.stdout
    assert "documents      6" in result.stdout
    info = status(home, "t")
    assert info["active"] == "g000001"
    [gen] = info["generations"]
    assert gen["documents"] == 6 and gen["dense"] == "none" and gen["status"] == "ok"

    assert search_ids(home, "dogs chasing cats")[0] == "d1"
    payload = json.loads(run_cli(home, "search", "quantum", "--name", "t", "--json", "-k", "1").stdout)
    assert payload["generation"] == "g000001" and len(payload["hits"]) == 1

    run_cli(home, "index", "rebuild", "--name", "t", "--quiet")
    assert status(home, "t")["active"] == "g000002"
    out = run_cli(home, "index", "rollback", "--name", "t").stdout
    assert "g000002 -> g000001" in out
    assert status(home, "t")["active"] == "g000001"
    run_cli(home, "index", "rollback", "--name", "t", "--to", "g000002")
    assert status(home, "t")["active"] == "g000002"


def test_old_generations_are_pruned_but_active_kept(home, small_corpus):
    for _ in range(4):
        build_index(home, "t", bm25_settings(small_corpus, keep=1), progress=False, log=lambda m: None)
    store = IndexStore(home)
    assert store.generations("t") == ["g000003", "g000004"]
    store.activate("t", "g000003")
    build_index(home, "t", bm25_settings(small_corpus, keep=0), progress=False, log=lambda m: None)
    assert store.active_generation("t") == "g000005"
    assert store.generations("t") == ["g000005"]


def test_bad_corpus_fails_precisely_and_leaves_active_untouched(home, small_corpus, tmp_path):
    run_cli(home, "index", "build", "--dataset", str(small_corpus), "--name", "t", "--no-dense", "--quiet")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"_id": "a", "text": "fine"}, {"_id": "b", "text": None}])
    result = run_cli(home, "index", "build", "--dataset", str(bad), "--name", "t", "--no-dense", "--quiet", check=False)
    assert result.returncode == 2
    assert f"{bad}:2: field 'text' must be a string, got null" in result.stderr
    assert "Traceback" not in result.stderr
    assert status(home, "t")["active"] == "g000001"
    assert IndexStore(home).generations("t") == ["g000001"]


def test_skip_invalid_reports_skipped_lines(home, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [*SMALL_DOCS, "{not json", {"_id": "d1", "text": "dup"}])
    result = run_cli(home, "index", "build", "--dataset", str(corpus), "--name", "t", "--no-dense", "--quiet", "--skip-invalid")
    assert "skipped lines  2" in result.stdout
    assert f"skipped {corpus}:7: invalid JSON" in result.stdout
    assert f"skipped {corpus}:8: duplicate id 'd1' (first seen on line 1)" in result.stdout
    manifest = IndexStore(home).open("t").manifest
    assert [s["line"] for s in manifest["corpus"]["skipped"]] == [7, 8]


def test_unknown_index_and_bad_arguments_are_clear(home, small_corpus):
    result = run_cli(home, "search", "cats", "--name", "nope", check=False)
    assert result.returncode == 2 and "no active index named 'nope'" in result.stderr
    run_cli(home, "index", "build", "--dataset", str(small_corpus), "--name", "t", "--no-dense", "--quiet")
    result = run_cli(home, "search", "cats", "--name", "t", "--pipeline", "dense", check=False)
    assert result.returncode == 2 and "built without dense vectors" in result.stderr
    result = run_cli(home, "search", "cats", "--name", "t", "-k", "0", check=False)
    assert result.returncode == 2 and "-k must be between" in result.stderr
    result = run_cli(home, "index", "build", "--dataset", str(small_corpus), "--name", "../evil", "--no-dense", check=False)
    assert result.returncode == 2 and "invalid index name" in result.stderr
    result = run_cli(home, "index", "build", "--dataset", str(small_corpus), "--b", "3", "--no-dense", check=False)
    assert result.returncode == 2 and "BM25 b must be in [0, 1]" in result.stderr


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_corrupt_generation_is_refused_with_the_file_named(home, small_corpus, damage):
    build_index(home, "t", bm25_settings(small_corpus), progress=False, log=lambda m: None)
    path = IndexStore(home).open("t").path
    target = path / "bm25" / "all.data.npy"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[-3] ^= 0xFF
        target.write_bytes(bytes(data))
        expected = "bm25/all.data.npy does not match its SHA-256 checksum"
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-8])
        expected = "bm25/all.data.npy has"
    elif damage == "delete":
        target.unlink()
        expected = "bm25/all.data.npy is missing"
    else:
        (path / "manifest.json").write_text("{ half a manifest", encoding="utf-8")
        expected = "manifest.json is not valid JSON"
    with pytest.raises(IndexCorruptError, match=expected.replace("[", r"\[")):
        EmbeddedIndex.open(home, "t")
    result = run_cli(home, "search", "cats", "--name", "t", check=False)
    assert result.returncode == 2 and expected in result.stderr
    assert "CORRUPT" in run_cli(home, "index", "status", "--name", "t", "--verify").stdout


def test_second_writer_is_refused_while_a_build_holds_the_lock(home, small_corpus):
    store = IndexStore(home)
    with store.lock("t", create=True):
        with pytest.raises(IndexBusyError, match="another build or rollback of index 't' is running"):
            build_index(home, "t", bm25_settings(small_corpus), progress=False, log=lambda m: None, lock_timeout_s=0.1)


def test_reader_keeps_serving_through_rebuild_and_prune(home, small_corpus):
    build_index(home, "t", bm25_settings(small_corpus), progress=False, log=lambda m: None)
    reader = EmbeddedIndex.open(home, "t")
    before = reader.retrieve_bm25("dogs and cats", 5).hits()
    for _ in range(2):  # with keep=0 the generation the reader holds is deleted from disk
        build_index(home, "t", bm25_settings(small_corpus, keep=0), progress=False, log=lambda m: None)
    assert not reader.generation.path.exists()
    assert reader.retrieve_bm25("dogs and cats", 5).hits() == before
    assert reader.document("d1")["title"] == "Cats and dogs"
    assert EmbeddedIndex.open(home, "t").generation.generation == "g000003"


def synthetic_corpus(path: Path, n_docs: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocabulary = ["".join(rng.choice(letters, size=rng.integers(4, 10))) for _ in range(20_000)]
    weights = 1.0 / np.arange(1, len(vocabulary) + 1) ** 1.1
    weights /= weights.sum()
    words = rng.choice(len(vocabulary), size=(n_docs, 60), p=weights)
    with open(path, "w", encoding="utf-8") as handle:
        for i, row in enumerate(words):
            text = " ".join(vocabulary[w] for w in row)
            handle.write(json.dumps({"_id": f"s{i}", "title": vocabulary[row[0]], "text": text}) + "\n")
    return path


@pytest.mark.parametrize("kill_when", ["staging_created", "bm25_written", "docs_written"])
def test_killed_build_leaves_the_previous_generation_serving(home, small_corpus, tmp_path, kill_when):
    build_index(home, "t", bm25_settings(small_corpus), progress=False, log=lambda m: None)
    expected = search_ids(home, "dogs chasing cats")
    big = synthetic_corpus(tmp_path / "big.jsonl", 40_000)
    generations = home / "indexes" / "t" / "generations"
    markers = {
        "staging_created": lambda s: True,
        "bm25_written": lambda s: (s / "bm25" / "all.doclen.npy").exists(),
        "docs_written": lambda s: (s / "docs" / "docs.offsets.npy").exists(),
    }
    command = [sys.executable, "-m", "search.app.cli", "--home", str(home), "index", "build",
               "--dataset", str(big), "--name", "t", "--no-dense", "--quiet"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    caught = False
    while time.monotonic() < deadline and process.poll() is None:
        if any(markers[kill_when](s) for s in generations.glob(".staging-*")):
            os.kill(process.pid, signal.SIGKILL)
            caught = True
            break
        time.sleep(0.002)
    process.wait()
    assert caught, f"the build finished before reaching '{kill_when}'; use a bigger corpus"

    store = IndexStore(home)
    assert store.active_generation("t") == "g000001"
    assert store.generations("t") == ["g000001"]
    assert search_ids(home, "dogs chasing cats") == expected
    # The next build cleans the killed build's staging directory and succeeds.
    build_index(home, "t", bm25_settings(small_corpus), progress=False, log=lambda m: None)
    assert store.active_generation("t") == "g000002"
    assert not list(generations.glob(".staging-*"))
