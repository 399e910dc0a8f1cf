"""One candidate window: a registry model is scored on the window its manifest records, wherever
it is scored (`search --pipeline ltr`, `eval model:active`, the promotion gate, the service), even
when the service's config asks for another `[fusion.INDEX]` window for its first stage."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from ltr.ranker import LtrPipeline, registry_pipeline
from ltr.registry import ModelRegistry
from search.embedded import EmbeddedIndex
from search.hybrid import FusionSettings
from tests.conftest import run_cli, running_service
from tests.test_ltr import indexed_topics

TRAINED_WINDOW = FusionSettings(bm25_candidates=3, dense_candidates=3)
QUERY = "volcano lava eruption"


@pytest.fixture(scope="module")
def narrow_model(tmp_path_factory, shared_encoder_home: Path):
    root = tmp_path_factory.mktemp("one-window")
    home, dataset = indexed_topics(root, shared_encoder_home)
    training = root / "training.toml"
    training.write_text("[fusion.topics]\nbm25_candidates = 3\ndense_candidates = 3\n")
    run_cli(home, "train", "--dataset", str(dataset), "--split", "train", "--config", str(training),
            "--valid-fraction", "0.25", "--quiet")
    run_cli(home, "models", "promote", "m0001")
    serving = root / "serving.toml"  # another window for the service's own first stage
    serving.write_text("rerank_window = 20\n[exploration]\nepsilon = 0.0\n[fusion.topics]\n"
                       "bm25_candidates = 30\ndense_candidates = 30\n")
    return {"home": home, "dataset": dataset, "serving": serving, "training": training}


def _window_ids(pipeline: LtrPipeline, query: str, k: int) -> list[str]:
    return [hit.doc_id for hit in pipeline.search(query, k)]


def test_the_manifest_records_the_window_and_the_registry_serves_it(narrow_model):
    home = narrow_model["home"]
    manifest = ModelRegistry(home).manifest("m0001")
    assert FusionSettings.from_dict(manifest.training["window"]) == TRAINED_WINDOW
    index = EmbeddedIndex.open(home, "topics")
    served = registry_pipeline(index, home, "active")
    assert served.fusion == TRAINED_WINDOW
    # the window matters on this collection: the default window ranks other documents, so the
    # equalities below can fail
    wide = LtrPipeline(index, served.model, served.features, FusionSettings())
    assert _window_ids(wide, QUERY, 10) != _window_ids(served, QUERY, 10)


def test_search_eval_gate_and_service_rank_on_the_trained_window(narrow_model, tmp_path: Path):
    home, dataset = narrow_model["home"], narrow_model["dataset"]
    index = EmbeddedIndex.open(home, "topics")
    expected = _window_ids(registry_pipeline(index, home, "active"), QUERY, 6)
    assert len(expected) >= 3

    searched = json.loads(run_cli(home, "search", QUERY, "--name", "topics", "--pipeline", "ltr", "-k", "6",
                                  "--json").stdout)
    assert [hit["id"] for hit in searched["hits"]] == expected

    report = tmp_path / "eval.json"
    run_cli(home, "eval", "--dataset", str(dataset), "--split", "test", "--name", "topics",
            "--pipeline", "model:active", "--json", str(report), "--runs", str(tmp_path / "runs"), "--quiet")
    query_id = "volcano-q2"  # the test query of the volcano topic
    run = {}
    for line in (tmp_path / "runs" / "model:active.run").read_text().splitlines():
        qid, _, doc_id, _, score, _ = line.split()
        if qid == query_id:
            run[doc_id] = float(score)
    queries = [json.loads(line) for line in (dataset / "queries.jsonl").read_text().splitlines()]
    text = next(q["text"] for q in queries if q["_id"] == query_id)
    window = registry_pipeline(index, home, "active").search(text, 1000)
    # scores, not order: a TREC run breaks ties by document id
    assert run == pytest.approx({hit.doc_id: hit.score for hit in window}, rel=1e-5)
    evaluated = json.loads(report.read_text())["pipelines"]["model:active"]["metrics"]["nDCG@10"]

    # the gate scores the active model on the same window: the same nDCG@10 as eval model:active
    run_cli(home, "train", "--dataset", str(dataset), "--split", "train", "--config", str(narrow_model["training"]),
            "--valid-fraction", "0.25", "--quiet")
    gate = run_cli(home, "models", "promote", "m0002", "--dataset", str(dataset), "--split", "test", "--quiet", "--json")
    assert json.loads(gate.stdout)["gate"]["means"]["m0001"] == pytest.approx(evaluated, abs=1e-9)

    with running_service(home, "--name", "topics", "--config", str(narrow_model["serving"]), "--threads", "1") as (url, _):
        page = httpx.post(f"{url}/search", json={"query": QUERY, "size": 6, "pipeline": "ltr"}, timeout=30).json()
    assert [result["id"] for result in page["results"]] == expected
