"""Event store: round trips, every validation rule with its message, atomic batches, idempotency,
thread safety, the SQLite settings that make writes durable, and a real SIGKILL mid-run."""
from __future__ import annotations

import math
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import indexing.sqlite as sqlite_helper
import search.event_store as event_store
from search.event_store import (
    CLOCK_SKEW_ALLOWANCE_S,
    MAX_BATCH_EVENTS,
    MAX_ID_LENGTH,
    SCHEMA_VERSION,
    AppendResult,
    Event,
    EventStore,
    EventStoreError,
    EventValidationError,
    ServedRequestError,
    ServedRequest,
    ServedResult,
)

ROOT = Path(__file__).resolve().parents[1]
T0 = time.time() - 3600.0  # requests an hour ago: event timestamps after them are never "in the future"


def served(request_id: str = "r1", n: int = 10, offset: int = 0, at: float = T0, **overrides) -> ServedRequest:
    results = [
        ServedResult(f"d{offset + i + 1}", offset + i + 1, 10.0 - i, 1.0, {"bm25_all": 3.5 - i, "dense": 0.25})
        for i in range(n)
    ]
    fields = dict(
        request_id=request_id, timestamp=at, query="vitamin d", pipeline="bm25", index_name="scifact",
        index_generation="g000001", model_version="m1", user_id="u1", session_id="s1", page_offset=offset,
        results=results,
    )
    fields.update(overrides)
    return ServedRequest(**fields)


def click(position: int = 1, request_id: str = "r1", at: float = T0 + 1.0, **overrides) -> Event:
    fields = dict(request_id=request_id, type="click", doc_id=f"d{position}", position=position, timestamp=at)
    fields.update(overrides)
    return Event(**fields)


@pytest.fixture
def store(tmp_path: Path):
    with EventStore(tmp_path / "events.db") as opened:
        opened.log_request(served())
        yield opened


# ---- request log ---------------------------------------------------------------------------------


def test_request_round_trip_keeps_every_field(tmp_path):
    path = tmp_path / "events.db"
    record = served("r2", n=3, offset=10, model_version=None, user_id=None, session_id=None)
    record.results[1] = ServedResult("d12", 12, -1.5, 0.125, None)
    with EventStore(path) as store:
        store.log_request(record)
        assert store.get_request("r2") == record
        assert store.get_request("missing") is None
    with EventStore(path) as reopened:  # and it is on disk, not only in the connection
        assert reopened.get_request("r2") == record


def test_nan_feature_means_missing_and_round_trips_as_nan(tmp_path):
    record = served(n=1)
    record.results[0] = ServedResult("d1", 1, 1.0, 1.0, {"dense": math.nan, "bm25_all": 2.0})
    with EventStore(tmp_path / "e.db") as store:
        store.log_request(record)
        features = store.get_request("r1").results[0].features
    assert math.isnan(features["dense"]) and features["bm25_all"] == 2.0


def test_iter_requests_in_timestamp_order_with_half_open_range_across_pages(tmp_path, monkeypatch):
    monkeypatch.setattr(event_store, "_PAGE_ROWS", 3)  # force several pages
    times = [T0 + 5, T0 + 1, T0 + 3, T0 + 3, T0 + 2, T0 + 4, T0 + 0, T0 + 6]
    with EventStore(tmp_path / "e.db") as store:
        for i, at in enumerate(times):
            store.log_request(served(f"q{i}", n=2, at=at))
        everything = list(store.iter_requests())
        assert [r.timestamp for r in everything] == sorted(times)
        assert [r.request_id for r in everything if r.timestamp == T0 + 3] == ["q2", "q3"]  # ties: logging order
        assert all(len(r.results) == 2 for r in everything)
        window = [r.request_id for r in store.iter_requests(since=T0 + 2, until=T0 + 4)]
        assert window == ["q4", "q2", "q3"]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(request_id=""), "request_id: must not be empty"),
        (dict(request_id="x" * (MAX_ID_LENGTH + 1)), f"request_id: {MAX_ID_LENGTH + 1} characters, the limit is {MAX_ID_LENGTH}"),
        (dict(timestamp=math.inf), "timestamp: must be a finite number of seconds since the epoch, got inf"),
        (dict(query=None), "query: must be a string, got NoneType"),
        (dict(query="q" * 16_385), "query: 16385 characters, the limit is 16384 (MAX_QUERY_CHARS)"),
        (dict(pipeline=""), "pipeline: must not be empty"),
        (dict(page_offset=-1), "page_offset: must be an integer >= 0, got -1"),
        (dict(results=[ServedResult("d1", 1, 1.0)] * 1001), "results: 1001 results, the limit is 1000 (MAX_RESULTS_PER_REQUEST)"),
        (dict(results=[ServedResult("d1", 1, 1.0), ServedResult("d2", 3, 1.0)]), "results[1].position: expected 2 (page_offset 0 + index 1 + 1), got 3"),
        (dict(results=[ServedResult("d1", 1, 1.0), ServedResult("d1", 2, 1.0)]), "results[1].doc_id: 'd1' is also at position 1"),
        (dict(results=[ServedResult("d1", 1, math.nan)]), "results[0].score: must be a finite number, got nan"),
        (dict(results=[ServedResult("d1", 1, 1.0, 0.0)]), "results[0].propensity: must be in (0, 1], got 0.0"),
        (dict(results=[ServedResult("d1", 1, 1.0, 1.0, {"f": math.inf})]), "results[0].features['f']: must be a finite number or NaN (missing), got inf"),
        (dict(results=[ServedResult("d1", 1, 1.0, 1.0, {f"f{i}": 0.0 for i in range(513)})]), "results[0].features: 513 features, the limit is 512 (MAX_FEATURES_PER_RESULT)"),
    ],
)
def test_request_validation_names_field_and_reason(tmp_path, change, message):
    with EventStore(tmp_path / "e.db") as store:
        with pytest.raises(ServedRequestError) as info:
            store.log_request(served(**{"request_id": "bad", **change}))
        assert info.value.problems == [message]
        assert list(store.iter_requests()) == []


def test_request_id_is_logged_once(store):
    with pytest.raises(ServedRequestError) as info:
        store.log_request(served("r1", n=2))
    assert info.value.problems == ["request_id: request 'r1' is already logged (request ids must be unique)"]
    assert len(store.get_request("r1").results) == 10  # the first one is untouched


# ---- events --------------------------------------------------------------------------------------


def test_events_round_trip_filter_and_count(store):
    store.log_request(served("r2", n=5, offset=5, at=T0 + 10))
    batch = [
        Event("r1", "impression", "d1", 1, T0 + 0.5),
        Event("r1", "click", "d3", 3, T0 + 2.0, event_id="c1"),
        Event("r1", "dwell", "d3", 3, T0 + 30.0, dwell_ms=28_000.0),
        Event("r2", "impression", "d7", 7, T0 + 10.5),
        Event("r2", "click", "d7", 7, T0 + 11),  # an int timestamp reads back as a float
    ]
    assert store.append_events(batch) == AppendResult(stored=5, duplicates=0)
    events = list(store.iter_events())
    assert [e.timestamp for e in events] == sorted(e.timestamp for e in batch)
    assert events == [batch[0], batch[1], batch[3], Event("r2", "click", "d7", 7, float(T0 + 11)), batch[2]]
    assert [e.type for e in store.iter_events(types=["click"])] == ["click", "click"]
    assert [e.doc_id for e in store.iter_events(since=T0 + 2.0, until=T0 + 30.0)] == ["d3", "d7", "d7"]
    assert list(store.iter_events(types=[])) == []
    assert store.count_events() == {"impression": 2, "click": 2, "dwell": 1}
    with pytest.raises(ValueError, match=r"unknown event type\(s\) \['hover'\]"):
        list(store.iter_events(types=["hover"]))


def test_iter_events_pages_through_ties(store, monkeypatch):
    monkeypatch.setattr(event_store, "_PAGE_ROWS", 4)
    store.append_events([Event("r1", "impression", f"d{p}", p, T0 + (p // 3)) for p in range(1, 11)])
    assert [e.position for e in store.iter_events()] == list(range(1, 11))


def test_empty_batch_is_a_no_op(store):
    assert store.append_events([]) == AppendResult(0, 0)


@pytest.mark.parametrize(
    "event, message",
    [
        (click(request_id="nope"), "events[1].request_id: request 'nope' is not in the request log"),
        (click(request_id=""), "events[1].request_id: must not be empty"),
        (click(request_id="r" * 129), f"events[1].request_id: 129 characters, the limit is {MAX_ID_LENGTH}"),
        (click(position=12, doc_id="d12"), "events[1].position: request 'r1' showed 10 results at positions 1-10, position 12 is out of range"),
        (click(position=0), "events[1].position: must be an integer >= 1, got 0"),
        (click(position=True), "events[1].position: must be an integer >= 1, got True"),
        (click(position=2, doc_id="d9"), "events[1].doc_id: request 'r1' showed 'd2' at position 2, not 'd9'"),
        (click(type="hover"), "events[1].type: unknown event type 'hover'; known: impression, click, dwell"),
        (click(at=math.nan), "events[1].timestamp: must be a finite number of seconds since the epoch, got nan"),
        (click(at="yesterday"), "events[1].timestamp: must be a finite number of seconds since the epoch, got 'yesterday'"),
        (click(at=T0 - 6.0), f"events[1].timestamp: {T0 - 6.0!r} is 6.000 s before request 'r1' was served at {T0!r} (allowance 5 s)"),
        (click(type="dwell"), "events[1].dwell_ms: required for dwell events"),
        (click(type="dwell", dwell_ms=-1.0), "events[1].dwell_ms: must be a number in [0, 8.64e+07] (MAX_DWELL_MS), got -1.0"),
        (click(dwell_ms=1200.0), "events[1].dwell_ms: only dwell events carry dwell_ms, got 1200.0 on a click"),
        (click(event_id=""), "events[1].event_id: must not be empty"),
        ("click", "events[1]: must be an Event, got str"),
    ],
)
def test_event_validation_names_batch_index_field_and_reason(store, event, message):
    with pytest.raises(EventValidationError) as info:
        store.append_events([click(position=1), event, click(position=2)])
    assert info.value.problems == [message]
    assert str(info.value) == f"event batch: 1 problem\n  {message}"
    assert store.count_events() == {"impression": 0, "click": 0, "dwell": 0}  # nothing of the batch


def test_clock_skew_allowance_and_future_bound(store):
    assert store.append_events([click(at=T0 - CLOCK_SKEW_ALLOWANCE_S + 0.01)]).stored == 1
    future = time.time() + 60.0
    with pytest.raises(EventValidationError, match=r"events\[0\]\.timestamp: .* s in the future \(allowance 5 s\)"):
        store.append_events([click(at=future)])


def test_page_offset_positions_are_absolute(store):
    store.log_request(served("p2", n=10, offset=10))
    assert store.append_events([click(position=11, request_id="p2")]).stored == 1
    with pytest.raises(EventValidationError) as info:
        store.append_events([click(position=3, request_id="p2")])
    assert info.value.problems == [
        "events[0].position: request 'p2' showed 10 results at positions 11-20, position 3 is out of range"
    ]


def test_every_problem_of_a_batch_is_reported_and_nothing_is_stored(store):
    batch = [click(position=p) for p in range(1, 8)]
    batch[3] = click(position=4, doc_id="d5")
    batch[5] = click(type="impression", dwell_ms=5.0)
    with pytest.raises(EventValidationError) as info:
        store.append_events(batch)
    assert [p.split(":")[0] for p in info.value.problems] == ["events[3].doc_id", "events[5].dwell_ms"]
    assert str(info.value).startswith("event batch: 2 problems\n")
    assert list(store.iter_events()) == []
    assert store.append_events([e for i, e in enumerate(batch) if i not in (3, 5)]).stored == 5


def test_message_is_capped_but_problems_are_all_kept(store):
    with pytest.raises(EventValidationError) as info:
        store.append_events([click(request_id="ghost")] * 30)
    assert len(info.value.problems) == 30
    assert str(info.value).endswith("  ... and 10 more")


def test_batch_limit_names_the_limit(store):
    with pytest.raises(EventValidationError) as info:
        store.append_events([click()] * (MAX_BATCH_EVENTS + 1))
    assert info.value.problems == [
        f"events: batch has {MAX_BATCH_EVENTS + 1} events, the limit is {MAX_BATCH_EVENTS} (MAX_BATCH_EVENTS)"
    ]
    assert store.append_events([click()] * MAX_BATCH_EVENTS).stored == MAX_BATCH_EVENTS


def test_a_failure_inside_the_write_rolls_back_the_whole_batch(store, monkeypatch):
    real = event_store._new_event_rows

    def one_bad_row(*args):
        rows, duplicates = real(*args)
        return rows + [(None, 999_999, 1, "click", "d1", T0, None, T0)], duplicates  # breaks the foreign key

    monkeypatch.setattr(event_store, "_new_event_rows", one_bad_row)
    with pytest.raises(sqlite3.IntegrityError):
        store.append_events([click(position=p) for p in range(1, 6)])
    monkeypatch.undo()
    assert list(store.iter_events()) == []
    assert store.append_events([click()]).stored == 1  # the writer is usable afterwards


# ---- idempotency ---------------------------------------------------------------------------------


def test_resending_event_ids_stores_them_once(store):
    batch = [click(position=p, event_id=f"e{p}") for p in range(1, 6)] + [click(position=6)]
    assert store.append_events(batch) == AppendResult(stored=6, duplicates=0)
    assert store.append_events(batch) == AppendResult(stored=1, duplicates=5)  # no id: stored again
    assert store.append_events([click(position=7, event_id="e7")] * 3) == AppendResult(stored=1, duplicates=2)
    assert sum(1 for e in store.iter_events() if e.event_id is not None) == 6


def test_reusing_an_event_id_for_another_event_refuses_the_batch(store):
    store.append_events([click(position=1, event_id="e1")])
    with pytest.raises(EventValidationError) as info:
        store.append_events([click(position=2, event_id="e2"), click(position=3, event_id="e1")])
    assert info.value.problems == [
        f"events[1].event_id: 'e1' was already stored for a different event "
        f"(click of 'd1' at position 1 of request 'r1' at {T0 + 1.0!r})"
    ]
    assert store.count_events()["click"] == 1


# ---- threads -------------------------------------------------------------------------------------


def test_eight_threads_write_concurrently_without_losses_or_lock_errors(tmp_path):
    errors: list[BaseException] = []
    threads_n, batches, per_batch = 8, 12, 10
    with EventStore(tmp_path / "e.db") as store:
        start = threading.Barrier(threads_n + 1)

        def writer(t: int) -> None:
            try:
                start.wait()
                for b in range(batches):
                    request_id = f"t{t}-b{b}"
                    store.log_request(served(request_id, n=per_batch))
                    store.append_events([
                        click(position=p, request_id=request_id, event_id=f"{request_id}-{p}")
                        for p in range(1, per_batch + 1)
                    ])
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        def reader() -> None:
            try:
                start.wait()
                for _ in range(20):
                    sum(1 for _ in store.iter_events())
                    store.count_events()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(threads_n)]
        threads.append(threading.Thread(target=reader))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        assert store.count_events()["click"] == threads_n * batches * per_batch
        assert len(list(store.iter_requests())) == threads_n * batches
        ids = {e.event_id for e in store.iter_events()}
        assert len(ids) == threads_n * batches * per_batch


# ---- durability settings, schema versions --------------------------------------------------------


def test_wal_full_sync_and_foreign_keys_are_set(store):
    with store._write() as writer:
        assert writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # 2 = FULL
        assert writer.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert writer.execute("PRAGMA busy_timeout").fetchone()[0] == sqlite_helper.BUSY_TIMEOUT_MS
    with store._read() as reader:
        assert reader.execute("PRAGMA synchronous").fetchone()[0] == 2
        assert reader.execute("PRAGMA query_only").fetchone()[0] == 1
    outside = sqlite3.connect(store.path)
    try:
        assert outside.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent, in the file
        assert outside.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert outside.execute("PRAGMA application_id").fetchone()[0] == event_store.APPLICATION_ID
    finally:
        outside.close()


def test_newer_schema_version_is_refused(tmp_path):
    path = tmp_path / "e.db"
    EventStore(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(EventStoreError) as info:
        EventStore(path)
    assert str(info.value) == (
        f"{path}: schema version {SCHEMA_VERSION + 1} is newer than this code supports ({SCHEMA_VERSION}); "
        "upgrade ltr-search to open it"
    )


def test_closed_store_says_so(tmp_path):
    store = EventStore(tmp_path / "e.db")
    store.close()
    store.close()  # twice is fine
    with pytest.raises(EventStoreError, match="event store is closed"):
        store.log_request(served())
    with pytest.raises(EventStoreError, match="event store is closed"):
        store.count_events()


# ---- a real crash --------------------------------------------------------------------------------

CRASH_CHILD = """
import sys, time
from search.event_store import Event, EventStore, ServedRequest, ServedResult
path, run = sys.argv[1], sys.argv[2]
with EventStore(path) as store:
    request_id = "crash-" + run
    results = [ServedResult(f"d{p}", p, 1.0 / p) for p in range(1, 51)]
    store.log_request(ServedRequest(request_id, time.time(), "q", "bm25", "i", "g1", None, None, None, 0, results))
    batch = 0
    while True:
        now = time.time()
        store.append_events([Event(request_id, "impression", f"d{p}", p, now, event_id=f"{run}:{batch}:{p}")
                             for p in range(1, 51)])
        print(f"ack {batch}", flush=True)  # printed only after the commit returned
        batch += 1
"""


def test_sigkill_mid_run_loses_no_acknowledged_event_and_no_batch_is_partial(tmp_path):
    path = tmp_path / "crash.db"
    rng = random.Random(7)
    acknowledged: dict[str, int] = {}
    for run in ("a", "b", "c"):  # each run also recovers the WAL the previous kill left behind
        child = subprocess.Popen(
            [sys.executable, "-c", CRASH_CHILD, str(path), run],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        acks = -1
        deadline = time.monotonic() + 30
        while acks < 4 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            acks = int(line.split()[1])
        time.sleep(rng.uniform(0.0, 0.03))  # kill at an arbitrary point of a later batch
        child.send_signal(signal.SIGKILL)
        rest, errors = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL, errors
        for line in rest.splitlines():
            acks = int(line.split()[1])
        assert acks >= 4, f"child acknowledged too little before the kill: {errors}"
        acknowledged[run] = acks

    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        raw.close()
    with EventStore(path) as store:
        stored_ids = [e.event_id for e in store.iter_events()]
    batches: dict[tuple[str, int], int] = {}
    for event_id in stored_ids:
        run, batch, _ = event_id.split(":")
        batches[run, int(batch)] = batches.get((run, int(batch)), 0) + 1
    assert len(stored_ids) % 50 == 0
    assert set(batches.values()) == {50}, "a partial batch is visible"
    for run, last in acknowledged.items():
        stored = sorted(b for r, b in batches if r == run)
        # every acknowledged batch is there; at most one more committed before its ack was printed
        assert stored[: last + 1] == list(range(last + 1)), run
        assert stored in (list(range(last + 1)), list(range(last + 2))), run
