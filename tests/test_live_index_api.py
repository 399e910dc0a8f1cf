"""PUT/DELETE /documents/{id} and POST /documents/_bulk on the real app (TestClient over
`create_app`, a real index and journal): admin token, strict validation, visibility, no stale serving."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from indexing.updates import pending_updates
from search.app.config import load_service_config
from search.app.service import create_app
from tests.conftest import SMALL_DOCS, lexical_home, write_jsonl

TOKEN = "live-index-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return lexical_home(tmp_path, "t")


@pytest.fixture
def client(home: Path):
    config = load_service_config(home, None, {"index": "t"})
    with TestClient(create_app(dataclasses.replace(config, admin_token=TOKEN))) as client:
        yield client


def _ids(client: TestClient, query: str) -> list[str]:
    response = client.get("/search", params={"q": query, "size": 10, "pipeline": "bm25"})
    assert response.status_code == 200, response.text
    return [hit["id"] for hit in response.json()["results"]]


def test_writes_need_the_admin_token(client):
    body = {"title": "x", "text": "y"}
    assert client.put("/documents/n1", json=body).status_code == 401
    assert client.put("/documents/n1", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.delete("/documents/d1").status_code == 401
    assert client.post("/documents/_bulk", content=b'{"op":"delete","id":"d1"}\n').status_code == 401
    assert client.get("/documents/d1").status_code == 200  # reading stays public
    assert "d1" in _ids(client, "cats")


def test_put_creates_then_updates_and_is_searchable_on_return(client, home):
    created = client.put("/documents/z1", json={"title": "Zebra", "text": "a zebra crossing", "metadata": {"a": 1}},
                         headers=AUTH)
    assert created.status_code == 200 and created.json()["result"] == "created" and created.json()["durable"]
    assert _ids(client, "zebra") == ["z1"]
    assert client.get("/documents/z1").json() == {"id": "z1", "title": "Zebra", "text": "a zebra crossing",
                                                  "metadata": {"a": 1}}
    updated = client.put("/documents/z1", json={"text": "now about giraffes"}, headers=AUTH)
    assert updated.json()["result"] == "updated"
    assert _ids(client, "zebra") == [] and _ids(client, "giraffes") == ["z1"]
    assert pending_updates(home, "t")["upserts"] == 2


@pytest.mark.parametrize("body", [{"title": "no text"}, {"text": 5}, {"text": "x", "extra": 1}, {"text": "x", "metadata": []},
                                  ["text"]])
def test_put_validates_strictly(client, body):
    response = client.put("/documents/n1", json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    assert client.get("/documents/n1").status_code == 404  # nothing was written


def test_delete_removes_and_unknown_is_404(client):
    assert client.delete("/documents/nope", headers=AUTH).status_code == 404
    deleted = client.delete("/documents/d1", headers=AUTH)
    assert deleted.status_code == 200 and deleted.json()["result"] == "deleted"
    assert "d1" not in _ids(client, "cats") and client.get("/documents/d1").status_code == 404
    assert client.delete("/documents/d1", headers=AUTH).status_code == 404  # already gone


def test_deleted_documents_are_not_served_from_any_pipeline_or_page(client):
    before = {name: _page(client, "cats garden", name) for name in ("bm25",)}
    assert all("d3" in ids for ids in before.values())
    client.delete("/documents/d3", headers=AUTH)
    for name in before:
        assert "d3" not in _page(client, "cats garden", name)  # the same query again: no cached page
    page = client.get("/", params={"q": "garden"})
    assert page.status_code == 200 and 'data-doc-id="d1"' in page.text
    assert 'data-doc-id="d3"' not in page.text  # not a bare "d3": random request ids are hex and may contain it


def _page(client: TestClient, query: str, pipeline: str) -> list[str]:
    response = client.get("/search", params={"q": query, "size": 10, "pipeline": pipeline})
    assert response.status_code == 200, response.text
    return [hit["id"] for hit in response.json()["results"]]


def test_bulk_applies_a_batch(client, home):
    lines = [{"op": "upsert", "id": "b1", "title": "Bulk", "text": "bulk loaded walrus"},
             {"op": "upsert", "id": "d2", "text": "qubits rewritten"},
             {"op": "delete", "id": "d5"}]
    body = "\n".join(json.dumps(line) for line in lines) + "\n"
    response = client.post("/documents/_bulk", content=body, headers={**AUTH, "Content-Type": "application/x-ndjson"})
    assert response.status_code == 200, response.text
    assert response.json()["upserted"] == 2 and response.json()["deleted"] == 1
    assert _ids(client, "walrus") == ["b1"] and client.get("/documents/d5").status_code == 404
    assert client.get("/documents/d2").json()["text"] == "qubits rewritten"


@pytest.mark.parametrize("body, status, where", [
    (b'{"op":"upsert","id":"a","text":"x"}\n{"op":"upsert","id":"b",\n', 400, "line 2"),
    (b'{"op":"upsert","id":"a","text":"x"}\n\n{"op":"merge","id":"b"}\n', 422, "line 3"),
    (b'{"op":"upsert","id":"a"}\n', 422, "line 1"),
    (b'{"op":"delete","id":"a","text":"x"}\n', 422, "line 1"),
    (b'{"op":"upsert","id":"a","text":"x"}\n{"op":"delete","id":"a"}\n', 422, "line 2"),
    (b'{"op":"upsert","id":"a","text":"x"}\n{"op":"delete","id":"nope"}\n', 404, "line 2"),
    (b'\xff\xfe\n', 400, "line 1"),
    (b"\n\n", 400, "no operations"),
])
def test_bulk_refuses_a_bad_line_by_number_and_writes_nothing(client, home, body, status, where):
    response = client.post("/documents/_bulk", content=body, headers=AUTH)
    assert response.status_code == status, response.text
    assert where in response.json()["error"]["message"]
    assert pending_updates(home, "t")["operations"] == 0 and client.get("/documents/a").status_code == 404


def test_a_generation_retired_under_the_service_is_reloaded_and_answered_503_not_500(client, home, tmp_path,
                                                                                     monkeypatch):
    """When the served generation can no longer follow the update journal (`JournalTruncatedError`:
    a compaction folded batches of another source it never read), the search answers 503 with a
    retry hint after reloading the active generation; the retry is served by it. The journal state
    that raises it is reached by racing processes, so the served index raises it here once."""
    from indexing.build import rebuild_index
    from indexing.delta import JournalTruncatedError
    from search.embedded import EmbeddedIndex

    other = write_jsonl(tmp_path / "other.jsonl", SMALL_DOCS[:3] + [{"_id": "b1", "title": "B", "text": "walrus colony"}])
    rebuild_index(home, "t", progress=False, log=lambda m: None, dataset=other)  # g2, not served yet
    assert _ids(client, "walrus") == []
    original, raised = EmbeddedIndex.retrieve_bm25, []

    def retrieve_once_retired(self, *args, **kwargs):
        if not raised:
            raised.append(self.generation_id)
            raise JournalTruncatedError("updates.log: the batches from offset 7 were folded into a generation")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EmbeddedIndex, "retrieve_bm25", retrieve_once_retired)
    retired = client.get("/search", params={"q": "walrus", "pipeline": "bm25"})
    assert retired.status_code == 503 and retired.json()["error"]["code"] == "generation_retired", retired.text
    assert retired.headers["Retry-After"] == "1" and "now serving g000002" in retired.json()["error"]["message"]
    assert raised == ["g000001"] and _ids(client, "walrus") == ["b1"]
