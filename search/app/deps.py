"""FastAPI dependencies: what `create_app` put on `app.state`, handed to the routers' handlers.

Handlers declare what they use (`state: StateDep`), so each router is a plain module with no
closure over the app; tests can override any of these with `app.dependency_overrides`.
"""
from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from ltr.behaviour import BehaviourStore
from ltr.experiments import ExperimentLog
from search.app.config import ServiceConfig
from search.app.errors import ApiError
from search.app.metrics import ServiceMetrics, refresh_generation_metrics
from search.app.state import JobRunner, ServingState
from search.event_store import EventStore


def get_state(request: Request) -> ServingState:
    """The serving state, first catching up with a reload another worker made (`serve --workers N`)."""
    state: ServingState = request.app.state.serving
    if state.follow_reloads():
        refresh_generation_metrics(request.app.state.metrics, state)
    return state


def get_config(request: Request) -> ServiceConfig:
    return request.app.state.serving.config


def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


def get_event_store(request: Request) -> EventStore:
    return request.app.state.event_store


def get_aggregates(request: Request) -> BehaviourStore:
    return request.app.state.aggregates


def get_experiment_log(request: Request) -> ExperimentLog | None:
    """None when no experiment is configured, or its log could not be opened."""
    return request.app.state.experiment_log


def get_jobs(request: Request) -> JobRunner:
    return request.app.state.jobs


StateDep = Annotated[ServingState, Depends(get_state)]
ConfigDep = Annotated[ServiceConfig, Depends(get_config)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
EventStoreDep = Annotated[EventStore, Depends(get_event_store)]
AggregatesDep = Annotated[BehaviourStore, Depends(get_aggregates)]
ExperimentLogDep = Annotated["ExperimentLog | None", Depends(get_experiment_log)]
JobsDep = Annotated[JobRunner, Depends(get_jobs)]


def require_admin(request: Request, config: ConfigDep) -> None:
    """Admin endpoints need `Authorization: Bearer $LTR_SEARCH_ADMIN_TOKEN`; off without a token."""
    if not config.admin_token:
        raise ApiError(403, "admin_disabled", "admin endpoints are disabled: set LTR_SEARCH_ADMIN_TOKEN")
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "admin endpoints need 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(token.strip().encode(), config.admin_token.encode()):
        raise ApiError(403, "forbidden", "invalid admin token")
