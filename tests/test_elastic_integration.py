"""The Elasticsearch backend against a real cluster: build, alias swap, search, features, filters,
rollback, a failed build, and errors. Runs when ES_URL is set, e.g.

    docker compose up -d elasticsearch
    ES_URL=http://127.0.0.1:9200 make test-es

Every test works under its own index prefix (LTR_SEARCH_ES_INDEX_PREFIX) and deletes its
indices afterwards. The down-cluster tests need no cluster and always run.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest

from indexing.elastic import ElasticsearchSettings, IncompatibleIndexError, alias_name, connect
from tests.conftest import SMALL_DOCS, run_cli, running_service, write_jsonl

ES_URL = os.environ.get("ES_URL")
needs_cluster = pytest.mark.skipif(
    not ES_URL,
    reason="ES_URL is not set: the Elasticsearch integration tests need a cluster "
           "(`docker compose up -d elasticsearch`, then `ES_URL=http://127.0.0.1:9200 make test-es`)",
)
CLOSED_PORT_URL = "http://127.0.0.1:9"  # discard port: nothing listens there


@pytest.fixture
def es(monkeypatch) -> ElasticsearchSettings:
    prefix = f"ltrtest-{uuid.uuid4().hex[:8]}-"
    monkeypatch.setenv("LTR_SEARCH_ES_INDEX_PREFIX", prefix)
    settings = ElasticsearchSettings(url=ES_URL, index_prefix=prefix)
    yield settings
    client = connect(settings)
    for index in client.indices.get(index=f"{prefix}*", expand_wildcards="all"):
        client.indices.delete(index=index)


def es_cli(home: Path, *args: str, check: bool = True):
    """`ltr-search` with the Elasticsearch backend: `--backend` goes after the subcommand."""
    return run_cli(home, *args, "--backend", "elasticsearch", "--es-url", ES_URL, check=check)


def alias_targets(settings: ElasticsearchSettings, name: str) -> list[str]:
    return sorted(connect(settings).indices.get_alias(name=alias_name(settings, name)))


def generations(settings: ElasticsearchSettings, name: str) -> list[str]:
    return sorted(connect(settings).indices.get(index=f"{alias_name(settings, name)}-g*"))


def open_es(home: Path, name: str, settings: ElasticsearchSettings):
    from search.elastic_backend import ElasticsearchBackend

    return ElasticsearchBackend.open(home, name, settings)


@needs_cluster
def test_build_search_swap_and_rollback(es, small_corpus: Path, dense_home: Path):
    es_cli(dense_home, "index", "build", "--dataset", str(small_corpus), "--name", "it", "--quiet")
    first = alias_targets(es, "it")
    assert first == [f"{alias_name(es, 'it')}-g000001"]
    assert connect(es).count(index=alias_name(es, "it"))["count"] == len(SMALL_DOCS)

    backend = open_es(dense_home, "it", es)
    assert backend.retrieve_bm25("cats chase mice", 3).doc_ids[0] == "d1"
    semantic = backend.retrieve_dense(backend.encode_query("quantum entanglement of photons"), 3)
    assert {"d2", "d4"} & set(semantic.doc_ids[:2])
    assert np.all((semantic.scores <= 1.0001) & (semantic.scores >= -1.0001))  # cosine, not (1 + cos) / 2
    assert backend.document("d6")["title"] == "Café culture"

    es_cli(dense_home, "index", "build", "--dataset", str(small_corpus), "--name", "it", "--quiet")
    assert alias_targets(es, "it") == [f"{alias_name(es, 'it')}-g000002"]  # one index behind the alias
    assert len(generations(es, "it")) == 2  # the old one kept for rollback
    still_open = backend.retrieve_bm25("cats", 1)  # an open backend keeps reading its generation
    assert still_open.doc_ids == ["d1"]

    es_cli(dense_home, "index", "rollback", "--name", "it")
    assert alias_targets(es, "it") == first
    status = json.loads(es_cli(dense_home, "index", "status", "--name", "it", "--json").stdout)
    assert status["indexes"]["it"]["active"] == "g000001"
    assert sorted(g["generation"] for g in status["indexes"]["it"]["generations"] if g["status"] == "ok") == ["g000001", "g000002"]


@needs_cluster
def test_keep_prunes_old_generations(es, small_corpus: Path, home: Path):
    for _ in range(3):
        es_cli(home, "index", "build", "--dataset", str(small_corpus), "--name", "kp", "--no-dense", "--keep", "1", "--quiet")
    names = generations(es, "kp")
    assert [n.rsplit("-", 1)[1] for n in names] == ["g000002", "g000003"]
    assert alias_targets(es, "kp") == [names[-1]]


@needs_cluster
def test_a_rejected_document_fails_the_build_and_leaves_the_alias(es, tmp_path: Path, small_corpus: Path, home: Path):
    es_cli(home, "index", "build", "--dataset", str(small_corpus), "--name", "bad", "--no-dense", "--quiet")
    before = alias_targets(es, "bad")
    broken = tmp_path / "broken"
    broken.mkdir()
    # `author` is a keyword in the first document and an object in the second: Elasticsearch rejects d2.
    write_jsonl(broken / "corpus.jsonl", [{**SMALL_DOCS[0]}, {**SMALL_DOCS[1], "author": {"name": "bob"}}])
    result = es_cli(home, "index", "build", "--dataset", str(broken), "--name", "bad", "--no-dense", "--quiet", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "d2" in result.stderr
    assert alias_targets(es, "bad") == before
    assert generations(es, "bad") == before  # the half-built index was removed


@needs_cluster
def test_features_match_the_embedded_backend(es, small_corpus: Path, dense_index):
    """Same documents, same analysis: statistics must agree exactly; BM25 to float precision
    (these fields are short, so Lucene's one-byte length encoding is exact)."""
    from ltr.features import extract_features, feature_set
    from search.hybrid import generate_candidates

    home = dense_index.home
    es_cli(home, "index", "build", "--dataset", str(small_corpus), "--name", "fd", "--quiet")
    backend = open_es(home, "fd", es)
    features = feature_set("text")
    for query in ("cats chase mice in the garden", "quantum entanglement", "dogs dogs training", "zebra"):
        window = generate_candidates(dense_index, query, 10, 10)
        embedded = extract_features(dense_index, query, window, features)
        elastic = extract_features(backend, query, window, features)
        np.testing.assert_allclose(elastic, embedded, rtol=1e-4, atol=1e-5, equal_nan=True,
                                   err_msg=f"{query!r}: {features.names}")


@needs_cluster
def test_filters_are_evaluated_by_elasticsearch(es, small_corpus: Path, home: Path):
    from search.rules import parse_filters

    es_cli(home, "index", "build", "--dataset", str(small_corpus), "--name", "fl", "--no-dense", "--quiet")
    backend = open_es(home, "fl", es)
    ids = [d["_id"] for d in SMALL_DOCS]
    cases = {
        json.dumps({"author": "ann"}): {"d1", "d3"},
        json.dumps({"author": {"in": ["bob", "cy"]}}): {"d2", "d4", "d5"},
        json.dumps({"id": {"in": ["d6", "nope"]}}): {"d6"},
        json.dumps({"title": "Dog training"}): {"d5"},
        json.dumps({"author": {"gte": 3}}): set(),  # a range never matches strings
        json.dumps({"missing_field": "x"}): set(),
    }
    for spec, expected in cases.items():
        mask = backend.filter_mask(parse_filters(json.loads(spec)), ids)
        assert {d for d, keep in zip(ids, mask) if keep} == expected, spec


@needs_cluster
def test_the_service_serves_from_elasticsearch(es, small_corpus: Path, dense_home: Path):
    import httpx

    es_cli(dense_home, "index", "build", "--dataset", str(small_corpus), "--name", "sv", "--quiet")
    with running_service(dense_home, "--name", "sv", "--backend", "elasticsearch", "--es-url", ES_URL) as (url, _):
        page = httpx.post(f"{url}/search", json={"query": "cats and dogs", "size": 3, "pipeline": "hybrid",
                                                 "filters": {"author": "ann"}}, timeout=30).json()
        assert page["results"] and {r["id"] for r in page["results"]} <= {"d1", "d3"}
        assert page["index"]["generation"] == "g000001"
        bm25 = httpx.get(f"{url}/search", params={"q": "quantum", "pipeline": "bm25"}, timeout=30).json()
        assert bm25["results"][0]["id"] in {"d2", "d4"}


@needs_cluster
def test_an_index_the_engine_did_not_create_is_refused(es, home: Path):
    client = connect(es)
    concrete = f"{es.index_prefix}foreign-g000001"
    client.indices.create(index=concrete, aliases={alias_name(es, "foreign"): {}})
    with pytest.raises(IncompatibleIndexError, match="not created by ltr-search"):
        open_es(home, "foreign", es)


def test_a_down_cluster_is_a_clear_error(home: Path, small_corpus: Path):
    """No cluster needed: a closed loopback port, through the real client."""
    result = run_cli(home, "search", "cats", "--backend", "elasticsearch", "--es-url", CLOSED_PORT_URL, check=False)
    assert result.returncode == 2
    assert "cannot reach Elasticsearch at http://127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr
    build = run_cli(home, "index", "build", "--dataset", str(small_corpus), "--no-dense", "--backend", "elasticsearch",
                    "--es-url", CLOSED_PORT_URL, check=False)
    assert build.returncode == 2 and "cannot reach Elasticsearch" in build.stderr


def test_the_service_reports_a_down_cluster_as_not_ready(home: Path):
    """No cluster needed: the service starts, says why it is not ready, and /health stays up."""
    from fastapi.testclient import TestClient

    from search.app.config import load_service_config
    from search.app.service import create_app

    config = load_service_config(home, None, {"backend": "elasticsearch", "es_url": CLOSED_PORT_URL})
    assert config.backend.is_elasticsearch and config.backend.elasticsearch.url == CLOSED_PORT_URL
    with TestClient(create_app(config)) as client:
        assert client.get("/health").status_code == 200
        ready = client.get("/ready")
        assert ready.status_code == 503
        assert "cannot reach Elasticsearch at http://127.0.0.1:9" in ready.text
        search = client.post("/search", json={"query": "cats"})
        assert search.status_code == 503
