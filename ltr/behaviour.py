"""Behaviour aggregates derived from the event store, and position-bias (PBM) propensities.

The event store is the source of truth: events are append-only and never pruned here. Everything
in the behaviour store is *derived* (per (normalised query, doc) and per doc counts, global
totals, fitted propensities), so it can be dropped and rebuilt from the events at any time
(`rebuild`). Recency is handled by time decay (half-life `DECAY_HALF_LIFE_S`), not by deleting
old events; that is the retention policy of the aggregates.

Incremental updates: a watermark holds the last event `seq` applied. `update` reads only events
after it, applies them in seq order and writes the aggregates and the new watermark in ONE
transaction (SQLite WAL, synchronous=FULL), so a crash leaves both as they were. Events are
applied one by one in seq order whatever the batching, so incremental updates and a rebuild give
bit-identical floats.

Impression rule: per request we keep the set of positions counted as impressed. An impression
event counts its position once; a click at position d counts every served result at positions
<= d (the user scanned down to it), which covers clients that send clicks but no impressions.
A position already counted is never counted twice, so the result does not depend on the order
in which impressions and clicks arrive. Dwell events are not aggregated (yet); they only move the
watermark.

Last click: the chronologically last click of a request (event timestamp, then seq) holds the
request's last-click credit; a later click moves it.

Expected examinations: each counted impression adds the examination propensity of its position
as fitted at the time it is applied (1.0 for every position before any fit, so COEC = CTR).
After a refit, `rebuild` recomputes them with the new propensities.
"""
from __future__ import annotations

import json
import re
import sqlite3
import time
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from indexing.home import behaviour_store_path
from indexing.sqlite import SqliteDatabase, SqliteSchema, SqliteStoreError
from search.event_store import EventStore, ServedRequest

DECAY_HALF_LIFE_S = 30 * 86_400.0  # decayed counts halve every 30 days
PRIOR_STRENGTH = 10.0  # `a` in (clicks + a * prior) / (impressions + a): pseudo-impressions of the prior
SCHEMA_VERSION = 1
APPLICATION_ID = 0x4C545242  # "LTRB" in PRAGMA application_id: marks the file as a behaviour store
_WHITESPACE = re.compile(r"\s+")
_LOOKUP_CHUNK = 500  # doc ids per `IN (...)` lookup, under SQLite's host-parameter limit


class BehaviourStoreError(SqliteStoreError):
    """The behaviour store cannot be opened or used: names the file and the reason."""


def normalise_query(text: str) -> str:
    """The one query key for behaviour: Unicode NFKC, lowercase, whitespace runs collapsed to one
    space, stripped. Deliberately lighter than the analyzer (no stemming or stop words): two
    queries share aggregates only when a user would call them the same text."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


@dataclass
class Aggregate:
    """Counters of one (query, doc) pair or one doc. Decayed values are as of `decay_ref`."""

    impressions: int = 0
    clicks: int = 0
    last_clicks: int = 0
    expected_exams: float = 0.0
    decayed_impressions: float = 0.0
    decayed_clicks: float = 0.0
    decay_ref: float | None = None
    first_seen: float | None = None
    last_seen: float | None = None

    def add(self, timestamp: float, impressions: int = 0, clicks: int = 0, exam: float = 0.0) -> None:
        if self.decay_ref is None or timestamp > self.decay_ref:
            if self.decay_ref is not None:
                factor = 0.5 ** ((timestamp - self.decay_ref) / DECAY_HALF_LIFE_S)
                self.decayed_impressions *= factor
                self.decayed_clicks *= factor
            self.decay_ref = timestamp
            weight = 1.0
        else:  # an event older than the reference enters already decayed
            weight = 0.5 ** ((self.decay_ref - timestamp) / DECAY_HALF_LIFE_S)
        self.impressions += impressions
        self.clicks += clicks
        self.expected_exams += exam
        self.decayed_impressions += impressions * weight
        self.decayed_clicks += clicks * weight
        self.first_seen = timestamp if self.first_seen is None else min(self.first_seen, timestamp)
        self.last_seen = timestamp if self.last_seen is None else max(self.last_seen, timestamp)


_AGG_COLUMNS = ("impressions", "clicks", "last_clicks", "expected_exams", "decayed_impressions",
                "decayed_clicks", "decay_ref", "first_seen", "last_seen")
_AGG_SQL = """impressions INTEGER NOT NULL, clicks INTEGER NOT NULL, last_clicks INTEGER NOT NULL,
    expected_exams REAL NOT NULL, decayed_impressions REAL NOT NULL, decayed_clicks REAL NOT NULL,
    decay_ref REAL, first_seen REAL, last_seen REAL"""
_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS pair_stats (query TEXT NOT NULL, doc_id TEXT NOT NULL, {_AGG_SQL},"
    " PRIMARY KEY (query, doc_id)) WITHOUT ROWID",
    f"CREATE TABLE IF NOT EXISTS doc_stats (doc_id TEXT PRIMARY KEY, {_AGG_SQL}) WITHOUT ROWID",
    # per-request state that makes the impression and last-click rules incremental
    "CREATE TABLE IF NOT EXISTS request_state (request_id TEXT PRIMARY KEY, impressed TEXT NOT NULL,"
    " last_click_doc TEXT, last_click_ts REAL, last_click_seq INTEGER) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
)
_TABLES = ("pair_stats", "doc_stats", "request_state", "meta")
# Files written before the store marked them hold only these tables; they are adopted (IF NOT EXISTS).
_FILE = SqliteSchema("behaviour store", APPLICATION_ID, SCHEMA_VERSION, _SCHEMA, error=BehaviourStoreError,
                     synchronous="FULL", adopt_tables=frozenset(_TABLES))
_TOTALS = ("impressions", "clicks", "events_applied", "explored_impressions")


@dataclass(frozen=True)
class UpdateSummary:
    events_applied: int
    impressions_added: int
    clicks_added: int
    explored_impressions: int  # counted impressions of results swapped in by exploration (propensity < 1)
    unknown_requests: int  # events whose request is not in the request log (skipped)
    watermark: int


MIN_RANDOMISED_PAGES = 200  # shuffled pages needed before their click rates replace the EM fit


@dataclass(frozen=True)
class PropensityFit:
    propensities: list[float]  # examination probability per position (index 0 = position 1 = 1.0)
    fitted_at: float
    sessions: int
    clicks: int
    explored_impressions: int
    method: str = "pbm-em"  # or "randomised": click rates per position on shuffled pages
    randomised_pages: int = 0


class BehaviourStore:
    """Aggregates in their own SQLite file; one writer at a time (the update job). Connection,
    WAL, locking and transactions are `indexing.sqlite`'s: the service's request threads (reads)
    and the event handler (updates) share one connection behind the file's lock."""

    def __init__(self, path: Path | str, synchronous: str = "FULL"):
        """`synchronous="NORMAL"`: no fsync per update, for a bulk run that owns the file (the
        in-process simulator); safe because aggregates are derived and catch up from their watermark."""
        self.path = Path(path)
        self._db = SqliteDatabase(self.path, replace(_FILE, synchronous=synchronous))

    @classmethod
    def for_index(cls, home: Path, index: str, synchronous: str = "FULL") -> "BehaviourStore":
        """The aggregates of an index, HOME/behaviour/INDEX.sqlite3 (its folder made on first use)."""
        path = behaviour_store_path(home, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(path, synchronous)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "BehaviourStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- meta ------------------------------------------------------------------------------

    @property
    def watermark(self) -> int:
        with self._db.read() as db:
            return _watermark(db)

    def totals(self) -> dict[str, int]:
        with self._db.read() as db:
            return _totals(db)

    def propensities(self) -> list[float] | None:
        """Fitted examination probability per position (position 1 first), None before a fit."""
        with self._db.read() as db:
            return _meta(db, "propensities")

    def set_propensities(self, propensities: Sequence[float], fitted_at: float | None = None) -> None:
        values = [float(p) for p in propensities]
        if not values or any(not (0.0 < p <= 1.0) for p in values):
            raise ValueError(f"propensities must be a non-empty list in (0, 1], got {values}")
        with self._db.write() as db:
            _set_meta(db, "propensities", values)
            _set_meta(db, "fitted_at", time.time() if fitted_at is None else float(fitted_at))

    # ---- updates ---------------------------------------------------------------------------

    def update(self, event_store: EventStore, limit: int | None = None,
               received_before: float | None = None) -> UpdateSummary:
        """Apply the events after the watermark (at most `limit`; with `received_before`, only
        those the event store received before that time) in one transaction."""
        with self._db.write() as db:
            return _apply(db, event_store, limit, received_before)

    def rebuild(self, event_store: EventStore) -> UpdateSummary:
        """Drop every aggregate (keeping fitted propensities) and re-apply all events."""
        with self._db.write() as db:
            keep = {key: _meta(db, key) for key in ("propensities", "fitted_at")}
            for table in _TABLES:
                db.execute(f"DELETE FROM {table}")
            for key, value in keep.items():
                if value is not None:
                    _set_meta(db, key, value)
            return _apply(db, event_store, None)

    # ---- reads -----------------------------------------------------------------------------

    def prior_ctr(self) -> float:
        """Global clicks / impressions: the Beta prior's mean (0.0 before any impression)."""
        with self._db.read() as db:
            return _prior_ctr(db)

    def query_doc_stats(self, query: str, doc_ids: Sequence[str], now: float | None = None) -> dict[str, np.ndarray]:
        """Aligned arrays for the (normalised query, doc) pairs; see `_stats`."""
        with self._db.read() as db:
            rows = _lookup(db, "pair_stats", "query = ? AND ", (normalise_query(query),), doc_ids)
            return _stats(rows, doc_ids, now, _prior_ctr(db))

    def doc_stats(self, doc_ids: Sequence[str], now: float | None = None) -> dict[str, np.ndarray]:
        with self._db.read() as db:
            return _stats(_lookup(db, "doc_stats", "", (), doc_ids), doc_ids, now, _prior_ctr(db))

    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every stored row, sorted: for comparing an incremental build with a rebuild."""
        with self._db.read() as db:
            return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall()) for t in _TABLES}

    def status(self) -> dict[str, Any]:
        with self._db.read() as db:
            totals = _totals(db)
            return {
                "pairs": db.execute("SELECT COUNT(*) FROM pair_stats").fetchone()[0],
                "docs": db.execute("SELECT COUNT(*) FROM doc_stats").fetchone()[0],
                "events_applied": totals["events_applied"],
                "impressions": totals["impressions"],
                "clicks": totals["clicks"],
                "explored_impressions": totals["explored_impressions"],
                "watermark": _watermark(db),
                "global_ctr": _prior_ctr(db),
                "propensities": _meta(db, "propensities"),
                "fitted_at": _meta(db, "fitted_at"),
            }


# ---- on one connection (inside the caller's read or write) ---------------------------------------


def _meta(db: sqlite3.Connection, key: str, default: Any = None) -> Any:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return default if row is None else json.loads(row[0])


def _set_meta(db: sqlite3.Connection, key: str, value: Any) -> None:
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))


def _watermark(db: sqlite3.Connection) -> int:
    return int(_meta(db, "watermark", 0))


def _totals(db: sqlite3.Connection) -> dict[str, int]:
    return {name: int(value) for name, value in _meta(db, "totals", dict.fromkeys(_TOTALS, 0)).items()}


def _prior_ctr(db: sqlite3.Connection) -> float:
    totals = _totals(db)
    return totals["clicks"] / totals["impressions"] if totals["impressions"] else 0.0


def _apply(db: sqlite3.Connection, event_store: EventStore, limit: int | None,
           received_before: float | None = None) -> UpdateSummary:
    """Apply events after the watermark inside the caller's write transaction; see the module docstring."""
    watermark = _watermark(db)
    totals = _totals(db)
    exam = _meta(db, "propensities") or [1.0]
    requests: dict[str, ServedRequest | None] = {}
    pairs: dict[tuple[str, str], Aggregate] = {}
    docs: dict[str, Aggregate] = {}
    states: dict[str, list[Any]] = {}
    added = {"events": 0, "impressions": 0, "clicks": 0, "explored": 0, "unknown": 0}

    def pair(query: str, doc_id: str) -> Aggregate:
        if (query, doc_id) not in pairs:
            row = db.execute(f"SELECT {','.join(_AGG_COLUMNS)} FROM pair_stats WHERE query = ? AND doc_id = ?",
                             (query, doc_id)).fetchone()
            pairs[query, doc_id] = Aggregate(*row) if row else Aggregate()
        return pairs[query, doc_id]

    def doc(doc_id: str) -> Aggregate:
        if doc_id not in docs:
            row = db.execute(f"SELECT {','.join(_AGG_COLUMNS)} FROM doc_stats WHERE doc_id = ?",
                             (doc_id,)).fetchone()
            docs[doc_id] = Aggregate(*row) if row else Aggregate()
        return docs[doc_id]

    def state(request_id: str) -> list[Any]:  # [impressed positions, last doc, last ts, last seq]
        if request_id not in states:
            row = db.execute("SELECT impressed, last_click_doc, last_click_ts, last_click_seq FROM request_state"
                             " WHERE request_id = ?", (request_id,)).fetchone()
            states[request_id] = [set(json.loads(row[0])), *row[1:]] if row else [set(), None, None, None]
        return states[request_id]

    def impress(query: str, request: ServedRequest, position: int, doc_id: str, timestamp: float) -> None:
        st = state(request.request_id)
        if position in st[0]:
            return
        st[0].add(position)
        p = exam[min(position, len(exam)) - 1]
        pair(query, doc_id).add(timestamp, impressions=1, exam=p)
        doc(doc_id).add(timestamp, impressions=1, exam=p)
        added["impressions"] += 1
        if any(r.position == position and r.propensity < 1.0 for r in request.results):
            added["explored"] += 1

    for seq, event in event_store.iter_events_after(watermark, limit, received_before):
        watermark = seq
        added["events"] += 1
        if event.request_id not in requests:
            requests[event.request_id] = event_store.get_request(event.request_id)
        request = requests[event.request_id]
        if request is None:
            added["unknown"] += 1
            continue
        query = normalise_query(request.query)
        if event.type == "impression":
            impress(query, request, event.position, event.doc_id, event.timestamp)
        elif event.type == "click":
            for result in request.results:
                if result.position <= event.position:
                    doc_id = event.doc_id if result.position == event.position else result.doc_id
                    impress(query, request, result.position, doc_id, event.timestamp)
            pair(query, event.doc_id).add(event.timestamp, clicks=1)
            doc(event.doc_id).add(event.timestamp, clicks=1)
            added["clicks"] += 1
            st = state(event.request_id)
            if st[1] is None or (event.timestamp, seq) > (st[2], st[3]):
                if st[1] is not None:
                    pair(query, st[1]).last_clicks -= 1
                    doc(st[1]).last_clicks -= 1
                pair(query, event.doc_id).last_clicks += 1
                doc(event.doc_id).last_clicks += 1
                st[1:] = [event.doc_id, event.timestamp, seq]

    _write_pairs(db, pairs)
    _write_docs(db, docs)
    db.executemany(
        "INSERT OR REPLACE INTO request_state VALUES (?,?,?,?,?)",
        [(rid, json.dumps(sorted(st[0])), *st[1:]) for rid, st in states.items()],
    )
    totals["impressions"] += added["impressions"]
    totals["clicks"] += added["clicks"]
    totals["events_applied"] += added["events"]
    totals["explored_impressions"] += added["explored"]
    _set_meta(db, "totals", totals)
    _set_meta(db, "watermark", watermark)
    return UpdateSummary(added["events"], added["impressions"], added["clicks"], added["explored"],
                         added["unknown"], watermark)


def _write_pairs(db: sqlite3.Connection, pairs: dict[tuple[str, str], Aggregate]) -> None:
    db.executemany(
        f"INSERT OR REPLACE INTO pair_stats VALUES ({','.join('?' * (2 + len(_AGG_COLUMNS)))})",
        [(q, d, *_values(agg)) for (q, d), agg in pairs.items()],
    )


def _write_docs(db: sqlite3.Connection, docs: dict[str, Aggregate]) -> None:
    db.executemany(
        f"INSERT OR REPLACE INTO doc_stats VALUES ({','.join('?' * (1 + len(_AGG_COLUMNS)))})",
        [(d, *_values(agg)) for d, agg in docs.items()],
    )


def _lookup(db: sqlite3.Connection, table: str, where: str, params: tuple[Any, ...], doc_ids: Sequence[str]) -> dict[str, Aggregate]:
    """Stored aggregates of the given docs, a few hundred per query (a window is one or two)."""
    unique = list(dict.fromkeys(doc_ids))
    rows: dict[str, Aggregate] = {}
    for start in range(0, len(unique), _LOOKUP_CHUNK):
        chunk = unique[start:start + _LOOKUP_CHUNK]
        for doc_id, *values in db.execute(
            f"SELECT doc_id, {','.join(_AGG_COLUMNS)} FROM {table} WHERE {where}doc_id IN ({','.join('?' * len(chunk))})",
            (*params, *chunk),
        ):
            rows[doc_id] = Aggregate(*values)
    return rows


def _stats(rows: dict[str, Aggregate], doc_ids: Sequence[str], now: float | None, prior: float) -> dict[str, np.ndarray]:
    """impressions, clicks, ctr (smoothed towards the prior with PRIOR_STRENGTH), coec (NaN
    without impressions), last_click_share (of clicks; NaN without clicks), decayed
    impressions and clicks as of `now` (default: the current time). Unknown docs: zeros,
    ctr = prior."""
    now = time.time() if now is None else float(now)
    empty = Aggregate()
    aggs = [rows.get(d, empty) for d in doc_ids]
    imp = np.array([a.impressions for a in aggs], dtype=np.float64)
    clk = np.array([a.clicks for a in aggs], dtype=np.float64)
    last = np.array([a.last_clicks for a in aggs], dtype=np.float64)
    exp = np.array([a.expected_exams for a in aggs], dtype=np.float64)
    decay = np.array([0.0 if a.decay_ref is None else 0.5 ** ((now - a.decay_ref) / DECAY_HALF_LIFE_S) for a in aggs])
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "impressions": imp,
            "clicks": clk,
            "expected_exams": exp,
            "ctr": (clk + PRIOR_STRENGTH * prior) / (imp + PRIOR_STRENGTH),
            "coec": np.where(exp > 0, clk / exp, np.nan),
            "last_click_share": np.where(clk > 0, last / clk, np.nan),
            "decayed_impressions": np.array([a.decayed_impressions for a in aggs]) * decay,
            "decayed_clicks": np.array([a.decayed_clicks for a in aggs]) * decay,
        }


def _values(agg: Aggregate) -> tuple[Any, ...]:
    return tuple(getattr(agg, name) for name in _AGG_COLUMNS)
