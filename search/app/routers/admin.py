"""Admin jobs behind the bearer token: rebuild the index in the background, poll it, reload."""
from __future__ import annotations

from fastapi import APIRouter, Depends

from search.app.deps import JobsDep, MetricsDep, StateDep, require_admin
from search.app.errors import ApiError
from search.app.metrics import refresh_generation_metrics
from search.app.schemas import IndexInfo, JobStatus, RebuildRequest, ReloadResponse
from search.app.state import RELOAD_ERRORS

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


@router.post("/rebuild", response_model=JobStatus, status_code=202)
def admin_rebuild(jobs: JobsDep, body: RebuildRequest | None = None) -> JobStatus:
    """Rebuild the index in the background (poll /admin/jobs/{id}); unknown body fields are a 422."""
    return jobs.start_rebuild().status()


@router.get("/jobs/{job_id}", response_model=JobStatus)
def admin_job(job_id: str, jobs: JobsDep) -> JobStatus:
    status = jobs.status(job_id)
    if status is None:
        raise ApiError(404, "not_found", f"no job '{job_id[:64]}'")
    return status


@router.post("/reload", response_model=ReloadResponse)
def admin_reload(state: StateDep, metrics: MetricsDep) -> ReloadResponse:
    try:
        previous, snapshot = state.reload()
    except RELOAD_ERRORS as exc:
        raise ApiError(409, "reload_failed", f"the active generation could not be loaded; still serving the old one: {exc}") from None
    refresh_generation_metrics(metrics, state)
    return ReloadResponse(index=IndexInfo(name=snapshot.index.name, generation=snapshot.index.generation_id),
                          previous_generation=previous)
