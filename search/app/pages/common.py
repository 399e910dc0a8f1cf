"""What every page shares: the Jinja2 environment (autoescape on for every template, so document
text is always escaped), rendering, and running a pipeline for a page without logging it.

Pages that only look (compare, judging pools) rank with exploration off and never write the
request log: a click can only be recorded against what the search page actually served.
"""
from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse

from search.app.pages.auth import csrf_token, current_session
from search.app.state import Snapshot
from search.ranking import RankingOutcome, RankingRequest, query_retrievers

PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATES_DIR = PACKAGE_DIR / "templates"
STATIC_DIR = PACKAGE_DIR / "static"
STATIC_URL = "/static"
# Defence in depth behind autoescape: no inline or foreign script can run, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

ENVIRONMENT = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
    autoescape=True,  # every template, whatever its name: no document text is ever inserted raw
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,
)


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    """One page; `session` and `csrf` come from the request (pages/auth.py), for the header and forms."""
    session = current_session(request)
    started = time.perf_counter()
    html = ENVIRONMENT.get_template(template).render(
        request=request, session=session, csrf=csrf_token(request, session), static=STATIC_URL, **context)
    response = HTMLResponse(html, status_code=status)
    response.headers["Server-Timing"] = f"render;dur={(time.perf_counter() - started) * 1000:.2f}"
    response.headers.update(SECURITY_HEADERS)
    return response


def rank_quietly(snapshot: Snapshot, pipeline: str, query: str, size: int) -> RankingOutcome:
    """A pipeline's top `size` for a page that only looks: no exploration, nothing logged."""
    served = snapshot.pipelines[pipeline]
    quiet = dataclasses.replace(served, epsilon=0.0) if served.epsilon else served
    request = RankingRequest(query=query, request_id=uuid.uuid4().hex, size=min(size, quiet.window), offset=0)
    if not any(r.answers for r in query_retrievers(snapshot.index, query, pipeline)):
        return quiet.nothing(request)
    return quiet.run(request)
