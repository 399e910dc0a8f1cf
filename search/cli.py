"""`ltr-search`: the one command-line entry point for every job.

    ltr-search [--home DIR] index build --dataset PATH [--name NAME] [--no-dense] [--skip-invalid]
    ltr-search [--home DIR] index rebuild --name NAME
    ltr-search [--home DIR] index status [--name NAME] [--json] [--verify]
    ltr-search [--home DIR] index rollback --name NAME [--to GENERATION]
    ltr-search [--home DIR] search "QUERY" [--name NAME] [--pipeline bm25|dense] [-k 10] [--json]

Input problems exit with status 2 and one precise line on stderr; nothing is half-written.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from indexing.config import DEFAULT_BM25_B, DEFAULT_BM25_K1, DEFAULT_INDEX_NAME, DEFAULT_KEEP_GENERATIONS, HOME_ENV_VAR, resolve_home

EXIT_USAGE = 2
MAX_QUERY_CHARS = 4096


class CliError(Exception):
    """An error worth one line to the user (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltr-search", description="Learning-to-rank search engine.")
    parser.add_argument("--home", help=f"engine home for indexes, models and events (env {HOME_ENV_VAR}, default ./.ltr-search)")
    commands = parser.add_subparsers(dest="command", required=True)

    index = commands.add_parser("index", help="build, rebuild, inspect and roll back indexes")
    index_commands = index.add_subparsers(dest="index_command", required=True)

    build = index_commands.add_parser("build", help="build a new generation from a corpus and activate it")
    build.add_argument("--dataset", required=True, help="BEIR directory (corpus.jsonl) or a JSONL file")
    build.add_argument("--name", default=DEFAULT_INDEX_NAME)
    build.add_argument("--no-dense", action="store_true", help="BM25 only: skip the embedding model")
    build.add_argument("--skip-invalid", action="store_true", help="index the valid lines and report every skipped one")
    build.add_argument("--id-field", default="_id")
    build.add_argument("--title-field", default="title", help="empty string for none")
    build.add_argument("--text-field", action="append", dest="text_fields", help="repeatable; default: text")
    build.add_argument("--k1", type=float, default=DEFAULT_BM25_K1)
    build.add_argument("--b", type=float, default=DEFAULT_BM25_B)
    build.add_argument("--stemmer", default="english", help="a PyStemmer algorithm or 'none'")
    build.add_argument("--stopwords", default="lucene", help="lucene or none")
    build.add_argument("--vector-index", default="auto", choices=["auto", "exact", "hnsw"])
    build.add_argument("--hnsw-threshold", type=int, help="corpus size from which 'auto' builds HNSW")
    build.add_argument("--keep", type=int, default=DEFAULT_KEEP_GENERATIONS, help="old generations kept for rollback")
    build.add_argument("--quiet", action="store_true", help="no progress bars")

    rebuild = index_commands.add_parser("rebuild", help="rebuild from the active generation's recorded corpus and settings")
    rebuild.add_argument("--name", default=DEFAULT_INDEX_NAME)
    rebuild.add_argument("--quiet", action="store_true")

    status = index_commands.add_parser("status", help="generations, sizes and the active pointer")
    status.add_argument("--name")
    status.add_argument("--json", action="store_true")
    status.add_argument("--verify", action="store_true", help="check every file's SHA-256, not just its size")

    rollback = index_commands.add_parser("rollback", help="reactivate an older generation")
    rollback.add_argument("--name", default=DEFAULT_INDEX_NAME)
    rollback.add_argument("--to", help="generation id (default: the one before the active)")

    search = commands.add_parser("search", help="run a query for a quick check")
    search.add_argument("query")
    search.add_argument("--name", default=DEFAULT_INDEX_NAME)
    search.add_argument("--pipeline", default="bm25", choices=["bm25", "dense"])
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    home = resolve_home(args.home)
    from indexing.bundle import IndexBundleError
    from indexing.corpus import CorpusError
    from indexing.encoder import EncoderError
    from search.embedded import DenseUnavailableError

    user_errors = (CliError, CorpusError, IndexBundleError, EncoderError, DenseUnavailableError, ValueError)
    try:
        if args.command == "index":
            handler = {"build": cmd_build, "rebuild": cmd_rebuild, "status": cmd_status, "rollback": cmd_rollback}
            return handler[args.index_command](home, args)
        if args.command == "search":
            return cmd_search(home, args)
    except user_errors as exc:
        print(f"ltr-search: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def cmd_build(home: Path, args: argparse.Namespace) -> int:
    from indexing.analysis import AnalyzerSettings
    from indexing.bm25 import BM25Settings
    from indexing.build import BuildSettings, build_index
    from indexing.corpus import CorpusSpec
    from indexing.vectors import VectorIndexSettings

    vector_options: dict[str, Any] = {"kind": args.vector_index}
    if args.hnsw_threshold is not None:
        vector_options["hnsw_threshold"] = args.hnsw_threshold
    settings = BuildSettings(
        corpus=CorpusSpec(
            path=str(Path(args.dataset).resolve()),
            id_field=args.id_field,
            title_field=args.title_field or None,
            text_fields=tuple(args.text_fields or ["text"]),
        ),
        analyzer=AnalyzerSettings(stemmer=args.stemmer, stopwords=args.stopwords),
        bm25=BM25Settings(k1=args.k1, b=args.b),
        dense=not args.no_dense,
        vectors=VectorIndexSettings(**vector_options),
        skip_invalid=args.skip_invalid,
        keep=args.keep,
    )
    summary = build_index(home, args.name, settings, progress=not args.quiet, log=_log)
    print("\n".join(summary.lines()))
    return 0


def cmd_rebuild(home: Path, args: argparse.Namespace) -> int:
    from indexing.build import rebuild_index

    summary = rebuild_index(home, args.name, progress=not args.quiet, log=_log)
    print("\n".join(summary.lines()))
    return 0


def cmd_status(home: Path, args: argparse.Namespace) -> int:
    from indexing.bundle import IndexBundleError, IndexStore

    store = IndexStore(home)
    names = [args.name] if args.name else store.names()
    report: dict[str, Any] = {"home": str(home), "indexes": {}}
    for name in names:
        active = store.active_generation(name)
        generations = []
        for generation in store.generations(name):
            entry: dict[str, Any] = {"generation": generation, "active": generation == active}
            try:
                bundle = store.open(name, generation, verify=args.verify)
            except IndexBundleError as exc:
                entry.update(status="corrupt", error=str(exc))
            else:
                manifest = bundle.manifest
                dense = manifest.get("dense")
                entry.update(
                    status="ok",
                    created_at=manifest["created_at"],
                    documents=manifest["counts"]["documents"],
                    skipped_lines=manifest["counts"]["skipped_lines"],
                    vocabulary=manifest["counts"]["vocabulary"],
                    dense=dense["vectors"]["kind"] if dense else "none",
                    bytes=sum(f["bytes"] for f in manifest["files"].values()),
                    corpus=manifest["corpus"]["file"],
                    path=str(bundle.path),
                )
            generations.append(entry)
        if not generations and args.name:
            raise CliError(f"no index named '{name}' in {store.root}")
        report["indexes"][name] = {"active": active, "generations": generations}

    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if not report["indexes"]:
        print(f"no indexes in {store.root}")
    for name, info in report["indexes"].items():
        print(f"index '{name}': active generation {info['active'] or '(none)'}")
        for g in info["generations"]:
            marker = "*" if g["active"] else " "
            if g["status"] != "ok":
                print(f" {marker} {g['generation']}  CORRUPT: {g['error']}")
                continue
            print(
                f" {marker} {g['generation']}  {g['created_at']}  {g['documents']:>9,} docs  "
                f"{g['vocabulary']:>9,} terms  dense={g['dense']:<5}  {g['bytes'] / 1e6:8.1f} MB"
            )
    return 0


def cmd_rollback(home: Path, args: argparse.Namespace) -> int:
    from indexing.bundle import IndexStore

    store = IndexStore(home)
    with store.lock(args.name):
        before = store.active_generation(args.name)
        target = args.to or store.previous_generation(args.name)
        store.activate(args.name, target)
    print(f"index '{args.name}': active generation {before} -> {target}")
    return 0


def cmd_search(home: Path, args: argparse.Namespace) -> int:
    from search.embedded import EmbeddedIndex

    if not args.query.strip():
        raise CliError("query is empty")
    if len(args.query) > MAX_QUERY_CHARS:
        raise CliError(f"query has {len(args.query)} characters; the limit is {MAX_QUERY_CHARS}")
    if not 1 <= args.k <= 10_000:
        raise CliError(f"-k must be between 1 and 10000, got {args.k}")
    index = EmbeddedIndex.open(home, args.name)
    started = time.perf_counter()
    hits = index.search(args.query, args.k, args.pipeline)
    took_ms = (time.perf_counter() - started) * 1000
    rows = []
    for hit in hits:
        doc = index.document(hit.doc_id) or {}
        rows.append({"rank": hit.rank, "id": hit.doc_id, "score": hit.score, "title": doc.get("title", "")})
    if args.json:
        payload = {
            "query": args.query,
            "pipeline": args.pipeline,
            "index": index.name,
            "generation": index.generation.generation,
            "took_ms": round(took_ms, 3),
            "hits": rows,
        }
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return 0
    print(f"{args.pipeline} top {len(rows)} for {args.query!r} ({index.name}/{index.generation.generation}, {took_ms:.1f} ms)")
    for row in rows:
        print(f"{row['rank']:>4}  {row['score']:8.3f}  {row['id']:<12}  {row['title'][:90]}")
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
