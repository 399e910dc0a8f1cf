"""Online model comparisons, in one module: the experiment log, scoring a served window with
another model, interleaving of served pages (optimized by default, or team draft), shadow
scoring, and the analysis behind `ltr-search models compare` (clicks credited per team or per
document, a t-test or a sign test, shadow agreement).

    HOME/experiments/INDEX.sqlite3
        interleaved      one row per interleaved page: the two models and, per shown position, the
                         document and the team (A = the active model) that put it there, or "=" for
                         what neither is credited with (team draft: the two rankings' common prefix;
                         older logs hold only A and B); optimized pages add each document's
                         "credit" (A over B: + for A, - for B, 0 for "=")
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
import logging
import math
import sqlite3
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, ContextManager, Iterable, Iterator, Protocol, Sequence

import numpy as np

from indexing.sqlite import SqliteDatabase, SqliteSchema, SqliteStoreError
from search.backend import Hit
from search.ranking import WindowView
from search.event_store import Event
from search.interleaving import (
    INTERLEAVING_METHODS, OPTIMIZED, TEAM_A, TEAM_B, TEAM_CREDIT, TEAM_SHARED, TEAMS, optimized_interleave, team_draft,
)
from search.rules import request_rng
from ltr.sequential_test import (
    SEQUENTIAL_EFFECT, SEQUENTIAL_MIN, always_valid_p_value, always_valid_p_values, requests_to_decide,
)

if TYPE_CHECKING:  # ltr.ranker loads xgboost: `models compare` and `--help` never need it
    from ltr.ranker import LtrPipeline, ScoredWindow

logger = logging.getLogger("ltr_search.experiments")

SCHEMA_VERSION = 1
APPLICATION_ID = 0x4C545258  # "LTRX": marks the file as an experiment log
SHADOW_TOP = 20  # documents of each ranking kept per shadow row
ALPHA = 0.05  # significance level of the interleaving tests (sign test, t-test)
MIN_DECIDED = 6  # fewest decided requests whose unanimous outcome is significant: 2 * 0.5**6 = 0.031 < ALPHA
# How `models compare` is read. "sequential" (default): the verdict comes from the always-valid
# p-value of the mean per-request credit (`ltr.sequential_test`), right however often the
# comparison is looked at while requests come in; "fixed": from the fixed-sample test (t-test or
# sign test), right only when the number of requests was fixed before the first look (read at 21
# growing sample sizes it called 22-49% of no-difference comparisons significant, the always-valid
# p 0-6%: bench/bench_interleaving.py --null).
READINGS: tuple[str, ...] = ("sequential", "fixed")
AGREEMENT_DEPTH = 10
RBO_PERSISTENCE = 0.9

_SCHEMA: tuple[str, ...] = (
    """
    CREATE TABLE interleaved (
        seq         INTEGER PRIMARY KEY,
        request_id  TEXT NOT NULL UNIQUE,
        timestamp   REAL NOT NULL,
        model_a     TEXT NOT NULL,  -- the active model (team A)
        model_b     TEXT NOT NULL,  -- the challenger (team B)
        page_offset INTEGER NOT NULL CHECK (page_offset >= 0),
        teams       TEXT NOT NULL   -- JSON [{"position": 1, "doc_id": "d", "team": "A"}, ...], shown positions;
                                    -- team "A", "B" or "=" (credited to neither); optimized pages add
                                    -- "credit": a click's credit for A over B
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


class ExperimentLogError(SqliteStoreError):
    """The experiment log cannot be opened or used: names the file and the reason."""


class ExperimentScoringError(ValueError):
    """Another model cannot score a served window (e.g. its features need the window's candidates)."""


@dataclass(frozen=True)
class TeamPick:
    position: int  # absolute, 1-based, as on the page and in click events
    doc_id: str
    team: str  # "A" (model_a), "B" (model_b) or "=" (no credit: team draft's shared prefix, or credit 0)
    credit: float | None = None  # optimized interleaving: a click's credit for A over B; None: team draft's +1 / -1 / 0

    @property
    def click_credit(self) -> float:
        return TEAM_CREDIT[self.team] if self.credit is None else self.credit


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
        schema = SqliteSchema("experiment log", APPLICATION_ID, SCHEMA_VERSION, _SCHEMA, error=ExperimentLogError,
                              synchronous="FULL")
        self._db = SqliteDatabase(self.path, schema)  # WAL, locking and transactions: indexing.sqlite

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "ExperimentLog":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- writes ----------------------------------------------------------------------------

    def log_interleaved(self, record: InterleavedRequest) -> None:
        teams = [{k: v for k, v in dataclasses.asdict(pick).items() if v is not None} for pick in record.teams]
        wrong = sorted({str(pick["team"]) for pick in teams} - set(TEAMS))
        if wrong:
            raise ValueError(f"{record.request_id}: teams must be 'A', 'B' or '=' (shared), got {', '.join(map(repr, wrong))}")
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
            picks = tuple(TeamPick(int(p["position"]), str(p["doc_id"]), str(p["team"]),
                                   None if p.get("credit") is None else float(p["credit"])) for p in json.loads(teams))
            yield InterleavedRequest(request_id, timestamp, model_a, model_b, offset, picks)

    def iter_shadow(self, since: float | None = None) -> Iterator[ShadowRanking]:
        sql = ("SELECT request_id, timestamp, model_version, ranking, served_model, served_ranking FROM shadow_rankings"
               + (" WHERE timestamp >= ?" if since is not None else "") + " ORDER BY timestamp, seq")
        for request_id, timestamp, version, ranking, served_model, served in self._select(sql, [] if since is None else [since]):
            yield ShadowRanking(request_id, timestamp, version, _ranking_from_json(ranking), served_model,
                                _ranking_from_json(served))

    # ---- connection ------------------------------------------------------------------------

    def _select(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self._db.read() as connection:
            return connection.execute(sql, list(params)).fetchall()

    def _write(self) -> ContextManager[sqlite3.Connection]:
        return self._db.write()


def _ranking_json(ranking: Sequence[tuple[str, float]]) -> str:
    return json.dumps([[doc_id, None if score != score else float(score)] for doc_id, score in ranking])


def _ranking_from_json(text: str) -> tuple[tuple[str, float], ...]:
    return tuple((str(doc_id), float("nan") if score is None else float(score)) for doc_id, score in json.loads(text))


# ---------------------------------------------------------------------------------------------
# Scoring the served window with another model


def scoring_problem(served: "LtrPipeline", other: "LtrPipeline") -> str | None:
    """Why `other` cannot score the windows `served` ranks, or None when it can. A served window
    carries its candidates, so another feature set or base stage is computed from them; another
    candidate window (fusion settings) is not the served one."""
    if getattr(other, "fusion", None) != getattr(served, "fusion", None):
        return "it would rank another candidate window (other fusion settings)"
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
    from ltr.features import extract_features  # xgboost and friends: loaded only when another feature set scores

    behaviour = other.behaviour_store() if hasattr(other, "behaviour_store") else None  # what `other` itself reads
    return extract_features(other.backend, query, candidates, other.features, behaviour)


def window_scores(other: "LtrPipeline", query: str, window: "ScoredWindow") -> np.ndarray:
    """`other`'s scores for every document of the served window, aligned with `window.hits`: the
    one scoring path of shadow and challenger models."""
    if other.model is None:
        raise ExperimentScoringError(f"pipeline '{other.name}' has no model")
    if not len(window):
        return np.empty(0)
    stage = other.model.stage
    base = None
    if stage is not None and stage == window.stage:
        base = window.base
    elif stage is not None:  # another base stage: its margin, from the served window's candidates
        candidates = getattr(window, "candidates", None)
        if candidates is None:
            raise ExperimentScoringError(f"model {other.version} is staged on {stage.name}, and the served window "
                                         "carries no candidates to compute that base from")
        base = stage.margin(candidates)
    return np.asarray(other.model.predict(window_features(other, query, window), base), dtype=np.float64)


def top_ranking(doc_ids: Sequence[str], scores: np.ndarray, k: int = SHADOW_TOP) -> tuple[tuple[str, float], ...]:
    """The `k` best (doc_id, score), best first; ties keep the window's order (as the service ranks)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]
    return tuple((doc_ids[i], float(scores[i])) for i in order.tolist())


# ---------------------------------------------------------------------------------------------
# Serving experiments: what the service runs on one `ltr` request


class InterleavingSettings(Protocol):
    """What interleaving reads of the service's `[experiments]` (search.app.config)."""

    interleave_model: str | None
    interleave_share: float
    interleave_method: str
    seed: int


@dataclass(frozen=True)
class ServedExperiments:
    """The models of `[experiments]` loaded for one generation, next to the active `ltr` model."""

    shadow: "LtrPipeline | None" = None  # scores every ltr request's window; logged, never shown
    challenger: "LtrPipeline | None" = None  # team B of interleaved pages (A: the active model)
    errors: tuple[tuple[str, str], ...] = ()  # (experiment, why) for a configured model not used
    # What interleaving reads (share, method, seed): the config's `[experiments]`, or with the
    # registry's challenge (`ltr.registry.Challenge`) its model and share.
    settings: InterleavingSettings | None = None


class WindowCapture:
    """The served model's first stage, remembering the window it scored for ONE request, so
    experiment models score that same window (no second retrieval). Made per request."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.window: "ScoredWindow | None" = None

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def version(self) -> str:
        return self.inner.version

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.inner.feature_names

    def rank_window(self, query: str) -> "ScoredWindow":
        self.window = self.inner.rank_window(query)
        return self.window

    def contributions(self, features: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
        return self.inner.contributions(features, base)

    def search(self, query: str, k: int) -> list[Hit]:
        return self.inner.search(query, k)


class InterleavingRanker:
    """The `Ranker` of an interleaved request: it sees the window after filters and exclusions
    and orders it as the interleaving (`method`: optimized or team draft, search.interleaving) of
    the active model's (A) and the challenger's (B) rankings of those same documents; diversity
    then applies to that order. Team draft puts the documents both rankings hold at the same top
    ranks first, labelled "=" (credited to neither team); optimized interleaving credits each
    document by its ranks (0, "=", when they are equal). Returns descending pseudo-scores; the
    service shows A's scores. If B fails, A's order is served."""

    def __init__(self, capture: WindowCapture, challenger: "LtrPipeline", rng: np.random.Generator,
                 method: str = OPTIMIZED):
        if method not in INTERLEAVING_METHODS:
            raise ValueError(f"interleaving method must be one of {', '.join(INTERLEAVING_METHODS)}, got {method!r}")
        self.capture, self.challenger, self.rng, self.method = capture, challenger, rng, method
        self.a_scores: dict[int, float] = {}  # first-stage window position -> A's score
        self.teams: dict[int, str] | None = None  # window position -> "A" | "B" | "="; None when not interleaved
        self.credits: dict[int, float] | None = None  # window position -> credit for A (optimized only)
        self.error: str | None = None
        self.version = f"{method}({capture.version},{challenger.version})"

    def score(self, query: str, view: WindowView) -> np.ndarray:
        window = self.capture.window
        assert window is not None
        positions = view.positions  # the captured window is the first stage's window: same positions
        a = np.asarray(window.scores, dtype=np.float64)[positions]
        self.a_scores = dict(zip(positions.tolist(), a.tolist()))
        try:
            b = window_scores(self.challenger, query, window)[positions]
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            return a
        ranking_a = positions[np.argsort(-a, kind="stable")].tolist()  # as A alone would rank them
        ranking_b = positions[np.argsort(-b, kind="stable")].tolist()
        if self.method == OPTIMIZED:
            picked, credits = optimized_interleave(ranking_a, ranking_b, len(positions), self.rng)
            self.credits = dict(zip(picked, credits))
            teams = [TEAM_A if c > 0 else TEAM_B if c < 0 else TEAM_SHARED for c in credits]
        else:
            picked, teams = team_draft(ranking_a, ranking_b, len(positions), self.rng)
        self.teams = dict(zip(picked, teams))
        place = {position: p for p, position in enumerate(picked)}
        return np.array([len(picked) - place[position] for position in positions.tolist()], dtype=np.float64)

    def picks(self, shown: Iterable[tuple[int, str, int]]) -> tuple[TeamPick, ...]:
        """The team (and credit) of each shown (page position, doc_id, window position), for the experiment log."""
        assert self.teams is not None
        credits = self.credits or {}
        return tuple(TeamPick(position, doc_id, self.teams[window_position], credits.get(window_position))
                     for position, doc_id, window_position in shown)


def interleaving_rng(request_id: str, settings: InterleavingSettings) -> np.random.Generator | None:
    """The generator of an interleaved request (its first draw decided it), or None when the
    request is not in the interleaved share. Salted apart from exploration's `request_rng`, so
    equal seeds do not correlate the two decisions."""
    if settings.interleave_model is None or settings.interleave_share <= 0:
        return None
    rng = request_rng(f"interleave\x00{request_id}", settings.seed)
    return rng if rng.random() < settings.interleave_share else None


def shadow_ranking(shadow: "LtrPipeline", query: str, window: "ScoredWindow", request_id: str,
                   served_model: str | None) -> ShadowRanking | None:
    """The shadow model's top of the served window next to the served model's top of it, or
    None (logged) when the shadow fails: it never affects the response."""
    try:
        doc_ids = window.doc_ids
        scores = window_scores(shadow, query, window)
        return ShadowRanking(request_id, 0.0, shadow.version, top_ranking(doc_ids, scores), served_model,
                             top_ranking(doc_ids, np.asarray(window.scores, dtype=np.float64)))
    except Exception:
        logger.exception("shadow model %s failed on request %s", shadow.version, request_id)
        return None


# ---------------------------------------------------------------------------------------------
# Analysis: which of two models users prefer (`ltr-search models compare`)


@dataclass
class RequestOutcome:
    request_id: str
    clicks_a: int  # clicks on documents credited to A (team A, or a positive credit)
    clicks_b: int
    clicks_shared: int = 0  # on "=" documents: credited to neither, outcome unchanged
    credit: float | None = None  # the clicks' summed credit for A over B (team draft: clicks_a - clicks_b)

    def __post_init__(self) -> None:
        if self.credit is None:
            self.credit = float(self.clicks_a - self.clicks_b)

    @property
    def outcome(self) -> str:
        credit = round(float(self.credit or 0.0), 12)  # summed float credits: 1/3 - 1/3 is a tie
        return "win" if credit > 0 else "loss" if credit < 0 else "tie"


@dataclass
class InterleavingComparison:
    """Which model the interleaved requests prefer. Read sequentially (the default), the verdict
    is the always-valid p-value of the mean per-request credit: safe to check as often as one
    likes. Read as a fixed sample: team-draft pages only, a sign test of wins against losses; any
    optimized page, a t-test of the mean per-request credit against 0 (its credit is fair in the
    mean, not in its sign); team-draft requests count +1 / -1 per click there."""

    model_a: str
    model_b: str
    requests: list[RequestOutcome]
    unmatched_clicks: int = 0  # clicks whose position or document is not on the logged page
    shadow: dict[str, Any] | None = None
    test: str = "sign"  # the fixed-sample test: "sign" (team draft) or "t" (optimized interleaving)
    reading: str = READINGS[0]

    def __post_init__(self) -> None:
        if self.reading not in READINGS:
            raise ValueError(f"reading must be one of {', '.join(READINGS)}, got {self.reading!r}")

    def credits(self) -> np.ndarray:
        """Each request's summed credit for A over B (0 without a credited click), in log order."""
        return np.array([r.credit for r in self.requests], dtype=np.float64)

    @property
    def mean_credit(self) -> float:
        return float(self.credits().mean()) if self.requests else 0.0

    @property
    def wins(self) -> int:
        return sum(r.outcome == "win" for r in self.requests)

    @property
    def losses(self) -> int:
        return sum(r.outcome == "loss" for r in self.requests)

    @property
    def ties(self) -> int:
        return sum(r.outcome == "tie" for r in self.requests)

    @property
    def p_value(self) -> float:
        """The fixed-sample test. Sign test: two-sided binomial of wins against losses under no
        preference (p = 1/2). t-test: two-sided one-sample t-test of the per-request credit
        against a mean of 0."""
        decided = self.wins + self.losses
        if decided == 0:
            return 1.0
        # scipy.stats takes a few hundred ms to import; only reports need it
        if self.test == "t":
            from scipy.stats import ttest_1samp

            credits = self.credits()
            if len(credits) < 2 or not credits.std() > 0:
                return 1.0
            return float(ttest_1samp(credits, 0.0).pvalue)
        from scipy.stats import binomtest

        return float(binomtest(self.wins, decided, 0.5, alternative="two-sided").pvalue)

    @property
    def always_valid_p_value(self) -> float:
        """The mSPRT's p-value of a mean per-request credit of 0, as if read after every request."""
        return always_valid_p_value(self.credits())

    @property
    def decision_p_value(self) -> float:
        return self.always_valid_p_value if self.reading == "sequential" else self.p_value

    def _lead(self) -> float:
        """> 0 when A is ahead: wins minus losses (sign test), the mean credit (t-test), or read
        sequentially the mean credit when the always-valid p first fell below ALPHA (the test
        stops there: a lead that turned later does not turn its verdict)."""
        if self.reading == "fixed":
            return float(self.wins - self.losses) if self.test == "sign" else self.mean_credit
        credits = self.credits()
        crossed = np.flatnonzero(always_valid_p_values(credits) < ALPHA)
        return float(credits[: crossed[0] + 1].mean()) if len(crossed) else self.mean_credit

    @property
    def preferred(self) -> str | None:
        lead = self._lead()
        if self.decision_p_value >= ALPHA or lead == 0:
            return None
        return self.model_a if lead > 0 else self.model_b

    def verdict(self) -> str:
        preferred = self.preferred
        if preferred is None:
            return "no significant preference"
        kind = "always-valid p" if self.reading == "sequential" else "p"
        return f"{preferred} preferred ({kind} = {self.decision_p_value:.3g} < {ALPHA})"

    def note(self) -> str | None:
        """Why an undecided comparison is undecided, when the sample is too small to say more:
        no decided request, fewer than a unanimous result needs, or the requests the observed
        mean credit (or win rate) would need. None once a preference is significant."""
        if self.preferred is not None:
            return None
        decided = self.wins + self.losses
        if decided == 0:
            return ("sample too small to decide: no request with more clicks for one model "
                    "(no clicks, only ties, or clicks only on results both rank alike)")
        z = NormalDist().inv_cdf(1 - ALPHA / 2)
        if self.test == "t" or self.reading == "sequential":
            credits = self.credits()
            mean, sd = float(credits.mean()), float(credits.std(ddof=1)) if len(credits) > 1 else 0.0
            if mean == 0:
                return f"no preference at all in {len(credits)} interleaved requests (mean credit 0)"
            if sd == 0:
                return (f"sample too small to decide: all {len(credits)} interleaved requests have credit {mean:+.4f}; "
                        "a test of their mean needs them to vary")
            if self.reading == "sequential":
                needed = requests_to_decide(mean / sd, ALPHA)
                fixed = self.p_value
                read_once = (f"; the fixed-sample p = {fixed:.3g} is below {ALPHA}, which would hold only for a "
                             "number of requests fixed before the first look" if fixed < ALPHA else "")
                return (f"sample too small to decide: at the observed mean credit {mean:+.4f} (sd {sd:.4f}) about "
                        f"{max(needed, SEQUENTIAL_MIN):,} interleaved requests would reach an always-valid p < {ALPHA}; "
                        f"{len(credits):,} so far" + read_once)
            needed = math.ceil((z * sd / mean) ** 2)
            return (f"sample too small to decide: at the observed mean credit {mean:+.4f} (sd {sd:.4f}) about "
                    f"{needed:,} interleaved requests would reach p < {ALPHA}; {len(credits):,} so far")
        if decided < MIN_DECIDED:
            return (f"sample too small to decide: {decided} decided request(s); even {decided}-0 gives p = "
                    f"{2 * 0.5 ** decided:.3g}, at least {MIN_DECIDED} are needed for p < {ALPHA}")
        rate = self.wins / decided
        if rate == 0.5:
            return f"no preference at all in {decided} decided requests (win rate 0.5)"
        needed = math.ceil((z / (2 * abs(rate - 0.5))) ** 2)
        per_request = decided / len(self.requests)
        return (f"sample too small to decide: at the observed win rate {rate:.3f} about {needed:,} decided requests "
                f"(~{math.ceil(needed / per_request):,} interleaved requests at this rate of ties) would reach "
                f"p < {ALPHA}; {decided:,} so far")

    def to_dict(self) -> dict[str, Any]:
        clicked = [r for r in self.requests if r.clicks_a or r.clicks_b or r.clicks_shared]
        return {
            "model_a": self.model_a, "model_b": self.model_b, "requests": len(self.requests),
            "requests_with_clicks": len(clicked), "wins_a": self.wins, "wins_b": self.losses, "ties": self.ties,
            "clicks_a": sum(r.clicks_a for r in self.requests), "clicks_b": sum(r.clicks_b for r in self.requests),
            "clicks_shared": sum(r.clicks_shared for r in self.requests),
            "unmatched_clicks": self.unmatched_clicks, "test": self.test, "mean_credit": self.mean_credit,
            "p_value": self.p_value, "alpha": ALPHA, "reading": self.reading,
            "always_valid_p_value": self.always_valid_p_value, "sequential_effect": SEQUENTIAL_EFFECT,
            "preferred": self.preferred, "verdict": self.verdict(), "note": self.note(), "shadow": self.shadow,
            "per_request": [{**asdict(r), "outcome": r.outcome} for r in self.requests],
        }


def compare_interleaved(model_a: str, model_b: str, pages: Iterable[InterleavedRequest],
                        clicks: Iterable[Event], reading: str = READINGS[0]) -> InterleavingComparison:
    """Credit clicks to teams, and sum each request's credit. `pages` of the pair in either order:
    team labels and credits are turned so that 'A' is `model_a` here ("=" stays); pages of other
    pairs are ignored. A click on a "=" document is counted but credited to neither team. A
    document clicked twice on one page counts once. Any optimized page makes the fixed-sample test
    a t-test. `reading`: "sequential" (always-valid verdict) or "fixed" (`READINGS`)."""
    oriented: dict[str, tuple[InterleavedRequest, bool]] = {}  # request id -> (page, swapped)
    for page in pages:
        if (page.model_a, page.model_b) == (model_a, model_b):
            oriented[page.request_id] = (page, False)
        elif (page.model_a, page.model_b) == (model_b, model_a):
            oriented[page.request_id] = (page, True)
    credited: dict[str, dict[str, set[str]]] = {rid: {team: set() for team in TEAMS} for rid in oriented}
    credit: dict[str, dict[str, float]] = {rid: {} for rid in oriented}  # request -> clicked doc -> credit for model_a
    unmatched = 0
    for click in clicks:
        if click.request_id not in oriented or click.type != "click":
            continue
        page, swapped = oriented[click.request_id]
        pick = page.pick_at(click.position)
        if pick is None or pick.doc_id != click.doc_id:
            unmatched += 1
            continue
        team = pick.team if not swapped else {TEAM_A: TEAM_B, TEAM_B: TEAM_A}.get(pick.team, pick.team)
        credited[click.request_id][team].add(click.doc_id)
        credit[click.request_id][click.doc_id] = -pick.click_credit if swapped else pick.click_credit
    outcomes = [RequestOutcome(rid, len(credited[rid][TEAM_A]), len(credited[rid][TEAM_B]), len(credited[rid][TEAM_SHARED]),
                               float(sum(credit[rid].values())))
                for rid in oriented]
    optimized = any(pick.credit is not None for page, _ in oriented.values() for pick in page.teams)
    return InterleavingComparison(model_a, model_b, outcomes, unmatched, test="t" if optimized else "sign", reading=reading)


# ---------------------------------------------------------------------------------------------
# Shadow agreement


def overlap_at(a: Sequence[str], b: Sequence[str], k: int = AGREEMENT_DEPTH) -> float:
    """Share of the top k the two rankings have in common (k: the shorter list's depth when shorter)."""
    depth = min(k, max(len(a), len(b)))
    return len(set(a[:k]) & set(b[:k])) / depth if depth else 1.0


def rank_biased_overlap(a: Sequence[str], b: Sequence[str], p: float = RBO_PERSISTENCE, k: int = AGREEMENT_DEPTH) -> float:
    """Extrapolated rank-biased overlap of the top k (Webber, Moffat & Zobel 2010, eq. 32): 1 for
    identical lists, 0 for disjoint ones, weighting the top most."""
    a, b = list(a[:k]), list(b[:k])
    depth = min(len(a), len(b))
    if depth == 0:
        return 1.0 if not a and not b else 0.0
    seen_a: set[str] = set()
    seen_b: set[str] = set()
    overlap, total = 0, 0.0
    for d in range(1, depth + 1):
        x, y = a[d - 1], b[d - 1]
        if x == y:
            overlap += 1
        else:
            overlap += (x in seen_b) + (y in seen_a)
        seen_a.add(x)
        seen_b.add(y)
        total += overlap / d * p ** d
    return overlap / depth * p ** depth + (1 - p) / p * total


def shadow_agreement(model_a: str, model_b: str, rows: Iterable[ShadowRanking],
                     k: int = AGREEMENT_DEPTH) -> dict[str, Any] | None:
    """Agreement of shadow and served top-k where one of the pair shadowed the other; None when
    the log has no such rows."""
    pair = {model_a, model_b}
    overlaps, rbos, top1 = [], [], []
    shadows = set()
    for row in rows:
        if {row.model_version, row.served_model} != pair:
            continue
        shadow = [doc_id for doc_id, _ in row.ranking[:k]]
        served = [doc_id for doc_id, _ in row.served_ranking[:k]]
        overlaps.append(overlap_at(shadow, served, k))
        rbos.append(rank_biased_overlap(shadow, served, k=k))
        top1.append(bool(shadow[:1] == served[:1]))
        shadows.add(row.model_version)
    if not overlaps:
        return None
    return {"requests": len(overlaps), "shadow_models": sorted(shadows), "depth": k,
            f"mean_overlap@{k}": sum(overlaps) / len(overlaps), f"mean_rbo@{k}": sum(rbos) / len(rbos),
            "top1_agreement": sum(top1) / len(top1), "rbo_persistence": RBO_PERSISTENCE}


def render(report: dict[str, Any]) -> str:
    a, b = report["model_a"], report["model_b"]
    lines = [f"interleaving {a} (A) vs {b} (B): {report['requests']} interleaved requests, "
             f"{report['requests_with_clicks']} with clicks"
             + (f" (since {datetime.fromtimestamp(report['since'], timezone.utc).isoformat()})" if report["since"] else "")]
    for r in report["per_request"]:
        shared = r.get("clicks_shared", 0)
        if r["clicks_a"] or r["clicks_b"] or shared:
            credit = f"  credit {r['credit']:+.3f}" if report.get("test") == "t" else ""
            lines.append(f"  {r['request_id']}  A {r['clicks_a']}  B {r['clicks_b']}"
                         + (f"  shared {shared}" if shared else "") + credit + f"  {r['outcome']}")
    shared = report.get("clicks_shared", 0)
    lines.append(f"wins {a}: {report['wins_a']}, wins {b}: {report['wins_b']}, ties: {report['ties']}; "
                 f"clicks A {report['clicks_a']}, B {report['clicks_b']}"
                 + (f", {shared} on results both rank alike (credited to neither)" if shared else "")
                 + (f"; {report['unmatched_clicks']} clicks not on a logged page position" if report["unmatched_clicks"] else ""))
    p = report["p_value"]
    fixed = (f"t-test (two-sided, mean credit per request {report['mean_credit']:+.4f} vs 0, optimized interleaving): "
             if report.get("test") == "t" else "sign test (two-sided binomial, wins vs losses): ") + f"p = {p:.4g}"
    if report.get("reading") == "sequential":
        lines.append(f"{fixed} (holds for a number of requests fixed before the first look)")
        lines.append(f"always-valid test (mSPRT, mean credit per request {report['mean_credit']:+.4f} vs 0; holds however "
                     f"often it is read): p = {report['always_valid_p_value']:.4g} -> {report['verdict']}")
    else:
        lines.append(f"{fixed} -> {report['verdict']}")
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    shadow = report["shadow"]
    if shadow:
        k = shadow["depth"]
        lines.append(f"shadow agreement ({', '.join(shadow['shadow_models'])} shadowing, {shadow['requests']} requests): "
                     f"overlap@{k} {shadow[f'mean_overlap@{k}']:.3f}, RBO@{k} {shadow[f'mean_rbo@{k}']:.3f}, "
                     f"same top 1 {shadow['top1_agreement']:.0%}")
    return "\n".join(lines)
