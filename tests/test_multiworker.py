"""`ltr-search serve --workers 2` as real processes: events posted concurrently by several client
processes through both workers are all stored (none lost, none twice), a reload made by one
worker reaches the other, and /metrics on any worker sums both. Plus the SQLite write lock's
retry across processes (indexing/sqlite.py) on a real file."""
from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from indexing.home import event_store_path
from indexing.sqlite import begin_immediate
from search.event_store import EventStore
from tests.conftest import SMALL_DOCS, run_cli, running_service, write_jsonl

INDEX = "mw"
ADMIN_TOKEN = "multi-worker-admin-token-0123"
CLIENTS, ROUNDS = 4, 12


@contextmanager
def serving_two_workers(root: Path) -> Iterator[dict]:
    home = root / "home"
    corpus = write_jsonl(root / "corpus.jsonl", SMALL_DOCS)
    run_cli(home, "index", "build", "--dataset", str(corpus), "--name", INDEX, "--no-dense", "--quiet")
    config = root / "service.toml"
    config.write_text('access_log = false\n[exploration]\nepsilon = 0.0\n')
    with running_service(home, "--name", INDEX, "--config", str(config), "--workers", "2",
                         env={"LTR_SEARCH_ADMIN_TOKEN": ADMIN_TOKEN}) as (url, _):
        yield {"url": url, "home": home, "pids": worker_pids(url, 2)}


def worker_pids(url: str, count: int, timeout: float = 90) -> set[str]:
    """The pids of `count` workers answering (each fresh connection lands on whichever accepts it)."""
    pids: set[str] = set()
    deadline = time.time() + timeout
    while len(pids) < count:
        assert time.time() < deadline, f"only workers {pids} answered"
        try:
            pids.add(httpx.get(f"{url}/health", timeout=10).headers["X-Worker"])
        except httpx.TransportError:
            time.sleep(0.1)
    return pids


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    with serving_two_workers(tmp_path_factory.mktemp("multiworker")) as served:
        yield served


def from_both_workers(two_workers, request, at_least: int = 1, limit: int = 300) -> list[httpx.Response]:
    """`request()` on fresh connections until both workers have answered (which one accepts a
    connection is the kernel's choice), and at least `at_least` times."""
    answers: list[httpx.Response] = []
    while len(answers) < at_least or {a.headers["X-Worker"] for a in answers} != two_workers["pids"]:
        assert len(answers) < limit, f"only {set(a.headers['X-Worker'] for a in answers)} answered"
        answers.append(request())
    return answers


def client_process(url: str, client: int) -> tuple[int, int, list[str]]:
    """One client: search, then post that page's impressions and a click, each on a fresh
    connection (so requests spread over the workers). Returns (acknowledged, duplicates, pids)."""
    acknowledged, duplicates, pids = 0, 0, []
    for round_ in range(ROUNDS):
        page = httpx.get(f"{url}/search", params={"q": "cats mice garden", "size": 3}, timeout=60)
        page.raise_for_status()
        results = page.json()["results"]
        request_id = page.json()["request_id"]
        events = [{"request_id": request_id, "type": "impression", "doc_id": r["id"], "position": r["position"],
                   "event_id": f"c{client}-r{round_}-i{r['position']}"} for r in results]
        events.append({"request_id": request_id, "type": "click", "doc_id": results[0]["id"], "position": 1,
                       "event_id": f"c{client}-r{round_}-click"})
        posted = httpx.post(f"{url}/events", json={"events": events}, timeout=60)
        posted.raise_for_status()
        acknowledged += posted.json()["stored"]
        duplicates += posted.json()["duplicates"]
        pids += [page.headers["X-Worker"], posted.headers["X-Worker"]]
    return acknowledged, duplicates, pids


def test_clients_posting_events_through_two_workers_lose_none(two_workers):
    url = two_workers["url"]
    store_path = event_store_path(two_workers["home"], INDEX)
    with EventStore(store_path) as store:
        before = sum(store.count_events().values())
    with ProcessPoolExecutor(CLIENTS, mp_context=get_context("spawn")) as pool:
        outcomes = list(pool.map(client_process, [url] * CLIENTS, range(CLIENTS)))
    acknowledged = sum(a for a, _, _ in outcomes)
    assert sum(d for _, d, _ in outcomes) == 0
    with EventStore(store_path) as store:
        stored = sum(store.count_events().values()) - before
    assert acknowledged == stored > 0, (acknowledged, stored)
    assert set().union(*(p for _, _, p in outcomes)) == two_workers["pids"]  # both workers wrote


def metric_lines(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


def test_a_reload_in_one_worker_reaches_every_worker(two_workers):
    url, home = two_workers["url"], two_workers["home"]
    before = httpx.get(f"{url}/ready", timeout=10).json()["index"]["generation"]
    run_cli(home, "index", "rebuild", "--name", INDEX, "--quiet")  # a new active generation on disk
    served = {httpx.get(f"{url}/ready", timeout=10).json()["index"]["generation"] for _ in range(10)}
    assert served == {before}  # the workers serve what they loaded until told to reload
    reloaded = httpx.post(f"{url}/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60)
    assert reloaded.status_code == 200, reloaded.text
    after = reloaded.json()["index"]["generation"]
    assert after != before
    answers = from_both_workers(two_workers, lambda: httpx.get(f"{url}/search", params={"q": "cats", "size": 1}, timeout=60))
    assert {a.json()["index"]["generation"] for a in answers} == {after}  # each worker followed the reload
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    generations = metric_lines(metrics, "ltr_search_index_generation_info")
    for pid in two_workers["pids"]:  # one series per worker, each at the new generation
        assert f'ltr_search_index_generation_info{{generation="{after}",index="{INDEX}",pid="{pid}"}} 1.0' in generations
        assert f'ltr_search_index_generation_info{{generation="{before}",index="{INDEX}",pid="{pid}"}} 0.0' in generations


def test_a_rebuild_job_is_visible_from_every_worker_and_its_generation_served_by_all(two_workers):
    url = two_workers["url"]
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    started = httpx.post(f"{url}/admin/rebuild", headers=auth, timeout=60)
    assert started.status_code == 202, started.text
    job_id, polled_by = started.json()["job_id"], set()
    deadline = time.time() + 120
    while True:  # fresh connections: the polls land on both workers, the runner's and the other
        status = httpx.get(f"{url}/admin/jobs/{job_id}", headers=auth, timeout=10)
        assert status.status_code == 200, status.text
        polled_by.add(status.headers["X-Worker"])
        if status.json()["state"] != "running" and len(polled_by) == 2:
            break
        assert time.time() < deadline, status.json()
        time.sleep(0.1)
    assert status.json()["state"] == "succeeded", status.json()
    generation = status.json()["generation"]
    answers = from_both_workers(two_workers, lambda: httpx.get(f"{url}/ready", timeout=10), at_least=10)
    assert {a.json()["index"]["generation"] for a in answers} == {generation}


def test_metrics_sum_over_both_workers(two_workers):
    url = two_workers["url"]

    def health_count() -> float:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        line = next((x for x in metric_lines(text, "ltr_search_requests_total") if 'route="/health"' in x), None)
        return 0.0 if line is None else float(line.rsplit(" ", 1)[1])

    start = health_count()
    answers = from_both_workers(two_workers, lambda: httpx.get(f"{url}/health", timeout=10), at_least=30)
    assert health_count() == start + len(answers)  # either worker's /metrics counts both workers' requests


def test_a_busy_write_lock_held_by_another_process_is_retried(tmp_path: Path):
    """Another connection (as another process would) holds the write lock past busy_timeout:
    BEGIN IMMEDIATE retries and gets it once released; without retries it fails busy."""
    path = tmp_path / "busy.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("PRAGMA journal_mode = WAL")
    holder.execute("CREATE TABLE t (x)")
    waiter = sqlite3.connect(path, isolation_level=None, timeout=0.05)
    waiter.execute("PRAGMA busy_timeout = 50")
    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        begin_immediate(waiter, retries=0)
    release = threading.Timer(0.2, lambda: holder.execute("COMMIT"))
    release.start()
    started = time.perf_counter()
    begin_immediate(waiter, retries=20)
    waited = time.perf_counter() - started
    waiter.execute("INSERT INTO t VALUES (?)", (uuid.uuid4().hex,))
    waiter.execute("COMMIT")
    release.join()
    assert waited >= 0.15 and holder.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 1
    holder.close()
    waiter.close()


@pytest.mark.parametrize("workers", ["0", "65"])
def test_serve_refuses_a_worker_count_out_of_range(tmp_path: Path, workers: str):
    result = run_cli(tmp_path / "home", "serve", "--workers", workers, check=False)
    assert result.returncode != 0 and f"--workers must be between 1 and 64, got {workers}" in result.stderr


def posting_client(url: str, client: int, seconds: float) -> tuple[set[str], int]:
    """Search and post events for `seconds`, on fresh connections; the event ids acknowledged
    (200), and how many requests failed (a worker killed under them)."""
    acknowledged, failures, round_ = set(), 0, 0
    stop_at = time.time() + seconds
    while time.time() < stop_at:
        round_ += 1
        try:
            page = httpx.get(f"{url}/search", params={"q": "cats mice garden", "size": 2}, timeout=30).json()
            events = [{"request_id": page["request_id"], "type": "impression", "doc_id": r["id"],
                       "position": r["position"], "event_id": f"k{client}-{round_}-{r['position']}"} for r in page["results"]]
            posted = httpx.post(f"{url}/events", json={"events": events}, timeout=30)
            if posted.status_code == 200:
                acknowledged.update(e["event_id"] for e in events)
            else:
                failures += 1
        except (httpx.TransportError, KeyError, ValueError):
            failures += 1
    return acknowledged, failures


def test_a_worker_killed_mid_write_loses_no_acknowledged_event_and_is_replaced(tmp_path: Path):
    with serving_two_workers(tmp_path) as served:
        url = served["url"]
        with ProcessPoolExecutor(3, mp_context=get_context("spawn")) as pool:
            clients = [pool.submit(posting_client, url, client, 8.0) for client in range(3)]
            time.sleep(3)
            victim = int(sorted(served["pids"])[0])
            os.kill(victim, signal.SIGKILL)  # a worker of the service this test started
            outcomes = [c.result() for c in clients]
        acknowledged = set().union(*(a for a, _ in outcomes))
        replacement = worker_pids(url, 2)  # uvicorn's supervisor started a new worker
        assert str(victim) not in replacement
        with EventStore(event_store_path(served["home"], INDEX)) as store:
            stored = [e.event_id for e in store.iter_events()]
    assert len(stored) == len(set(stored))  # none twice
    assert acknowledged and acknowledged <= set(stored), len(acknowledged - set(stored))  # none lost
