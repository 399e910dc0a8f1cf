"""Online model comparisons: the experiment log, and scoring a served window with another model.

    HOME/experiments/INDEX.sqlite3
        interleaved      one row per team-draft interleaved page: the two models and, per shown
                         position, the document and the team (A = the active model) that put it there
        shadow_rankings  one row per (request, shadow model): the shadow's ranking of the served
                         window's top, next to the served model's ranking of the same window

Its own SQLite file, beside the event store rather than in it, so the event store's schema stays
the request and event log. Same durability: WAL with `synchronous=FULL`, one write connection
behind a lock (the service writes from its thread pool), a write is on disk when the call returns.

The other model scores the SAME candidate window the served model scored (no second retrieval):
when both read the same feature set the served feature matrix is reused; otherwise the other
model's features are computed for that window through `ltr.features.extract_features`, the one
feature path, which needs the window's candidates on the `ScoredWindow`.
"""
from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    from ltr.ranker import LtrPipeline, ScoredWindow

SCHEMA_VERSION = 1
APPLICATION_ID = 0x4C545258  # "LTRX": marks the file as an experiment log
BUSY_TIMEOUT_MS = 10_000
SHADOW_TOP = 20  # documents of each ranking kept per shadow row

_SCHEMA: tuple[str, ...] = (
    """
    CREATE TABLE interleaved (
        seq         INTEGER PRIMARY KEY,
        request_id  TEXT NOT NULL UNIQUE,
        timestamp   REAL NOT NULL,
        model_a     TEXT NOT NULL,  -- the active model (team A)
        model_b     TEXT NOT NULL,  -- the challenger (team B)
        page_offset INTEGER NOT NULL CHECK (page_offset >= 0),
        teams       TEXT NOT NULL   -- JSON [{"position": 1, "doc_id": "d", "team": "A"}, ...], shown positions
    )
    """,
    "CREATE INDEX interleaved_by_time ON interleaved (timestamp, seq)",
    """
    CREATE TABLE shadow_rankings (
        seq            INTEGER PRIMARY KEY,
        request_id     TEXT NOT NULL,
        timestamp      REAL NOT NULL,
        model_version  TEXT NOT NULL,  -- the shadow model
        ranking        TEXT NOT NULL,  -- JSON [[doc_id, score], ...], the shadow's top of the window
        served_model   TEXT,           -- the model that ranked the served window
        served_ranking TEXT NOT NULL,  -- JSON [[doc_id, score], ...], its top of the same window
        UNIQUE (request_id, model_version)
    )
    """,
    "CREATE INDEX shadow_by_time ON shadow_rankings (timestamp, seq)",
)


class ExperimentLogError(RuntimeError):
    """The experiment log cannot be opened or used: names the file and the reason."""


class ExperimentScoringError(ValueError):
    """Another model cannot score a served window (e.g. its features need the window's candidates)."""


@dataclass(frozen=True)
class TeamPick:
    position: int  # absolute, 1-based, as on the page and in click events
    doc_id: str
    team: str  # "A" (model_a) or "B" (model_b)


@dataclass(frozen=True)
class InterleavedRequest:
    request_id: str
    timestamp: float
    model_a: str
    model_b: str
    page_offset: int
    teams: tuple[TeamPick, ...]

    def pick_at(self, position: int) -> TeamPick | None:
        index = position - self.page_offset - 1
        if 0 <= index < len(self.teams) and self.teams[index].position == position:
            return self.teams[index]
        return next((pick for pick in self.teams if pick.position == position), None)


@dataclass(frozen=True)
class ShadowRanking:
    request_id: str
    timestamp: float
    model_version: str
    ranking: tuple[tuple[str, float], ...]  # the shadow's top documents, best first
    served_model: str | None
    served_ranking: tuple[tuple[str, float], ...]  # the served model's top of the same window


class ExperimentLog:
    """Interleaved pages and shadow rankings in one SQLite file; safe to share between threads."""

    def __init__(self, path: Path | str, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise ExperimentLogError(f"{self.path}: no experiment log (the service writes one when [experiments] is set)")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                               timeout=BUSY_TIMEOUT_MS / 1000)
        except sqlite3.Error as exc:
            raise ExperimentLogError(f"{self.path}: cannot open experiment log: {exc}") from exc
        try:
            self._prepare()
        except BaseException:
            self._connection.close()
            raise

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._connection.close()

    def __enter__(self) -> "ExperimentLog":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- writes ----------------------------------------------------------------------------

    def log_interleaved(self, record: InterleavedRequest) -> None:
        teams = [dataclasses.asdict(pick) for pick in record.teams]
        if any(pick["team"] not in ("A", "B") for pick in teams):
            raise ValueError(f"{record.request_id}: teams must be 'A' or 'B'")
        with self._write() as connection:
            connection.execute(
                "INSERT INTO interleaved (request_id, timestamp, model_a, model_b, page_offset, teams) VALUES (?, ?, ?, ?, ?, ?)",
                (record.request_id, float(record.timestamp), record.model_a, record.model_b, int(record.page_offset),
                 json.dumps(teams)),
            )

    def log_shadow(self, record: ShadowRanking) -> None:
        with self._write() as connection:
            connection.execute(
                "INSERT INTO shadow_rankings (request_id, timestamp, model_version, ranking, served_model, served_ranking) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (record.request_id, float(record.timestamp), record.model_version, _ranking_json(record.ranking),
                 record.served_model, _ranking_json(record.served_ranking)),
            )

    # ---- reads -----------------------------------------------------------------------------

    def iter_interleaved(self, since: float | None = None, models: tuple[str, str] | None = None) -> Iterator[InterleavedRequest]:
        """Interleaved pages in time order; with `models`, those of that pair in either order."""
        sql, params = "SELECT request_id, timestamp, model_a, model_b, page_offset, teams FROM interleaved", []
        clauses = []
        if since is not None:
            clauses.append("timestamp >= ?")
            params.append(float(since))
        if models is not None:
            clauses.append("((model_a = ? AND model_b = ?) OR (model_a = ? AND model_b = ?))")
            params += [models[0], models[1], models[1], models[0]]
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        for request_id, timestamp, model_a, model_b, offset, teams in self._select(sql + " ORDER BY timestamp, seq", params):
            picks = tuple(TeamPick(int(p["position"]), str(p["doc_id"]), str(p["team"])) for p in json.loads(teams))
            yield InterleavedRequest(request_id, timestamp, model_a, model_b, offset, picks)

    def iter_shadow(self, since: float | None = None) -> Iterator[ShadowRanking]:
        sql = ("SELECT request_id, timestamp, model_version, ranking, served_model, served_ranking FROM shadow_rankings"
               + (" WHERE timestamp >= ?" if since is not None else "") + " ORDER BY timestamp, seq")
        for request_id, timestamp, version, ranking, served_model, served in self._select(sql, [] if since is None else [since]):
            yield ShadowRanking(request_id, timestamp, version, _ranking_from_json(ranking), served_model,
                                _ranking_from_json(served))

    # ---- connection ------------------------------------------------------------------------

    def _select(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self._lock:
            self._check_open()
            return self._connection.execute(sql, list(params)).fetchall()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._check_open()
            connection = self._connection
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
                connection.execute("COMMIT")  # the WAL is fsynced before this returns (synchronous=FULL)
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise

    def _check_open(self) -> None:
        if self._closed:
            raise ExperimentLogError(f"{self.path}: experiment log is closed")

    def _prepare(self) -> None:
        connection = self._connection
        try:
            connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            connection.execute("PRAGMA synchronous = FULL")
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                tables = connection.execute("SELECT name FROM sqlite_schema WHERE type = 'table'").fetchall()
                if tables:
                    raise ExperimentLogError(f"{self.path}: not an experiment log (it has other tables)")
                mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise ExperimentLogError(f"{self.path}: cannot switch to WAL mode (journal_mode is {mode!r})")
                connection.execute("BEGIN IMMEDIATE")
                try:
                    if connection.execute("PRAGMA user_version").fetchone()[0] == 0:  # no other process won the race
                        for statement in _SCHEMA:
                            connection.execute(statement)
                        connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    connection.execute("COMMIT")
                except BaseException:
                    if connection.in_transaction:
                        connection.execute("ROLLBACK")
                    raise
                version = connection.execute("PRAGMA user_version").fetchone()[0]
            application_id = connection.execute("PRAGMA application_id").fetchone()[0]
            if application_id != APPLICATION_ID:
                raise ExperimentLogError(f"{self.path}: not an experiment log (application_id {application_id:#x})")
            if version != SCHEMA_VERSION:
                raise ExperimentLogError(f"{self.path}: schema version {version}; this code knows {SCHEMA_VERSION}")
            connection.execute("PRAGMA journal_mode = WAL")
        except sqlite3.DatabaseError as exc:
            raise ExperimentLogError(f"{self.path}: cannot open experiment log: {exc}") from exc


def _ranking_json(ranking: Sequence[tuple[str, float]]) -> str:
    return json.dumps([[doc_id, None if score != score else float(score)] for doc_id, score in ranking])


def _ranking_from_json(text: str) -> tuple[tuple[str, float], ...]:
    return tuple((str(doc_id), float("nan") if score is None else float(score)) for doc_id, score in json.loads(text))


# ---------------------------------------------------------------------------------------------
# Scoring the served window with another model


def scoring_problem(served: "LtrPipeline", other: "LtrPipeline") -> str | None:
    """Why `other` cannot score the windows `served` ranks, or None when it can."""
    from ltr.ranker import ScoredWindow

    if getattr(other, "fusion", None) != getattr(served, "fusion", None):
        return "it would rank another candidate window (other fusion settings)"
    if tuple(other.feature_names) != tuple(served.feature_names):
        if "candidates" not in {f.name for f in dataclasses.fields(ScoredWindow)}:
            return (f"it reads feature set {other.features.name}, the active model {served.features.name}; computing "
                    "its features for the served window needs the window's candidates on ScoredWindow")
    return None


def window_features(other: "LtrPipeline", query: str, window: "ScoredWindow") -> np.ndarray:
    """`other`'s feature matrix for the served window, rows aligned with `window.hits`."""
    if tuple(other.feature_names) == tuple(window.feature_names):
        return window.features
    candidates = getattr(window, "candidates", None)  # the window's Candidates, aligned with hits
    if candidates is None:
        raise ExperimentScoringError(f"model {other.version} reads other features than the served model and the "
                                     "served window carries no candidates to compute them from")
    if list(candidates.doc_ids) != [hit.doc_id for hit in window.hits]:
        raise ExperimentScoringError("the served window's candidates are not aligned with its hits")
    from ltr.features import extract_features

    behaviour = other.behaviour_store() if hasattr(other, "behaviour_store") else None  # what `other` itself reads
    return extract_features(other.backend, query, candidates, other.features, behaviour)


def window_scores(other: "LtrPipeline", query: str, window: "ScoredWindow") -> np.ndarray:
    """`other`'s scores for every document of the served window, aligned with `window.hits`."""
    if other.model is None:
        raise ExperimentScoringError(f"pipeline '{other.name}' has no model")
    if not window.hits:
        return np.empty(0)
    return np.asarray(other.model.predict(window_features(other, query, window)), dtype=np.float64)


def top_ranking(doc_ids: Sequence[str], scores: np.ndarray, k: int = SHADOW_TOP) -> tuple[tuple[str, float], ...]:
    """The `k` best (doc_id, score), best first; ties keep the window's order (as the service ranks)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]
    return tuple((doc_ids[i], float(scores[i])) for i in order.tolist())
