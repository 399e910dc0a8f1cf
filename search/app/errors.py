"""The one error shape of the HTTP API: `{"error": {"code", "message", "details": [{field, reason}]}}`.

Every malformed input gets a 4xx in this shape naming the field; a 5xx means a bug.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from indexing.elastic import ElasticsearchError

logger = logging.getLogger("ltr_search.service")


class ApiError(Exception):
    """A client error with an HTTP status, a code and the offending field(s)."""

    def __init__(self, status: int, code: str, message: str, details: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details or []


def error_response(status: int, code: str, message: str, details: list[dict[str, str]] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "details": details or []}}, status, headers=headers)


def validation_details(errors: list[dict]) -> list[dict[str, str]]:
    """pydantic errors as the API's details: the field as a dotted path, the reason."""
    return [{"field": ".".join(str(part) for part in e.get("loc", ())), "reason": str(e.get("msg", ""))} for e in errors]


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.details)


async def _backend_error(request: Request, exc: ElasticsearchError) -> JSONResponse:
    """The cluster is down, slow or refused a request: the service itself is fine, retry later."""
    logger.error("elasticsearch: %s", exc)
    request.app.state.metrics.backend_errors.inc()
    return error_response(503, "backend_unavailable", str(exc))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, "invalid_request", "the request does not match the schema", validation_details(exc.errors()))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, "http_error", str(exc.detail), headers=getattr(exc, "headers", None))


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(ElasticsearchError, _backend_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
