"""The durable event store: the request log (what was served, with features) and behaviour events.

One SQLite file in WAL mode with `synchronous=FULL`, so a write is on disk (the WAL is fsynced)
before the call that made it returns: an acknowledged request or event batch survives a process
crash or a power cut. Events are append-only; aggregates are derived from them elsewhere.

`EventStore(path, durability="batched")` is for bulk writers that own the run (the click simulator
in process): commits use `synchronous=NORMAL` (no fsync per commit; each transaction is still
atomic, so a crash at any point leaves a consistent store that holds a prefix of the commits), and
`sync()` / `close()` make everything committed durable with one FULL checkpoint. Other processes
opening the same file keep their own FULL commits.

Threading and locking are `indexing.sqlite`'s (the one SQLite helper): one writer connection behind
the file's process-local lock, reads from a pool of read-only connections (WAL lets them run while
a write commits), `busy_timeout` as the fallback between processes.

Validation happens before anything is written: a bad event batch raises `EventValidationError`
listing every problem as `events[i].field: reason`, and nothing of that batch is stored. A valid
batch is written in one transaction (all or nothing). Events may carry a client `event_id`;
re-sending one is counted as a duplicate, not stored twice.

Schema versions: 1 had no per-request flags; 2 adds `explored` (exploration moved a result on the
page) and `interleaved` (the page mixed two rankers: an online experiment). A version-1 file is
migrated in place when opened (`migrate`): one transaction adds the columns and infers `explored`
from the logged propensities; `interleaved` stays NULL (unknown) for old `ltr` pages and 0 for the
others (experiments only run on `ltr` requests).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence, get_args

from indexing.sqlite import SqliteDatabase, SqliteSchema, SqliteStoreError, connect, path_lock, transaction
from search.limits import (
    MAX_BATCH_EVENTS, MAX_DOC_ID_LENGTH, MAX_FEATURES_PER_RESULT, MAX_FIELD_NAME_LENGTH, MAX_ID_LENGTH, MAX_QUERY_CHARS,
    MAX_RESULTS_PER_REQUEST,
)

SCHEMA_VERSION = 2
APPLICATION_ID = 0x4C545245  # "LTRE" in PRAGMA application_id: marks the file as an event store

EventType = Literal["impression", "click", "dwell"]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)

# An event cannot happen before the page it refers to was served. The service stamps requests and
# (it should) events with its own clock, so the allowance only covers NTP skew between the hosts or
# processes that wrote them and float rounding; a client clock minutes off must be corrected by the
# service (stamp on receipt), not absorbed here. The same allowance bounds timestamps in the future.
CLOCK_SKEW_ALLOWANCE_S = 5.0

MAX_DWELL_MS = 86_400_000.0  # one day; longer is a client bug, not a reading
MAX_PROBLEMS_IN_MESSAGE = 20

_PAGE_ROWS = 500  # iterators read in pages so no read transaction stays open while a consumer works


class EventStoreError(SqliteStoreError):
    """The store cannot be opened or used: names the file and the reason."""


class ValidationError(ValueError):
    """Input refused before anything was written; `problems` lists every reason, `field: reason`."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = problems
        shown = problems[:MAX_PROBLEMS_IN_MESSAGE]
        lines = [f"{what}: {len(problems)} problem{'s' if len(problems) != 1 else ''}"]
        lines += [f"  {problem}" for problem in shown]
        if len(problems) > len(shown):
            lines.append(f"  ... and {len(problems) - len(shown)} more")
        super().__init__("\n".join(lines))


class EventValidationError(ValidationError):
    """An event batch refused as a whole; problems are named `events[i].field: reason`."""


class ServedRequestError(ValidationError):
    """A served request refused by `log_request`; problems are named `field` or `results[i].field`."""


@dataclass(frozen=True, slots=True)
class ServedResult:
    """One document on a served page. `position` is absolute and 1-based (offset included);
    `propensity` is the probability the exploration policy put this doc here (1.0 without one);
    `features` is the vector the ranker scored (NaN = missing, as XGBoost reads it)."""

    doc_id: str
    position: int
    score: float
    propensity: float = 1.0
    features: dict[str, float] | None = None


@dataclass(frozen=True, slots=True)
class ServedRequest:
    """One answered query: the feature log row group that training turns into examples."""

    request_id: str
    timestamp: float
    query: str
    pipeline: str
    index_name: str
    index_generation: str
    model_version: str | None
    user_id: str | None
    session_id: str | None
    page_offset: int
    results: list[ServedResult]
    # Whether exploration moved a result onto this page; None when the logger did not say
    # (readers then infer it from the propensities: `ServedRequest.was_explored`).
    explored: bool | None = None
    # Whether the page was a team-draft interleaving of two rankers (None: unknown, rows logged
    # before schema version 2 on the `ltr` pipeline).
    interleaved: bool | None = None

    @property
    def was_explored(self) -> bool:
        """The logged flag, else what the propensities say (`explored_from_propensities`)."""
        if self.explored is not None:
            return self.explored
        return explored_from_propensities([r.propensity for r in self.results])


@dataclass(frozen=True, slots=True)
class Event:
    """A behaviour event on one shown document. `dwell_ms` is required for dwell events and
    forbidden otherwise; `event_id` (client-chosen) makes re-sending the event harmless."""

    request_id: str
    type: EventType
    doc_id: str
    position: int
    timestamp: float
    dwell_ms: float | None = None
    event_id: str | None = None


@dataclass(frozen=True, slots=True)
class AppendResult:
    stored: int
    duplicates: int  # events whose event_id was already stored (or repeated within the batch)


# Executed statement by statement inside the creating transaction (executescript would commit).
_SCHEMA: tuple[str, ...] = (
    """
    CREATE TABLE requests (
        seq              INTEGER PRIMARY KEY,
        request_id       TEXT NOT NULL UNIQUE,
        timestamp        REAL NOT NULL,
        query            TEXT NOT NULL,
        pipeline         TEXT NOT NULL,
        index_name       TEXT NOT NULL,
        index_generation TEXT NOT NULL,
        model_version    TEXT,
        user_id          TEXT,
        session_id       TEXT,
        page_offset      INTEGER NOT NULL CHECK (page_offset >= 0),
        n_results        INTEGER NOT NULL CHECK (n_results >= 0),
        explored         INTEGER CHECK (explored IN (0, 1)),
        interleaved      INTEGER CHECK (interleaved IN (0, 1))  -- NULL: unknown (logged before version 2)
    )
    """,
    """
    CREATE INDEX requests_by_time ON requests (timestamp, seq)
    """,
    """
    CREATE TABLE request_results (
        request_seq INTEGER NOT NULL REFERENCES requests (seq),
        position    INTEGER NOT NULL CHECK (position >= 1),
        doc_id      TEXT NOT NULL,
        score       REAL NOT NULL,
        propensity  REAL NOT NULL CHECK (propensity > 0 AND propensity <= 1),
        features    TEXT,  -- JSON object name -> number, null for NaN (missing), NULL when not logged
        PRIMARY KEY (request_seq, position)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE events (
        seq         INTEGER PRIMARY KEY,
        event_id    TEXT UNIQUE,  -- NULL for events sent without one (never deduplicated)
        request_seq INTEGER NOT NULL,
        position    INTEGER NOT NULL,
        type        TEXT NOT NULL CHECK (type IN ('impression', 'click', 'dwell')),
        doc_id      TEXT NOT NULL,
        timestamp   REAL NOT NULL,
        dwell_ms    REAL CHECK ((type = 'dwell') = (dwell_ms IS NOT NULL)),
        received_at REAL NOT NULL,  -- store clock at append, for audits and incremental consumers
        FOREIGN KEY (request_seq, position) REFERENCES request_results (request_seq, position)
    )
    """,
    """
    CREATE INDEX events_by_time ON events (timestamp, seq)
    """,
    """
    CREATE INDEX events_by_request ON events (request_seq, position)
    """,
)

_FILE = SqliteSchema("event store", APPLICATION_ID, SCHEMA_VERSION, _SCHEMA, error=EventStoreError,
                     synchronous="FULL", foreign_keys=True)

Durability = Literal["commit", "batched"]
DURABILITY_LEVELS: tuple[str, ...] = get_args(Durability)

_REQUEST_COLUMNS = (
    "seq, request_id, timestamp, query, pipeline, index_name, index_generation, "
    "model_version, user_id, session_id, page_offset, explored, interleaved"
)
_EVENT_SELECT = (
    "SELECT e.seq, r.request_id, e.type, e.doc_id, e.position, e.timestamp, e.dwell_ms, e.event_id "
    "FROM events e JOIN requests r ON r.seq = e.request_seq"
)


class EventStore:
    """The request log and event log in one SQLite file; safe to share between threads."""

    def __init__(self, path: Path | str, durability: Durability = "commit"):
        """`durability`: "commit" (default) fsyncs every commit before it returns; "batched" skips
        the per-commit fsync and makes the writes durable at `sync()` and `close()` (module doc)."""
        if durability not in DURABILITY_LEVELS:
            raise ValueError(f"durability must be one of {', '.join(DURABILITY_LEVELS)}, got {durability!r}")
        self.path = Path(path)
        self.durability = durability
        migrate(self.path)
        schema = _FILE if durability == "commit" else dataclasses.replace(_FILE, synchronous="NORMAL")
        self._db = SqliteDatabase(self.path, schema, reader_pool=True)
        self._write = self._db.write
        self._read = self._db.read

    # ---- lifecycle -------------------------------------------------------------------------

    def sync(self) -> None:
        """Make every committed write durable now: a FULL checkpoint on a synchronous=FULL
        connection fsyncs the WAL, copies it into the database file and fsyncs that. A no-op
        cost-wise for a "commit" store (its WAL is already synced)."""
        with path_lock(self.path):  # no writer of this process between the commits and the checkpoint
            connection = connect(self.path, _FILE)
            try:
                busy, _, _ = connection.execute("PRAGMA wal_checkpoint(FULL)").fetchone()
            except sqlite3.Error as exc:
                raise EventStoreError(f"{self.path}: cannot checkpoint the event store: {exc}") from exc
            finally:
                connection.close()
        if busy:
            raise EventStoreError(f"{self.path}: checkpoint blocked by another connection; writes not yet durable")

    def close(self) -> None:
        """Close every connection (a "batched" store syncs first); call once no request handler
        uses the store any more."""
        try:
            if self.durability == "batched" and not self._db.closed:
                self.sync()
        finally:  # a failed sync still closes: what was committed stays consistent in the WAL
            self._db.close()

    def __enter__(self) -> "EventStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- request log -----------------------------------------------------------------------

    def log_request(self, record: ServedRequest) -> None:
        """Store a served page and its results in one transaction; a request id is logged once."""
        self.log_requests([record])

    def log_requests(self, records: Sequence[ServedRequest]) -> None:
        """Store several served pages in ONE transaction (all or none): for replays and batch
        loaders, where a commit (an fsync) per page would dominate."""
        prepared = []
        for record in records:
            if not isinstance(record, ServedRequest):
                raise ServedRequestError("request", [f"record: must be a ServedRequest, got {type(record).__name__}"])
            problems = _request_problems(record)
            if problems:
                raise ServedRequestError(f"request {record.request_id!r}", problems)
            request_row = (
                record.request_id, float(record.timestamp), record.query, record.pipeline, record.index_name,
                record.index_generation, record.model_version, record.user_id, record.session_id,
                record.page_offset, len(record.results), None if record.explored is None else int(bool(record.explored)),
                None if record.interleaved is None else int(bool(record.interleaved)),
            )
            result_rows = [
                (r.position, r.doc_id, float(r.score), float(r.propensity), _features_to_json(r.features))
                for r in record.results
            ]
            prepared.append((record.request_id, request_row, result_rows))
        with self._write() as connection:
            for request_id, request_row, result_rows in prepared:
                try:
                    cursor = connection.execute(
                        "INSERT INTO requests (request_id, timestamp, query, pipeline, index_name, index_generation, "
                        "model_version, user_id, session_id, page_offset, n_results, explored, interleaved) "
                        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        request_row,
                    )
                except sqlite3.IntegrityError as exc:
                    if "UNIQUE" not in str(exc):
                        raise
                    raise ServedRequestError(
                        f"request {request_id!r}",
                        [f"request_id: request {request_id!r} is already logged (request ids must be unique)"],
                    ) from None
                seq = cursor.lastrowid
                connection.executemany(
                    "INSERT INTO request_results (request_seq, position, doc_id, score, propensity, features) "
                    "VALUES (?,?,?,?,?,?)",
                    [(seq, *row) for row in result_rows],
                )

    def get_request(self, request_id: str) -> ServedRequest | None:
        with self._read() as connection:
            row = connection.execute(
                f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE request_id = ?", (request_id,)
            ).fetchone()
            if row is None:
                return None
            return _requests_with_results(connection, [row])[0]

    def iter_requests(self, since: float | None = None, until: float | None = None) -> Iterator[ServedRequest]:
        """Requests with `since <= timestamp < until`, in timestamp order (ties in logging order)."""
        where, params = _time_range("timestamp", since, until)
        cursor_key: tuple[float, int] | None = None
        while True:
            clauses = list(where)
            page_params = list(params)
            if cursor_key is not None:
                clauses.append("(timestamp, seq) > (?, ?)")
                page_params += cursor_key
            sql = f"SELECT {_REQUEST_COLUMNS} FROM requests"
            if clauses:
                sql += " WHERE " + " AND ".join(clauses)
            sql += f" ORDER BY timestamp, seq LIMIT {_PAGE_ROWS}"
            with self._read() as connection:
                rows = connection.execute(sql, page_params).fetchall()
                page = _requests_with_results(connection, rows)
            yield from page
            if len(rows) < _PAGE_ROWS:
                return
            cursor_key = (rows[-1][2], rows[-1][0])

    # ---- events ----------------------------------------------------------------------------

    def append_events(self, events: Sequence[Event]) -> AppendResult:
        """Validate the whole batch, then store it in one transaction (all or nothing)."""
        events = list(events)
        if len(events) > MAX_BATCH_EVENTS:
            raise EventValidationError(
                "event batch",
                [f"events: batch has {len(events)} events, the limit is {MAX_BATCH_EVENTS} (MAX_BATCH_EVENTS)"],
            )
        if not events:
            return AppendResult(0, 0)
        problems: dict[int, list[str]] = {}
        for index, event in enumerate(events):
            found = _event_problems(index, event)
            if found:
                problems[index] = found
        # Requests are append-only and immutable, so checking against them outside the write lock
        # cannot be invalidated by a concurrent writer; this keeps the lock for the insert alone.
        with self._read() as connection:
            request_seqs = _check_against_requests(connection, events, problems)
        if problems:
            raise EventValidationError("event batch", [p for i in sorted(problems) for p in problems[i]])

        with self._write() as connection:
            received_at = time.time()  # inside the lock: seq order is received_at order (point-in-time reads rely on it)
            rows, duplicates = _new_event_rows(connection, events, request_seqs, received_at)
            connection.executemany(
                "INSERT INTO events (event_id, request_seq, position, type, doc_id, timestamp, dwell_ms, received_at) "
                "VALUES (?,?,?,?,?,?,?,?)",
                rows,
            )
        return AppendResult(stored=len(rows), duplicates=duplicates)

    def iter_events(
        self,
        since: float | None = None,
        until: float | None = None,
        types: Iterable[str] | None = None,
    ) -> Iterator[Event]:
        """Events with `since <= timestamp < until` (of the given types), in timestamp order."""
        where, params = _time_range("e.timestamp", since, until)
        if types is not None:
            wanted = list(dict.fromkeys(types))
            unknown = [t for t in wanted if t not in EVENT_TYPES]
            if unknown:
                raise ValueError(f"unknown event type(s) {unknown}; known: {', '.join(EVENT_TYPES)}")
            if not wanted:
                return
            where.append(f"e.type IN ({','.join('?' * len(wanted))})")
            params += wanted
        cursor_key: tuple[float, int] | None = None
        while True:
            clauses = list(where)
            page_params = list(params)
            if cursor_key is not None:
                clauses.append("(e.timestamp, e.seq) > (?, ?)")
                page_params += cursor_key
            sql = _EVENT_SELECT
            if clauses:
                sql += " WHERE " + " AND ".join(clauses)
            sql += f" ORDER BY e.timestamp, e.seq LIMIT {_PAGE_ROWS}"
            with self._read() as connection:
                rows = connection.execute(sql, page_params).fetchall()
            for row in rows:
                yield Event(*row[1:])
            if len(rows) < _PAGE_ROWS:
                return
            cursor_key = (rows[-1][5], rows[-1][0])

    def iter_events_after(self, seq: int, limit: int | None = None,
                          received_before: float | None = None) -> Iterator[tuple[int, Event]]:
        """(seq, event) for events with seq > `seq`, in seq (append) order, at most `limit`;
        with `received_before`, only events the store received before that time (what a service
        could have known then: point-in-time reads for training rows).

        For incremental consumers that keep a watermark: writes are serialised and seq is given
        inside the write transaction, so a committed seq is never followed by a smaller one."""
        last = int(seq)
        remaining = limit
        select = _EVENT_SELECT.replace("SELECT e.seq,", "SELECT e.received_at, e.seq,")
        while remaining is None or remaining > 0:
            page = _PAGE_ROWS if remaining is None else min(_PAGE_ROWS, remaining)
            with self._read() as connection:
                rows = [row for row in connection.execute(
                    f"{select} WHERE e.seq > ? ORDER BY e.seq LIMIT ?", (last, page)
                ).fetchall()]
            for received_at, *row in rows:
                if received_before is not None and received_at >= received_before:
                    return  # seq order is receipt order: everything after was received later
                yield row[0], Event(*row[1:])
            if len(rows) < page:
                return
            last = rows[-1][1]
            if remaining is not None:
                remaining -= len(rows)

    def last_event_seq(self) -> int:
        """The newest event's seq (0 when none): how far incremental consumers have to go."""
        with self._read() as connection:
            return int(connection.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])

    def count_events(self) -> dict[str, int]:
        """Stored events per type; every known type is present, zero when none."""
        counts = dict.fromkeys(EVENT_TYPES, 0)
        with self._read() as connection:
            for event_type, count in connection.execute("SELECT type, COUNT(*) FROM events GROUP BY type"):
                counts[event_type] = count
        return counts


# ---- validation ------------------------------------------------------------------------------


def _request_problems(record: ServedRequest) -> list[str]:
    problems: list[str] = []
    _check_id(problems, "request_id", record.request_id, MAX_ID_LENGTH)
    _check_time(problems, "timestamp", record.timestamp)
    if not isinstance(record.query, str):
        problems.append(f"query: must be a string, got {type(record.query).__name__}")
    elif len(record.query) > MAX_QUERY_CHARS:
        problems.append(f"query: {len(record.query)} characters, the limit is {MAX_QUERY_CHARS} (MAX_QUERY_CHARS)")
    for name in ("pipeline", "index_name", "index_generation"):
        _check_id(problems, name, getattr(record, name), MAX_ID_LENGTH)
    for name in ("model_version", "user_id", "session_id"):
        if getattr(record, name) is not None:
            _check_id(problems, name, getattr(record, name), MAX_ID_LENGTH)
    for name in ("explored", "interleaved"):
        if getattr(record, name) is not None and not isinstance(getattr(record, name), bool):
            problems.append(f"{name}: must be true, false or None, got {getattr(record, name)!r}")
    offset = record.page_offset
    if not _is_int(offset) or offset < 0:
        problems.append(f"page_offset: must be an integer >= 0, got {offset!r}")
        offset = None
    results = record.results
    if not isinstance(results, (list, tuple)):
        problems.append(f"results: must be a list of ServedResult, got {type(results).__name__}")
        return problems
    if len(results) > MAX_RESULTS_PER_REQUEST:
        problems.append(
            f"results: {len(results)} results, the limit is {MAX_RESULTS_PER_REQUEST} (MAX_RESULTS_PER_REQUEST)"
        )
        return problems
    first_position: dict[str, int] = {}
    for i, result in enumerate(results):
        where = f"results[{i}]"
        if not isinstance(result, ServedResult):
            problems.append(f"{where}: must be a ServedResult, got {type(result).__name__}")
            continue
        if _check_id(problems, f"{where}.doc_id", result.doc_id, MAX_DOC_ID_LENGTH):
            if result.doc_id in first_position:
                problems.append(
                    f"{where}.doc_id: {result.doc_id!r} is also at position {first_position[result.doc_id]}"
                )
            else:
                first_position[result.doc_id] = result.position
        if offset is not None and (not _is_int(result.position) or result.position != offset + i + 1):
            # A page is contiguous: result i of a page at offset k is shown at position k + i + 1.
            problems.append(
                f"{where}.position: expected {offset + i + 1} (page_offset {offset} + index {i} + 1), "
                f"got {result.position!r}"
            )
        if not _is_number(result.score) or not math.isfinite(result.score):
            problems.append(f"{where}.score: must be a finite number, got {result.score!r}")
        if not _is_number(result.propensity) or not 0.0 < result.propensity <= 1.0:
            problems.append(f"{where}.propensity: must be in (0, 1], got {result.propensity!r}")
        _check_features(problems, f"{where}.features", result.features)
    return problems


def _check_features(problems: list[str], where: str, features: Any) -> None:
    if features is None:
        return
    if not isinstance(features, dict):
        problems.append(f"{where}: must be a dict of name -> number or None, got {type(features).__name__}")
        return
    if len(features) > MAX_FEATURES_PER_RESULT:
        problems.append(
            f"{where}: {len(features)} features, the limit is {MAX_FEATURES_PER_RESULT} (MAX_FEATURES_PER_RESULT)"
        )
        return
    for name, value in features.items():
        if not isinstance(name, str) or not name:
            problems.append(f"{where}: feature names must be non-empty strings, got {name!r}")
        elif len(name) > MAX_FIELD_NAME_LENGTH:
            problems.append(
                f"{where}[{name[:20]!r}...]: name has {len(name)} characters, the limit is "
                f"{MAX_FIELD_NAME_LENGTH} (MAX_FIELD_NAME_LENGTH)"
            )
        elif not _is_number(value) or math.isinf(value):
            problems.append(f"{where}[{name!r}]: must be a finite number or NaN (missing), got {value!r}")


def _event_problems(index: int, event: Any) -> list[str]:
    """Checks that need no database: types, ids, finiteness, dwell rules, the future bound."""
    where = f"events[{index}]"
    if not isinstance(event, Event):
        return [f"{where}: must be an Event, got {type(event).__name__}"]
    problems: list[str] = []
    _check_id(problems, f"{where}.request_id", event.request_id, MAX_ID_LENGTH)
    if event.event_id is not None:
        _check_id(problems, f"{where}.event_id", event.event_id, MAX_ID_LENGTH)
    if event.type not in EVENT_TYPES:
        problems.append(f"{where}.type: unknown event type {event.type!r}; known: {', '.join(EVENT_TYPES)}")
    _check_id(problems, f"{where}.doc_id", event.doc_id, MAX_DOC_ID_LENGTH)
    if not _is_int(event.position) or event.position < 1:
        problems.append(f"{where}.position: must be an integer >= 1, got {event.position!r}")
    if _check_time(problems, f"{where}.timestamp", event.timestamp):
        now = time.time()
        if event.timestamp > now + CLOCK_SKEW_ALLOWANCE_S:
            problems.append(
                f"{where}.timestamp: {event.timestamp!r} is {event.timestamp - now:.1f} s in the future "
                f"(allowance {CLOCK_SKEW_ALLOWANCE_S:g} s)"
            )
    if event.type == "dwell":
        if event.dwell_ms is None:
            problems.append(f"{where}.dwell_ms: required for dwell events")
        elif not _is_number(event.dwell_ms) or not 0.0 <= event.dwell_ms <= MAX_DWELL_MS:
            problems.append(
                f"{where}.dwell_ms: must be a number in [0, {MAX_DWELL_MS:g}] (MAX_DWELL_MS), got {event.dwell_ms!r}"
            )
    elif event.dwell_ms is not None and event.type in EVENT_TYPES:
        problems.append(f"{where}.dwell_ms: only dwell events carry dwell_ms, got {event.dwell_ms!r} on a {event.type}")
    return problems


def _check_against_requests(
    connection: sqlite3.Connection, events: list[Event], problems: dict[int, list[str]]
) -> dict[str, int]:
    """Request exists, position was shown, doc matches, time not before the page; returns id -> seq.
    One query per distinct request, one per request for the positions the batch names."""
    checkable = [
        (index, event) for index, event in enumerate(events)
        if isinstance(event, Event)
        and isinstance(event.request_id, str)
        and 0 < len(event.request_id) <= MAX_ID_LENGTH
        and _is_int(event.position)
        and event.position >= 1
    ]  # the others are already reported: the lookups need a well-formed request id and position
    requests: dict[str, tuple[int, float, int, int] | None] = {}
    wanted: dict[str, set[int]] = {}
    for _, event in checkable:
        if event.request_id not in requests:
            requests[event.request_id] = connection.execute(
                "SELECT seq, timestamp, page_offset, n_results FROM requests WHERE request_id = ?",
                (event.request_id,),
            ).fetchone()
        request = requests[event.request_id]
        if request is not None and request[2] < event.position <= request[2] + request[3]:
            wanted.setdefault(event.request_id, set()).add(event.position)
    shown: dict[tuple[str, int], str] = {}
    for request_id, positions in wanted.items():
        ordered = sorted(positions)
        for position, doc_id in connection.execute(
            f"SELECT position, doc_id FROM request_results WHERE request_seq = ? "
            f"AND position IN ({','.join('?' * len(ordered))})",
            (requests[request_id][0], *ordered),
        ):
            shown[request_id, position] = doc_id

    for index, event in checkable:
        where = f"events[{index}]"
        request = requests[event.request_id]
        found: list[str] = []
        if request is None:
            found.append(f"{where}.request_id: request {event.request_id!r} is not in the request log")
        else:
            _, served_at, offset, n_results = request
            if (event.request_id, event.position) not in shown:
                span = f"positions {offset + 1}-{offset + n_results}" if n_results else "no positions"
                found.append(
                    f"{where}.position: request {event.request_id!r} showed {n_results} results at {span}, "
                    f"position {event.position} is out of range"
                )
            elif isinstance(event.doc_id, str) and shown[event.request_id, event.position] != event.doc_id:
                found.append(
                    f"{where}.doc_id: request {event.request_id!r} showed {shown[event.request_id, event.position]!r} "
                    f"at position {event.position}, not {event.doc_id!r}"
                )
            if _is_number(event.timestamp) and event.timestamp < served_at - CLOCK_SKEW_ALLOWANCE_S:
                found.append(
                    f"{where}.timestamp: {event.timestamp!r} is {served_at - event.timestamp:.3f} s before request "
                    f"{event.request_id!r} was served at {served_at!r} (allowance {CLOCK_SKEW_ALLOWANCE_S:g} s)"
                )
        if found:
            problems.setdefault(index, []).extend(found)
    return {request_id: row[0] for request_id, row in requests.items() if row is not None}


def _new_event_rows(
    connection: sqlite3.Connection, events: list[Event], request_seqs: dict[str, int], received_at: float
) -> tuple[list[tuple[Any, ...]], int]:
    """Rows to insert, skipping event ids already stored or repeated in the batch. Runs inside the
    write transaction so the duplicate check and the insert see the same state. A re-sent id with
    different content is a client bug and refuses the batch."""
    ids = [e.event_id for e in events if e.event_id is not None]
    stored: dict[str, Event] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        for row in connection.execute(
            f"{_EVENT_SELECT} WHERE e.event_id IN ({','.join('?' * len(chunk))})", chunk
        ):
            stored[row[7]] = Event(*row[1:])
    rows: list[tuple[Any, ...]] = []
    duplicates = 0
    conflicts: list[str] = []
    for index, event in enumerate(events):
        normalised = _normalised(event)
        if event.event_id is not None:
            previous = stored.get(event.event_id)
            if previous is not None:
                if _identity(previous) != _identity(normalised):
                    conflicts.append(
                        f"events[{index}].event_id: {event.event_id!r} was already stored for a different event "
                        f"({_describe(previous)})"
                    )
                duplicates += 1
                continue
            stored[event.event_id] = normalised
        rows.append((
            event.event_id, request_seqs[event.request_id], event.position, event.type, event.doc_id,
            float(event.timestamp), None if event.dwell_ms is None else float(event.dwell_ms), received_at,
        ))
    if conflicts:
        raise EventValidationError("event batch", conflicts)
    return rows, duplicates


def _normalised(event: Event) -> Event:
    """The event as it reads back from the store (ints stored as REAL come back as floats)."""
    return Event(
        event.request_id, event.type, event.doc_id, event.position, float(event.timestamp),
        None if event.dwell_ms is None else float(event.dwell_ms), event.event_id,
    )


def _identity(event: Event) -> tuple[Any, ...]:
    """What makes a re-sent event the same event: everything but the timestamp, because a retry
    is restamped when the service fills in the time of receipt (the first stored time wins)."""
    return (event.request_id, event.type, event.doc_id, event.position, event.dwell_ms, event.event_id)


def _describe(event: Event) -> str:
    return (f"{event.type} of {event.doc_id!r} at position {event.position} of request {event.request_id!r} "
            f"at {event.timestamp!r}")


def _check_id(problems: list[str], where: str, value: Any, limit: int) -> bool:
    if not isinstance(value, str):
        problems.append(f"{where}: must be a string, got {type(value).__name__}")
        return False
    if not value.strip():
        problems.append(f"{where}: must not be empty")
        return False
    if len(value) > limit:
        problems.append(f"{where}: {len(value)} characters, the limit is {limit}")
        return False
    return True


def _check_time(problems: list[str], where: str, value: Any) -> bool:
    if not _is_number(value) or not math.isfinite(value):
        problems.append(f"{where}: must be a finite number of seconds since the epoch, got {value!r}")
        return False
    return True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---- rows <-> dataclasses --------------------------------------------------------------------


def _features_to_json(features: dict[str, float] | None) -> str | None:
    if features is None:
        return None
    # NaN (a missing feature for XGBoost) is written as null so the column stays standard JSON.
    return json.dumps(
        {name: (None if math.isnan(value) else float(value)) for name, value in features.items()},
        separators=(",", ":"),
        allow_nan=False,
    )


def _features_from_json(text: str | None) -> dict[str, float] | None:
    if text is None:
        return None
    return {name: (math.nan if value is None else value) for name, value in json.loads(text).items()}


def _requests_with_results(connection: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[ServedRequest]:
    if not rows:
        return []
    seqs = [row[0] for row in rows]
    results: dict[int, list[ServedResult]] = {seq: [] for seq in seqs}
    for seq, position, doc_id, score, propensity, features in connection.execute(
        "SELECT request_seq, position, doc_id, score, propensity, features FROM request_results "
        f"WHERE request_seq IN ({','.join('?' * len(seqs))}) ORDER BY request_seq, position",
        seqs,
    ):
        results[seq].append(ServedResult(doc_id, position, score, propensity, _features_from_json(features)))
    return [
        ServedRequest(*row[1:11], results=results[row[0]], explored=None if row[11] is None else bool(row[11]),
                      interleaved=None if row[12] is None else bool(row[12]))
        for row in rows
    ]


def _time_range(column: str, since: float | None, until: float | None) -> tuple[list[str], list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if since is not None:
        clauses.append(f"{column} >= ?")
        params.append(float(since))
    if until is not None:
        clauses.append(f"{column} < ?")
        params.append(float(until))
    return clauses, params


# ---- schema migration ------------------------------------------------------------------------


def explored_from_propensities(propensities: Sequence[float]) -> bool:
    """Whether exploration moved a result onto a page, from its logged propensities.

    Both exploration modes (`search.rules.explore` / `shuffle_page`) log 1 or the "stay"
    probability (>= 1 - epsilon) for a result left in place and a small "moved" probability
    (epsilon / n or less) for one they moved, so an explored page holds two distinct values below
    1, or a value below 1/2 (every result moved). Exact for epsilon < 1/2, the useful range."""
    below = {round(float(p), 12) for p in propensities if p < 1.0}
    return len(below) >= 2 or any(p < 0.5 for p in below)


def migrate(path: Path) -> bool:
    """Bring a version-1 event store to the current schema in place, in one transaction (a crash
    or `kill -9` leaves it at version 1, untouched); True when it migrated. Files that are not
    version-1 event stores are left to `SqliteDatabase` to accept or refuse."""
    if not path.is_file():
        return False
    connection = connect(path, _FILE)
    try:
        with path_lock(path):
            marks = connection.execute("PRAGMA application_id").fetchone()[0], connection.execute("PRAGMA user_version").fetchone()[0]
            if marks != (APPLICATION_ID, 1):
                return False
            with transaction(connection):
                if connection.execute("PRAGMA user_version").fetchone()[0] != 1:  # another process migrated it
                    return False
                _migrate_1_to_2(connection)
                connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return True
    except sqlite3.DatabaseError as exc:
        raise EventStoreError(f"{path}: cannot migrate the event store to schema version {SCHEMA_VERSION}: {exc}") from exc
    finally:
        connection.close()


def _migrate_1_to_2(connection: sqlite3.Connection) -> None:
    """Add the request flags; `explored` inferred from propensities, `interleaved` 0 off `ltr`."""
    connection.execute("ALTER TABLE requests ADD COLUMN explored INTEGER CHECK (explored IN (0, 1))")
    connection.execute("ALTER TABLE requests ADD COLUMN interleaved INTEGER CHECK (interleaved IN (0, 1))")
    connection.execute("UPDATE requests SET interleaved = 0 WHERE pipeline != 'ltr'")
    moved: list[tuple[int]] = []
    current, values = None, []
    for seq, propensity in connection.execute("SELECT request_seq, propensity FROM request_results ORDER BY request_seq"):
        if seq != current:
            if current is not None and explored_from_propensities(values):
                moved.append((current,))
            current, values = seq, []
        values.append(propensity)
    if current is not None and explored_from_propensities(values):
        moved.append((current,))
    connection.execute("UPDATE requests SET explored = 0")
    connection.executemany("UPDATE requests SET explored = 1 WHERE seq = ?", moved)
