"""What every page shares: the Jinja2 environment (autoescape on for every template, so document
text is always escaped), rendering, and running a pipeline for a page without logging it.

Pages that only look (compare, judging pools) rank with exploration off and never write the
request log: a click can only be recorded against what the search page actually served.
"""
from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse

from ltr.ranker import registry_pipeline
from ltr.registry import ModelRegistry
from search.app.config import ServiceConfig
from search.app.pages.auth import csrf_token, current_session
from search.app.state import Snapshot
from search.ranking import RankingOutcome, RankingPipeline, RankingRequest, query_retrievers

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


MODEL_PREFIX = "model:"
_STORED_MODELS: dict[tuple[str, str, str], RankingPipeline] = {}
_STORED_MODELS_LOCK = threading.Lock()


def stored_model_names(home: Path, snapshot: Snapshot) -> list[str]:
    """`model:V` for every stored model (the active one is also served as `ltr`), when the index has
    the dense vectors learned rankers need."""
    if not snapshot.index.has_dense:
        return []
    try:
        versions = ModelRegistry(home).version_ids()
    except OSError:
        return []
    return [f"{MODEL_PREFIX}{v}" for v in reversed(versions)]


def page_pipeline(snapshot: Snapshot, config: ServiceConfig, name: str) -> RankingPipeline:
    """A served pipeline, or a stored model (`model:V`) loaded once per generation for pages that
    compare; a model that cannot be used raises `RegistryError`/`ModelUnavailableError`."""
    if name in snapshot.pipelines:
        return snapshot.pipelines[name]
    if not name.startswith(MODEL_PREFIX):
        raise KeyError(name)
    key = (snapshot.index.name, snapshot.index.generation_id, name)
    with _STORED_MODELS_LOCK:
        pipeline = _STORED_MODELS.get(key)
        if pipeline is None:
            learned = registry_pipeline(snapshot.index, config.home, name[len(MODEL_PREFIX):], name=name,
                                        events_path=config.event_store_path)
            if len(_STORED_MODELS) > 8:
                _STORED_MODELS.clear()
            pipeline = _STORED_MODELS[key] = RankingPipeline(snapshot.index, learned, config.rerank_window)
    return pipeline


def rank_quietly(snapshot: Snapshot, pipeline: str, query: str, size: int,
                 config: ServiceConfig | None = None) -> RankingOutcome:
    """A pipeline's top `size` for a page that only looks: no exploration, nothing logged.
    With `config`, `pipeline` may also be a stored model (`model:V`)."""
    served = page_pipeline(snapshot, config, pipeline) if config is not None else snapshot.pipelines[pipeline]
    quiet = dataclasses.replace(served, epsilon=0.0) if served.epsilon else served
    request = RankingRequest(query=query, request_id=uuid.uuid4().hex, size=min(size, quiet.window), offset=0)
    if not any(r.answers for r in query_retrievers(snapshot.index, query, pipeline)):
        return quiet.nothing(request)
    return quiet.run(request)
