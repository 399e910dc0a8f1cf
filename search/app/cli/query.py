"""`ltr-search search`: one query for a quick check, or a query file scored in batch.

    ltr-search search "QUERY" [--name INDEX] [--pipeline P] [-k 10] [--json]
    ltr-search search --queries FILE --out RUN [--format trec|jsonl] [--pipeline P] [-k 100]

The batch side of online vs batch prediction: the same catalogue pipelines the service serves,
over a BEIR queries.jsonl or a TSV of id<TAB>text, written as a TREC run or JSONL.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from search.app.cli.common import CliError, add_backend_arguments, log, open_index, plural
from indexing.progress import progress_bar
from search.app.pipelines import check_pipelines, create_pipeline, default_candidates, describe_pipelines, resolve_pipeline
from search.limits import MAX_QUERY_CHARS
from search.ranking import query_retrievers, retriever_notes

FORMATS = ("trec", "jsonl")
MAX_K = 10_000


def add_arguments(command: str, search: argparse.ArgumentParser) -> None:
    search.add_argument("query", nargs="?", help="the query (or --queries FILE)")
    search.add_argument("--name", help="index (default: the home's only index, or 'default')")
    search.add_argument("--pipeline", help=describe_pipelines("serve") + "; default: what the service serves, the "
                        "config's default_pipeline (ltr, the promoted model), else hybrid, else bm25")
    search.add_argument("-k", type=int, help="results per query (default 10; with --queries 100)")
    search.add_argument("--json", action="store_true", help="one query: print JSON")
    batch = search.add_argument_group("batch: a query file in, a run file out")
    batch.add_argument("--queries", metavar="FILE", help="BEIR queries.jsonl (_id, text) or TSV id<TAB>text")
    batch.add_argument("--out", metavar="RUN", help="where to write the results")
    batch.add_argument("--format", choices=FORMATS, default="trec", help="TREC run (default) or JSONL")
    batch.add_argument("--tag", help="TREC run tag (default: the pipeline name)")
    batch.add_argument("--quiet", action="store_true", help="no progress bar")
    add_backend_arguments(search)


def run(home: Path, args: argparse.Namespace) -> int:
    batch = _check_args(args)
    if args.pipeline is None:
        index = open_index(home, args.name, args)
        args.pipeline, name, pipeline = default_pipeline(home, index)
    else:
        name = resolve_pipeline(args.pipeline, "serve")  # an unknown name fails here, before the index loads
        index = open_index(home, args.name, args)
        check_pipelines([name], index)
        pipeline = create_pipeline(name, index)
    if batch:
        return run_batch(args, index, pipeline)
    return run_one(args, index, pipeline, name)


def default_pipeline(home: Path, index: Any) -> tuple[str, str, Any]:
    """(name, catalogue name, pipeline) a search without --pipeline runs: the first of the service's default
    candidates (`default_candidates`) that can run on `index`, each skipped one said on stderr,
    so that `ltr-search search` ranks as the service would."""
    from search.app.config import load_service_config  # lazy: start-up time

    skipped = []
    for candidate in default_candidates(load_service_config(home).default_pipeline):
        name = resolve_pipeline(candidate, "serve")
        try:
            check_pipelines([name], index)
            pipeline = create_pipeline(name, index)
        except ValueError as exc:  # no promoted model (ModelUnavailableError), no dense vectors
            skipped.append(f"{candidate} ({exc})")
            continue
        for note in skipped:
            log(f"default pipeline {note} cannot serve; searching with {candidate}")
        return candidate, name, pipeline
    raise CliError("no pipeline can run on index '" + str(index.name) + "': " + "; ".join(skipped))


def _check_args(args: argparse.Namespace) -> bool:
    """True for a batch run; refuses mixed or missing inputs before anything loads."""
    if args.queries:
        if args.query is not None:
            raise CliError("give a query or --queries FILE, not both")
        if not args.out:
            raise CliError("--queries needs --out RUN (where the results go)")
        if args.json:
            raise CliError("--json is for one query; with --queries use --format jsonl")
        args.k = 100 if args.k is None else args.k
    else:
        if args.out:
            raise CliError("--out goes with --queries FILE")
        if args.query is None:
            raise CliError("give a query, or --queries FILE --out RUN")
        _check_query(args.query)
        args.k = 10 if args.k is None else args.k
    if not 1 <= args.k <= MAX_K:
        raise CliError(f"-k must be between 1 and {MAX_K}, got {args.k}")
    return bool(args.queries)


def _check_query(query: str, where: str = "query") -> None:
    if not query.strip():
        raise CliError(f"{where} is empty")
    if len(query) > MAX_QUERY_CHARS:
        raise CliError(f"{where} has {len(query)} characters; the limit is {MAX_QUERY_CHARS}")


def run_one(args: argparse.Namespace, index: Any, pipeline: Any, name: str) -> int:
    started = time.perf_counter()
    retrievers = query_retrievers(index, args.query, name)
    hits = pipeline.search(args.query, args.k) if any(r.answers for r in retrievers) else []
    took_ms = (time.perf_counter() - started) * 1000
    notes = retriever_notes(retrievers)
    rows = []
    for hit in hits:
        doc = index.document(hit.doc_id) or {}
        rows.append({"rank": hit.rank, "id": hit.doc_id, "score": hit.score, "title": doc.get("title", "")})
    if args.json:
        payload = {
            "query": args.query, "pipeline": args.pipeline, "index": index.name, "generation": index.generation_id,
            "backend": index.kind, "took_ms": round(took_ms, 3), "hits": rows,
            "retrievers": {r.name: {"answered": r.answers, **({"terms": r.terms} if r.terms is not None else {})}
                           for r in retrievers},
            "notes": notes,
        }
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return 0
    for note in notes:
        log(note)
    print(f"{args.pipeline} top {len(rows)} for {args.query!r} ({index.kind} {index.name}/{index.generation_id}, {took_ms:.1f} ms)")
    for row in rows:
        print(f"{row['rank']:>4}  {row['score']:8.3f}  {row['id']:<12}  {row['title'][:90]}")
    return 0


def read_query_file(path: Path) -> dict[str, str]:
    """A BEIR queries.jsonl (first non-blank character `{`) or a TSV of id<TAB>text."""
    from eval.datasets import read_queries  # here for start-up time

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if text.lstrip().startswith("{"):
        return read_queries(path)
    queries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        query_id, tab, query = line.partition("\t")
        if not tab or not query_id.strip():
            raise CliError(f"{path}:{number}: expected id<TAB>text (or a BEIR queries.jsonl)")
        if query_id in queries:
            raise CliError(f"{path}:{number}: duplicate query id '{query_id}'")
        queries[query_id] = query
    if not queries:
        raise CliError(f"{path}: no queries")
    return queries


def run_batch(args: argparse.Namespace, index: Any, pipeline: Any) -> int:
    queries = read_query_file(Path(args.queries))
    for query_id, query in queries.items():
        _check_query(query, f"{args.queries}: query '{query_id}'")
    tag = args.tag or args.pipeline.replace(":", "-")
    if any(ch.isspace() for ch in tag):
        raise CliError(f"--tag must be one word, got {tag!r}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp")
    started = time.perf_counter()
    bar = progress_bar(queries.items(), desc=args.pipeline, unit="q", enabled=not args.quiet, leave=False)
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            for query_id, query in bar:
                hits = pipeline.search(query, args.k)
                handle.write(format_hits(query_id, query, hits, args.format, tag))
    finally:
        bar.close()  # before any error message: no bar residue in front of it
    temporary.replace(out)  # all or nothing
    seconds = time.perf_counter() - started
    log(f"{plural(len(queries), 'query', 'queries')} with {args.pipeline} on {index.kind} {index.name}/"
        f"{index.generation_id} in {seconds:.1f} s ({len(queries) / seconds if seconds else 0:.0f} queries/s)")
    print(f"run: {out} ({args.format})")
    return 0


def format_hits(query_id: str, query: str, hits: Any, fmt: str, tag: str) -> str:
    """One query's results: TREC lines (`qid Q0 doc rank score tag`) or one JSON line."""
    if fmt == "jsonl":
        record = {"query_id": query_id, "query": query,
                  "hits": [{"rank": h.rank, "id": h.doc_id, "score": float(h.score)} for h in hits]}
        return json.dumps(record, ensure_ascii=False) + "\n"
    return "".join(f"{query_id} Q0 {h.doc_id} {h.rank} {float(h.score)!r} {tag}\n" for h in hits)
