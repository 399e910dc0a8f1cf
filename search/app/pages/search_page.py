"""GET / : the search page (query box, pipeline selector, metadata filters, paging, highlighted
snippets, a "why" panel per result) and GET /doc/{id}: one document. Searches run through the
same `run_search` as the API, so every page is in the request log and a click on a result, sent
by the page's script to POST /events with the request id and position, feeds the behaviour loop."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from search.app.deps import ConfigDep, EventStoreDep, ExperimentLogDep, MetricsDep, StateDep
from search.app.errors import ApiError
from search.app.pages.common import render
from search.app.pages.facets import Facet, index_facets
from search.app.pages.highlight import Segment, highlighter
from search.app.routers.search import run_search
from search.app.schemas import SearchRequest, SearchResponse, SearchResult
from search.limits import MAX_DOC_ID_LENGTH, MAX_QUERY_CHARS

router = APIRouter(include_in_schema=False)
PAGE_SIZE = 10  # results per page unless the URL says `size=` (1 to MAX_PAGE_RESULTS)
MAX_PAGE_RESULTS = 50
WHY_FEATURES = 6  # contributions shown per result
FILTER_PREFIX = "f."


@dataclass
class WhyRow:
    name: str
    value: float
    width: float  # percent of the panel, by |value| against the result's largest


@dataclass
class ResultView:
    result: SearchResult
    title: list[Segment]
    text: list[Segment]
    why: list[WhyRow]
    bias: float | None  # the model's constant (bias + a staged model's base)
    matched: list[str]  # distinct matched words of the snippets, as written


def parse_filters(params: dict[str, str], facets: list[Facet]) -> tuple[dict[str, Any], list[str]]:
    """The search filters of the form's `f.FIELD` (a JSON value) and `f.FIELD.gte|lte` (a number)
    parameters, and the problems found (each names the field)."""
    filters: dict[str, Any] = {}
    problems: list[str] = []
    for key, raw in params.items():
        if not key.startswith(FILTER_PREFIX) or raw == "":
            continue
        field, _, bound = key[len(FILTER_PREFIX):].rpartition(".") if key.endswith((".gte", ".lte")) else (
            key[len(FILTER_PREFIX):], "", "")
        if bound:
            try:
                number = float(raw)
                if not math.isfinite(number):
                    raise ValueError
            except ValueError:
                problems.append(f"{field}: '{raw[:40]}' is not a number")
                continue
            range_ = filters.setdefault(field, {})
            if isinstance(range_, dict):
                range_[bound] = int(number) if number.is_integer() else number
        else:
            try:
                filters[field] = json.loads(raw)
            except json.JSONDecodeError:
                filters[field] = raw  # a plain string typed into the URL
    return filters, problems


def why_rows(result: SearchResult) -> tuple[list[WhyRow], float | None]:
    """The largest model contributions of one result (bias and base apart)."""
    contributions = (result.explain.contributions if result.explain else None) or {}
    constant = [v for k, v in contributions.items() if k in ("bias", "base") and v is not None]
    items = sorted(((k, v) for k, v in contributions.items() if k not in ("bias", "base") and v is not None),
                   key=lambda kv: -abs(kv[1]))[:WHY_FEATURES]
    largest = max((abs(v) for _, v in items), default=0.0) or 1.0
    return [WhyRow(k, v, 100 * abs(v) / largest) for k, v in items], (sum(constant) if constant else None)


@router.get("/", response_class=HTMLResponse)
def search_page(request: Request, state: StateDep, config: ConfigDep, metrics: MetricsDep, store: EventStoreDep,
                experiment_log: ExperimentLogDep) -> Response:
    snapshot = state.snapshot
    if snapshot is None:
        return render(request, "message.html", status=503, title="Not ready",
                      message=f"No index is loaded: {state.load_error or 'still loading'}.")
    params = dict(request.query_params)
    query = params.get("q", "")[:MAX_QUERY_CHARS]
    pipeline = params.get("pipeline") or snapshot.default_pipeline
    facets = index_facets(snapshot.index)
    filters, problems = parse_filters(params, facets)
    try:
        size = max(1, min(int(params.get("size", PAGE_SIZE)), MAX_PAGE_RESULTS, config.max_page_size))
        page = max(1, min(int(params.get("page", "1")), config.rerank_window // size))
    except ValueError:
        size, page, problems = PAGE_SIZE, 1, [*problems, "page and size: whole numbers"]
    response: SearchResponse | None = None
    views: list[ResultView] = []
    status = 200
    if query.strip() and not problems:
        body = SearchRequest(query=query, size=size, offset=(page - 1) * size, pipeline=pipeline,
                             filters=filters or None, explain=True)
        try:
            response = run_search(body, snapshot, config, metrics, store, experiment_log)
        except ApiError as exc:
            problems.append(exc.message)
            status = exc.status
        if response is not None:
            marker = highlighter(snapshot.index.describe(), query)
            for result in response.results:
                snippets = marker.document(result.fields)
                rows, bias = why_rows(result)
                title, text = snippets.get("title", []), snippets.get("text", [])
                matched = list(dict.fromkeys(t.lower() for t, hit in title + text if hit))
                views.append(ResultView(result, title, text, rows, bias, matched))
    elif problems:
        status = 400
    last_page = 0 if response is None else max(1, min(math.ceil(response.eligible / size), config.rerank_window // size))
    return render(request, "search.html", status=status, title=query or "Search", query=query, pipeline=pipeline,
                  pipelines=list(snapshot.pipelines), facets=facets, params=params, filters=filters, problems=problems,
                  response=response, views=views, page=page, last_page=last_page, json=json,
                  params_without_page="".join(f"{quote_plus(k)}={quote_plus(v)}&" for k, v in params.items() if k != "page"),
                  model_version=snapshot.model_version, index=snapshot.index)


@router.get("/doc/{doc_id}", response_class=HTMLResponse)
def document_page(request: Request, doc_id: str, state: StateDep, q: str = "") -> Response:
    snapshot = state.require()
    document = snapshot.index.document(doc_id) if len(doc_id) <= MAX_DOC_ID_LENGTH else None
    if document is None:
        return render(request, "message.html", status=404, title="Not found",
                      message=f"No document '{doc_id[:200]}' in index '{snapshot.index.name}'.")
    marker = highlighter(snapshot.index.describe(), q[:MAX_QUERY_CHARS])
    return render(request, "document.html", title=document.get("title") or doc_id, document=document, query=q,
                  title_segments=marker.field(document.get("title") or "", 10_000),
                  text_segments=marker.field(document.get("text") or "", 1_000_000))
