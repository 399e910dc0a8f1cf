"""Live click simulation: simulated users searching the running ranker and sending behaviour events.

`ltr-search simulate --dataset PATH --split SPLIT` replays a judged split's queries against the
query service so the whole behaviour loop (search -> clicks -> events -> whatever the service
derives from them) runs end to end, the way real traffic would drive it. Each session is one
POST /search, clicks decided by a `UserBehaviour` from the qrels grades of the results actually
shown, and one POST /events with an impression per shown result and a click per click.

The loop takes any httpx-style client, so the same code drives the FastAPI app in process
(`fastapi.testclient.TestClient`, no socket) and a real server (`httpx.Client(base_url=URL)`).
Events carry no timestamp (the service stamps receipt time, so they can never predate the page)
and an `event_id` derived from the request id, so a retried batch cannot be stored twice.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from eval.click_models import UserBehaviour, simulate_page_clicks
from indexing.progress import progress_bar

RETRY_STATUSES = frozenset({500, 502, 503, 504})


class SimulationError(RuntimeError):
    """The service refused a request (4xx: a bug in the simulator or a misconfigured run) or
    stayed unreachable after the retries; the message says which request and why."""


class HttpClient(Protocol):
    """What the loop needs from httpx.Client / fastapi.testclient.TestClient."""

    def post(self, url: str, *, json: Any = ...) -> Any: ...

    def get(self, url: str) -> Any: ...


@dataclass(frozen=True)
class SimulationSettings:
    """How many sessions, how deep the pages are, and who the users claim to be.

    `seed` fixes the order of queries and each session's clicks (session k's clicks depend only
    on the seed, k and the page served). `id_prefix` names the users and sessions in the
    request log, so simulated traffic is easy to tell from real traffic."""

    sessions: int
    depth: int = 10
    seed: int = 0
    pipeline: str | None = None  # None: the service's default pipeline
    id_prefix: str = "sim"
    max_grade: int | None = None  # top grade of the judgments; scales default click probabilities
    retries: int = 4  # extra attempts per request after a connection error or a 5xx
    backoff_s: float = 0.25  # first retry waits this long, then twice as long each time
    record_pages: bool = False  # keep every page and its clicks in the report (tests, debugging)

    def __post_init__(self) -> None:
        if self.sessions < 1:
            raise ValueError(f"sessions must be >= 1, got {self.sessions}")
        if not 1 <= self.depth <= 100:
            raise ValueError(f"depth must be between 1 and 100 (the service's page limit), got {self.depth}")
        if self.retries < 0 or self.backoff_s < 0:
            raise ValueError("retries and backoff must be >= 0")


@dataclass(frozen=True)
class PageRecord:
    """One simulated session: the query, the page served and what the user clicked."""

    session_id: str
    query_id: str
    request_id: str
    doc_ids: tuple[str, ...]
    positions: tuple[int, ...]
    clicked: tuple[int, ...]  # positions clicked


@dataclass
class SimulationReport:
    """Counts of one run, as the simulator sent them and as the service acknowledged them."""

    sessions: int = 0
    searches: int = 0
    empty_pages: int = 0  # searches that returned no result (no events to send)
    events_sent: int = 0
    events_stored: int = 0  # as acknowledged by POST /events
    duplicates: int = 0  # as acknowledged: event ids the service already had (a retried batch)
    clicks: int = 0
    retries: int = 0
    explored: int = 0  # pages where the service's exploration swapped a result in
    interleaved: int = 0  # pages the service interleaved with a challenger model (an online experiment)
    wall_s: float = 0.0
    impressions_by_position: list[int] = field(default_factory=list)
    clicks_by_position: list[int] = field(default_factory=list)
    pipelines: dict[str, int] = field(default_factory=dict)
    model_versions: dict[str, int] = field(default_factory=dict)
    pages: list[PageRecord] = field(default_factory=list)

    @property
    def clicks_per_session(self) -> float:
        return self.clicks / self.sessions if self.sessions else 0.0

    @property
    def sessions_per_s(self) -> float:
        return self.sessions / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def ctr_by_position(self) -> list[float]:
        return [c / i if i else 0.0 for c, i in zip(self.clicks_by_position, self.impressions_by_position)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions, "searches": self.searches, "empty_pages": self.empty_pages,
            "events_sent": self.events_sent, "events_stored": self.events_stored, "duplicates": self.duplicates,
            "clicks": self.clicks, "clicks_per_session": round(self.clicks_per_session, 4),
            "ctr_by_position": [round(c, 4) for c in self.ctr_by_position],
            "impressions_by_position": self.impressions_by_position, "clicks_by_position": self.clicks_by_position,
            "retries": self.retries, "explored": self.explored, "interleaved": self.interleaved, "pipelines": self.pipelines,
            "model_versions": self.model_versions, "wall_s": round(self.wall_s, 3),
            "sessions_per_s": round(self.sessions_per_s, 2),
        }

    def lines(self) -> list[str]:
        served = ", ".join(f"{name} x{count:,}" for name, count in self.pipelines.items()) or "none"
        models = ", ".join(f"{name} x{count:,}" for name, count in self.model_versions.items())
        return [
            f"  {self.sessions:,} sessions, {self.searches:,} searches ({self.empty_pages:,} empty pages, "
            f"{self.explored:,} explored, {self.interleaved:,} interleaved), pipeline {served}" + (f", model {models}" if models else ""),
            f"  events sent {self.events_sent:,}, acknowledged stored {self.events_stored:,} + duplicates {self.duplicates:,}; "
            f"{self.retries:,} retries",
            f"  {self.clicks:,} clicks ({self.clicks_per_session:.2f} per session)",
            "  CTR by position: " + " ".join(f"{p:.3f}" for p in self.ctr_by_position),
            f"  wall {self.wall_s:.2f} s, {self.sessions_per_s:.1f} sessions/s",
        ]


def session_plan(query_ids: Sequence[str], sessions: int, seed: int) -> list[str]:
    """The query of each session: round-robin over a seeded shuffle of the queries, so
    sessions = k * len(query_ids) gives every query exactly k sessions."""
    if not query_ids:
        raise ValueError("no queries to simulate")
    order = list(query_ids)
    permutation = np.random.default_rng([seed, 0]).permutation(len(order))
    order = [order[i] for i in permutation.tolist()]
    return [order[k % len(order)] for k in range(sessions)]


def run_sessions(
    client: HttpClient,
    queries: Mapping[str, str],
    grades: Mapping[str, Mapping[str, int]],
    behaviour: UserBehaviour,
    settings: SimulationSettings,
    progress: bool = False,
) -> SimulationReport:
    """Run `settings.sessions` simulated sessions against the service behind `client`.

    `queries`: query id -> text; `grades`: query id -> doc id -> grade (unjudged = 0). Raises
    `SimulationError` on a 4xx or when a request keeps failing; the report so far is attached
    as `.report` so the caller can still say what was sent."""
    plan = session_plan(list(queries), settings.sessions, settings.seed)
    max_grade = settings.max_grade
    if max_grade is None:
        max_grade = max((int(g) for docs in grades.values() for g in docs.values()), default=1)
    report = SimulationReport(impressions_by_position=[0] * settings.depth, clicks_by_position=[0] * settings.depth)
    bar = _progress_bar(progress, settings.sessions)
    started = time.perf_counter()
    try:
        for k, query_id in enumerate(plan):
            _one_session(client, k, query_id, queries[query_id], grades.get(query_id, {}), behaviour, settings,
                         max_grade, report)
            bar.update(1)
    except SimulationError as exc:
        exc.report = report  # type: ignore[attr-defined]
        raise
    finally:
        report.wall_s = time.perf_counter() - started
        bar.close()
    return report


def _one_session(
    client: HttpClient, k: int, query_id: str, text: str, judged: Mapping[str, int], behaviour: UserBehaviour,
    settings: SimulationSettings, max_grade: int, report: SimulationReport,
) -> None:
    session_id = f"{settings.id_prefix}-{k:07d}"
    body: dict[str, Any] = {"query": text, "size": settings.depth, "user_id": f"{session_id}-user", "session_id": session_id}
    if settings.pipeline:
        body["pipeline"] = settings.pipeline
    page = _post(client, "/search", body, settings, report, f"search of query '{query_id}' (session {k})")
    report.sessions += 1
    report.searches += 1
    report.pipelines[page["pipeline"]] = report.pipelines.get(page["pipeline"], 0) + 1
    if page.get("model_version"):
        report.model_versions[page["model_version"]] = report.model_versions.get(page["model_version"], 0) + 1
    report.explored += bool(page.get("explored"))
    report.interleaved += bool(page.get("interleaved"))
    results = page["results"]
    if not results:
        report.empty_pages += 1
        return
    request_id = page["request_id"]
    docs = [r["id"] for r in results]
    positions = [int(r["position"]) for r in results]
    rng = np.random.default_rng([settings.seed, 1, k])  # session k's user, whatever ran before it
    clicks = simulate_page_clicks(behaviour, [judged.get(d, 0) for d in docs], rng, max_grade).tolist()
    events = [{"request_id": request_id, "type": "impression", "doc_id": d, "position": p, "event_id": f"{request_id}-i{p}"}
              for d, p in zip(docs, positions)]
    events += [{"request_id": request_id, "type": "click", "doc_id": d, "position": p, "event_id": f"{request_id}-c{p}"}
               for d, p, clicked in zip(docs, positions, clicks) if clicked]
    accepted = _post(client, "/events", {"events": events}, settings, report, f"events of session {k} (request {request_id})")
    report.events_sent += len(events)
    report.events_stored += int(accepted["stored"])
    report.duplicates += int(accepted["duplicates"])
    clicked = tuple(p for p, c in zip(positions, clicks) if c)
    report.clicks += len(clicked)
    for p, c in zip(positions, clicks):
        if 1 <= p <= settings.depth:
            report.impressions_by_position[p - 1] += 1
            report.clicks_by_position[p - 1] += bool(c)
    if settings.record_pages:
        report.pages.append(PageRecord(session_id, query_id, request_id, tuple(docs), tuple(positions), clicked))


def _post(client: HttpClient, path: str, body: dict[str, Any], settings: SimulationSettings, report: SimulationReport,
          what: str) -> dict[str, Any]:
    """POST with retries on connection errors and 5xx (back-off doubling); a 4xx stops the run."""
    import httpx  # only the HTTP client path needs it

    attempt = 0
    while True:
        try:
            response = client.post(path, json=body)
        except httpx.TransportError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        else:
            if response.status_code < 300:
                return response.json()
            if response.status_code not in RETRY_STATUSES:
                raise SimulationError(f"{what}: POST {path} answered {response.status_code}: {_error_text(response)}")
            problem = f"{response.status_code}: {_error_text(response)}"
        if attempt >= settings.retries:
            raise SimulationError(f"{what}: POST {path} failed after {attempt + 1} attempts; last: {problem}")
        time.sleep(settings.backoff_s * 2**attempt)
        attempt += 1
        report.retries += 1


def check_ready(client: HttpClient, where: str, retries: int = 4, backoff_s: float = 0.25) -> dict[str, Any]:
    """GET /ready (retrying while unreachable or not ready), so a service without an index fails
    the run before the first session, with the service's own reason."""
    import httpx  # only the HTTP client path needs it

    attempt = 0
    while True:
        try:
            response = client.get("/ready")
            if response.status_code == 200:
                return response.json()
            problem = f"not ready ({response.status_code}): {_error_text(response)}"
        except httpx.TransportError as exc:
            problem = f"unreachable: {type(exc).__name__}: {exc}"
        if attempt >= retries:
            raise SimulationError(f"{where}: {problem}")
        time.sleep(backoff_s * 2**attempt)
        attempt += 1


def _error_text(response: Any) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            details = "; ".join(f"{d.get('field')}: {d.get('reason')}" for d in error.get("details", [])[:5])
            return str(error.get("message", "")) + (f" ({details})" if details else "")
        if "reason" in payload:
            return str(payload["reason"])
    return str(payload)[:500]


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(enabled: bool, total: int) -> Any:
    if not enabled:
        return _NoBar()
    return progress_bar(total=total, desc="sessions", unit="session", mininterval=0.5)

