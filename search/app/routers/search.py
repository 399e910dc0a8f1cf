"""GET and POST /search. One request runs as separate steps: HTTP validation, the online
experiments that wrap the pipeline, the ranking itself, shadow scoring, the request log and
metrics, then the response."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError

from ltr.experiments import (
    ExperimentLog, InterleavedRequest, ServedExperiments, ShadowRanking, InterleavingRanker, WindowCapture, interleaving_rng,
    shadow_ranking,
)
from ltr.ranker import stage_contributions
from search.app.config import OnlineExperimentSettings, ServiceConfig
from search.app.deps import ConfigDep, EventStoreDep, ExperimentLogDep, MetricsDep, StateDep
from search.app.errors import STORE_ERRORS, ApiError
from search.app.metrics import ServiceMetrics
from search.app.pages.highlight import highlighter, to_html
from search.app.schemas import (
    RESULT_FIELDS, IndexInfo, ResultExplanation, RetrieverInfo, SearchRequest, SearchResponse, SearchResult,
)
from search.app.state import DENSE_PIPELINES, Snapshot
from search.event_store import EventStore
from search.limits import MAX_FIELD_NAME_LENGTH, MAX_ID_LENGTH, MAX_PAGE_SIZE, MAX_QUERY_CHARS, MAX_RERANK_WINDOW
from search.ranking import (
    RankingOutcome, RankingPipeline, RankingRequest, RetrieverStatus, WindowTooSmallError, named_row, query_retrievers,
    retriever_notes, served_request,
)
from search.rules import FieldFilter, RuleError, check_field_name, parse_filters

logger = logging.getLogger("ltr_search.service")
router = APIRouter(tags=["search"])

GET_SEARCH_PARAMS = frozenset({"q", "size", "offset", "pipeline", "filters", "exclude", "diversity_field",
                               "diversity_cap", "explain", "user_id", "session_id", "fields", "highlight"})


@router.post("/search", response_model=SearchResponse, response_model_exclude_none=True)
def search_post(body: SearchRequest, state: StateDep, config: ConfigDep, metrics: MetricsDep, store: EventStoreDep,
                experiment_log: ExperimentLogDep) -> SearchResponse:
    return run_search(body, state.require(), config, metrics, store, experiment_log)


@router.get("/search", response_model=SearchResponse, response_model_exclude_none=True)
def search_get(
    request: Request, state: StateDep, config: ConfigDep, metrics: MetricsDep, store: EventStoreDep,
    experiment_log: ExperimentLogDep,
    q: str = Query(..., min_length=1, max_length=MAX_QUERY_CHARS),
    size: int = Query(10, ge=1, le=MAX_PAGE_SIZE),
    offset: int = Query(0, ge=0, le=MAX_RERANK_WINDOW),
    pipeline: str | None = Query(None, max_length=MAX_ID_LENGTH),
    filters: str | None = Query(None, max_length=8192, description="JSON object, as in POST /search"),
    exclude: str | None = Query(None, max_length=65536, description="comma-separated ids"),
    diversity_field: str | None = Query(None, min_length=1, max_length=MAX_FIELD_NAME_LENGTH),
    diversity_cap: int | None = Query(None, ge=1, le=MAX_PAGE_SIZE),
    explain: bool = False,
    user_id: str | None = Query(None, min_length=1, max_length=MAX_ID_LENGTH),
    session_id: str | None = Query(None, min_length=1, max_length=MAX_ID_LENGTH),
    fields: str | None = Query(None, max_length=200, description="comma-separated: " + ", ".join(RESULT_FIELDS)
                               + " (default: all; empty for none)"),
    highlight: bool = False,
) -> SearchResponse:
    check_get_limits(config, q, size, offset, diversity_cap)
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
        except RecursionError:  # the decoder's nesting guard, as for a POST body
            raise ApiError(400, "invalid_request", "filters: JSON nested too deeply",
                           [{"field": "query.filters", "reason": "nested too deeply"}]) from None
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
            explain=explain, user_id=user_id, session_id=session_id, highlight=highlight,
            fields=None if fields is None else [f.strip() for f in fields.split(",") if f.strip()],
        )
    except ValueError as exc:  # pydantic's ValidationError
        raise RequestValidationError(getattr(exc, "errors", lambda: [])()) from None
    return run_search(body, state.require(), config, metrics, store, experiment_log)


def check_get_limits(config: ServiceConfig, q: str, size: int, offset: int, diversity_cap: int | None) -> None:
    """The service's own limits (config), tighter than the schema's, as a 422 like the schema's."""
    errors = []
    if len(q) > config.max_query_chars:
        errors.append({"loc": ("query", "q"), "msg": f"String should have at most {config.max_query_chars} characters"})
    for name, value, limit in (("size", size, config.max_page_size), ("offset", offset, config.rerank_window),
                               ("diversity_cap", diversity_cap, config.max_page_size)):
        if value is not None and value > limit:
            errors.append({"loc": ("query", name), "msg": f"Input should be less than or equal to {limit}"})
    if errors:
        raise RequestValidationError(errors)


# ------------------------------------------------------------------------------------ the steps


def run_search(body: SearchRequest, snapshot: Snapshot, config: ServiceConfig, metrics: ServiceMetrics,
               store: EventStore, experiment_log: ExperimentLog | None) -> SearchResponse:
    started = time.perf_counter()
    name, pipeline, filters = validate_search(body, snapshot)
    request_id = uuid.uuid4().hex
    retrievers = query_retrievers(snapshot.index, body.query, name)
    answerable = any(r.answers for r in retrievers)
    plan = plan_experiments(pipeline, name, snapshot, config.experiments, request_id,
                            experiment_log is not None and answerable)
    ranking_request = RankingRequest(
        query=body.query, request_id=request_id, size=body.size, offset=body.offset, filters=tuple(filters),
        exclude=frozenset(body.exclude), diversity_field=body.diversity.field if body.diversity else None,
        diversity_cap=body.diversity.max_per_value if body.diversity else None, explain=body.explain,
    )
    try:
        outcome = plan.pipeline.run(ranking_request) if answerable else plan.pipeline.nothing(ranking_request)
    except WindowTooSmallError as exc:
        raise ApiError(400, "invalid_request", str(exc), [{"field": "offset", "reason": str(exc)}]) from None
    except RuleError as exc:  # a filter that can never match the index's values (search.rules.check_value_kinds)
        raise ApiError(400, "invalid_request", str(exc), [{"field": str(exc).split(":")[0], "reason": str(exc)}]) from None
    if snapshot.drift is not None:
        snapshot.drift.observe_outcome(outcome)
    interleaved = finish_interleaving(plan, outcome, metrics)
    shadow = score_shadow(plan, body.query, outcome, request_id, metrics)
    log_search(store, experiment_log, metrics, plan, outcome, ranking_request, name, snapshot, body, interleaved, shadow)
    record_stage_metrics(metrics, outcome.timings_ms)
    return build_response(body, request_id, name, snapshot, outcome, interleaved, retrievers, started)


def validate_search(body: SearchRequest, snapshot: Snapshot) -> tuple[str, RankingPipeline, list[FieldFilter]]:
    """The pipeline to run and the parsed filters, or a 400 naming the field."""
    if not body.query.strip():
        raise ApiError(400, "invalid_request", "query is blank", [{"field": "query", "reason": "blank"}])
    unknown_fields = sorted(set(body.fields or ()) - set(RESULT_FIELDS))
    if unknown_fields:
        reason = f"unknown field(s) {', '.join(unknown_fields)}; known: {', '.join(RESULT_FIELDS)}"
        raise ApiError(400, "invalid_request", f"fields: {reason}", [{"field": "fields", "reason": reason}])
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
    return name, pipeline, filters


@dataclass
class ExperimentPlan:
    """The pipeline one request runs, wrapped for the online experiments that apply to it."""

    pipeline: RankingPipeline
    experiments: ServedExperiments | None = None  # None: no experiment on this request
    capture: WindowCapture | None = None  # the scored window, for shadow and challenger
    interleaver: InterleavingRanker | None = None  # set on interleaved requests


def plan_experiments(pipeline: RankingPipeline, name: str, snapshot: Snapshot, settings: OnlineExperimentSettings,
                     request_id: str, can_log: bool) -> ExperimentPlan:
    """Experiments run on `ltr` requests only, and only when their log is open."""
    experiments = snapshot.experiments if name == "ltr" and can_log else None
    if experiments is None:
        return ExperimentPlan(pipeline)
    capture = WindowCapture(pipeline.first_stage)
    run_pipeline = dataclasses.replace(pipeline, first_stage=capture)
    interleaver = None
    settings = experiments.settings or settings  # with the registry's challenge: its model and share
    rng = interleaving_rng(request_id, settings) if experiments.challenger is not None else None
    if rng is not None:  # interleaved pages are not explored: every propensity is 1
        interleaver = InterleavingRanker(capture, experiments.challenger, rng, settings.interleave_method)
        run_pipeline = dataclasses.replace(run_pipeline, ranker=interleaver, epsilon=0.0)
    return ExperimentPlan(run_pipeline, experiments, capture, interleaver)


def finish_interleaving(plan: ExperimentPlan, outcome: RankingOutcome, metrics: ServiceMetrics) -> bool:
    """Whether the page is interleaved; its shown scores are then the active model's, as on any ltr page."""
    interleaver = plan.interleaver
    if interleaver is None:
        return False
    if interleaver.error is not None:
        logger.error("interleaving %s failed, served A's order: %s", interleaver.version, interleaver.error)
        metrics.experiment_failures.labels("interleave", "score").inc()
    if interleaver.teams is None:
        return False
    for result in outcome.results:
        result.score = interleaver.a_scores[result.first_stage_rank - 1]
    return True


def score_shadow(plan: ExperimentPlan, query: str, outcome: RankingOutcome, request_id: str,
                 metrics: ServiceMetrics) -> ShadowRanking | None:
    experiments, capture = plan.experiments, plan.capture
    if experiments is None or experiments.shadow is None or capture is None or capture.window is None:
        return None
    started = time.perf_counter()
    shadow = shadow_ranking(experiments.shadow, query, capture.window, request_id, outcome.model_version)
    outcome.timings_ms["shadow"] = (time.perf_counter() - started) * 1000
    if shadow is None:
        metrics.experiment_failures.labels("shadow", "score").inc()
    else:
        metrics.shadow_scorings.labels(experiments.shadow.version).inc()
    return shadow


def log_search(store: EventStore, experiment_log: ExperimentLog | None, metrics: ServiceMetrics, plan: ExperimentPlan,
               outcome: RankingOutcome, ranking_request: RankingRequest, name: str, snapshot: Snapshot,
               body: SearchRequest, interleaved: bool, shadow: ShadowRanking | None) -> None:
    """The request log (clicks are validated against it), then the experiment rows."""
    started = time.perf_counter()
    now = time.time()
    try:  # an unwritable store degrades the log (counted, /ready says so), never the search
        store.log_request(served_request(outcome, ranking_request, name, snapshot.index, now, body.user_id,
                                         body.session_id, interleaved=interleaved))
        metrics.store_ok("request_log")
    except STORE_ERRORS as exc:
        logger.error("request %s served but not logged: %s", ranking_request.request_id, exc)
        metrics.store_failed("request_log", exc)
    interleaver = plan.interleaver
    if interleaved and interleaver is not None and experiment_log is not None:
        metrics.interleaved.labels(interleaver.capture.version, interleaver.challenger.version).inc()
        record = InterleavedRequest(ranking_request.request_id, now, interleaver.capture.version,
                                    interleaver.challenger.version, body.offset,
                                    interleaver.picks((r.position, r.doc_id, r.first_stage_rank - 1) for r in outcome.results))
        _log_experiment(metrics, "interleave", lambda: experiment_log.log_interleaved(record))
    if shadow is not None and experiment_log is not None:
        stamped = dataclasses.replace(shadow, timestamp=now)
        _log_experiment(metrics, "shadow", lambda: experiment_log.log_shadow(stamped))
    outcome.timings_ms["log"] = (time.perf_counter() - started) * 1000


def _log_experiment(metrics: ServiceMetrics, experiment: str, write: Callable[[], None]) -> None:
    try:
        write()
    except Exception:  # the page is served and in the request log; only this experiment row is lost
        logger.exception("experiment log write failed (%s)", experiment)
        metrics.experiment_failures.labels(experiment, "log").inc()


def record_stage_metrics(metrics: ServiceMetrics, timings_ms: dict[str, float]) -> None:
    for stage, ms in timings_ms.items():
        metrics.stages.labels(stage).observe(ms / 1000)


def build_response(body: SearchRequest, request_id: str, name: str, snapshot: Snapshot, outcome: RankingOutcome,
                   interleaved: bool, retrievers: tuple[RetrieverStatus, ...], started: float) -> SearchResponse:
    marker = highlighter(snapshot.index.describe(), body.query) if body.highlight else None
    results = [
        SearchResult(
            id=r.doc_id, score=r.score, position=r.position, propensity=r.propensity,
            fields=select_fields(r.fields or {}, body.fields),
            highlights={field: to_html(s) for field, s in marker.document(r.fields or {}).items()} if marker else None,
            explain=ResultExplanation(
                first_stage_rank=r.first_stage_rank, first_stage_score=r.first_stage_score,
                features=_json_safe(named_row(outcome.feature_names, r.features)),
                contributions=_json_safe(named_row(_with_bias(outcome.feature_names), r.contributions)),
                stages=stage_contributions(outcome.feature_names, r.contributions)
                if outcome.feature_names is not None and r.contributions is not None else None,
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
        retrievers={r.name: RetrieverInfo(answered=r.answers, terms=r.terms) for r in retrievers},
        notes=retriever_notes(retrievers) or None,
    )


def select_fields(fields: dict[str, Any], wanted: list[str] | None) -> dict[str, Any]:
    """The stored fields a request asked for (`fields=`); all of them by default."""
    return fields if wanted is None else {name: fields[name] for name in wanted if name in fields}


def _with_bias(names: tuple[str, ...] | None) -> tuple[str, ...] | None:
    return None if names is None else (*names, "bias", "base")  # "base": a staged model's (zip drops it otherwise)


def _json_safe(values: dict[str, float] | None) -> dict[str, float | None] | None:
    """JSON has no NaN: a missing feature is null in API responses."""
    if values is None:
        return None
    return {k: (None if v != v else v) for k, v in values.items()}
