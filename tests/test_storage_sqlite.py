"""The one SQLite helper (indexing.sqlite) and the three stores on it: the same pragmas, marks,
refusals and write transactions everywhere, and one process-local lock per file."""
from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from indexing.sqlite import BUSY_TIMEOUT_MS, SqliteDatabase, SqliteSchema, SqliteStoreError, path_lock
from ltr import behaviour, experiments
from ltr.behaviour import BehaviourStore, BehaviourStoreError
from ltr.experiments import ExperimentLog, ExperimentLogError, InterleavedRequest, TeamPick
from search import event_store
from search.event_store import EventStore, EventStoreError

STORES = [
    (EventStore, EventStoreError, "event store", 0x4C545245),
    (BehaviourStore, BehaviourStoreError, "behaviour store", 0x4C545242),
    (ExperimentLog, ExperimentLogError, "experiment log", 0x4C545258),
]
VERSIONS = {EventStore: event_store.SCHEMA_VERSION, BehaviourStore: behaviour.SCHEMA_VERSION,
            ExperimentLog: experiments.SCHEMA_VERSION}  # each store's current schema version
SCHEMA = SqliteSchema("test store", 0x54455354, 1, ("CREATE TABLE t (x INTEGER NOT NULL)",))


@pytest.mark.parametrize("store_class, error, kind, application_id", STORES)
def test_every_store_is_wal_full_sync_and_marked(tmp_path, store_class, error, kind, application_id):
    path = tmp_path / "s.sqlite3"
    store = store_class(path)
    try:
        with store._db.write() as connection:
            assert connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: acknowledged = on disk
            assert connection.execute("PRAGMA busy_timeout").fetchone()[0] == BUSY_TIMEOUT_MS
    finally:
        store.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA application_id").fetchone()[0] == application_id
        assert raw.execute("PRAGMA user_version").fetchone()[0] == VERSIONS[store_class]


@pytest.mark.parametrize("store_class, error, kind, application_id", STORES)
def test_every_store_refuses_other_files_and_says_when_closed(tmp_path, store_class, error, kind, application_id):
    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as raw:
        raw.execute("CREATE TABLE notes (x)")
    with pytest.raises(error, match=rf"not an? {kind} \(schema version 0 but it has tables: notes\)"):
        store_class(foreign)
    with sqlite3.connect(foreign) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # left alone, not switched to WAL
        raw.execute("PRAGMA user_version = 1")
    with pytest.raises(error, match=rf"not an? {kind} \(application_id 0x0, expected {application_id:#x}\)"):
        store_class(foreign)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(error, match=f"cannot open {kind}: file is not a database"):
        store_class(garbage)
    newer = tmp_path / "newer.db"
    store_class(newer).close()
    with sqlite3.connect(newer) as raw:
        raw.execute(f"PRAGMA user_version = {VERSIONS[store_class] + 1}")
    with pytest.raises(error, match=f"schema version {VERSIONS[store_class] + 1} is newer than this code supports"):
        store_class(newer)
    store = store_class(tmp_path / "closed.db")
    store.close()
    store.close()
    with pytest.raises(error, match=f"{kind} is closed"):
        with store._db.read():
            pass


def test_an_unmarked_behaviour_store_from_before_is_adopted(tmp_path):
    path = tmp_path / "behaviour.sqlite3"
    with sqlite3.connect(path) as raw:  # as BehaviourStore wrote files before it marked them
        raw.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID")
        raw.execute("INSERT INTO meta VALUES ('watermark', '7')")
    with BehaviourStore(path) as store:
        assert store.watermark == 7
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA application_id").fetchone()[0] == 0x4C545242


def test_write_rolls_back_on_error_and_commits_otherwise(tmp_path):
    db = SqliteDatabase(tmp_path / "t.db", SCHEMA)
    try:
        with db.write() as connection:
            connection.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(RuntimeError):
            with db.write() as connection:
                connection.execute("INSERT INTO t VALUES (2)")
                raise RuntimeError("half way")
        with pytest.raises(sqlite3.IntegrityError):
            with db.write() as connection:
                connection.execute("INSERT INTO t VALUES (3)")
                connection.execute("INSERT INTO t VALUES (NULL)")
        with db.read() as connection:
            assert connection.execute("SELECT x FROM t").fetchall() == [(1,)]
            assert not connection.in_transaction
    finally:
        db.close()


def test_one_lock_per_file_across_store_objects(tmp_path):
    path = tmp_path / "t.db"
    (tmp_path / "link").symlink_to(tmp_path)
    assert path_lock(path) is path_lock(tmp_path / "link" / "t.db")
    assert path_lock(path) is not path_lock(tmp_path / "u.db")


def test_threads_writing_through_several_store_objects_never_see_busy(tmp_path):
    """Two objects on one file in one process queue on the shared lock, not on SQLite's busy
    handler: with a 0 ms busy timeout, a second writer would fail at once without it."""
    path = tmp_path / "x.sqlite3"
    logs = [ExperimentLog(path), ExperimentLog(path)]
    for log in logs:
        with log._db.write() as connection:
            connection.execute("PRAGMA busy_timeout = 0")
    errors: list[BaseException] = []

    def writer(worker: int) -> None:
        log = logs[worker % 2]
        try:
            for i in range(25):
                picks = (TeamPick(1, "d1", "A"),)
                log.log_interleaved(InterleavedRequest(f"w{worker}-{i}", time.time(), "m1", "m2", 0, picks))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        assert len(list(logs[0].iter_interleaved())) == 6 * 25
    finally:
        for log in logs:
            log.close()


def test_an_unknown_synchronous_level_is_refused():
    with pytest.raises(ValueError, match="synchronous must be one of"):
        SqliteSchema("x", 1, 1, (), synchronous="SOMETIMES")


def test_store_errors_are_sqlite_store_errors():
    assert all(issubclass(error, SqliteStoreError) for _, error, _, _ in STORES)
