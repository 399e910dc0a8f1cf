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

import functools
import json
import re
import sqlite3
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from search.event_store import EventStore, ServedRequest

DECAY_HALF_LIFE_S = 30 * 86_400.0  # decayed counts halve every 30 days
PRIOR_STRENGTH = 10.0  # `a` in (clicks + a * prior) / (impressions + a): pseudo-impressions of the prior
SCHEMA_VERSION = 1
_WHITESPACE = re.compile(r"\s+")
_LOOKUP_CHUNK = 500  # doc ids per `IN (...)` lookup, under SQLite's host-parameter limit
_Method = TypeVar("_Method", bound=Callable[..., Any])


def _locked(method: _Method) -> _Method:
    """One connection is shared by the service's request threads (reads) and the event handler
    (updates): a transaction must not interleave with another thread's statements on it."""

    @functools.wraps(method)
    def wrapper(self: "BehaviourStore", *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


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
    """Aggregates in their own SQLite file; one writer at a time (the update job)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        for statement in _SCHEMA:
            self._db.execute(statement)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "BehaviourStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- meta ------------------------------------------------------------------------------

    def _meta(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def _set_meta(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    @property
    def watermark(self) -> int:
        return int(self._meta("watermark", 0))

    @_locked
    def totals(self) -> dict[str, int]:
        return {name: int(value) for name, value in self._meta("totals", dict.fromkeys(_TOTALS, 0)).items()}

    @_locked
    def propensities(self) -> list[float] | None:
        """Fitted examination probability per position (position 1 first), None before a fit."""
        return self._meta("propensities")

    @_locked
    def set_propensities(self, propensities: Sequence[float], fitted_at: float | None = None) -> None:
        values = [float(p) for p in propensities]
        if not values or any(not (0.0 < p <= 1.0) for p in values):
            raise ValueError(f"propensities must be a non-empty list in (0, 1], got {values}")
        with self._transaction():
            self._set_meta("propensities", values)
            self._set_meta("fitted_at", time.time() if fitted_at is None else float(fitted_at))

    # ---- updates ---------------------------------------------------------------------------

    def _transaction(self) -> "_Transaction":
        return _Transaction(self._db)

    @_locked
    def update(self, event_store: EventStore, limit: int | None = None,
               received_before: float | None = None) -> UpdateSummary:
        """Apply the events after the watermark (at most `limit`; with `received_before`, only
        those the event store received before that time) in one transaction."""
        with self._transaction():
            return self._apply(event_store, limit, received_before)

    @_locked
    def rebuild(self, event_store: EventStore) -> UpdateSummary:
        """Drop every aggregate (keeping fitted propensities) and re-apply all events."""
        with self._transaction():
            keep = {key: self._meta(key) for key in ("propensities", "fitted_at")}
            for table in _TABLES:
                self._db.execute(f"DELETE FROM {table}")
            for key, value in keep.items():
                if value is not None:
                    self._set_meta(key, value)
            return self._apply(event_store, None)

    def _apply(self, event_store: EventStore, limit: int | None, received_before: float | None = None) -> UpdateSummary:
        watermark = self.watermark
        totals = self.totals()
        exam = self.propensities() or [1.0]
        requests: dict[str, ServedRequest | None] = {}
        pairs: dict[tuple[str, str], Aggregate] = {}
        docs: dict[str, Aggregate] = {}
        states: dict[str, list[Any]] = {}
        added = {"events": 0, "impressions": 0, "clicks": 0, "explored": 0, "unknown": 0}

        def pair(query: str, doc_id: str) -> Aggregate:
            if (query, doc_id) not in pairs:
                row = self._db.execute(f"SELECT {','.join(_AGG_COLUMNS)} FROM pair_stats WHERE query = ? AND doc_id = ?",
                                       (query, doc_id)).fetchone()
                pairs[query, doc_id] = Aggregate(*row) if row else Aggregate()
            return pairs[query, doc_id]

        def doc(doc_id: str) -> Aggregate:
            if doc_id not in docs:
                row = self._db.execute(f"SELECT {','.join(_AGG_COLUMNS)} FROM doc_stats WHERE doc_id = ?",
                                       (doc_id,)).fetchone()
                docs[doc_id] = Aggregate(*row) if row else Aggregate()
            return docs[doc_id]

        def state(request_id: str) -> list[Any]:  # [impressed positions, last doc, last ts, last seq]
            if request_id not in states:
                row = self._db.execute("SELECT impressed, last_click_doc, last_click_ts, last_click_seq FROM request_state"
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

        self._write_pairs(pairs)
        self._write_docs(docs)
        self._db.executemany(
            "INSERT OR REPLACE INTO request_state VALUES (?,?,?,?,?)",
            [(rid, json.dumps(sorted(st[0])), *st[1:]) for rid, st in states.items()],
        )
        totals["impressions"] += added["impressions"]
        totals["clicks"] += added["clicks"]
        totals["events_applied"] += added["events"]
        totals["explored_impressions"] += added["explored"]
        self._set_meta("totals", totals)
        self._set_meta("watermark", watermark)
        return UpdateSummary(added["events"], added["impressions"], added["clicks"], added["explored"],
                             added["unknown"], watermark)

    def _write_pairs(self, pairs: dict[tuple[str, str], Aggregate]) -> None:
        self._db.executemany(
            f"INSERT OR REPLACE INTO pair_stats VALUES ({','.join('?' * (2 + len(_AGG_COLUMNS)))})",
            [(q, d, *_values(agg)) for (q, d), agg in pairs.items()],
        )

    def _write_docs(self, docs: dict[str, Aggregate]) -> None:
        self._db.executemany(
            f"INSERT OR REPLACE INTO doc_stats VALUES ({','.join('?' * (1 + len(_AGG_COLUMNS)))})",
            [(d, *_values(agg)) for d, agg in docs.items()],
        )

    # ---- reads -----------------------------------------------------------------------------

    @_locked
    def prior_ctr(self) -> float:
        """Global clicks / impressions: the Beta prior's mean (0.0 before any impression)."""
        totals = self.totals()
        return totals["clicks"] / totals["impressions"] if totals["impressions"] else 0.0

    @_locked
    def query_doc_stats(self, query: str, doc_ids: Sequence[str], now: float | None = None) -> dict[str, np.ndarray]:
        """Aligned arrays for the (normalised query, doc) pairs; see `_stats`."""
        rows = self._lookup("pair_stats", "query = ? AND ", (normalise_query(query),), doc_ids)
        return self._stats(rows, doc_ids, now)

    @_locked
    def doc_stats(self, doc_ids: Sequence[str], now: float | None = None) -> dict[str, np.ndarray]:
        return self._stats(self._lookup("doc_stats", "", (), doc_ids), doc_ids, now)

    def _lookup(self, table: str, where: str, params: tuple[Any, ...], doc_ids: Sequence[str]) -> dict[str, Aggregate]:
        """Stored aggregates of the given docs, a few hundred per query (a window is one or two)."""
        unique = list(dict.fromkeys(doc_ids))
        rows: dict[str, Aggregate] = {}
        for start in range(0, len(unique), _LOOKUP_CHUNK):
            chunk = unique[start:start + _LOOKUP_CHUNK]
            for doc_id, *values in self._db.execute(
                f"SELECT doc_id, {','.join(_AGG_COLUMNS)} FROM {table} WHERE {where}doc_id IN ({','.join('?' * len(chunk))})",
                (*params, *chunk),
            ):
                rows[doc_id] = Aggregate(*values)
        return rows

    def _stats(self, rows: dict[str, Aggregate], doc_ids: Sequence[str], now: float | None) -> dict[str, np.ndarray]:
        """impressions, clicks, ctr (smoothed towards the prior with PRIOR_STRENGTH), coec (NaN
        without impressions), last_click_share (of clicks; NaN without clicks), decayed
        impressions and clicks as of `now` (default: the current time). Unknown docs: zeros,
        ctr = prior."""
        now = time.time() if now is None else float(now)
        prior = self.prior_ctr()
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
                "ctr": (clk + PRIOR_STRENGTH * prior) / (imp + PRIOR_STRENGTH),
                "coec": np.where(exp > 0, clk / exp, np.nan),
                "last_click_share": np.where(clk > 0, last / clk, np.nan),
                "decayed_impressions": np.array([a.decayed_impressions for a in aggs]) * decay,
                "decayed_clicks": np.array([a.decayed_clicks for a in aggs]) * decay,
            }

    @_locked
    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every stored row, sorted: for comparing an incremental build with a rebuild."""
        return {t: sorted(self._db.execute(f"SELECT * FROM {t}").fetchall()) for t in _TABLES}

    @_locked
    def status(self) -> dict[str, Any]:
        totals = self.totals()
        return {
            "pairs": self._db.execute("SELECT COUNT(*) FROM pair_stats").fetchone()[0],
            "docs": self._db.execute("SELECT COUNT(*) FROM doc_stats").fetchone()[0],
            "events_applied": totals["events_applied"],
            "impressions": totals["impressions"],
            "clicks": totals["clicks"],
            "explored_impressions": totals["explored_impressions"],
            "watermark": self.watermark,
            "global_ctr": self.prior_ctr(),
            "propensities": self.propensities(),
            "fitted_at": self._meta("fitted_at"),
        }


def _values(agg: Aggregate) -> tuple[Any, ...]:
    return tuple(getattr(agg, name) for name in _AGG_COLUMNS)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (so nothing half-applied stays)."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
