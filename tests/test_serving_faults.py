"""The service under faults, as real processes: `ltr-search serve` (uvicorn on 127.0.0.1) over a
small BM25 index, with real faults injected: deeply nested JSON, a corrupted stored-fields file
(a genuine unhandled error), an oversized chunked body, and an immutable event store (`chattr +i`:
the tests run as root)."""
from __future__ import annotations

import http.client
import json
import resource
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.conftest import SMALL_DOCS, run_cli, running_service, write_jsonl

INDEX = "faults"
CONFIG = 'max_body_bytes = 65536\naccess_log = false\n[exploration]\nepsilon = 0.0\n'


@pytest.fixture
def served_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    corpus = write_jsonl(tmp_path / "corpus.jsonl", SMALL_DOCS)
    run_cli(home, "index", "build", "--dataset", str(corpus), "--name", INDEX, "--no-dense", "--quiet")
    (tmp_path / "service.toml").write_text(CONFIG)
    return home


@contextmanager
def serving(home: Path, *args: str) -> Iterator[str]:
    with serving_process(home, *args) as (url, _):
        yield url


@contextmanager
def serving_process(home: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    with running_service(home, "--name", INDEX, "--config", str(home.parent / "service.toml"), "--threads", "1",
                         *args) as (url, process):
        yield url, process


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def nested(depth: int) -> str:
    return '{"author": ' + "[" * depth + "]" * depth + "}"


def test_deep_nesting_is_a_400_in_get_and_post(served_home: Path):
    with serving(served_home) as url, httpx.Client(base_url=url, timeout=30) as client:
        for depth in (1500, 3000):  # past the JSON decoder's recursion guard
            got = client.get("/search", params={"q": "cats", "filters": nested(depth)})
            assert got.status_code == 400, got.text
            assert got.json()["error"]["details"] == [{"field": "query.filters", "reason": "nested too deeply"}]
            posted = client.post("/search", content='{"query": "cats", "filters": ' + nested(depth) + "}",
                                 headers={"Content-Type": "application/json"})
            assert posted.status_code == 400, posted.text
        for depth in (2, 50, 900):  # parses, then refused as a filter value
            got = client.get("/search", params={"q": "cats", "filters": nested(depth)})
            assert 400 <= got.status_code < 500, (depth, got.status_code, got.text)
        assert metric(client.get("/metrics").text, "ltr_search_requests_total",
                      method="GET", route="/search", status="500") == 0


def corrupt_stored_document(home: Path, doc_id: str) -> None:
    """Overwrite one stored document's JSON line in place (same size, same inode): reading it fails."""
    (docs,) = (home / "indexes" / INDEX).rglob("docs.jsonl")
    data = docs.read_bytes()
    start = data.index(json.dumps({"id": doc_id})[:-1].encode())
    end = data.index(b"\n", start)
    with open(docs, "r+b") as handle:
        handle.seek(start)
        handle.write(b"#" * (end - start))


def test_an_unhandled_error_is_json_counted_and_keeps_the_connection(served_home: Path):
    with serving(served_home) as url:
        corrupt_stored_document(served_home, "d1")  # the service read the offsets at start; the line is now garbage
        connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
        try:
            connection.request("GET", "/documents/d1")
            failed = connection.getresponse()
            body = json.loads(failed.read())
            assert failed.status == 500 and failed.getheader("Content-Type") == "application/json"
            assert body["error"]["code"] == "internal_error" and "JSONDecodeError" in body["error"]["message"]
            connection.request("GET", "/documents/d2")  # the same keep-alive connection
            after = connection.getresponse()
            assert after.status == 200 and json.loads(after.read())["title"] == "Quantum computing"
            connection.request("GET", "/metrics")
            metrics = connection.getresponse().read().decode()
        finally:
            connection.close()
        assert metric(metrics, "ltr_search_requests_total", method="GET", route="/documents/{doc_id}", status="500") == 1


def post_chunked(url: str, path: str, body: bytes, chunk: int = 4096) -> tuple[int, dict]:
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    try:
        connection.request("POST", path, body=(body[i:i + chunk] for i in range(0, len(body), chunk)),
                           headers={"Content-Type": "application/json"}, encode_chunked=True)
        response = connection.getresponse()
        assert response.getheader("Content-Length") is not None or response.status == 413
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_chunked_body_over_the_limit_is_a_413(served_home: Path):
    with serving(served_home) as url:
        small = json.dumps({"query": "cats", "size": 2, "exclude": ["x" * 10] * 100}).encode()
        status, payload = post_chunked(url, "/search", small)
        assert status == 200 and payload["results"], payload
        big = json.dumps({"query": "cats", "exclude": ["x" * 60] * 2000}).encode()
        assert len(big) > 65536
        status, payload = post_chunked(url, "/search", big)
        assert status == 413 and payload["error"]["code"] == "body_too_large", payload
        status, payload = post_chunked(url, "/events", b'{"events": [' + b" " * 70000 + b"]}")
        assert status == 413, payload


def chattr_works(probe: Path) -> bool:
    probe.write_text("x")
    try:
        ok = subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False
    if ok:
        subprocess.run(["chattr", "-i", str(probe)], check=True)
    return ok


@contextmanager
def read_only_store(store_dir: Path, server: subprocess.Popen) -> Iterator[None]:
    """`chattr +i` on the store's folder, database and WAL: not even root can write them. Not the
    -shm index, which SQLite has memory-mapped: a page fault on an immutable mapping is a SIGBUS,
    a different fault from a read-only store."""
    paths = [store_dir, *sorted(p for p in store_dir.iterdir() if not p.name.endswith("-shm"))]
    assert [p.name for p in paths[1:]] == [f"{INDEX}.sqlite3", f"{INDEX}.sqlite3-wal"]
    names = [str(p) for p in paths]
    subprocess.run(["chattr", "+i", *names], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *names], check=True)


@contextmanager
def full_disk(store_dir: Path, server: subprocess.Popen) -> Iterator[None]:
    """RLIMIT_FSIZE 0 on the server process (`prlimit`): every file write fails with EFBIG, as on a
    full disk (Python ignores SIGXFSZ). Its output file cannot be written either meanwhile."""
    before = resource.prlimit(server.pid, resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
    try:
        yield
    finally:
        resource.prlimit(server.pid, resource.RLIMIT_FSIZE, before)


@pytest.mark.parametrize("fault", [read_only_store, full_disk], ids=["read-only", "disk-full"])
def test_an_unwritable_event_store_degrades_logging_but_searches_go_on(served_home: Path, tmp_path: Path, fault):
    if fault is read_only_store and not chattr_works(tmp_path / "probe"):
        pytest.skip("chattr +i is not available here (needs root and a filesystem with the immutable flag)")
    store_dir = served_home / "events"
    with serving_process(served_home) as (url, server), httpx.Client(base_url=url, timeout=30) as client:
        first = client.get("/search", params={"q": "cats", "size": 2}).json()
        with fault(store_dir, server):
            for _ in range(3):
                searched = client.get("/search", params={"q": "cats garden", "size": 2})
                assert searched.status_code == 200 and searched.json()["results"], searched.text
            posted = client.post("/events", json={"events": [
                {"request_id": first["request_id"], "type": "click", "doc_id": first["results"][0]["id"], "position": 1}]})
            assert posted.status_code == 503, posted.text
            assert posted.json()["error"]["code"] == "store_unavailable" and posted.headers["Retry-After"]
            assert "nothing was stored" in posted.json()["error"]["message"]
            ready = client.get("/ready")
            assert ready.status_code == 200 and set(ready.json()["degraded"]) == {"request_log", "events"}, ready.text
            metrics = client.get("/metrics").text
            assert metric(metrics, "ltr_search_store_write_failures_total", store="request_log") == 3
            assert metric(metrics, "ltr_search_store_write_failures_total", store="events") == 1
            assert metric(metrics, "ltr_search_requests_total", method="GET", route="/search", status="200") == 4
        # writable again: the next writes succeed and the degraded state clears
        again = client.get("/search", params={"q": "cats", "size": 2}).json()
        posted = client.post("/events", json={"events": [
            {"request_id": again["request_id"], "type": "click", "doc_id": again["results"][0]["id"], "position": 1}]})
        assert posted.status_code == 200 and posted.json()["stored"] == 1, posted.text
        assert client.get("/ready").json().get("degraded") is None


def test_an_oversized_url_gets_a_json_4xx_not_a_reset(served_home: Path):
    """A 240 KB query string (past uvicorn's default 16 KiB request-head buffer, where the server
    answered a bare 400 and closed mid-request: a connection reset, found by schema fuzzing) reaches
    the app and gets its JSON answer; the connection stays usable."""
    with serving(served_home) as url:
        connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
        try:
            connection.request("GET", "/search?q=" + "%A2%A1%F2%BB" * 20000)
            response = connection.getresponse()
            payload = json.loads(response.read())
            assert response.status == 422 and payload["error"]["details"][0]["field"] == "query.q", payload
            connection.request("GET", "/search?q=cats")
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read())["results"]
        finally:
            connection.close()
