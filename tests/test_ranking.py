"""The ranking pipeline in process (window, filters, ranker slot, rules, page) and the service config loader."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from search.app.config import ADMIN_TOKEN_ENV_VAR, load_service_config
from search.embedded import EmbeddedIndex
from search.hybrid import FusionSettings
from search.pipelines import BM25Pipeline
from search.ranking import RankingPipeline, RankingRequest, WindowTooSmallError
from search.rules import parse_filters
from tests.conftest import run_cli


@pytest.fixture
def bm25_index(small_corpus: Path, home: Path) -> EmbeddedIndex:
    run_cli(home, "index", "build", "--dataset", str(small_corpus), "--name", "r", "--no-dense", "--quiet")
    return EmbeddedIndex.open(home, "r")


EVERYTHING = "cats quantum garden entanglement dogs café"  # matches all six documents


def _pipeline(index: EmbeddedIndex, **options) -> RankingPipeline:
    return RankingPipeline(index, BM25Pipeline(index), window=options.pop("window", 6), **options)


def test_page_is_cut_from_one_ranked_window(bm25_index):
    pipeline = _pipeline(bm25_index)
    whole = pipeline.run(RankingRequest(EVERYTHING, "r1", size=6))
    first = pipeline.run(RankingRequest(EVERYTHING, "r2", size=2))
    second = pipeline.run(RankingRequest(EVERYTHING, "r3", size=2, offset=2))
    ids = [r.doc_id for r in whole.results]
    assert [r.doc_id for r in first.results + second.results] == ids[:4]
    assert [r.position for r in second.results] == [3, 4]
    with pytest.raises(WindowTooSmallError, match="offset \\+ size = 7 goes past the rerank window of 6"):
        pipeline.run(RankingRequest("cats", "r4", size=5, offset=2))


def test_filters_apply_before_the_ranker(bm25_index):
    seen: list[list[str]] = []

    class ReverseRanker:
        version = "test"

        def score(self, query, window):
            seen.append(window.doc_ids())
            return -np.arange(len(window), dtype=float)[::-1]  # reverses the first-stage order

    pipeline = _pipeline(bm25_index, ranker=ReverseRanker())
    outcome = pipeline.run(RankingRequest("cats dogs garden mice", "r1", size=6, filters=tuple(parse_filters({"author": "ann"}))))
    assert seen[0] and all(bm25_index.document(d)["metadata"]["author"] == "ann" for d in seen[0])
    assert [r.doc_id for r in outcome.results] == seen[0][::-1]
    assert outcome.eligible == len(seen[0]) < outcome.window_size


def test_diversity_and_exclusion(bm25_index):
    pipeline = _pipeline(bm25_index)
    outcome = pipeline.run(RankingRequest(
        "cats dogs garden mice training", "r1", size=6, exclude=frozenset({"d1"}), diversity_field="author", diversity_cap=1,
    ))
    authors = [bm25_index.document(r.doc_id)["metadata"]["author"] for r in outcome.results]
    assert "d1" not in [r.doc_id for r in outcome.results] and len(authors) == len(set(authors))


def test_exploration_logs_propensities(bm25_index):
    explored = _pipeline(bm25_index, epsilon=1.0, protected_top=1)
    baseline = _pipeline(bm25_index).run(RankingRequest(EVERYTHING, "r0", size=2))
    outcome = explored.run(RankingRequest(EVERYTHING, "r1", size=2))
    assert outcome.explored and all(r.propensity == 1.0 for r in baseline.results)
    assert outcome.results[0].doc_id == baseline.results[0].doc_id and outcome.results[0].propensity == 1.0
    # one slot below the protected top, four deeper candidates: each lands there with probability 1/4
    assert outcome.results[1].doc_id != baseline.results[1].doc_id and outcome.results[1].propensity == pytest.approx(0.25)
    again = explored.run(RankingRequest(EVERYTHING, "r1", size=2))
    assert [r.doc_id for r in again.results] == [r.doc_id for r in outcome.results]  # reproducible from the id


def test_service_config_loader(tmp_path: Path, monkeypatch):
    config_file = tmp_path / "s.toml"
    config_file.write_text(
        'index = "scifact"\nrerank_window = 300\n[exploration]\nepsilon = 0.1\n'
        '[fusion.scifact]\nmethod = "convex"\ndense_weight = 0.55\nnormalisation = "z-score"\n'
    )
    monkeypatch.setenv(ADMIN_TOKEN_ENV_VAR, "x" * 20)
    config = load_service_config(tmp_path, config_file, {"rerank_window": 100, "default_pipeline": None})
    assert config.index == "scifact" and config.rerank_window == 100 and config.exploration.epsilon == 0.1
    assert config.fusion_for("scifact") == FusionSettings(method="convex", dense_weight=0.55, normalisation="z-score")
    assert config.fusion_for("other") == FusionSettings() and config.admin_token == "x" * 20
    assert config.event_store_path == tmp_path / "events" / "scifact.sqlite3"
    config_file.write_text("rerank_windw = 3\n")
    with pytest.raises(ValueError, match="unknown setting\\(s\\) rerank_windw"):
        load_service_config(tmp_path, config_file)
    config_file.write_text("[exploration]\nepsilon = 2\n")
    with pytest.raises(ValueError, match="epsilon must be in"):
        load_service_config(tmp_path, config_file)
    config_file.write_text("index = \n")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_service_config(tmp_path, config_file)
    monkeypatch.setenv(ADMIN_TOKEN_ENV_VAR, "short")
    with pytest.raises(ValueError, match="at least 16 characters"):
        load_service_config(tmp_path)
