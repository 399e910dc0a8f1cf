"""Shared fixtures: paths to the shared datasets (skipped when absent) and small corpora."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("LTR_SEARCH_DATASETS", ROOT.parent / "shared" / "datasets"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def dataset_path(name: str) -> Path:
    path = DATASETS / name
    if not path.is_dir():
        pytest.skip(f"shared dataset '{name}' not found at {path} (set LTR_SEARCH_DATASETS to its folder)")
    return path


@pytest.fixture
def scifact_dir() -> Path:
    return dataset_path("scifact")


SMALL_DOCS = [
    {"_id": "d1", "title": "Cats and dogs", "text": "Cats chase mice. Dogs chase cats around the garden.", "author": "ann"},
    {"_id": "d2", "title": "Quantum computing", "text": "Qubits use superposition and entanglement for computing.", "author": "bob"},
    {"_id": "d3", "title": "Gardening tips", "text": "Water the garden early; mice avoid mint plants.", "author": "ann"},
    {"_id": "d4", "title": "", "text": "Entanglement experiments with photons confirm quantum theory.", "author": "cy"},
    {"_id": "d5", "title": "Dog training", "text": "Training dogs requires patience, treats and daily practice.", "author": "bob"},
    {"_id": "d6", "title": "Café culture", "text": "The café serves crème brûlée; cafés are popular in Paris.", "author": "dee"},
]


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n")
    return path


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    directory = tmp_path / "small"
    directory.mkdir()
    write_jsonl(directory / "corpus.jsonl", SMALL_DOCS)
    return directory


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture(scope="session")
def shared_encoder_home(tmp_path_factory) -> Path:
    """Export the ONNX encoder once per test session (the only step that needs torch)."""
    from indexing.encoder import EncoderSettings, ensure_onnx_encoder

    home = tmp_path_factory.mktemp("encoder-home")
    ensure_onnx_encoder(home, EncoderSettings(), progress=False)
    return home


@pytest.fixture
def dense_home(tmp_path: Path, shared_encoder_home: Path) -> Path:
    return home_sharing_encoder(tmp_path / "dense-home", shared_encoder_home)


def home_sharing_encoder(home: Path, shared_encoder_home: Path) -> Path:
    """A new engine home whose encoders directory is the session's shared export."""
    from indexing.home import encoders_dir

    home.mkdir(parents=True)
    (home / "encoders").symlink_to(encoders_dir(shared_encoder_home), target_is_directory=True)
    return home


def run_cli(home: Path, *args: str, check: bool = True):
    """Run `ltr-search` in a subprocess, as a user would."""
    import subprocess

    command = [sys.executable, "-m", "search.app.cli", "--home", str(home), *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lexical_home(root: Path, name: str) -> Path:
    """SMALL_DOCS indexed with BM25 only (no encoder needed) as index `name` in ROOT/home."""
    from indexing.build import BuildSettings, build_index
    from indexing.corpus import CorpusSpec

    home = root / "home"
    corpus = write_jsonl(root / "corpus.jsonl", SMALL_DOCS)
    build_index(home, name, BuildSettings(corpus=CorpusSpec(str(corpus)), dense=False), progress=False, log=lambda m: None)
    return home


def first_ready_answer(port: int, process: subprocess.Popen, timeout: float = 60):
    """The first answer of a spawned `serve` to GET /ready, whatever its status (an
    `httpx.Response`); fails if the process exits or `timeout` passes before it answers."""
    import time

    import httpx

    deadline = time.time() + timeout
    while True:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2)
        except httpx.TransportError:
            assert process.poll() is None and time.time() < deadline
            time.sleep(0.2)


@contextmanager
def running_service(home: Path, *serve_args: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real `ltr-search serve` (uvicorn on 127.0.0.1, a free port), ready when yielded."""
    import time

    import httpx

    import tempfile

    port = free_port()
    # The server's output (access log included) goes to a file: a pipe nobody reads fills up and
    # blocks the server after a few hundred requests.
    output = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "search.app.cli", "--home", str(home), "serve", "--port", str(port), *serve_args],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        stdout=output, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    try:
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                process.wait(timeout=30)
                output.seek(0)
                raise AssertionError(f"service did not become ready:\n{output.read()}")
            time.sleep(0.2)
        yield url, process
    finally:
        process.terminate()
        process.wait(timeout=30)
        output.close()


@pytest.fixture
def dense_index(small_corpus: Path, dense_home: Path):
    """SMALL_DOCS indexed with BM25 and dense vectors, as index 'fd' in a home of its own."""
    from search.embedded import EmbeddedIndex

    run_cli(dense_home, "index", "build", "--dataset", str(small_corpus), "--name", "fd", "--quiet")
    return EmbeddedIndex.open(dense_home, "fd")
