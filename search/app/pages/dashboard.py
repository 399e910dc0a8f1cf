"""GET /dashboard: the active and previous models with their metrics, drift PSI per feature of
the served model, events per minute over the last hour, and the latest eval report with its
plots (PNG files beside it in HOME/reports, served by /dashboard/plots/NAME)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

from indexing.home import reports_dir
from ltr.registry import ModelManifest, ModelRegistry, RegistryError
from search.app.deps import ConfigDep, EventStoreDep, StateDep
from search.app.pages.auth import Session
from search.app.pages.login import require_page
from search.app.pages.common import render
from search.app.pages.compare import latest_eval
from search.event_store import EventStore

router = APIRouter(include_in_schema=False)
MINUTES = 60  # events per minute over this many minutes
MODELS_SHOWN = 8
HEADLINE = ("nDCG@10", "R@100", "P@10", "RR@10")


@dataclass
class ModelRow:
    version: str
    created_at: str
    status: str  # "active", "previous" or ""
    feature_set: str
    metrics: dict[str, Any]


def model_rows(home: Path) -> tuple[list[ModelRow], str | None]:
    """The newest models, the active and the one a rollback returns to marked; an error line if
    the registry cannot be read."""
    registry = ModelRegistry(home)
    try:
        active = registry.active()
        previous = registry.rollback_target()
        manifests: list[ModelManifest] = registry.versions()
    except (RegistryError, OSError, ValueError) as exc:
        return [], str(exc)
    try:  # an unreadable challenge file leaves the table as it is
        challenge = registry.challenge()
    except RegistryError:
        challenge = None

    def status(version: str) -> str:
        if version == active:
            return "active"
        if challenge is not None and version == challenge.version:
            since = time.strftime("%Y-%m-%d %H:%M", time.gmtime(challenge.started))
            return f"challenger: {challenge.share:.0%} of ltr requests vs {challenge.against} since {since} UTC"
        return "previous" if version == previous else ""

    rows = [ModelRow(m.version, m.created_at, status(m.version),
                     f"{m.feature_set.get('name', '?')} v{m.feature_set.get('version', '?')}",
                     {k: v for k, v in m.metrics.items() if isinstance(v, (int, float))})
            for m in reversed(manifests)]
    rows.sort(key=lambda r: (r.status != "active", not r.status.startswith("challenger"), r.status != "previous"))
    return rows[:MODELS_SHOWN], None


def events_per_minute(store: EventStore, now: float, minutes: int = MINUTES) -> list[dict[str, int]]:
    """Events per minute (clicks apart) for the last `minutes`, oldest first."""
    start = (int(now) // 60 - minutes + 1) * 60
    buckets = [{"minute": start + 60 * i, "events": 0, "clicks": 0} for i in range(minutes)]
    for event in store.iter_events(since=start):
        i = int(event.timestamp - start) // 60
        if 0 <= i < minutes:
            buckets[i]["events"] += 1
            buckets[i]["clicks"] += event.type == "click"
    return buckets


def report_plots(report_json: Path) -> list[str]:
    """PNG plots written with the report beside the JSON (eval/report.py names them STEM-*.png)."""
    folder = report_json.parent
    stems = {report_json.stem, *(p.stem for p in folder.glob("*.md"))}
    newest_md = max(folder.glob("*.md"), key=lambda p: p.stat().st_mtime, default=None)
    stem = newest_md.stem if newest_md is not None else report_json.stem
    return sorted(p.name for p in folder.glob(f"{stem}-*.png")) if stem in stems else []


@router.get("/dashboard", response_class=HTMLResponse)
def dashboard(request: Request, state: StateDep, config: ConfigDep, store: EventStoreDep) -> Response:
    session = require_page(request, "dashboard")
    if not isinstance(session, Session):
        return session
    snapshot = state.snapshot
    models, model_error = model_rows(config.home)
    drift = snapshot.drift.report() if snapshot is not None and snapshot.drift is not None else None
    minutes = events_per_minute(store, time.time())
    peak = max((m["events"] for m in minutes), default=0)
    report = latest_eval(config.home)
    payload = json.loads(report.read_text(encoding="utf-8")) if report is not None else None
    return render(request, "dashboard.html", title="Dashboard", models=models, model_error=model_error,
                  active=snapshot.model_version if snapshot else None, drift=drift, minutes=minutes, peak=peak,
                  counts=store.count_events(), report=report, payload=payload, headline=HEADLINE,
                  plots=report_plots(report) if report is not None else [], index=snapshot.index if snapshot else None)


@router.get("/dashboard/plots/{name}")
def plot(request: Request, name: str, config: ConfigDep) -> Response:
    """A PNG of HOME/reports, by plain file name only (no path can leave the folder)."""
    session = require_page(request, "dashboard")
    if not isinstance(session, Session):
        return session
    folder = reports_dir(config.home).resolve()
    path = (folder / name).resolve()
    if "/" in name or "\\" in name or path.parent != folder or path.suffix != ".png" or not path.is_file():
        return render(request, "message.html", status=404, title="Not found", message="No such plot.")
    return FileResponse(path, media_type="image/png")
