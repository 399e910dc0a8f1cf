"""`ltr-search index build|rebuild|status|rollback|list|delete`: the generations of an index, on
either backend (`search.backend_factory.index_admin` chooses; nothing here branches on it), and
`index upsert|delete-docs|compact`: documents changed between rebuilds (`_live_admin` chooses)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from indexing.config import DEFAULT_BM25_B, DEFAULT_BM25_K1, DEFAULT_INDEX_NAME, DEFAULT_KEEP_GENERATIONS
from search.app.cli.common import CliError, add_backend_arguments, backend_from_args, log



def add_arguments(command: str, index: argparse.ArgumentParser) -> None:
    index_commands = index.add_subparsers(dest="index_command", required=True)

    build = index_commands.add_parser("build", help="build a new generation from a corpus and activate it")
    build.add_argument("--dataset", required=True, help="BEIR directory (corpus.jsonl) or a JSONL file")
    build.add_argument("--name", default=DEFAULT_INDEX_NAME)
    build.add_argument("--no-dense", action="store_true", help="BM25 only: skip the embedding model")
    build.add_argument("--encoder-form", choices=["fp32", "int8"], default=None,
                       help="encoder form for documents and, always, for this index's queries (default: "
                            "EncoderSettings' default; README: Compressed encoder)")
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
    build.add_argument("--keep", type=int, help=f"old generations kept for rollback (default {DEFAULT_KEEP_GENERATIONS}; "
                                                "elasticsearch: elasticsearch.keep, env LTR_SEARCH_ES_KEEP)")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    add_backend_arguments(build)

    rebuild = index_commands.add_parser("rebuild", help="rebuild from the active generation's recorded corpus and settings")
    rebuild.add_argument("--name", help="index (default: the home's only index, or 'default')")
    rebuild.add_argument("--dataset", help="build from this corpus path instead of the recorded one (a new source: "
                                           "updates written before it are not applied)")
    rebuild.add_argument("--quiet", action="store_true")
    add_backend_arguments(rebuild)

    upsert = index_commands.add_parser("upsert", help="add or replace documents (JSONL in the index's corpus format); "
                                                      "searchable once acknowledged")
    upsert.add_argument("--file", required=True, help="JSONL file: one document a line, fields as in the corpus")
    upsert.add_argument("--name", help="index (default: the home's only index, or 'default')")
    add_backend_arguments(upsert)

    delete_docs = index_commands.add_parser("delete-docs", help="delete documents by id (unknown ids are an error)")
    delete_docs.add_argument("--ids", required=True, help="comma-separated document ids")
    delete_docs.add_argument("--name", help="index (default: the home's only index, or 'default')")
    add_backend_arguments(delete_docs)

    compact = index_commands.add_parser("compact", help="fold the pending upserts and deletes into a new generation")
    compact.add_argument("--name", help="index (default: the home's only index, or 'default')")
    add_backend_arguments(compact)

    status = index_commands.add_parser("status", help="generations, sizes and the active pointer")
    status.add_argument("--name")
    status.add_argument("--json", action="store_true")
    status.add_argument("--verify", action="store_true", help="check every file's SHA-256, not just its size (embedded)")
    add_backend_arguments(status)

    rollback = index_commands.add_parser("rollback", help="reactivate an older generation")
    rollback.add_argument("--name", help="index (default: the home's only index, or 'default')")
    rollback.add_argument("--to", help="generation id (default: the one before the active)")
    add_backend_arguments(rollback)

    listing = index_commands.add_parser("list", help="every index: active generation, documents, state")
    listing.add_argument("--json", action="store_true")
    add_backend_arguments(listing)

    delete = index_commands.add_parser("delete", help="delete an index and all its generations")
    delete.add_argument("--name", required=True)
    delete.add_argument("--yes", action="store_true", help="really delete (without it the command refuses)")
    add_backend_arguments(delete)


def run(home: Path, args: argparse.Namespace) -> int:
    handler = {"build": cmd_build, "rebuild": cmd_rebuild, "status": cmd_status, "rollback": cmd_rollback,
               "list": cmd_list, "delete": cmd_delete, "upsert": cmd_upsert, "delete-docs": cmd_delete_docs,
               "compact": cmd_compact}
    return handler[args.index_command](home, args)


def _admin(home: Path, args: argparse.Namespace) -> Any:
    from search.backend_factory import index_admin  # here for start-up time: loads the index code

    return index_admin(home, backend_from_args(args))


def _name(home: Path, args: argparse.Namespace) -> str:
    from search.backend_factory import resolve_index_name  # here for start-up time

    return resolve_index_name(home, args.name, backend_from_args(args))


def cmd_build(home: Path, args: argparse.Namespace) -> int:
    admin = _admin(home, args)
    summary = admin.build(args.name, build_settings(args, admin.keep(args.keep)), progress=not args.quiet, log=log)
    print("\n".join(summary.lines()))
    return 0


def build_settings(args: argparse.Namespace, keep: int) -> Any:
    """The `BuildSettings` of `index build`'s flags (both backends)."""
    from indexing.analysis import AnalyzerSettings  # here (and below) for start-up time
    from indexing.bm25 import BM25Settings
    from indexing.build import BuildSettings  # lazy: start-up time
    from indexing.corpus import CorpusSpec  # lazy: start-up time
    from indexing.encoder import EncoderSettings  # lazy: start-up time
    from indexing.vectors import VectorIndexSettings  # lazy: start-up time

    vector_options: dict[str, Any] = {"kind": args.vector_index}
    if args.hnsw_threshold is not None:
        vector_options["hnsw_threshold"] = args.hnsw_threshold
    return BuildSettings(
        corpus=CorpusSpec(
            path=str(Path(args.dataset).resolve()),
            id_field=args.id_field,
            title_field=args.title_field or None,
            text_fields=tuple(args.text_fields or ["text"]),
        ),
        analyzer=AnalyzerSettings(stemmer=args.stemmer, stopwords=args.stopwords),
        bm25=BM25Settings(k1=args.k1, b=args.b),
        dense=not args.no_dense,
        encoder=EncoderSettings(form=args.encoder_form) if args.encoder_form else EncoderSettings(),
        vectors=VectorIndexSettings(**vector_options),
        skip_invalid=args.skip_invalid,
        keep=keep,
    )


def cmd_rebuild(home: Path, args: argparse.Namespace) -> int:
    summary = _admin(home, args).rebuild(_name(home, args), progress=not args.quiet, log=log, dataset=args.dataset)
    print("\n".join(summary.lines()))
    return 0


def cmd_status(home: Path, args: argparse.Namespace) -> int:
    admin = _admin(home, args)
    report = admin.status(args.name, args.verify)
    live = _live_admin(home, args)
    for name, info in report["indexes"].items():
        if info.get("active"):
            info["live"] = live.describe(name)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if not report["indexes"]:
        print(f"no indexes in {admin.where}")
    for name, info in report["indexes"].items():
        print(f"{admin.heading(name, info)}: active generation {info['active'] or '(none)'}")
        for g in info["generations"]:
            print(f" {'*' if g['active'] else ' '} {g['generation']}  {generation_row(g)}")
        if info.get("live"):
            print(live_row(info["live"]))
    if args.verify:
        print(verify_summary(report))
    return 0


def live_row(live: dict[str, Any]) -> str:
    """The delta and compaction line of `index status`."""
    if live.get("error"):
        return f"   delta: unknown ({live['error']})"
    delta = live.get("delta") or {}
    row = (f"   delta: {delta.get('upserts', 0):,} upserts, {delta.get('deletes', 0):,} deletes pending "
           f"({delta.get('bytes', 0) / 1e6:.2f} MB of journal)")
    last = live.get("last_compaction")
    row += f"; last compaction {last['at']} (from {last['from']}, {last['operations']:,} operations)" if last else \
        "; never compacted"
    return row


def _live_admin(home: Path, args: argparse.Namespace) -> Any:
    """Document updates on the chosen backend."""
    choice = backend_from_args(args)
    if choice.is_elasticsearch:
        from search.elastic_backend import ElasticLiveAdmin  # lazy: start-up time

        return ElasticLiveAdmin(home, choice.elasticsearch)
    from search.embedded import EmbeddedLiveAdmin  # lazy: start-up time

    return EmbeddedLiveAdmin(home)


def cmd_upsert(home: Path, args: argparse.Namespace) -> int:
    receipt = _live_admin(home, args).upsert_file(_name(home, args), Path(args.file))
    print(json.dumps(receipt, indent=2))
    return 0


def cmd_delete_docs(home: Path, args: argparse.Namespace) -> int:
    ids = [i.strip() for i in args.ids.split(",")]
    if not all(ids):
        raise CliError(f"--ids has an empty id: {args.ids!r} (comma-separated ids, no empty ones)")
    if len(set(ids)) != len(ids):
        raise CliError("--ids names an id twice")
    try:
        receipt = _live_admin(home, args).delete_ids(_name(home, args), ids)
    except KeyError as exc:  # an id the live index does not hold
        raise CliError(str(exc)) from None
    print(json.dumps(receipt, indent=2))
    return 0


def cmd_compact(home: Path, args: argparse.Namespace) -> int:
    summary = _live_admin(home, args).compact(_name(home, args), log=log)
    print("\n".join(summary.lines()) if hasattr(summary, "lines") else json.dumps(summary, indent=2))
    return 0


def generation_row(g: dict[str, Any]) -> str:
    """One generation of the status report, either backend."""
    if g["status"] == "corrupt":
        return f"CORRUPT: {g['error']}"
    if g["status"] == "incompatible":
        return f"INCOMPATIBLE: {g['error']}"
    documents = "?" if g.get("documents") is None else f"{g['documents']:,}"
    row = f"{g['created_at']}  {documents:>9} docs  "
    if "vocabulary" in g:
        row += f"{g['vocabulary']:>9,} terms  "
    row += f"dense={g['dense']:<5}  {g['bytes'] / 1e6:8.1f} MB"
    if "health" in g:
        row += f"  {g['health'] or '?'}/{g['state'] or '?'}"
    if g["status"] == "incomplete":
        row += f"  INCOMPLETE: its build read {g['expected_documents']} documents"
    return row


def verify_summary(report: dict[str, Any]) -> str:
    """The last line of `index status --verify`: it says so when every checked file is intact."""
    generations = [g for info in report["indexes"].values() for g in info["generations"]]
    bad = [g["generation"] for g in generations if g["status"] != "ok"]
    if bad:
        return f"verify: {len(bad)} of {len(generations)} generations FAILED ({', '.join(bad)})"
    return f"verify: OK, {len(generations)} generation{'s' if len(generations) != 1 else ''} checked"


def index_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per index for `index list`: active generation, its documents and a state
    (ok, empty: no generation, e.g. a failed first build; no active generation; corrupt active)."""
    rows = []
    for name, info in report["indexes"].items():
        generations = info["generations"]
        active = next((g for g in generations if g["active"]), None)
        if not generations:
            state = "empty (no generation: a failed or interrupted build?)"
        elif active is None:
            state = "no active generation"
        else:
            state = active["status"]
        rows.append({"name": name, "active": info["active"], "generations": len(generations),
                     "documents": active.get("documents") if active else None, "state": state})
    return rows


def cmd_list(home: Path, args: argparse.Namespace) -> int:
    admin = _admin(home, args)
    rows = index_rows(admin.status(None, verify=False))
    if args.json:
        print(json.dumps({"indexes": rows}, indent=2))
        return 0
    if not rows:
        print(f"no indexes in {admin.where}; build one with `ltr-search index build --dataset PATH --name NAME`")
        return 0
    print(f"{'index':<24}{'active':<10}{'docs':>11}  {'generations':>11}  state")
    for row in rows:
        docs = "-" if row["documents"] is None else f"{row['documents']:,}"
        print(f"{row['name']:<24}{row['active'] or '-':<10}{docs:>11}  {row['generations']:>11}  {row['state']}")
    return 0


def cmd_delete(home: Path, args: argparse.Namespace) -> int:
    if not args.yes:
        raise CliError(f"deleting index '{args.name}' removes every generation; pass --yes to confirm")
    _admin(home, args).delete(args.name)
    print(f"index '{args.name}' deleted")
    return 0


def cmd_rollback(home: Path, args: argparse.Namespace) -> int:
    name = _name(home, args)
    before, target = _admin(home, args).rollback(name, args.to, log)
    print(f"index '{name}': active generation {before} -> {target}")
    return 0
