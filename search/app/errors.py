"""The one error shape of the HTTP API: `{"error": {"code", "message", "details": [{field, reason}]}}`.

Every malformed input gets a 4xx in this shape naming the field; a 5xx means a bug or an
unavailable dependency, and is answered in this shape too (`InternalErrorMiddleware`).
"""
from __future__ import annotations

import logging
import sqlite3

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from indexing.delta import JournalTruncatedError
from indexing.elastic import ElasticsearchError
from indexing.sqlite import SqliteStoreError

logger = logging.getLogger("ltr_search.service")
# A store that cannot take a write (read-only, disk full, locked past its retries): the store's
# trouble, not the request's. Searches log around it; POST /events answers 503.
STORE_ERRORS = (sqlite3.OperationalError, SqliteStoreError, OSError)


class ApiError(Exception):
    """An error answer: an HTTP status, a code, the offending field(s), optional headers."""

    def __init__(self, status: int, code: str, message: str, details: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details or []
        self.headers = headers


def error_response(status: int, code: str, message: str, details: list[dict[str, str]] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "details": details or []}}, status, headers=headers)


def validation_details(errors: list[dict]) -> list[dict[str, str]]:
    """pydantic errors as the API's details: the field as a dotted path, the reason."""
    return [{"field": ".".join(str(part) for part in e.get("loc", ())), "reason": str(e.get("msg", ""))} for e in errors]


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


async def _backend_error(request: Request, exc: ElasticsearchError) -> JSONResponse:
    """The cluster is down, slow or refused a request: the service itself is fine, retry later."""
    logger.error("elasticsearch: %s", exc)
    request.app.state.metrics.backend_errors.inc()
    return error_response(503, "backend_unavailable", str(exc))


async def _generation_retired(request: Request, exc: JournalTruncatedError) -> JSONResponse:
    """The served generation's update journal was folded into a newer generation (a compaction after
    `rebuild --dataset` started another source): reload the active generation, ask for a retry."""
    from starlette.concurrency import run_in_threadpool

    logger.warning("served generation retired by a compaction; reloading the active one: %s", exc)
    try:
        _, snapshot = await run_in_threadpool(request.app.state.serving.reload)
        message = f"the served index generation was retired; now serving {snapshot.index.generation_id}: retry"
    except Exception as reload_error:  # noqa: BLE001 - still answered as 503 with the reason
        logger.error("reload after a retired generation failed: %s", reload_error)
        message = f"the served index generation was retired and reloading failed: {reload_error}"
    return error_response(503, "generation_retired", message, headers={"Retry-After": "1"})


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, "invalid_request", "the request does not match the schema", validation_details(exc.errors()))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, "http_error", str(exc.detail), headers=getattr(exc, "headers", None))


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(ElasticsearchError, _backend_error)
    app.add_exception_handler(JournalTruncatedError, _generation_retired)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


class InternalErrorMiddleware:
    """Any exception no handler claimed becomes a JSON 500 here, inside the request metrics.

    Starlette's own catch-all answers plain text and then re-raises, so uvicorn logs it as a
    crash, the metrics middleware never sees a response, and the keep-alive connection is
    closed under the client's next request. Answering here returns normally: the 500 is counted
    and the connection stays usable. An exception after the response started cannot be answered
    and is re-raised (uvicorn then closes that connection, the only honest thing left)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            response = error_response(500, "internal_error",
                                      f"internal error ({type(exc).__name__}); it is logged with its traceback")
            await response(scope, receive, send)
