"""Dense end to end: build a small index with vectors, search it, and prove the serving path
(loading a generation and answering bm25 and dense queries) never imports torch."""
from __future__ import annotations

import json
import subprocess
import sys

from indexing.build import BuildSettings, build_index
from indexing.corpus import CorpusSpec
from search.embedded import EmbeddedIndex
from search.pipelines import DensePipeline
from tests.conftest import ROOT, run_cli


def test_dense_build_and_search(dense_home, small_corpus):
    summary = build_index(dense_home, "t", BuildSettings(corpus=CorpusSpec(str(small_corpus))), progress=False, log=lambda m: None)
    assert summary.dense == "exact"
    index = EmbeddedIndex.open(dense_home, "t")
    assert index.has_dense
    hits = DensePipeline(index).search("superposition of qubits in quantum computers", 3)
    assert hits[0].doc_id == "d2"
    assert [h.rank for h in hits] == [1, 2, 3]
    assert all(-1.0 <= h.score <= 1.0 + 1e-5 for h in hits)
    manifest = index.generation.manifest
    assert manifest["dense"]["encoder"]["sha256"] == index.encoder.sha256
    assert manifest["dense"]["vectors"]["kind"] == "exact"


def test_serving_path_does_not_import_torch(dense_home, small_corpus):
    build_index(dense_home, "t", BuildSettings(corpus=CorpusSpec(str(small_corpus))), progress=False, log=lambda m: None)
    script = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from search.embedded import EmbeddedIndex\n"
        "from search.pipelines import BM25Pipeline, DensePipeline\n"
        f"index = EmbeddedIndex.open(Path({str(dense_home)!r}), 't')\n"
        "dense = DensePipeline(index).search('dog training with treats', 2)\n"
        "bm25 = BM25Pipeline(index).search('dog training with treats', 2)\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'transformers': 'transformers' in sys.modules,\n"
        "                  'dense': dense[0].doc_id, 'bm25': bm25[0].doc_id}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"torch": False, "transformers": False, "dense": "d5", "bm25": "d5"}


def test_cli_dense_search(dense_home, small_corpus):
    run_cli(dense_home, "index", "build", "--dataset", str(small_corpus), "--name", "t", "--quiet")
    payload = json.loads(run_cli(dense_home, "search", "Parisian coffee houses", "--name", "t", "--pipeline", "dense", "--json").stdout)
    assert payload["hits"][0]["id"] == "d6"


def test_hnsw_is_used_above_the_threshold(dense_home, small_corpus):
    from indexing.vectors import VectorIndexSettings

    settings = BuildSettings(corpus=CorpusSpec(str(small_corpus)), vectors=VectorIndexSettings(hnsw_threshold=3))
    summary = build_index(dense_home, "t", settings, progress=False, log=lambda m: None)
    assert summary.dense == "hnsw"
    index = EmbeddedIndex.open(dense_home, "t")
    assert DensePipeline(index).search("superposition of qubits in quantum computers", 1)[0].doc_id == "d2"


def test_missing_encoder_is_a_clear_error(dense_home, small_corpus):
    build_index(dense_home, "t", BuildSettings(corpus=CorpusSpec(str(small_corpus))), progress=False, log=lambda m: None)
    (dense_home / "encoders").unlink()
    result = run_cli(dense_home, "search", "cats", "--name", "t", check=False)
    assert result.returncode == 2
    assert "rebuild" in result.stderr and "Traceback" not in result.stderr
