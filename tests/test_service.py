"""The query service end to end: a real `ltr-search serve` (uvicorn on 127.0.0.1) over a small
index with vectors, a real SQLite event store, and a schema-driven fuzz run (schemathesis)."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from search.event_store import EventStore
from search.limits import MAX_QUERY_CHARS
from tests.conftest import home_sharing_encoder, ROOT, SMALL_DOCS, run_cli, running_service, write_jsonl

ADMIN_TOKEN = "test-admin-token-0123456789"
DOCS = SMALL_DOCS + [
    {"_id": "d7", "title": "Cat behaviour", "text": "Cats sleep most of the day and hunt mice at night.", "author": "ann", "year": 2019},
    {"_id": "d8", "title": "Feline health", "text": "Vets recommend vaccines for cats and kittens.", "author": "eve", "year": 2021},
    {"_id": "d9", "title": "Mice as pets", "text": "Pet mice are social animals and need company.", "author": "bob", "year": 2015},
]


@pytest.fixture(scope="module")
def service(tmp_path_factory, shared_encoder_home: Path):
    root = tmp_path_factory.mktemp("service")
    home = home_sharing_encoder(root / "home", shared_encoder_home)
    corpus = write_jsonl(root / "corpus.jsonl", DOCS)
    run_cli(home, "index", "build", "--dataset", str(corpus), "--name", "svc", "--quiet")
    config = root / "service.toml"
    # no access log: running_service pipes stdout without reading it, and the rebuild test sends many requests
    config.write_text('rerank_window = 20\nmax_body_bytes = 20000\naccess_log = false\n[exploration]\nepsilon = 0.0\n')
    env = {"LTR_SEARCH_ADMIN_TOKEN": ADMIN_TOKEN}
    with running_service(home, "--name", "svc", "--config", str(config), "--threads", "1", env=env) as (url, process):
        client = httpx.Client(base_url=url, timeout=30)
        yield {"url": url, "client": client, "home": home, "process": process}
        client.close()


def _search(client: httpx.Client, **body):
    return client.post("/search", json=body)


def test_health_ready_and_documents(service):
    client = service["client"]
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["ready"] and ready["index"]["name"] == "svc"
    assert client.get("/documents/d2").json()["title"] == "Quantum computing"
    missing = client.get("/documents/nope")
    assert missing.status_code == 404 and "no document 'nope'" in missing.json()["error"]["message"]


def test_get_and_post_search(service):
    client = service["client"]
    got = client.get("/search", params={"q": "cats and mice", "size": 3})
    assert got.status_code == 200, got.text
    payload = got.json()
    assert payload["pipeline"] == "hybrid" and len(payload["results"]) == 3 and payload["request_id"]
    assert [r["position"] for r in payload["results"]] == [1, 2, 3]
    assert all(r["propensity"] == 1.0 and "title" in r["fields"] for r in payload["results"])
    assert "timings_ms" not in payload
    posted = _search(client, query="cats and mice", size=3, pipeline="bm25", explain=True).json()
    assert posted["pipeline"] == "bm25" and {"retrieve", "rules", "log"} <= set(posted["timings_ms"])
    assert posted["results"][0]["explain"]["first_stage_rank"] >= 1
    first_page = _search(client, query="cats and mice", size=3).json()
    second_page = _search(client, query="cats and mice", size=3, offset=3).json()
    assert [r["position"] for r in second_page["results"]] == [4, 5, 6]
    assert not {r["id"] for r in second_page["results"]} & {r["id"] for r in first_page["results"]}
    only_matching = _search(client, query="cats and mice", size=3, offset=3, pipeline="bm25").json()
    assert len(only_matching["results"]) < 3  # BM25 returns matching documents only


def test_filters_exclusion_and_diversity(service):
    client = service["client"]
    ann = _search(client, query="cats mice garden", size=10, filters={"author": "ann"}).json()
    assert ann["results"] and all(r["fields"]["metadata"]["author"] == "ann" for r in ann["results"])
    recent = _search(client, query="cats", size=10, filters={"year": {"gte": 2016}}).json()
    assert {r["id"] for r in recent["results"]} <= {"d7", "d8"}
    excluded = _search(client, query="cats mice", size=10, exclude=["d1", "d7"]).json()
    assert not {"d1", "d7"} & {r["id"] for r in excluded["results"]}
    diverse = _search(client, query="cats mice dogs", size=10, diversity={"field": "author", "max_per_value": 1}).json()
    authors = [r["fields"]["metadata"]["author"] for r in diverse["results"]]
    assert len(authors) == len(set(authors)) >= 3


@pytest.mark.parametrize(
    "body, status, field",
    [
        ({"query": "x", "size": 0}, 422, "body.size"),
        ({"query": "x", "sizee": 3}, 422, "body.sizee"),
        ({"query": "x" * (MAX_QUERY_CHARS + 1)}, 422, "body.query"),
        ({"query": "   "}, 400, "query"),
        ({"query": "x", "pipeline": "nope"}, 400, "pipeline"),
        ({"query": "x", "filters": {"year": {"gtee": 1}}}, 400, "filters.year"),
        ({"query": "x", "offset": 15, "size": 10}, 400, "offset"),
        ({"query": "x", "diversity": {"field": "author"}}, 422, "body.diversity.max_per_value"),
        ({"query": "x", "diversity": {"field": "a b", "max_per_value": 1}}, 400, "diversity.field"),
        ({"query": "x", "filters": {"id": {"in": []}}}, 400, "filters.id"),
        ({"query": 12}, 422, "body.query"),
    ],
)
def test_search_input_errors_are_4xx_with_the_field(service, body, status, field):
    response = _search(service["client"], **body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert any(d["field"].startswith(field) for d in error["details"]), error


def test_get_search_and_body_errors(service):
    client = service["client"]
    unknown = client.get("/search", params={"q": "x", "color": "red"})
    assert unknown.status_code == 400 and unknown.json()["error"]["details"][0]["field"] == "query.color"
    bad_json = client.get("/search", params={"q": "x", "filters": "{oops"})
    assert bad_json.status_code == 400 and "invalid JSON" in bad_json.json()["error"]["message"]
    assert client.get("/search").status_code == 422
    broken = client.post("/search", content=b'{"query": ', headers={"content-type": "application/json"})
    assert broken.status_code == 422
    huge = client.post("/search", content=b'{"query": "' + b"a" * 30000 + b'"}', headers={"content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"


def test_events_are_validated_stored_and_idempotent(service):
    client = service["client"]
    served = _search(client, query="quantum entanglement", size=3, pipeline="hybrid").json()
    assert len(served["results"]) == 3
    request_id, first = served["request_id"], served["results"][0]
    events = [
        {"request_id": request_id, "type": "impression", "doc_id": r["id"], "position": r["position"], "event_id": f"i{r['position']}"}
        for r in served["results"]
    ] + [{"request_id": request_id, "type": "click", "doc_id": first["id"], "position": 1, "event_id": "c1"}]
    stored = client.post("/events", json={"events": events})
    assert stored.status_code == 200 and stored.json() == {"stored": 4, "duplicates": 0}
    assert client.post("/events", json={"events": events}).json() == {"stored": 0, "duplicates": 4}
    bad = client.post("/events", json={"events": [
        {"request_id": request_id, "type": "click", "doc_id": first["id"], "position": 1},
        {"request_id": request_id, "type": "click", "doc_id": first["id"], "position": 9},
    ]})
    assert bad.status_code == 422 and bad.json()["error"]["details"][0]["field"] == "events[1].position"
    unknown_request = client.post("/events", json={"events": [{"request_id": "nope", "type": "click", "doc_id": "d1", "position": 1}]})
    assert unknown_request.status_code == 422
    assert client.post("/events", json={"events": []}).status_code == 422
    # the request log and the events are in the SQLite file, readable by another process
    with EventStore(service["home"] / "events" / "svc.sqlite3") as store:
        logged = store.get_request(request_id)
        assert [r.doc_id for r in logged.results] == [r["id"] for r in served["results"]]
        assert logged.pipeline == "hybrid" and logged.index_name == "svc"
        assert store.count_events()["click"] == 1  # the refused batch stored nothing


def test_metrics_expose_requests_stages_and_generation(service):
    client = service["client"]
    _search(client, query="dogs", size=2)
    generation = client.get("/ready").json()["index"]["generation"]
    text = client.get("/metrics").text
    assert 'ltr_search_requests_total{method="POST",route="/search",status="200"}' in text
    assert 'ltr_search_stage_seconds_bucket{le="0.001",stage="retrieve"}' in text
    assert f'ltr_search_index_generation_info{{generation="{generation}",index="svc"}} 1.0' in text
    assert 'ltr_search_model_info{version="none"} 1.0' in text


def test_admin_needs_the_token_and_rebuild_never_interrupts_search(service):
    client = service["client"]
    assert client.post("/admin/reload").status_code == 401
    assert client.post("/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 403
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    before = client.get("/ready").json()["index"]["generation"]
    failures: list[str] = []
    stop = threading.Event()

    def keep_searching() -> None:
        with httpx.Client(base_url=service["url"], timeout=30) as own:
            while not stop.is_set():
                response = own.post("/search", json={"query": "cats", "size": 3})
                if response.status_code != 200:
                    failures.append(response.text)

    searcher = threading.Thread(target=keep_searching)
    searcher.start()
    try:
        job = client.post("/admin/rebuild", headers=auth)
        assert job.status_code == 202, job.text
        job_id = job.json()["job_id"]
        deadline = time.time() + 300
        while (status := client.get(f"/admin/jobs/{job_id}", headers=auth).json())["state"] == "running":
            assert time.time() < deadline
            time.sleep(0.3)
    finally:
        stop.set()
        searcher.join()
    assert status["state"] == "succeeded", status
    assert not failures
    after = client.get("/ready").json()["index"]["generation"]
    assert after == status["generation"] != before
    reloaded = client.post("/admin/reload", headers=auth).json()
    assert reloaded["previous_generation"] == after == reloaded["index"]["generation"]


@pytest.mark.slow
def test_schema_fuzzing_finds_no_server_error(service):
    """schemathesis generates requests from the OpenAPI schema (valid and invalid) against the
    live server; any 5xx fails."""
    result = subprocess.run(
        [str(Path(sys.executable).with_name("schemathesis")), "run", f"{service['url']}/openapi.json",
         "--checks", "not_a_server_error", "--max-examples", "40", "--seed", "1",
         "--exclude-path", "/admin/rebuild", "-H", f"Authorization: Bearer {ADMIN_TOKEN}"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
