"""The FastAPI query service: search, events, documents, health, metrics and admin jobs.

Handlers are plain `def`s, so FastAPI runs them in its thread pool; the state they read (the
index generation and its pipelines) is one immutable snapshot swapped atomically on reload, so
a request that started on the old generation finishes on it while new requests use the new one.
Every malformed input gets a 4xx JSON error naming the field; a 5xx means a bug.
"""
from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from indexing.bundle import IndexBundleError, IndexBusyError
from indexing.elastic import ElasticsearchError
from ltr.behaviour import BehaviourStore
from indexing.home import behaviour_store_path
from ltr.drift import PROMETHEUS_GAUGES, DriftMonitor, set_gauges
from search.event_store import Event, EventStore, ValidationError
from ltr.experiments import (
    ExperimentLog, InterleavedRequest, ShadowRanking, TeamPick, scoring_problem, top_ranking, window_features,
)
from ltr.ranker import LtrPipeline, ModelUnavailableError, ScoredWindow, registry_pipeline
from ltr.registry import RegistryError
from search.backend import Hit, SearchBackend
from search.app.config import ExperimentSettings, ServiceConfig
from search.backend_factory import open_backend
from search.hybrid import HybridPipeline
from search.interleaving import team_draft
from search.app.pipelines import create_pipeline, pipeline_names, pipeline_spec
from search.pipelines import Pipeline
from search.ranking import RankingPipeline, RankingRequest, WindowTooSmallError, named_row, served_request
from search.rules import RuleError, check_field_name, parse_filters, request_rng
from search.app.schemas import (
    EventBatch, EventsAccepted, HealthResponse, IndexInfo, JobStatus, ReadyResponse, ReloadResponse,
    ResultExplanation, SearchRequest, SearchResponse, SearchResult,
)

logger = logging.getLogger("ltr_search.service")
DENSE_PIPELINES = frozenset({"dense", "hybrid", "hybrid-convex", "ltr"})
FALLBACK_PIPELINES = ("hybrid", "bm25")  # served by default when the configured pipeline cannot be
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ApiError(Exception):
    """A client error with an HTTP status, a code and the offending field(s)."""

    def __init__(self, status: int, code: str, message: str, details: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details or []


def _error(status: int, code: str, message: str, details: list[dict[str, str]] | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "details": details or []}}, status, headers=headers)


# ----------------------------------------------------------------------------------- serving state


@dataclass(frozen=True)
class ServedExperiments:
    """The models of `[experiments]` loaded for one generation, next to the active `ltr` model."""

    shadow: LtrPipeline | None = None  # scores every ltr request's window; logged, never shown
    challenger: LtrPipeline | None = None  # team B of interleaved pages (A: the active model)
    errors: tuple[tuple[str, str], ...] = ()  # (experiment, why) for a configured model not used


@dataclass(frozen=True)
class Snapshot:
    """One loaded generation and the pipelines built on it; never mutated, only replaced."""

    index: SearchBackend
    pipelines: dict[str, RankingPipeline]
    default_pipeline: str
    model_version: str | None = None  # the active ranking model served as `ltr`
    model_error: str | None = None  # why `ltr` is not served, when it is not
    experiments: ServedExperiments | None = None  # None: no [experiments], or no active model
    drift: DriftMonitor | None = None  # the active model's served features against its training data


class ServingState:
    def __init__(self, config: ServiceConfig):
        self.config = config
        self._snapshot: Snapshot | None = None
        self._reload_lock = threading.Lock()
        self.load_error: str | None = None

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def require(self) -> Snapshot:
        snapshot = self._snapshot
        if snapshot is None:
            raise ApiError(503, "not_ready", f"no index loaded: {self.load_error or 'still loading'}")
        return snapshot

    def reload(self) -> tuple[str | None, Snapshot]:
        """Open the active generation and swap it in; the old one keeps serving until then."""
        with self._reload_lock:
            previous = self._snapshot.index.generation_id if self._snapshot else None
            index = open_backend(self.config.home, self.config.index, self.config.backend, encoder_threads=self.config.threads)
            self._snapshot = self._build(index)
            self.load_error = None
            return previous, self._snapshot

    def _serve(self, index: SearchBackend, first_stage: Pipeline) -> RankingPipeline:
        """A first stage wrapped with the service's window and exploration settings."""
        exploration = self.config.exploration
        return RankingPipeline(index, first_stage, self.config.rerank_window, epsilon=exploration.epsilon,
                               protected_top=exploration.protected_top, seed=exploration.seed, exploration=exploration.mode)

    def _build(self, index: SearchBackend) -> Snapshot:
        config = self.config
        pipelines: dict[str, RankingPipeline] = {}
        for name in pipeline_names():
            if pipeline_spec(name).learned or (name in DENSE_PIPELINES and not index.has_dense):
                continue
            if name == "hybrid":
                first_stage = HybridPipeline(index, config.fusion_for(index.name))
            else:
                first_stage = create_pipeline(name, index)
            pipelines[name] = self._serve(index, first_stage)
        model_version, model_error, experiments, drift = None, None, None, None
        if index.has_dense:
            try:
                learned = registry_pipeline(index, config.home, "active", warn=logger.warning,
                                            events_path=config.event_store_path)
                pipelines["ltr"] = self._serve(index, learned)
                model_version = learned.version
                drift = DriftMonitor.for_manifest(learned.model.manifest)
                if config.experiments.enabled:
                    experiments = self._experiments(index, learned)
            except ModelUnavailableError as exc:
                model_error = str(exc)
            except RegistryError as exc:  # refused: parity, checksum or feature-set mismatch
                model_error = f"the active model was refused: {exc}"
                logger.error("%s", model_error)
        else:
            model_error = f"the ltr pipeline needs dense vectors; index '{index.name}' has none"
        default = next(name for name in (config.default_pipeline, *FALLBACK_PIPELINES) if name in pipelines)
        if default != config.default_pipeline:
            logger.warning("default pipeline %s unavailable on index %s; using %s", config.default_pipeline, index.name, default)
        return Snapshot(index, pipelines, default, model_version, model_error, experiments, drift)

    def _experiments(self, index: SearchBackend, served: LtrPipeline) -> ServedExperiments:
        """Load the shadow and challenger models; one that cannot be used is logged and left out,
        never failing the generation (the active model serves as usual)."""
        settings = self.config.experiments
        wanted = {"shadow": settings.shadow_model,
                  "interleave": settings.interleave_model if settings.interleave_share > 0 else None}
        loaded: dict[str, LtrPipeline] = {}
        chosen: dict[str, LtrPipeline | None] = {}
        errors: list[tuple[str, str]] = []
        for experiment, version in wanted.items():
            chosen[experiment] = None
            if version is None:
                continue
            try:
                if version not in loaded:
                    loaded[version] = registry_pipeline(index, self.config.home, version, name=experiment, warn=logger.warning,
                                                        events_path=self.config.event_store_path)
                other = loaded[version]
                problem = scoring_problem(served, other)
                if problem is None and experiment == "interleave" and other.version == served.version:
                    problem = "it is the active model: interleaving it with itself compares nothing"
                if problem is not None:
                    raise ValueError(problem)
                chosen[experiment] = other
            except Exception as exc:  # a model that cannot be used never breaks serving
                errors.append((experiment, f"{experiment} model {version} is not used: {exc}"))
                logger.error("%s", errors[-1][1])
        return ServedExperiments(chosen["shadow"], chosen["interleave"], tuple(errors))


class _WindowCapture:
    """The served model's first stage, remembering the window it scored for ONE request, so
    experiment models score that same window (no second retrieval). Made per request."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.window: ScoredWindow | None = None

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def version(self) -> str:
        return self.inner.version

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.inner.feature_names

    def rank_window(self, query: str) -> ScoredWindow:
        self.window = self.inner.rank_window(query)
        return self.window

    def contributions(self, features: np.ndarray) -> np.ndarray:
        return self.inner.contributions(features)

    def search(self, query: str, k: int) -> list[Hit]:
        return self.inner.search(query, k)


class _TeamDraftRanker:
    """The `Ranker` of an interleaved request: it sees the window after filters and exclusions
    and orders it as the team-draft interleaving of the active model's (A) and the challenger's
    (B) rankings of those same documents; diversity then applies to that order. Returns
    descending pseudo-scores; the service shows A's scores. If B fails, A's order is served."""

    def __init__(self, capture: _WindowCapture, challenger: LtrPipeline, rng: np.random.Generator):
        self.capture, self.challenger, self.rng = capture, challenger, rng
        self.a_scores: dict[str, float] = {}
        self.teams: dict[str, str] | None = None  # doc id -> "A" | "B"; None when not interleaved
        self.error: str | None = None
        self.version = f"team-draft({capture.version},{challenger.version})"

    def score(self, query: str, hits: Sequence[Hit]) -> np.ndarray:
        window = self.capture.window
        assert window is not None
        row_of = {hit.doc_id: i for i, hit in enumerate(window.hits)}
        rows = np.fromiter((row_of[hit.doc_id] for hit in hits), dtype=np.intp, count=len(hits))
        doc_ids = [hit.doc_id for hit in hits]
        a = np.asarray(window.scores, dtype=np.float64)[rows]
        self.a_scores = dict(zip(doc_ids, a.tolist()))
        try:
            model = self.challenger.model
            assert model is not None
            b = np.asarray(model.predict(window_features(self.challenger, query, window)[rows]), dtype=np.float64)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            return a
        ranking_a = [doc_ids[i] for i in np.argsort(-a, kind="stable").tolist()]  # as A alone would rank them
        ranking_b = [doc_ids[i] for i in np.argsort(-b, kind="stable").tolist()]
        docs, teams = team_draft(ranking_a, ranking_b, len(doc_ids), self.rng)
        self.teams = dict(zip(docs, teams))
        place = {doc_id: p for p, doc_id in enumerate(docs)}
        return np.array([len(docs) - place[doc_id] for doc_id in doc_ids], dtype=np.float64)


def interleaving_rng(request_id: str, settings: ExperimentSettings) -> np.random.Generator | None:
    """The generator of an interleaved request (its first draw decided it), or None when the
    request is not in the interleaved share. Salted apart from exploration's `request_rng`, so
    equal seeds do not correlate the two decisions."""
    if settings.interleave_model is None or settings.interleave_share <= 0:
        return None
    rng = request_rng(f"interleave\x00{request_id}", settings.seed)
    return rng if rng.random() < settings.interleave_share else None


# ----------------------------------------------------------------------------------- admin jobs


@dataclass
class Job:
    job_id: str
    kind: str
    state: str = "running"
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    generation: str | None = None
    error: str | None = None
    log: list[str] = field(default_factory=list)

    def status(self) -> JobStatus:
        return JobStatus(job_id=self.job_id, kind=self.kind, state=self.state, started_at=self.started_at,
                         finished_at=self.finished_at, generation=self.generation, error=self.error, log=self.log[-50:])


class JobRunner:
    """Index rebuilds in a background thread; at most one at a time per service."""

    def __init__(self, state: ServingState, on_reload: Callable[[], None]):
        self.state = state
        self.on_reload = on_reload
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start_rebuild(self) -> Job:
        with self._lock:
            if any(job.state == "running" for job in self.jobs.values()):
                raise ApiError(409, "busy", "a rebuild is already running; poll its status")
            job = Job(uuid.uuid4().hex, "rebuild")
            self.jobs[job.job_id] = job
        threading.Thread(target=self._rebuild, args=(job,), name=f"rebuild-{job.job_id[:8]}", daemon=True).start()
        return job

    def _rebuild(self, job: Job) -> None:
        config = self.state.config
        try:
            if config.backend.is_elasticsearch:  # a new generation index, verified, then the alias switch
                from indexing.elastic_build import rebuild_elastic_index

                summary = rebuild_elastic_index(config.home, config.index, config.backend.elasticsearch, progress=False,
                                                log=job.log.append)
            else:
                from indexing.build import rebuild_index

                summary = rebuild_index(config.home, config.index, progress=False, log=job.log.append)
            job.generation = summary.generation
            self.state.reload()
            self.on_reload()
            job.state = "succeeded"
        except IndexBusyError as exc:
            job.state, job.error = "failed", f"index is locked by another writer: {exc}"
        except Exception as exc:  # the job reports every failure; serving goes on with the old generation
            logger.exception("rebuild failed")
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            job.finished_at = time.time()


# ----------------------------------------------------------------------------------- metrics


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ltr_search_requests_total", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("ltr_search_request_seconds", "HTTP request latency by route", ["route"],
                                 buckets=STAGE_BUCKETS, registry=self.registry)
        self.stages = Histogram("ltr_search_stage_seconds", "search latency per pipeline stage", ["stage"],
                                buckets=STAGE_BUCKETS, registry=self.registry)
        self.events = Counter("ltr_search_events_total", "behaviour events stored, by type", ["type"], registry=self.registry)
        self.index_info = Gauge("ltr_search_index_generation_info", "the active index generation (value 1)",
                                ["index", "generation"], registry=self.registry)
        self.model_info = Gauge("ltr_search_model_info", "the active ranking model (value 1; 'none' = fused order)",
                                ["version"], registry=self.registry)
        self.interleaved = Counter("ltr_search_interleaved_requests_total",
                                   "ltr requests served as a team-draft interleaving of the active model (A) and B",
                                   ["model_a", "model_b"], registry=self.registry)
        self.shadow_scorings = Counter("ltr_search_shadow_scorings_total",
                                       "ltr request windows the shadow model also ranked (logged, never shown)",
                                       ["model"], registry=self.registry)
        self.drift = {name: Gauge(name, help_text, list(labels), registry=self.registry)
                      for name, (help_text, labels) in PROMETHEUS_GAUGES.items()}
        self.behaviour_failures = Counter("ltr_search_behaviour_update_failures_total",
                                          "event batches stored but not yet applied to the behaviour aggregates "
                                          "(the next batch or `ltr-search behaviour update` catches up)",
                                          registry=self.registry)
        self.experiment_failures = Counter("ltr_search_experiment_failures_total",
                                           "experiment failures (served responses unaffected), by experiment and stage",
                                           ["experiment", "stage"], registry=self.registry)
        self.backend_errors = Counter("ltr_search_backend_errors_total",
                                      "requests answered 503 because the Elasticsearch backend failed", registry=self.registry)

    def set_generation(self, index: str, generation: str) -> None:
        self.index_info.clear()
        self.index_info.labels(index, generation).set(1)

    def set_model(self, version: str | None) -> None:
        self.model_info.clear()
        self.model_info.labels(version or "none").set(1)


class BodyLimitMiddleware:
    """Refuse request bodies over the limit with 413, whether or not Content-Length is sent."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            response = _error(413, "body_too_large", f"request body over {self.max_bytes} bytes")
            await response(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(413, "body_too_large", f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


# ----------------------------------------------------------------------------------- the app


GET_SEARCH_PARAMS = frozenset({"q", "size", "offset", "pipeline", "filters", "exclude", "diversity_field",
                               "diversity_cap", "explain", "user_id", "session_id"})


def create_app(config: ServiceConfig, event_store: EventStore | None = None,
               experiment_log: ExperimentLog | None = None) -> FastAPI:
    state = ServingState(config)
    metrics = ServiceMetrics()
    metrics.model_info.labels("none").set(1)
    if event_store is None:
        config.event_store_path.parent.mkdir(parents=True, exist_ok=True)
    store = event_store or EventStore(config.event_store_path)
    behaviour_path = behaviour_store_path(config.home, config.index)
    behaviour_path.parent.mkdir(parents=True, exist_ok=True)
    aggregates = BehaviourStore(behaviour_path)  # updated after every stored event batch
    experiments_log = experiment_log
    if experiments_log is None and config.experiments.enabled:
        try:
            experiments_log = ExperimentLog(config.experiment_log_path)
        except Exception as exc:  # experiments are off without their log; serving goes on
            logger.error("experiments disabled: %s", exc)
            metrics.experiment_failures.labels("all", "open").inc()

    def refresh_generation_metric() -> None:
        snapshot = state.snapshot
        if snapshot is not None:
            metrics.set_generation(snapshot.index.name, snapshot.index.generation_id)
            metrics.set_model(snapshot.model_version)
            for experiment, _ in snapshot.experiments.errors if snapshot.experiments else ():
                metrics.experiment_failures.labels(experiment, "load").inc()

    jobs = JobRunner(state, refresh_generation_metric)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            state.reload()
            refresh_generation_metric()
        except (IndexBundleError, ElasticsearchError, OSError, ValueError) as exc:
            state.load_error = str(exc)
            logger.error("index not loaded: %s", exc)
        yield
        aggregates.close()
        if event_store is None:
            store.close()
        if experiment_log is None and experiments_log is not None:
            experiments_log.close()

    app = FastAPI(title="ltr-search", version="1", lifespan=lifespan,
                  description="Hybrid retrieval, learning-to-rank and behaviour events over one index.")
    app.state.serving = state
    app.state.metrics = metrics
    app.state.jobs = jobs
    app.state.event_store = store

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except ApiError as exc:  # raised while reading the body (size limit)
            response = _error(exc.status, exc.code, exc.message, exc.details)
        route = request.scope.get("route")
        label = getattr(route, "path", "unmatched")
        metrics.requests.labels(request.method, label, str(response.status_code)).inc()
        metrics.latency.labels(label).observe(time.perf_counter() - started)
        return response

    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message, exc.details)

    @app.exception_handler(ElasticsearchError)
    async def backend_error(request: Request, exc: ElasticsearchError) -> JSONResponse:
        """The cluster is down, slow or refused a request: the service itself is fine, retry later."""
        logger.error("elasticsearch: %s", exc)
        metrics.backend_errors.inc()
        return _error(503, "backend_unavailable", str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"field": ".".join(str(part) for part in e.get("loc", ())), "reason": str(e.get("msg", ""))}
                   for e in exc.errors()]
        return _error(422, "invalid_request", "the request does not match the schema", details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "http_error", str(exc.detail), headers=getattr(exc, "headers", None))

    def require_admin(request: Request) -> None:
        if not config.admin_token:
            raise ApiError(403, "admin_disabled", "admin endpoints are disabled: set LTR_SEARCH_ADMIN_TOKEN")
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "unauthorized", "admin endpoints need 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(token.strip().encode(), config.admin_token.encode()):
            raise ApiError(403, "forbidden", "invalid admin token")

    # ------------------------------------------------------------------ search

    def run_search(body: SearchRequest) -> SearchResponse:
        started = time.perf_counter()
        snapshot = state.require()
        if not body.query.strip():
            raise ApiError(400, "invalid_request", "query is blank", [{"field": "query", "reason": "blank"}])
        name = body.pipeline or snapshot.default_pipeline
        pipeline = snapshot.pipelines.get(name)
        if pipeline is None:
            if name == "ltr":
                reason = snapshot.model_error or "no model"
            elif name in DENSE_PIPELINES:
                reason = f"needs dense vectors; index '{snapshot.index.name}' has none"
            else:
                reason = "unknown or not servable"
            raise ApiError(400, "invalid_request", f"pipeline '{name}' {reason}; available: {', '.join(snapshot.pipelines)}",
                           [{"field": "pipeline", "reason": reason}])
        try:
            filters = parse_filters(body.filters or {})
            if body.diversity:
                check_field_name(body.diversity.field, "diversity.field")
        except RuleError as exc:
            raise ApiError(400, "invalid_request", str(exc), [{"field": str(exc).split(":")[0], "reason": str(exc)}]) from None
        request_id = uuid.uuid4().hex
        experiments = snapshot.experiments if name == "ltr" and experiments_log is not None else None
        run_pipeline, capture, interleaver = pipeline, None, None
        if experiments is not None:
            capture = _WindowCapture(pipeline.first_stage)
            run_pipeline = dataclasses.replace(pipeline, first_stage=capture)
            rng = interleaving_rng(request_id, config.experiments) if experiments.challenger is not None else None
            if rng is not None:  # interleaved pages are not explored: every propensity is 1
                interleaver = _TeamDraftRanker(capture, experiments.challenger, rng)
                run_pipeline = dataclasses.replace(run_pipeline, ranker=interleaver, epsilon=0.0)
        ranking_request = RankingRequest(
            query=body.query, request_id=request_id, size=body.size, offset=body.offset, filters=tuple(filters),
            exclude=frozenset(body.exclude), diversity_field=body.diversity.field if body.diversity else None,
            diversity_cap=body.diversity.max_per_value if body.diversity else None, explain=body.explain,
        )
        try:
            outcome = run_pipeline.run(ranking_request)
        except WindowTooSmallError as exc:
            raise ApiError(400, "invalid_request", str(exc), [{"field": "offset", "reason": str(exc)}]) from None
        if snapshot.drift is not None:
            snapshot.drift.observe_outcome(outcome)
        interleaved = interleaver is not None and interleaver.teams is not None
        if interleaver is not None and interleaver.error is not None:
            logger.error("interleaving %s failed, served A's order: %s", interleaver.version, interleaver.error)
            metrics.experiment_failures.labels("interleave", "score").inc()
        if interleaved:
            for result in outcome.results:  # shown scores are the active model's, as on any ltr page
                result.score = interleaver.a_scores[result.doc_id]
        shadow = None
        if experiments is not None and experiments.shadow is not None and capture is not None and capture.window is not None:
            shadow_started = time.perf_counter()
            shadow = shadow_ranking(experiments.shadow, body.query, capture.window, request_id, outcome.model_version)
            outcome.timings_ms["shadow"] = (time.perf_counter() - shadow_started) * 1000
            if shadow is None:
                metrics.experiment_failures.labels("shadow", "score").inc()
            else:
                metrics.shadow_scorings.labels(experiments.shadow.version).inc()
        log_started = time.perf_counter()
        now = time.time()
        store.log_request(served_request(outcome, ranking_request, name, snapshot.index, now,
                                         body.user_id, body.session_id))
        if interleaved:
            metrics.interleaved.labels(interleaver.capture.version, interleaver.challenger.version).inc()
            picks = tuple(TeamPick(r.position, r.doc_id, interleaver.teams[r.doc_id]) for r in outcome.results)
            record = InterleavedRequest(request_id, now, interleaver.capture.version, interleaver.challenger.version,
                                        body.offset, picks)
            _log_experiment(metrics, "interleave", lambda: experiments_log.log_interleaved(record))
        if shadow is not None:
            shadow = dataclasses.replace(shadow, timestamp=now)
            _log_experiment(metrics, "shadow", lambda: experiments_log.log_shadow(shadow))
        outcome.timings_ms["log"] = (time.perf_counter() - log_started) * 1000
        for stage, ms in outcome.timings_ms.items():
            metrics.stages.labels(stage).observe(ms / 1000)
        results = [
            SearchResult(
                id=r.doc_id, score=r.score, position=r.position, propensity=r.propensity, fields=r.fields or {},
                explain=ResultExplanation(
                    first_stage_rank=r.first_stage_rank, first_stage_score=r.first_stage_score,
                    features=_json_safe(named_row(outcome.feature_names, r.features)),
                    contributions=_json_safe(named_row(_with_bias(outcome.feature_names), r.contributions)),
                ) if body.explain else None,
            )
            for r in outcome.results
        ]
        return SearchResponse(
            request_id=request_id, query=body.query, pipeline=name,
            index=IndexInfo(name=snapshot.index.name, generation=snapshot.index.generation_id),
            model_version=outcome.model_version,
            offset=body.offset, size=body.size, window=outcome.window_size, eligible=outcome.eligible,
            explored=outcome.explored, results=results, took_ms=(time.perf_counter() - started) * 1000,
            timings_ms=outcome.timings_ms if body.explain else None, interleaved=True if interleaved else None,
        )

    @app.post("/search", response_model=SearchResponse, response_model_exclude_none=True)
    def search_post(body: SearchRequest) -> SearchResponse:
        return run_search(body)

    @app.get("/search", response_model=SearchResponse, response_model_exclude_none=True)
    def search_get(
        request: Request,
        q: str = Query(..., min_length=1, max_length=config.max_query_chars),
        size: int = Query(10, ge=1, le=config.max_page_size),
        offset: int = Query(0, ge=0, le=config.rerank_window),
        pipeline: str | None = Query(None, max_length=64),
        filters: str | None = Query(None, max_length=8192, description="JSON object, as in POST /search"),
        exclude: str | None = Query(None, max_length=65536, description="comma-separated ids"),
        diversity_field: str | None = Query(None, min_length=1, max_length=128),
        diversity_cap: int | None = Query(None, ge=1, le=config.max_page_size),
        explain: bool = False,
        user_id: str | None = Query(None, min_length=1, max_length=128),
        session_id: str | None = Query(None, min_length=1, max_length=128),
    ) -> SearchResponse:
        unknown = sorted(set(request.query_params) - GET_SEARCH_PARAMS)
        if unknown:
            raise ApiError(400, "invalid_request", f"unknown query parameter(s): {', '.join(unknown)}",
                           [{"field": f"query.{name}", "reason": "unknown parameter"} for name in unknown])
        parsed_filters = None
        if filters is not None:
            try:
                parsed_filters = json.loads(filters)
            except json.JSONDecodeError as exc:
                raise ApiError(400, "invalid_request", f"filters: invalid JSON ({exc.msg})",
                               [{"field": "query.filters", "reason": "invalid JSON"}]) from None
            if not isinstance(parsed_filters, dict):
                raise ApiError(400, "invalid_request", "filters: expected a JSON object",
                               [{"field": "query.filters", "reason": "not an object"}])
        if (diversity_field is None) != (diversity_cap is None):
            raise ApiError(400, "invalid_request", "diversity_field and diversity_cap go together",
                           [{"field": "query.diversity_cap", "reason": "needs diversity_field"}])
        try:
            body = SearchRequest(
                query=q, size=size, offset=offset, pipeline=pipeline, filters=parsed_filters,
                exclude=[e for e in (exclude or "").split(",") if e],
                diversity={"field": diversity_field, "max_per_value": diversity_cap} if diversity_field else None,
                explain=explain, user_id=user_id, session_id=session_id,
            )
        except ValueError as exc:  # pydantic's ValidationError
            raise RequestValidationError(getattr(exc, "errors", lambda: [])()) from None
        return run_search(body)

    # ------------------------------------------------------------------ events and documents

    @app.post("/events", response_model=EventsAccepted)
    def post_events(batch: EventBatch) -> EventsAccepted:
        now = time.time()
        events = [
            Event(request_id=e.request_id, type=e.type, doc_id=e.doc_id, position=e.position,
                  timestamp=now if e.timestamp is None else e.timestamp, dwell_ms=e.dwell_ms, event_id=e.event_id)
            for e in batch.events
        ]
        try:
            result = store.append_events(events)
        except ValidationError as exc:
            details = [{"field": p.split(": ", 1)[0], "reason": p.split(": ", 1)[-1]} for p in exc.problems]
            raise ApiError(422, "invalid_events", f"{len(exc.problems)} problem(s); nothing was stored", details) from None
        for event in events:
            metrics.events.labels(event.type).inc()
        try:  # the events are stored (the source of truth); aggregates follow them, never the reverse
            aggregates.update(store)
        except Exception:
            logger.exception("behaviour aggregates not updated; they catch up on the next batch")
            metrics.behaviour_failures.inc()
        return EventsAccepted(stored=result.stored, duplicates=result.duplicates)

    @app.get("/documents/{doc_id}")
    def get_document(doc_id: str) -> dict[str, Any]:
        snapshot = state.require()
        document = snapshot.index.document(doc_id) if len(doc_id) <= 512 else None
        if document is None:
            raise ApiError(404, "not_found", f"no document '{doc_id[:200]}' in index '{snapshot.index.name}'")
        return document

    # ------------------------------------------------------------------ operations

    @app.get("/health", response_model=HealthResponse)
    def health() -> HealthResponse:
        return HealthResponse(status="ok")

    @app.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
    def ready() -> Any:
        snapshot = state.snapshot
        if snapshot is None:
            return JSONResponse(ReadyResponse(ready=False, reason=state.load_error or "loading").model_dump(), 503)
        return ReadyResponse(ready=True, index=IndexInfo(name=snapshot.index.name, generation=snapshot.index.generation_id))

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        snapshot = state.snapshot
        set_gauges(metrics.drift, snapshot.drift.report() if snapshot is not None and snapshot.drift is not None else None)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/rebuild", response_model=JobStatus, status_code=202, dependencies=[Depends(require_admin)])
    def admin_rebuild() -> JobStatus:
        return jobs.start_rebuild().status()

    @app.get("/admin/jobs/{job_id}", response_model=JobStatus, dependencies=[Depends(require_admin)])
    def admin_job(job_id: str) -> JobStatus:
        job = jobs.jobs.get(job_id)
        if job is None:
            raise ApiError(404, "not_found", f"no job '{job_id[:64]}'")
        return job.status()

    @app.post("/admin/reload", response_model=ReloadResponse, dependencies=[Depends(require_admin)])
    def admin_reload() -> ReloadResponse:
        try:
            previous, snapshot = state.reload()
        except (IndexBundleError, ElasticsearchError, OSError, ValueError) as exc:
            raise ApiError(409, "reload_failed", f"the active generation could not be loaded; still serving the old one: {exc}") from None
        refresh_generation_metric()
        return ReloadResponse(index=IndexInfo(name=snapshot.index.name, generation=snapshot.index.generation_id),
                              previous_generation=previous)

    return app


def shadow_ranking(shadow: LtrPipeline, query: str, window: ScoredWindow, request_id: str,
                   served_model: str | None) -> ShadowRanking | None:
    """The shadow model's top of the served window next to the served model's top of it, or
    None (logged) when the shadow fails: it never affects the response."""
    try:
        model = shadow.model
        assert model is not None
        doc_ids = [hit.doc_id for hit in window.hits]
        scores = np.asarray(model.predict(window_features(shadow, query, window)), dtype=np.float64) if doc_ids else np.empty(0)
        return ShadowRanking(request_id, 0.0, shadow.version, top_ranking(doc_ids, scores), served_model,
                             top_ranking(doc_ids, np.asarray(window.scores, dtype=np.float64)))
    except Exception:
        logger.exception("shadow model %s failed on request %s", shadow.version, request_id)
        return None


def _log_experiment(metrics: ServiceMetrics, experiment: str, write: Callable[[], None]) -> None:
    try:
        write()
    except Exception:  # the page is served and in the request log; only this experiment row is lost
        logger.exception("experiment log write failed (%s)", experiment)
        metrics.experiment_failures.labels(experiment, "log").inc()


def _with_bias(names: tuple[str, ...] | None) -> tuple[str, ...] | None:
    return None if names is None else (*names, "bias")


def _json_safe(values: dict[str, float] | None) -> dict[str, float | None] | None:
    """JSON has no NaN: a missing feature is null in API responses."""
    if values is None:
        return None
    return {k: (None if v != v else v) for k, v in values.items()}


def limit_native_threads() -> None:
    """BLAS gets one thread per call: the service's parallelism is its request threads, and the
    matrix-vector products of exact dense search are memory-bound, so a BLAS pool per request
    only oversubscribes the cores. ONNX Runtime's pool is sized by `ServiceConfig.threads`."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def serve(config: ServiceConfig, host: str, port: int) -> None:
    import uvicorn

    limit_native_threads()
    uvicorn.run(create_app(config), host=host, port=port, log_level="info", access_log=False)
