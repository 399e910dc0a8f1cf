"""GET /compare: two pipelines (or stored models, `model:V`) side by side for one query, moved
and new results marked, nDCG@10 of each when the query is judged in the workbench, and the
queries of the last eval run sorted by the largest nDCG@10 difference between two pipelines."""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response

from eval.datasets import EvalDataError, load_dataset, read_run
from eval.judgments import JudgmentStore
from eval.metrics import evaluate_run
from indexing.home import reports_dir
from ltr.ranker import ModelUnavailableError
from ltr.registry import RegistryError
from search.app.deps import ConfigDep, StateDep
from search.app.pages.auth import Session
from search.app.pages.login import require_page
from search.app.pages.common import rank_quietly, render, stored_model_names
from search.app.pages.judge import judgment_store
from search.limits import MAX_QUERY_CHARS

router = APIRouter(include_in_schema=False)
COMPARE_DEPTH = 10
METRIC = "nDCG@10"
LARGEST_DIFFERENCES = 20


@dataclass
class Row:
    doc_id: str
    title: str
    tag: str  # "", "new", "up", "down", "gone"
    change: str  # "+2", "-3", "new", "gone"
    grade: int | None


def side_by_side(a: list[str], b: list[str]) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(doc id, tag, change) for each list: in B, `new` when absent from A's list, `up`/`down` with
    the places moved; in A, `gone` when absent from B's."""
    rank_a = {d: i for i, d in enumerate(a)}
    rank_b = {d: i for i, d in enumerate(b)}
    left = [(d, "" if d in rank_b else "gone", "" if d in rank_b else "gone") for d in a]
    right = []
    for i, d in enumerate(b):
        if d not in rank_a:
            right.append((d, "new", "new"))
        elif rank_a[d] > i:
            right.append((d, "up", f"↑{rank_a[d] - i}"))
        elif rank_a[d] < i:
            right.append((d, "down", f"↓{i - rank_a[d]}"))
        else:
            right.append((d, "", ""))
    return left, right


def ndcg(ranked: list[str], judged: dict[str, int]) -> float:
    """nDCG@10 of one ranking against one query's judgments (eval.metrics, as `ltr-search eval`)."""
    run = {"q": {d: float(len(ranked) - i) for i, d in enumerate(ranked)}}
    return float(evaluate_run(run, {"q": judged}, [METRIC]).values[METRIC][0])


def latest_eval(home: Path) -> Path | None:
    """The newest eval JSON (`ltr-search eval --json`) in the reports folder."""
    candidates = sorted(reports_dir(home).glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(payload, dict) and "pipelines" in payload and "dataset_path" in payload:
            return path
    return None


_DIFF_CACHE: dict[tuple[str, float, str, str], list[dict[str, Any]]] = {}
_DIFF_LOCK = threading.Lock()


def largest_differences(report: Path, a: str, b: str) -> list[dict[str, Any]]:
    """Per query nDCG@10 of pipelines `a` and `b` of an eval run (from its run files and qrels),
    largest |b - a| first; cached per report file."""
    key = (str(report), report.stat().st_mtime, a, b)
    with _DIFF_LOCK:
        if key in _DIFF_CACHE:
            return _DIFF_CACHE[key]
    payload = json.loads(report.read_text(encoding="utf-8"))
    dataset = load_dataset(payload["dataset_path"], payload["split"])
    scores = {}
    for name in (a, b):
        run = read_run(payload["pipelines"][name]["run_file"])
        scores[name] = evaluate_run(run, dataset.qrels, [METRIC], ignore_queries=run.keys()).values[METRIC]
    ids = list(dataset.qrels)
    rows = [{"query_id": q, "text": dataset.queries.get(q, q), "a": float(scores[a][i]), "b": float(scores[b][i]),
             "difference": float(scores[b][i] - scores[a][i])} for i, q in enumerate(ids)]
    rows.sort(key=lambda r: -abs(r["difference"]))
    with _DIFF_LOCK:
        if len(_DIFF_CACHE) > 16:
            _DIFF_CACHE.clear()
        _DIFF_CACHE[key] = rows[:LARGEST_DIFFERENCES]
    return _DIFF_CACHE[key]


@router.get("/compare", response_class=HTMLResponse)
def compare(request: Request, state: StateDep, config: ConfigDep, store: JudgmentStore = Depends(judgment_store),
            q: str = "", a: str | None = None, b: str | None = None) -> Response:
    session = require_page(request, "compare")
    if not isinstance(session, Session):
        return session
    snapshot = state.require()
    names = list(snapshot.pipelines) + stored_model_names(config.home, snapshot)
    a = a if a in names else names[0]
    b = b if b in names else (names[1] if len(names) > 1 else names[0])
    query = q[:MAX_QUERY_CHARS].strip()
    columns: list[list[Row]] = []
    scores: list[float | None] = [None, None]
    judged: dict[str, int] | None = None
    problem = None
    try:
        outcomes = [rank_quietly(snapshot, name, query, COMPARE_DEPTH, config) for name in (a, b)] if query else []
    except (RegistryError, ModelUnavailableError) as exc:
        outcomes, problem = [], f"{exc}"
    if outcomes:
        ids = [[r.doc_id for r in o.results] for o in outcomes]
        judged_id = next((x.query_id for x in store.queries() if x.text.lower() == " ".join(query.split()).lower()), None)
        judged = store.qrels().get(judged_id) if judged_id else None
        titles = {r.doc_id: (r.fields or {}).get("title") or r.doc_id for o in outcomes for r in o.results}
        for side in side_by_side(*ids):
            columns.append([Row(d, titles[d], tag, change, (judged or {}).get(d)) for d, tag, change in side])
        if judged:
            scores = [ndcg(ids[0], judged), ndcg(ids[1], judged)]
    report = latest_eval(config.home)
    differences, report_pipelines, report_error = [], [], None
    if report is not None:
        report_pipelines = list(json.loads(report.read_text(encoding="utf-8"))["pipelines"])
        ra = a if a in report_pipelines else report_pipelines[0]
        rb = b if b in report_pipelines and b != ra else next((p for p in report_pipelines if p != ra), ra)
        try:
            differences = [dict(r, a_name=ra, b_name=rb) for r in largest_differences(report, ra, rb)]
        except (EvalDataError, OSError, KeyError, ValueError) as exc:
            report_error = f"{report.name}: {exc}"
    return render(request, "compare.html", title=f"Compare {a} / {b}", query=query, a=a, b=b, names=names,
                  columns=columns, scores=scores, judged=judged, report=report, differences=differences,
                  report_error=report_error, problem=problem)
