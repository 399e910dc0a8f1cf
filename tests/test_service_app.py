"""The service app in process (FastAPI's TestClient over `create_app`, a real index and a real
SQLite event store): admin body validation, queries with no indexable term, offline /docs."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from indexing.build import BuildSettings, build_index
from indexing.corpus import CorpusSpec
from search.app.config import load_service_config
from search.app.service import create_app
from tests.conftest import SMALL_DOCS, home_sharing_encoder, write_jsonl

ADMIN_TOKEN = "test-admin-token-0123456789"


def _build(home: Path, corpus: Path, name: str, dense: bool) -> None:
    build_index(home, name, BuildSettings(corpus=CorpusSpec(str(corpus)), dense=dense), progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def home(tmp_path_factory, shared_encoder_home: Path) -> Path:
    root = tmp_path_factory.mktemp("service-app")
    home = home_sharing_encoder(root / "home", shared_encoder_home)
    corpus = write_jsonl(root / "corpus.jsonl", SMALL_DOCS)
    _build(home, corpus, "svc", dense=True)
    _build(home, corpus, "lexical", dense=False)
    return home


def _client(home: Path, index: str = "svc", **overrides) -> TestClient:
    config = load_service_config(home, None, {"index": index})
    return TestClient(create_app(dataclasses.replace(config, admin_token=ADMIN_TOKEN, **overrides)))


@pytest.fixture(scope="module")
def client(home: Path):
    with _client(home) as client:
        yield client


def test_admin_rebuild_refuses_unknown_body_fields(client):
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    unknown = client.post("/admin/rebuild", headers=auth, json={"force": True})
    assert unknown.status_code == 422, unknown.text
    error = unknown.json()["error"]
    assert error["code"] == "invalid_request" and error["details"][0]["field"] == "body.force"
    not_an_object = client.post("/admin/rebuild", headers=auth, json=[1])
    assert not_an_object.status_code == 422 and not_an_object.json()["error"]["details"]
    assert client.post("/admin/rebuild", json={"force": True}).status_code == 401  # the token is checked first
    assert client.get("/admin/jobs/nope", headers=auth).status_code == 404  # nothing was started


def test_routes_answer_as_before(client):
    assert client.get("/health").json() == {"status": "ok"}
    page = client.get("/search", params={"q": "cats", "size": 2}).json()
    assert page["pipeline"] == "hybrid" and len(page["results"]) == 2
    too_deep = client.get("/search", params={"q": "cats", "offset": 1000})  # past the configured window
    assert too_deep.status_code == 422 and too_deep.json()["error"]["details"][0]["field"] == "query.offset"
    assert client.get("/documents/d1").json()["title"] == "Cats and dogs"
    assert 'route="/search"' in client.get("/metrics").text


@pytest.mark.parametrize("query", ["!!!", "the of and"])
def test_a_query_with_no_indexable_term_says_so(client, home, query):
    lexical = client.post("/search", json={"query": query, "pipeline": "bm25"})
    assert lexical.status_code == 200, lexical.text
    payload = lexical.json()
    assert payload["results"] == [] and payload["retrievers"] == {"bm25": {"answered": False, "terms": 0}}
    assert any("no indexable term" in note for note in payload["notes"])
    assert any("no retriever can answer" in note for note in payload["notes"])
    hybrid = client.post("/search", json={"query": query, "pipeline": "hybrid", "size": 3}).json()
    assert len(hybrid["results"]) == 3  # dense still answers
    assert hybrid["retrievers"] == {"bm25": {"answered": False, "terms": 0}, "dense": {"answered": True}}
    assert "answered by dense" in hybrid["notes"]
    normal = client.post("/search", json={"query": "cats and mice", "pipeline": "hybrid"}).json()
    assert "notes" not in normal and normal["retrievers"]["bm25"] == {"answered": True, "terms": 2}
    with _client(home, "lexical") as no_vectors:  # hybrid falls back to bm25 alone: nothing can answer
        fallback = no_vectors.get("/search", params={"q": query}).json()
    assert fallback["pipeline"] == "bm25" and fallback["results"] == [] and fallback["retrievers"]["bm25"]["terms"] == 0


def test_retriever_statuses_are_pure():
    from search.ranking import pipeline_retrievers, retriever_notes, retriever_statuses

    assert pipeline_retrievers("bm25", True) == ("bm25",) and pipeline_retrievers("ltr", False) == ("bm25",)
    statuses = retriever_statuses(pipeline_retrievers("hybrid", True), 0)
    assert [(s.name, s.answers) for s in statuses] == [("bm25", False), ("dense", True)]
    assert all(s.answers for s in retriever_statuses(("bm25",), None))  # unknown (Elasticsearch): assumed to answer
    assert retriever_notes(retriever_statuses(("bm25",), 3)) == []


def test_docs_work_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert {url.rsplit("/", 1)[-1] for url in assets} >= {"swagger-ui-bundle.js", "swagger-ui.css"}
    assert "cdn" not in page.text.lower()
    for url in assets:
        assert url.startswith("/"), url  # no other host: nothing to fetch from the internet
        assert client.get(url).status_code == 200, url
    assert client.get("/openapi.json").status_code == 200
