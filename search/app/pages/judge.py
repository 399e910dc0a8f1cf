"""The judging workbench (/judge): queries from a dataset, an uploaded file, typed in, or the
request log's top queries; a pool of several pipelines' top k shown unlabelled in a fixed random order; one
document at a time graded 0-3 (keys 0-3, s skips; the buttons work without JavaScript); stored
with the judge's name and the time (eval/judgments.py); exported as BEIR or TREC qrels; Cohen's
kappa between judges."""
from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path
from contextlib import closing
from typing import Iterator

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from eval.datasets import EvalDataError, load_dataset, read_queries
from eval.judgments import (
    EXPORT_FORMATS, GRADE_LABELS, GRADES, JudgmentError, JudgmentStore, queries_text, qrels_text,
)
from indexing.home import judgments_path
from search.app.deps import ConfigDep, EventStoreDep, StateDep
from search.app.errors import ApiError
from search.app.pages.auth import Session, check_csrf
from search.app.pages.login import require_page
from search.app.pages.common import rank_quietly, render
from search.app.pages.highlight import highlighter
from search.limits import MAX_QUERY_CHARS

router = APIRouter(include_in_schema=False)
DEFAULT_POOL_DEPTH = 10
MAX_POOL_DEPTH = 50
MAX_NEW_QUERIES = 200  # per form submission
LOG_WINDOW_S = 30 * 86400  # the request log's top queries: over the last 30 days


def judgment_store(config: ConfigDep) -> Iterator[JudgmentStore]:
    """The index's judgment store, open for one request (pages are few; opening is ~1 ms)."""
    with closing(JudgmentStore(judgments_path(config.home, config.index))) as store:
        yield store


def top_logged_queries(events: EventStoreDep, limit: int, now: float | None = None) -> list[str]:
    """The most frequent queries of the request log (normalised whitespace and case), most first."""
    counts: Counter[str] = Counter()
    shown: dict[str, str] = {}
    for request in events.iter_requests(since=(now or time.time()) - LOG_WINDOW_S):
        key = " ".join(request.query.split()).lower()
        counts[key] += 1
        shown.setdefault(key, " ".join(request.query.split()))
    return [shown[key] for key, _ in counts.most_common(limit)]


@router.get("/judge", response_class=HTMLResponse)
def workbench(request: Request, state: StateDep, store: JudgmentStore = Depends(judgment_store),
              pooled: int | None = None) -> Response:
    session = require_page(request, "judge")
    if not isinstance(session, Session):
        return session
    snapshot = state.snapshot
    queries = store.queries(session.name)
    next_query = next((q for q in queries if q.done < q.pool), None)
    return render(request, "judge.html", title="Judge", queries=queries, next_query=next_query,
                  pipelines=list(snapshot.pipelines) if snapshot else [], default_depth=DEFAULT_POOL_DEPTH,
                  agreement=store.agreement(), judges=store.judges(), formats=EXPORT_FORMATS,
                  message=None if pooled is None else f"{pooled} quer{'y' if pooled == 1 else 'ies'} added and pooled.")


@router.post("/judge/queries")
def add_queries(request: Request, state: StateDep, events: EventStoreDep, store: JudgmentStore = Depends(judgment_store),
                csrf: str = Form(""), source: str = Form("text"), queries: str = Form("", max_length=200_000),
                dataset: str = Form("", max_length=4096), split: str = Form("test", max_length=100),
                limit: int = Form(20, ge=1, le=MAX_NEW_QUERIES), pipelines: list[str] = Form([]),
                depth: int = Form(DEFAULT_POOL_DEPTH, ge=1, le=MAX_POOL_DEPTH),
                file: UploadFile | None = File(None)) -> Response:
    session = require_page(request, "judge")
    if not isinstance(session, Session):
        return session
    try:
        check_csrf(request, session, csrf)
        snapshot = state.require()
        unknown = [p for p in pipelines if p not in snapshot.pipelines]
        if not pipelines or unknown:
            raise ApiError(400, "invalid_request", f"pipelines: choose among {', '.join(snapshot.pipelines)}"
                           + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        if source == "file":
            wanted = uploaded_queries(file)[:limit]
        else:
            wanted = new_queries(source, queries, dataset, split, limit, session, events)
        for query_id, text in wanted:
            query_id = store.add_query(text, source, query_id)
            store.add_pool(query_id, {p: [r.doc_id for r in rank_quietly(snapshot, p, text, depth).results]
                                      for p in pipelines})
    except (ApiError, JudgmentError) as exc:
        return refused(request, exc)
    return RedirectResponse(f"/judge?pooled={len(wanted)}", status_code=303)


def refused(request: Request, exc: Exception) -> Response:
    """A refused form as a page (status and reason), with the way back."""
    status = exc.status if isinstance(exc, ApiError) else 400
    message = exc.message if isinstance(exc, ApiError) else str(exc)
    return render(request, "message.html", status=status, title="Refused", message=message)


def uploaded_queries(file: UploadFile | None) -> list[tuple[str | None, str]]:
    """An uploaded queries file: BEIR queries.jsonl (ids kept) when its lines are JSON objects,
    else one query per line; read by `eval.datasets.read_queries`, as strictly as any dataset."""
    if file is None or not file.filename:
        raise ApiError(400, "invalid_request", "file: choose a queries file to upload")
    raw = file.file.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "invalid_request", f"{file.filename}: not valid UTF-8 (byte {exc.start})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or not all(line.startswith("{") for line in lines):
        return [(None, line[:MAX_QUERY_CHARS]) for line in dict.fromkeys(lines)][:MAX_NEW_QUERIES]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "queries.jsonl"
        path.write_bytes(raw)
        try:
            return list(read_queries(path).items())[:MAX_NEW_QUERIES]
        except EvalDataError as exc:
            where = f"{file.filename}:{exc.line}" if exc.line is not None else file.filename
            raise ApiError(400, "invalid_request", f"{where}: {exc.reason}") from None


def new_queries(source: str, typed: str, dataset: str, split: str, limit: int, session: Session,
                events: EventStoreDep) -> list[tuple[str | None, str]]:
    """(query id or None, text) from the chosen source; a precise 400 for a bad one."""
    if source == "text":
        texts = [line.strip()[:MAX_QUERY_CHARS] for line in typed.splitlines() if line.strip()]
        found: list[tuple[str | None, str]] = [(None, t) for t in dict.fromkeys(texts)][:MAX_NEW_QUERIES]
    elif source == "log":
        found = [(None, t) for t in top_logged_queries(events, limit)]
    elif source == "dataset":
        if session.role != "admin":  # a path on the server: the admin's to choose
            raise ApiError(403, "forbidden", "queries from a dataset path need the admin token")
        try:
            if split:
                data = load_dataset(dataset, split)
                found = list(data.queries.items())[:limit]
            else:
                found = list(read_queries(f"{dataset.rstrip('/')}/queries.jsonl").items())[:limit]
        except EvalDataError as exc:
            raise ApiError(400, "invalid_request", f"dataset: {exc}") from None
    else:
        raise ApiError(400, "invalid_request", "source must be text, dataset or log")
    if not found:
        raise ApiError(400, "invalid_request", f"no queries found in the {source} source")
    return found


@router.get("/judge/q/{query_id}", response_class=HTMLResponse)
def judge_query(request: Request, query_id: str, state: StateDep, store: JudgmentStore = Depends(judgment_store),
                doc: str | None = None) -> Response:
    session = require_page(request, "judge")
    if not isinstance(session, Session):
        return session
    query = store.query(query_id)
    if query is None:
        return render(request, "message.html", status=404, title="Not found", message=f"No query '{query_id[:200]}'.")
    pool = store.pool(query_id)
    mine = {j.doc_id: j.grade for j in store.judgments(query_id, session.name)}
    current = doc if doc in pool else next((d for d in pool if d not in mine), None)
    document = None
    title, text = [], []
    snapshot = state.require()
    stored = dict(zip(pool, snapshot.index.documents(pool))) if pool else {}
    titles = {d: (stored.get(d) or {}).get("title") or d for d in pool}
    if current is not None:
        document = stored.get(current) or {"id": current, "title": "", "text": "(not in the served index)"}
        marker = highlighter(snapshot.index.describe(), query.text)
        title = marker.field(document.get("title") or "", 10_000)
        text = marker.field(document.get("text") or "", 1_000_000)
    later = next((q for q in store.queries(session.name) if q.done < q.pool and q.query_id != query_id), None)
    return render(request, "judge_query.html", title=f"Judge: {query.text}", query=query, pool=pool, mine=mine,
                  current=current, document=document, title_segments=title, text_segments=text, titles=titles,
                  grades=GRADES, labels=GRADE_LABELS, position=pool.index(current) + 1 if current else None,
                  next_query=later)


@router.post("/judge/q/{query_id}")
def grade(request: Request, query_id: str, store: JudgmentStore = Depends(judgment_store), csrf: str = Form(""),
          doc_id: str = Form(..., max_length=512), grade: str = Form(..., max_length=8)) -> Response:
    session = require_page(request, "judge")
    if not isinstance(session, Session):
        return session
    try:
        check_csrf(request, session, csrf)
        if grade != "skip" and grade not in {str(g) for g in GRADES}:
            raise ApiError(400, "invalid_request", f"grade must be one of {', '.join(map(str, GRADES))} or skip")
        store.judge(query_id, doc_id, session.name, None if grade == "skip" else int(grade))
    except (ApiError, JudgmentError) as exc:
        return refused(request, exc)
    return RedirectResponse(f"/judge/q/{query_id}", status_code=303)


@router.get("/judge/export")
def export(request: Request, store: JudgmentStore = Depends(judgment_store), format: str = "beir",
           judge: str | None = None) -> Response:
    """The qrels as a download (BEIR TSV or TREC); queries.jsonl beside it at /judge/queries.jsonl."""
    session = require_page(request, "judge")
    if not isinstance(session, Session):
        return session
    if format not in EXPORT_FORMATS:
        raise ApiError(400, "invalid_request", f"format must be one of {', '.join(EXPORT_FORMATS)}")
    qrels = store.qrels(judge or None)
    if not qrels:
        raise ApiError(404, "not_found", "no graded judgments to export yet")
    name = "judged.tsv" if format == "beir" else "judged.qrels"
    return PlainTextResponse(qrels_text(qrels, format), headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.get("/judge/queries.jsonl")
def export_queries(request: Request, store: JudgmentStore = Depends(judgment_store)) -> Response:
    session = require_page(request, "judge")
    if not isinstance(session, Session):
        return session
    body = queries_text(store.texts(), store.qrels())
    return PlainTextResponse(body, headers={"Content-Disposition": 'attachment; filename="queries.jsonl"'})
