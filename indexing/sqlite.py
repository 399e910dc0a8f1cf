"""The one way the engine opens and writes its SQLite files (event store, behaviour store, experiment log).

Every file is in WAL mode with the store's `synchronous` level (FULL for all three: a write is on
disk, the WAL fsynced, before the call that made it returns), `busy_timeout` set, and is marked
with `PRAGMA application_id` (what kind of file it is) and `PRAGMA user_version` (its schema
version), which are checked on every open: another program's file is refused and left alone, a
newer schema is refused with a message to upgrade.

Locking. Writes run in `BEGIN IMMEDIATE ... COMMIT` (ROLLBACK on any exception) on one writer
connection per store, serialised by ONE process-local lock per file (shared by every store object
open on that file), so threads of a process queue on the lock instead of on SQLite's busy handler.
Measured for the event store on the 2-core dev machine with 8 writer threads, 40 commits each: one
connection per thread relying on `busy_timeout` gave 150-270 commits/s with p99 0.5-1.3 s (the busy
handler sleeps and backs off, so some threads starve); one locked connection gave 310-570 commits/s
with p99 under 80 ms. Separate processes (`serve --workers N`, a CLI job beside the service) still
contend through `busy_timeout`; a BEGIN that is still busy after it (SQLite's busy handler backs
off and can starve one process, and some busy states skip the handler altogether) is retried a few
times after a short random pause (`begin_immediate`): nothing was written yet, so a retry is safe.

Reads either share the writer connection under the same lock (small stores), or take a read-only
connection from a pool (`reader_pool=True`: WAL lets them run while a write commits). Connections
are opened with `check_same_thread=False` because the lock or the pool guarantees one user at a time,
never because threads may share one freely.
"""
from __future__ import annotations

import os
import queue
import random
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

BUSY_TIMEOUT_MS = 10_000  # only other processes wait on this; threads of one process queue on a lock
BEGIN_RETRIES = 5  # further BEGIN IMMEDIATE attempts once busy_timeout has run out (other processes)
SYNCHRONOUS_LEVELS = ("OFF", "NORMAL", "FULL", "EXTRA")


class SqliteStoreError(RuntimeError):
    """A store file cannot be opened or used: names the file and the reason."""


@dataclass(frozen=True)
class SqliteSchema:
    """What a store's file must be: its kind (for messages), marks, schema and durability level.

    `adopt_tables`: tables a file may hold from before the store marked its files; an unmarked
    file holding only those is adopted (its schema statements must then be idempotent)."""

    kind: str
    application_id: int
    version: int
    statements: tuple[str, ...]
    error: type[SqliteStoreError] = SqliteStoreError
    synchronous: str = "FULL"
    foreign_keys: bool = False
    adopt_tables: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.synchronous not in SYNCHRONOUS_LEVELS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS_LEVELS}, got {self.synchronous!r}")


_PATH_LOCKS: dict[str, threading.RLock] = {}
_PATH_LOCKS_GUARD = threading.Lock()


def path_lock(path: Path | str) -> threading.RLock:
    """The process-wide write lock of one database file (re-entrant: a store's write may call its reads)."""
    key = os.path.realpath(path)
    with _PATH_LOCKS_GUARD:
        return _PATH_LOCKS.setdefault(key, threading.RLock())


def connect(path: Path | str, schema: SqliteSchema, read_only: bool = False) -> sqlite3.Connection:
    """A connection with the store's pragmas; no implicit transactions (isolation_level=None)."""
    try:
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                     timeout=BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error as exc:
        raise schema.error(f"{path}: cannot open {schema.kind}: {exc}") from exc
    try:
        connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        connection.execute(f"PRAGMA synchronous = {schema.synchronous}")
        if schema.foreign_keys:
            connection.execute("PRAGMA foreign_keys = ON")
        if read_only:
            connection.execute("PRAGMA query_only = ON")
    except sqlite3.Error as exc:
        connection.close()
        raise schema.error(f"{path}: cannot open {schema.kind}: {exc}") from exc
    return connection


@contextmanager
def transaction(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception; the caller holds the file's lock."""
    begin_immediate(connection)
    try:
        yield connection
        connection.execute("COMMIT")  # with synchronous=FULL, returns once the WAL is fsynced
    except BaseException:
        if connection.in_transaction:  # a failed COMMIT (disk full, I/O error) may leave it open
            connection.execute("ROLLBACK")
        raise


def begin_immediate(connection: sqlite3.Connection, retries: int = BEGIN_RETRIES) -> None:
    """Take the write lock, retrying when another process holds it past `busy_timeout`."""
    for attempt in range(retries + 1):
        try:
            connection.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if attempt == retries or not is_busy(exc):
                raise
            time.sleep(random.uniform(0.005, 0.05) * (attempt + 1))  # jitter: the waiters do not retry in step


def is_busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED: another connection holds the lock (worth retrying)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def prepare(connection: sqlite3.Connection, path: Path | str, schema: SqliteSchema) -> None:
    """Create the schema in an empty file (under the write lock, so two processes cannot both
    create it), then check the file's marks and switch it to WAL."""
    fail = schema.error
    try:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            _refuse_foreign_tables(connection, path, schema)  # before WAL: never change someone else's file
            _switch_to_wal(connection, path, schema)
            with transaction(connection):
                version = connection.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:  # still unmarked under the write lock: no other process created it
                    _refuse_foreign_tables(connection, path, schema)
                    for statement in schema.statements:
                        connection.execute(statement)
                    connection.execute(f"PRAGMA application_id = {schema.application_id}")
                    connection.execute(f"PRAGMA user_version = {schema.version}")
                    version = schema.version
        application_id = connection.execute("PRAGMA application_id").fetchone()[0]
        if application_id != schema.application_id:
            raise fail(f"{path}: not {_a(schema.kind)} (application_id {application_id:#x}, "
                       f"expected {schema.application_id:#x})")
        if version > schema.version:
            raise fail(f"{path}: schema version {version} is newer than this code supports ({schema.version}); "
                       "upgrade ltr-search to open it")
        if version != schema.version:
            raise fail(f"{path}: unknown schema version {version} (this code knows version {schema.version})")
        _switch_to_wal(connection, path, schema)
    except sqlite3.DatabaseError as exc:
        raise fail(f"{path}: cannot open {schema.kind}: {exc}") from exc


def _refuse_foreign_tables(connection: sqlite3.Connection, path: Path | str, schema: SqliteSchema) -> None:
    tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")]
    foreign = [t for t in tables if t not in schema.adopt_tables]
    if foreign:
        raise schema.error(f"{path}: not {_a(schema.kind)} (schema version 0 but it has tables: {', '.join(tables)})")


def _a(kind: str) -> str:
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


def _switch_to_wal(connection: sqlite3.Connection, path: Path | str, schema: SqliteSchema) -> None:
    mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise schema.error(f"{path}: cannot switch to WAL mode (journal_mode is {mode!r})")


class SqliteDatabase:
    """One store file: a writer connection behind the file's process-local lock, and reads either
    on that connection (under the lock) or from a pool of read-only connections."""

    def __init__(self, path: Path | str, schema: SqliteSchema, reader_pool: bool = False):
        self.path = Path(path)
        self.schema = schema
        self._lock = path_lock(self.path)
        self._reader_pool = reader_pool
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all_readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._writer = connect(self.path, schema)
        try:
            with self._lock:
                prepare(self._writer, self.path, schema)
        except BaseException:
            self._writer.close()
            raise

    def close(self) -> None:
        """Close every connection; idempotent. Call once nothing uses the store any more."""
        with self._lock, self._readers_lock:
            if self._closed:
                return
            self._closed = True
            self._writer.close()
            for connection in self._all_readers:
                connection.close()
            self._all_readers.clear()

    @property
    def closed(self) -> bool:
        return self._closed

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on the writer connection; commits (fsync) or rolls back."""
        with self._lock:
            self._check_open()
            with transaction(self._writer) as connection:
                yield connection

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A connection to read with: from the pool, or the writer under the lock (re-entrant, so a
        read inside this thread's write transaction sees that transaction)."""
        if not self._reader_pool:
            with self._lock:
                self._check_open()
                yield self._writer
            return
        self._check_open()
        try:
            connection = self._readers.get_nowait()
        except queue.Empty:
            connection = connect(self.path, self.schema, read_only=True)
            with self._readers_lock:
                if self._closed:
                    connection.close()
                    self._check_open()
                self._all_readers.append(connection)
        try:
            yield connection
        finally:
            if not self._closed:
                self._readers.put(connection)

    def _check_open(self) -> None:
        if self._closed:
            raise self.schema.error(f"{self.path}: {self.schema.kind} is closed")
