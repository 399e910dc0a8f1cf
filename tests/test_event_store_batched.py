"""Batched durability of the event store (`EventStore(path, durability="batched")`, what the
in-process click simulator writes with): no fsync per commit, every commit still atomic, and
`sync()` / `close()` leave every write in the database file itself. A real SIGKILL mid-run leaves
a consistent store holding a prefix of the batches, none partial."""
from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from search.event_store import Event, EventStore, ServedRequest, ServedResult

ROOT = Path(__file__).resolve().parents[1]


def _page(request_id: str, at: float) -> ServedRequest:
    results = [ServedResult(f"d{p}", p, 1.0 / p) for p in range(1, 11)]
    return ServedRequest(request_id, at, "vitamin d", "bm25", "i", "g1", None, None, None, 0, results)


def _write_pages(store: EventStore, n: int) -> None:
    at = time.time() - 60
    for i in range(n):
        store.log_request(_page(f"r{i}", at))
        store.append_events([Event(f"r{i}", "impression", f"d{p}", p, at + 1, event_id=f"r{i}-i{p}") for p in range(1, 11)])


def _rows_in_file_alone(path: Path, tmp: Path) -> int:
    """Event rows in a copy of the database file WITHOUT its WAL: what is checkpointed there."""
    copy = tmp / f"alone-{len(list(tmp.glob('alone-*')))}.db"
    shutil.copyfile(path, copy)
    raw = sqlite3.connect(copy)
    try:
        if raw.execute("SELECT COUNT(*) FROM sqlite_schema WHERE name = 'events'").fetchone()[0] == 0:
            return 0  # even the schema is still only in the WAL
        return raw.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    finally:
        raw.close()


def test_batched_store_skips_the_per_commit_fsync_and_sync_checkpoints_everything(tmp_path):
    path = tmp_path / "events.db"
    with EventStore(path, durability="batched") as store:
        with store._db.write() as connection:
            assert connection.execute("PRAGMA synchronous").fetchone()[0] == 1  # 1 = NORMAL
        _write_pages(store, 20)
        assert sum(store.count_events().values()) == 200  # committed and visible at once
        assert _rows_in_file_alone(path, tmp_path) < 200  # still in the WAL: not yet in the file
        store.sync()
        assert _rows_in_file_alone(path, tmp_path) == 200
        at = time.time() - 30
        for request_id in ("x0", "x1", "x2"):
            store.log_request(_page(request_id, at))
            store.append_events([Event(request_id, "click", "d1", 1, at + 1, event_id=f"{request_id}-c1")])
    assert _rows_in_file_alone(path, tmp_path) == 203  # close() synced
    with EventStore(path) as reopened:  # a default (per-commit) store opens the same file
        assert reopened.count_events() == {"impression": 200, "click": 3, "dwell": 0}


def test_default_store_still_fsyncs_every_commit(tmp_path):
    with EventStore(tmp_path / "events.db") as store:
        assert store.durability == "commit"
        with store._db.write() as connection:
            assert connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # 2 = FULL


def test_behaviour_store_synchronous_level(tmp_path):
    from ltr.behaviour import BehaviourStore

    for level, code in (("FULL", 2), ("NORMAL", 1)):
        with BehaviourStore(tmp_path / f"{level}.db", synchronous=level) as aggregates:
            with aggregates._db.write() as connection:
                assert connection.execute("PRAGMA synchronous").fetchone()[0] == code
    with pytest.raises(ValueError, match="synchronous must be one of"):
        BehaviourStore(tmp_path / "bad.db", synchronous="SOMETIMES")


def test_unknown_durability_is_refused(tmp_path):
    with pytest.raises(ValueError, match="durability must be one of commit, batched, got 'never'"):
        EventStore(tmp_path / "events.db", durability="never")  # type: ignore[arg-type]
    assert not (tmp_path / "events.db").exists()


CRASH_CHILD = """
import sys, time
from search.event_store import Event, EventStore, ServedRequest, ServedResult
path, run = sys.argv[1], sys.argv[2]
store = EventStore(path, durability="batched")
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


def test_sigkill_mid_batched_run_leaves_a_consistent_prefix(tmp_path):
    path = tmp_path / "crash.db"
    acknowledged: dict[str, int] = {}
    for run, pause in (("a", 0.0), ("b", 0.013), ("c", 0.027)):  # each run also recovers the previous kill's WAL
        child = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(path), run],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        acks, deadline = -1, time.monotonic() + 30
        while acks < 4 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            acks = int(line.split()[1])
        time.sleep(pause)  # kill at an arbitrary point of a later batch
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
    assert set(batches.values()) == {50}, "a partial batch is visible"
    for run, last in acknowledged.items():
        stored = sorted(b for r, b in batches if r == run)
        # a process crash loses no commit (the OS holds the WAL); a prefix, at most one batch past the last ack
        assert stored in (list(range(last + 1)), list(range(last + 2))), run


def test_a_blocked_final_sync_says_so_and_still_closes(tmp_path, monkeypatch):
    import indexing.sqlite as sqlite_helper
    from search.event_store import EventStoreError

    monkeypatch.setattr(sqlite_helper, "BUSY_TIMEOUT_MS", 50)  # the checkpoint gives up quickly
    path = tmp_path / "events.db"
    store = EventStore(path, durability="batched")
    _write_pages(store, 2)
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM events").fetchone()  # holds a snapshot: the WAL cannot be fully copied
        at = time.time() - 30
        store.log_request(_page("late", at))
        with pytest.raises(EventStoreError, match="checkpoint blocked by another connection; writes not yet durable"):
            store.close()
        assert store._db.closed
    finally:
        reader.close()
    with EventStore(path) as reopened:
        assert reopened.get_request("late") is not None and sum(reopened.count_events().values()) == 20
