"""GET /health (the process is up), /ready (an index is loaded; `degraded` names the stores that
refuse writes, while searches go on) and /metrics (Prometheus, summed over workers)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ltr.drift import set_gauges
from search.app.deps import MetricsDep, StateDep
from search.app.schemas import HealthResponse, IndexInfo, ReadyResponse

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=HealthResponse)
def health() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
def ready(state: StateDep, metrics: MetricsDep) -> Any:
    """503 without an index. A degraded store keeps it 200: searches are served, so a load
    balancer must keep sending them; `degraded` says what is refused and why."""
    snapshot = state.snapshot
    if snapshot is None:
        return JSONResponse(ReadyResponse(ready=False, reason=state.load_error or "loading").model_dump(), 503)
    degraded = metrics.degraded_reasons() or None
    return ReadyResponse(ready=True, index=IndexInfo(name=snapshot.index.name, generation=snapshot.index.generation_id),
                         degraded=degraded)


@router.get("/metrics")
def prometheus_metrics(state: StateDep, metrics: MetricsDep) -> Response:
    snapshot = state.snapshot
    set_gauges(metrics.drift, snapshot.drift.report() if snapshot is not None and snapshot.drift is not None else None)
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
