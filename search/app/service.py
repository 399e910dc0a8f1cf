"""The FastAPI query service: `create_app` wires the routers (search/app/routers/), the serving
state (search/app/state.py), metrics and error handlers; `serve` runs it under uvicorn.

Handlers are plain `def`s, so FastAPI runs them in its thread pool; they get what they use
through dependencies (search/app/deps.py). Every malformed input gets a 4xx JSON error naming
the field (search/app/errors.py); a 5xx means a bug.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from search.app.preload import import_xgboost_without_sklearn

import_xgboost_without_sklearn()  # before the imports below load XGBoost (ltr.ranker, ltr.registry)

import swagger_ui_bundle  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.openapi.docs import get_swagger_ui_html  # noqa: E402
from fastapi.responses import HTMLResponse  # noqa: E402
from fastapi.staticfiles import StaticFiles  # noqa: E402
from starlette.types import ASGIApp, Message, Receive, Scope, Send  # noqa: E402

from indexing.home import registry_dir  # noqa: E402
from ltr.behaviour import BehaviourStore  # noqa: E402
from ltr.experiments import ExperimentLog  # noqa: E402
from search.app.config import ServiceConfig, load_service_config  # noqa: E402
from search.app.errors import InternalErrorMiddleware, add_error_handlers, error_response  # noqa: E402
from search.app.metrics import ServiceMetrics, multiprocess_dir, refresh_generation_metrics  # noqa: E402
from search.app import pages  # noqa: E402
from search.limits import MAX_REQUEST_HEAD_BYTES  # noqa: E402
from search.app.routers import admin, documents, events, operations, search  # noqa: E402
from search.app.state import RELOAD_ERRORS, JobRunner, ServingState, Snapshot  # noqa: F401, E402 - ServingState: used by tests and benches
from search.backend import SearchBackend  # noqa: E402
from search.event_store import EventStore  # noqa: E402

if TYPE_CHECKING:
    from ltr.ranker import LtrPipeline

logger = logging.getLogger("ltr_search.service")
DOCS_ASSETS = "/docs-assets"  # Swagger UI from the swagger-ui-bundle package: /docs works offline
WORKER_PID = str(os.getpid())  # each worker imports this module afresh (uvicorn spawns them)


class BodyLimitMiddleware:
    """Refuse request bodies over the limit with 413, whether or not Content-Length is sent.

    A body without Content-Length (chunked) is read here, up to the limit, before the app sees it:
    raising from inside the app's `receive` would reach FastAPI's body parser, which turns any
    error into 400. The 413 closes the connection, since the rest of the body is left unread."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            await self.app(scope, receive, send)  # the server stops the body at Content-Length
            return
        chunks: list[bytes] = []
        seen, first = 0, None
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                first = message
                break
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, "body_too_large", f"request body over {self.max_bytes} bytes",
                                  headers={"Connection": "close"})
        await response(scope, receive, send)


def create_app(config: ServiceConfig, event_store: EventStore | None = None,
               experiment_log: ExperimentLog | None = None, run_dir: Path | None = None,
               behaviour_store: BehaviourStore | None = None, opening: Future[SearchBackend] | None = None,
               model: Future[LtrPipeline | None] | None = None) -> FastAPI:
    """The app over `config`; a given `event_store`, `experiment_log` or `behaviour_store` is the caller's to close.
    `run_dir`: the folder the workers of one `serve --workers N` share (reload stamp, job statuses).
    `opening`, `model`: the configured index and its active model, already being opened (see `ServingState`)."""
    state = ServingState(config, run_dir / "reload.stamp" if run_dir is not None else None, opening, model)
    metrics = ServiceMetrics()
    metrics.model_info.labels("none").set(1)
    if event_store is None:
        config.event_store_path.parent.mkdir(parents=True, exist_ok=True)
    store = event_store or EventStore(config.event_store_path)
    aggregates = behaviour_store or BehaviourStore.for_index(config.home, config.index)  # updated after every stored event batch
    experiments_log = experiment_log
    # Open whenever a model could be interleaved: configured, or a registry challenge started by
    # `ltr-search retrain --interleave` while the service runs (it is read on reload).
    if experiments_log is None and (config.experiments.enabled or registry_dir(config.home).is_dir()):
        try:
            experiments_log = ExperimentLog(config.experiment_log_path)
        except Exception as exc:  # experiments are off without their log; serving goes on
            logger.error("experiments disabled: %s", exc)
            metrics.experiment_failures.labels("all", "open").inc()
    refresh = partial(refresh_generation_metrics, metrics, state)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            state.reload(announce=False)  # a worker starting is no news to the others
            refresh()
        except RELOAD_ERRORS as exc:
            state.load_error = str(exc)
            logger.error("index not loaded: %s", exc)
        yield
        if multiprocess_dir():  # this worker's live gauges leave the sums
            from prometheus_client import multiprocess  # lazy: multi-worker serving only

            multiprocess.mark_process_dead(os.getpid())
        if behaviour_store is None:
            aggregates.close()
        if event_store is None:
            store.close()
        if experiment_log is None and experiments_log is not None:
            experiments_log.close()

    app = FastAPI(title="ltr-search", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Hybrid retrieval, learning-to-rank and behaviour events over one index.")
    add_offline_docs(app)
    app.state.serving = state
    app.state.metrics = metrics
    app.state.jobs = JobRunner(state, refresh, run_dir / "jobs" if run_dir is not None else None)
    app.state.event_store = store
    app.state.aggregates = aggregates
    app.state.experiment_log = experiments_log
    # Innermost first: an unhandled error becomes a JSON 500 inside the request metrics, and the
    # body limit answers before any of it runs.
    app.add_middleware(InternalErrorMiddleware)
    app.middleware("http")(count_requests)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    add_error_handlers(app)
    for router in (search.router, events.router, documents.router, operations.router, admin.router):
        app.include_router(router)
    pages.install(app)  # the server-rendered pages (search/app/pages)
    return app


def add_offline_docs(app: FastAPI) -> None:
    """GET /docs with Swagger UI's scripts and styles served by the app itself, not a CDN."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")


async def count_requests(request: Request, call_next):
    """Requests and latency per route template (not per URL: ids would explode the labels); the
    answering worker's pid in `X-Worker` (which of `serve --workers N` served it)."""
    started = time.perf_counter()
    response = await call_next(request)
    metrics: ServiceMetrics = request.app.state.metrics
    label = getattr(request.scope.get("route"), "path", "unmatched")
    metrics.requests.labels(request.method, label, str(response.status_code)).inc()
    metrics.latency.labels(label).observe(time.perf_counter() - started)
    response.headers["X-Worker"] = WORKER_PID
    return response


def limit_native_threads() -> None:
    """BLAS gets one thread per call: the service's parallelism is its request threads, and the
    matrix-vector products of exact dense search are memory-bound, so a BLAS pool per request
    only oversubscribes the cores. ONNX Runtime's pool is sized by `ServiceConfig.threads`."""
    from threadpoolctl import threadpool_limits  # only when serving

    threadpool_limits(limits=1, user_api="blas")


def app_from_environment() -> FastAPI:
    """The app factory each `serve --workers N` worker calls (uvicorn imports it by name; see
    search/app/cli/serve.py, which launches them without importing this module)."""
    from search.app.cli.serve import ServeSpec  # the spec's one definition, beside its writer

    spec = ServeSpec.from_environment()
    limit_native_threads()
    config = load_service_config(Path(spec.home), Path(spec.config_file) if spec.config_file else None, spec.overrides)
    return create_app(config, run_dir=Path(spec.run_dir) if spec.run_dir else None)


def serve(config: ServiceConfig, host: str, port: int, opening: Future[SearchBackend] | None = None,
          model: Future[LtrPipeline | None] | None = None) -> None:
    """Run the app under uvicorn, one process; its access log (one line per request) follows
    `config.access_log`. Several worker processes: search/app/cli/serve.py `serve_workers`.
    `opening`, `model`: the configured index and its active model, already being opened (see `ServingState`)."""
    import uvicorn  # only `serve` needs the server: the CLI's other commands start faster without it

    limit_native_threads()
    uvicorn.run(create_app(config, opening=opening, model=model), host=host, port=port, log_level="info",
                access_log=config.access_log, h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
