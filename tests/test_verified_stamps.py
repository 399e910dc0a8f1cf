"""Verification stamps (issue 17, start-up): a generation or encoder file hashed in full once is
not hashed again while its identity (size, mtime, ctime, inode) is unchanged, and any change,
even one that keeps the size and puts the mtime back, is hashed again and refused when corrupt:
in process, and by a real `serve`, whose /ready reports the refusal."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import indexing.verified as verified
from indexing.bundle import IndexCorruptError, IndexStore
from indexing.build import BuildSettings, build_index
from indexing.corpus import CorpusSpec
from indexing.encoder import EncoderError, EncoderSettings, OnnxEncoder, encoder_dir_for
from indexing.verified import stamp_path
from tests.conftest import ROOT, SMALL_DOCS, first_ready_answer, free_port, lexical_home, write_jsonl

CORRUPTED = "docs/docs.jsonl"


@pytest.fixture
def lex_home(tmp_path: Path) -> Path:
    return lexical_home(tmp_path, "lex")


@pytest.fixture
def hashed(monkeypatch) -> list[Path]:
    """The files indexing.verified hashes in full (the real hash still runs)."""
    calls: list[Path] = []
    real = verified.sha256_file
    monkeypatch.setattr(verified, "sha256_file", lambda path, *a: calls.append(Path(path)) or real(path, *a))
    return calls


def corrupt_keeping_size_and_mtime(file: Path) -> None:
    """Flip one byte in place and put the mtime back: only the ctime tells."""
    stat = file.stat()
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x20
    file.write_bytes(bytes(data))
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file.stat().st_size == stat.st_size and file.stat().st_mtime_ns == stat.st_mtime_ns


def test_the_build_stamps_its_generation_and_a_load_hashes_nothing_unchanged(lex_home, hashed):
    generation = IndexStore(lex_home).open("lex")
    stamp = json.loads(stamp_path(generation.path).read_text())
    assert set(stamp["files"]) == set(generation.manifest["files"])  # commit's full check stamped them all
    assert hashed == []
    IndexStore(lex_home).open("lex", rehash=True)  # index status --verify: every byte, stamps aside
    assert len(hashed) == len(generation.manifest["files"])


def test_a_corrupted_file_is_refused_though_it_kept_its_size_and_mtime(lex_home, hashed):
    generation = IndexStore(lex_home).open("lex")
    corrupt_keeping_size_and_mtime(generation.path / CORRUPTED)
    with pytest.raises(IndexCorruptError, match="docs.jsonl does not match its SHA-256"):
        IndexStore(lex_home).open("lex")
    assert hashed == [generation.path / CORRUPTED]  # only the changed file was hashed again
    with pytest.raises(IndexCorruptError):  # and again: a refused file is never stamped
        IndexStore(lex_home).open("lex")


def test_pruning_a_generation_removes_its_stamp(lex_home, tmp_path):
    store = IndexStore(lex_home)
    first = store.open("lex")
    corpus = write_jsonl(tmp_path / "again.jsonl", SMALL_DOCS)
    for _ in range(2):
        build_index(lex_home, "lex", BuildSettings(corpus=CorpusSpec(str(corpus)), dense=False, keep=1), progress=False,
                    log=lambda m: None)
    assert "g000001" not in store.generations("lex")
    assert not stamp_path(first.path).exists() and stamp_path(store.open("lex").path).exists()


def test_a_replaced_file_is_hashed_again(lex_home, hashed):
    generation = IndexStore(lex_home).open("lex")
    file = generation.path / CORRUPTED
    copy = file.with_name("copy")
    shutil.copy2(file, copy)
    os.replace(copy, file)  # same bytes, another inode
    IndexStore(lex_home).open("lex")
    assert hashed == [file]
    hashed.clear()
    IndexStore(lex_home).open("lex")  # stamped again
    assert hashed == []


def test_an_unwritable_stamp_only_costs_hashing(lex_home, hashed):
    generation = IndexStore(lex_home).open("lex")
    stamp_path(generation.path).unlink()
    stamp_path(generation.path).mkdir()  # neither readable nor replaceable as a file
    IndexStore(lex_home).open("lex")
    IndexStore(lex_home).open("lex")
    assert len(hashed) == 2 * len(generation.manifest["files"])
    assert not [p for p in generation.path.parent.iterdir() if p.name.endswith(".tmp")]


def test_the_encoder_model_is_stamped_and_a_corrupted_one_refused(tmp_path, shared_encoder_home):
    directory = tmp_path / "encoder"
    shutil.copytree(encoder_dir_for(shared_encoder_home, EncoderSettings()), directory, symlinks=False)
    first = OnnxEncoder(directory)
    stamp = json.loads(stamp_path(directory).read_text())
    assert stamp["files"]["model.onnx"][0] == first.sha256
    assert OnnxEncoder(directory).sha256 == first.sha256  # from the stamp
    corrupt_keeping_size_and_mtime(directory / "model.onnx")
    with pytest.raises(EncoderError, match="does not match encoder.json"):
        OnnxEncoder(directory)


def test_serve_refuses_a_generation_corrupted_after_it_was_stamped(lex_home):
    generation = IndexStore(lex_home).open("lex")
    assert stamp_path(generation.path).exists() and not list(generation.path.glob(".*"))
    corrupt_keeping_size_and_mtime(generation.path / CORRUPTED)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "search.app.cli", "--home", str(lex_home), "serve", "--port", str(port),
                                "--name", "lex", "--no-access-log"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        response = first_ready_answer(port, process)
        assert response.status_code == 503
        assert "docs.jsonl does not match its SHA-256" in response.json()["reason"]
    finally:
        process.terminate()
        process.wait(timeout=30)
