"""`ltr-search`: the one command-line entry point for every job.

    ltr-search [--home DIR] index build --dataset PATH [--name NAME] [--no-dense] [--skip-invalid]
    ltr-search [--home DIR] index rebuild --name NAME
    ltr-search [--home DIR] index status [--name NAME] [--json] [--verify]
    ltr-search [--home DIR] index rollback --name NAME [--to GENERATION]
    ltr-search [--home DIR] search "QUERY" [--name NAME] [--pipeline bm25|dense] [-k 10] [--json]
    ltr-search [--home DIR] eval --dataset PATH [--split test] [--pipeline bm25,dense] [--name INDEX]
               [--json OUT] [--report OUT.md] [--runs DIR] [--folds K] [--run-file PATH ...]
    ltr-search [--home DIR] serve [--host 127.0.0.1] [--port 8000] [--name INDEX] [--config FILE]
    ltr-search [--home DIR] train --dataset PATH [--split train] [--name INDEX] [--feature-set text] [--valid-fraction 0.2]
    ltr-search [--home DIR] models list|show VERSION|promote VERSION [--dataset PATH --split SPLIT] [--force]|rollback
    ltr-search [--home DIR] behaviour status|update|rebuild [--name INDEX]
    ltr-search clicks fit --log PATH [--models ctr,pbm,cascade,dbn] [--json OUT] [--report OUT.md]
    ltr-search simulate --qrels QRELS --run RUN --model pbm|cascade|dbn [--out events.jsonl]

Input problems exit with status 2 and one precise line on stderr; nothing is half-written.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from search.backend_factory import add_backend_arguments
from indexing.config import DEFAULT_BM25_B, DEFAULT_BM25_K1, DEFAULT_INDEX_NAME, DEFAULT_KEEP_GENERATIONS
from indexing.home import HOME_ENV_VAR, resolve_home, runs_dir
from search.limits import MAX_QUERY_CHARS

EXIT_USAGE = 2


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
    build.add_argument("--keep", type=int, help=f"old generations kept for rollback (default {DEFAULT_KEEP_GENERATIONS}; "
                                                "elasticsearch: elasticsearch.keep, env LTR_SEARCH_ES_KEEP)")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    add_backend_arguments(build)

    rebuild = index_commands.add_parser("rebuild", help="rebuild from the active generation's recorded corpus and settings")
    rebuild.add_argument("--name", default=DEFAULT_INDEX_NAME)
    rebuild.add_argument("--quiet", action="store_true")
    add_backend_arguments(rebuild)

    status = index_commands.add_parser("status", help="generations, sizes and the active pointer")
    status.add_argument("--name")
    status.add_argument("--json", action="store_true")
    status.add_argument("--verify", action="store_true", help="check every file's SHA-256, not just its size (embedded)")
    add_backend_arguments(status)

    rollback = index_commands.add_parser("rollback", help="reactivate an older generation")
    rollback.add_argument("--name", default=DEFAULT_INDEX_NAME)
    rollback.add_argument("--to", help="generation id (default: the one before the active)")
    add_backend_arguments(rollback)

    search = commands.add_parser("search", help="run a query for a quick check")
    search.add_argument("query")
    search.add_argument("--name", default=DEFAULT_INDEX_NAME)
    search.add_argument("--pipeline", default="bm25", help="bm25, dense, hybrid, hybrid-convex, ltr (the promoted model) or model:VERSION")
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--json", action="store_true")
    add_backend_arguments(search)

    evaluate = commands.add_parser("eval", help="evaluate pipelines on a judged split, with significance tests")
    evaluate.add_argument("--dataset", required=True, help="BEIR directory with queries.jsonl and qrels/SPLIT.tsv")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--pipeline", default="bm25,dense", help="comma-separated registered pipelines (first = baseline)")
    evaluate.add_argument("--name", help="index name (default: the dataset folder's name if such an index exists, else 'default')")
    evaluate.add_argument("--metrics", help="comma-separated, ir_measures names (default: nDCG@1,3,5,10,100 P@1,5,10 R@10,100,1000 MAP@100 RR@10 judged@10)")
    evaluate.add_argument("--baseline", help="pipeline the others are tested against (default: the first)")
    evaluate.add_argument("--depth", type=int, default=1000, help="documents retrieved per query")
    evaluate.add_argument("--train-split", help="split learned pipelines are fitted on (default: train, when it exists and differs)")
    evaluate.add_argument("--folds", type=int, help="k-fold cross-validation of learned pipelines over the evaluated split")
    evaluate.add_argument("--seed", type=int, help="seed of the folds and the randomisation test")
    evaluate.add_argument("--resamples", type=int, default=10_000, help="sign flips of the randomisation test")
    evaluate.add_argument("--run-file", action="append", default=[], help="also score this TREC run file (named by its file stem); repeatable")
    evaluate.add_argument("--json", dest="json_out", help="write the results as JSON here ('-' for stdout)")
    evaluate.add_argument("--report", help="write a markdown report here, with PNG plots next to it")
    evaluate.add_argument("--runs", help="directory for the TREC run files (default: HOME/runs/DATASET-SPLIT)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    add_backend_arguments(evaluate)

    serve = commands.add_parser("serve", help="run the HTTP query service (FastAPI on uvicorn)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--name", help="index to serve (default: the config's, else 'default')")
    serve.add_argument("--config", help="TOML settings file (env LTR_SEARCH_CONFIG)")
    serve.add_argument("--pipeline", dest="default_pipeline", help="default pipeline (default ltr, falling back to hybrid while no model is active)")
    serve.add_argument("--window", dest="rerank_window", type=int, help="rerank window (default 200)")
    serve.add_argument("--threads", type=int, help="ONNX Runtime threads per query encoding (default: all cores; BLAS always 1)")
    add_backend_arguments(serve)

    from search.app.cli.clicks import add_click_commands

    add_click_commands(commands)  # `clicks fit` and `simulate`
    from search.app.cli.models import add_ltr_commands

    add_ltr_commands(commands)  # `train` and `models list|show|promote|rollback`
    from search.app.cli.behaviour import add_behaviour_commands

    add_behaviour_commands(commands)  # `behaviour status|update|rebuild`
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    home = resolve_home(args.home)
    from indexing.bundle import IndexBundleError
    from indexing.corpus import CorpusError
    from indexing.encoder import EncoderError
    from indexing.elastic import ElasticsearchError
    from search.embedded import DenseUnavailableError

    from search.event_store import EventStoreError
    from ltr.registry import RegistryError

    user_errors = (CliError, CorpusError, IndexBundleError, EncoderError, DenseUnavailableError, EventStoreError,
                   RegistryError, ElasticsearchError, ValueError)
    try:
        if args.command == "index":
            handler = {"build": cmd_build, "rebuild": cmd_rebuild, "status": cmd_status, "rollback": cmd_rollback}
            return handler[args.index_command](home, args)
        if args.command == "search":
            return cmd_search(home, args)
        if args.command == "eval":
            return cmd_eval(home, args)
        if args.command == "serve":
            return cmd_serve(home, args)
        if args.command in ("train", "models"):
            from search.app.cli.models import run_ltr_command

            return run_ltr_command(home, args)
        if args.command == "behaviour":
            from search.app.cli.behaviour import run_behaviour_command

            return run_behaviour_command(home, args)
        if args.command in ("clicks", "simulate"):
            from search.app.cli.clicks import run_click_command

            return run_click_command(args)
    except user_errors as exc:
        print(f"ltr-search: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def cmd_build(home: Path, args: argparse.Namespace) -> int:
    from indexing.build import build_index

    es = _elasticsearch_settings(args)
    if es is not None:
        from indexing.elastic_build import build_elastic_index

        if args.keep is not None:
            es = dataclasses.replace(es, keep=args.keep)
        summary = build_elastic_index(home, args.name, _build_settings(args, es.keep), es, progress=not args.quiet,
                                      log=_log)
    else:
        keep = DEFAULT_KEEP_GENERATIONS if args.keep is None else args.keep
        summary = build_index(home, args.name, _build_settings(args, keep), progress=not args.quiet, log=_log)
    print("\n".join(summary.lines()))
    return 0


def _build_settings(args: argparse.Namespace, keep: int) -> Any:
    """The `BuildSettings` of `index build`'s flags (both backends)."""
    from indexing.analysis import AnalyzerSettings
    from indexing.bm25 import BM25Settings
    from indexing.build import BuildSettings
    from indexing.corpus import CorpusSpec
    from indexing.vectors import VectorIndexSettings

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
        vectors=VectorIndexSettings(**vector_options),
        skip_invalid=args.skip_invalid,
        keep=keep,
    )


def _elasticsearch_settings(args: argparse.Namespace) -> Any:
    """The cluster settings when an `index` command targets Elasticsearch, else None."""
    from search.backend_factory import backend_from_args

    return backend_from_args(args).elasticsearch


def cmd_rebuild(home: Path, args: argparse.Namespace) -> int:
    from indexing.build import rebuild_index

    es = _elasticsearch_settings(args)
    if es is not None:
        from indexing.elastic_build import rebuild_elastic_index

        summary = rebuild_elastic_index(home, args.name, es, progress=not args.quiet, log=_log)
    else:
        summary = rebuild_index(home, args.name, progress=not args.quiet, log=_log)
    print("\n".join(summary.lines()))
    return 0


def cmd_status(home: Path, args: argparse.Namespace) -> int:
    from indexing.bundle import IndexBundleError, IndexStore

    es = _elasticsearch_settings(args)
    if es is not None:
        return _elastic_status(args, es)

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

    def row(g: dict[str, Any]) -> str:
        if g["status"] != "ok":
            return f"CORRUPT: {g['error']}"
        return (f"{g['created_at']}  {g['documents']:>9,} docs  "
                f"{g['vocabulary']:>9,} terms  dense={g['dense']:<5}  {g['bytes'] / 1e6:8.1f} MB")

    return _print_status(args, report, f"no indexes in {store.root}", lambda name, info: f"index '{name}'", row)


def _elastic_status(args: argparse.Namespace, es: Any) -> int:
    from indexing.elastic_build import elastic_index_status

    def row(g: dict[str, Any]) -> str:
        if g["status"] == "incompatible":
            return f"INCOMPATIBLE: {g['error']}"
        documents = "?" if g["documents"] is None else f"{g['documents']:,}"
        note = "" if g["status"] == "ok" else f"  INCOMPLETE: its build read {g['expected_documents']} documents"
        return (f"{g['created_at']}  {documents:>9} docs  dense={g['dense']:<5}  {g['bytes'] / 1e6:8.1f} MB  "
                f"{g['health'] or '?'}/{g['state'] or '?'}{note}")

    return _print_status(args, elastic_index_status(args.name, es),
                         f"no indexes under prefix '{es.index_prefix}' on Elasticsearch at {es.url}",
                         lambda name, info: f"index '{name}' (Elasticsearch at {es.url}, alias {info['alias']})", row)


def _print_status(args: argparse.Namespace, report: dict[str, Any], nothing: str, heading: Any, row: Any) -> int:
    """`index status` output (both backends): the JSON report, or a heading per index and a line
    per generation, `*` marking the active one."""
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if not report["indexes"]:
        print(nothing)
    for name, info in report["indexes"].items():
        print(f"{heading(name, info)}: active generation {info['active'] or '(none)'}")
        for g in info["generations"]:
            print(f" {'*' if g['active'] else ' '} {g['generation']}  {row(g)}")
    return 0


def cmd_rollback(home: Path, args: argparse.Namespace) -> int:
    from indexing.bundle import IndexStore

    es = _elasticsearch_settings(args)
    if es is not None:
        from indexing.elastic_build import rollback_elastic_index

        before, target = rollback_elastic_index(args.name, es, to=args.to, log=_log)
    else:
        store = IndexStore(home)
        with store.lock(args.name):
            before = store.active_generation(args.name)
            target = args.to or store.previous_generation(args.name)
            store.activate(args.name, target)
    print(f"index '{args.name}': active generation {before} -> {target}")
    return 0


def cmd_search(home: Path, args: argparse.Namespace) -> int:
    from search.backend_factory import backend_from_args, open_backend
    from search.app.pipelines import create_pipeline, pipeline_spec

    name = "model:active" if args.pipeline == "ltr" else args.pipeline  # as the service serves `ltr`
    if pipeline_spec(name).learned:  # an unknown name fails here too, before the index loads
        raise CliError(f"pipeline '{name}' is fitted on training queries inside `ltr-search eval`; "
                       "to search with the promoted model use --pipeline ltr (or model:VERSION)")
    if not args.query.strip():
        raise CliError("query is empty")
    if len(args.query) > MAX_QUERY_CHARS:
        raise CliError(f"query has {len(args.query)} characters; the limit is {MAX_QUERY_CHARS}")
    if not 1 <= args.k <= 10_000:
        raise CliError(f"-k must be between 1 and 10000, got {args.k}")
    index = open_backend(home, args.name, backend_from_args(args))
    pipeline = create_pipeline(name, index)
    started = time.perf_counter()
    hits = pipeline.search(args.query, args.k)
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
            "generation": index.generation_id,
            "backend": index.kind,
            "took_ms": round(took_ms, 3),
            "hits": rows,
        }
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return 0
    print(f"{args.pipeline} top {len(rows)} for {args.query!r} ({index.kind} {index.name}/{index.generation_id}, {took_ms:.1f} ms)")
    for row in rows:
        print(f"{row['rank']:>4}  {row['score']:8.3f}  {row['id']:<12}  {row['title'][:90]}")
    return 0


def cmd_serve(home: Path, args: argparse.Namespace) -> int:
    from search.app.config import load_service_config
    from search.app.service import serve

    if not 0 < args.port < 65536:
        raise CliError(f"--port must be between 1 and 65535, got {args.port}")
    config = load_service_config(
        home, Path(args.config) if args.config else None,
        {"index": args.name, "default_pipeline": args.default_pipeline, "rerank_window": args.rerank_window,
         "threads": args.threads, "backend": args.backend, "es_url": args.es_url},
    )
    _log(f"serving index '{config.index}' ({config.backend.describe()}) from {home} on http://{args.host}:{args.port} "
         f"(admin endpoints {'enabled' if config.admin_token else 'disabled: set LTR_SEARCH_ADMIN_TOKEN'})")
    serve(config, args.host, args.port)
    return 0


def cmd_eval(home: Path, args: argparse.Namespace) -> int:
    from eval.datasets import available_splits, load_dataset, read_run
    from eval.experiment import ExperimentSettings, run_experiment
    from eval.metrics import DEFAULT_METRICS, HEADLINE_METRICS, parse_metric_list
    from eval.significance import DEFAULT_SEED
    from search.backend_factory import backend_from_args, open_index_for_dataset
    from search.app.pipelines import parse_pipeline_list, pipeline_spec

    dataset = load_dataset(args.dataset, args.split)
    external = {}
    for run_path in args.run_file:
        stem = Path(run_path).stem
        if stem in external:
            raise CliError(f"two run files are named '{stem}'")
        external[stem] = read_run(run_path)
    names = [n.strip() for n in args.pipeline.split(",") if n.strip()] if args.pipeline else []
    own = parse_pipeline_list(",".join(names)) if names else []
    clash = sorted(set(own) & set(external))
    if clash:
        raise CliError(f"run file name '{clash[0]}' clashes with a pipeline name; rename the file")
    settings = ExperimentSettings(
        pipelines=own + list(external),
        metrics=parse_metric_list(args.metrics or ",".join(DEFAULT_METRICS)),
        depth=args.depth,
        baseline=args.baseline,
        folds=args.folds,
        seed=DEFAULT_SEED if args.seed is None else args.seed,
        resamples=args.resamples,
    )
    train = None
    if any(pipeline_spec(n).learned for n in own) and not args.folds:
        train_split = args.train_split or ("train" if "train" in available_splits(dataset.path) else None)
        if train_split is None or train_split == args.split:
            raise CliError("learned pipelines need a training split other than the evaluated one (--train-split), or --folds K")
        train = load_dataset(args.dataset, train_split)

    index = open_index_for_dataset(home, args.name, dataset.name, backend_from_args(args))
    name = index.name
    runs = Path(args.runs) if args.runs else runs_dir(home, dataset.name, dataset.split)
    _log(f"evaluating {', '.join(settings.pipelines)} on {dataset.name}/{dataset.split}: "
         f"{len(dataset.queries)} queries ({len(dataset.skipped)} skipped), index {name}/{index.generation_id} ({index.kind})")
    result = run_experiment(
        index, dataset, settings, runs, catalog=pipeline_spec, train=train, external_runs=external,
        progress=not args.quiet, log=_log,
    )
    payload = result.to_json()
    if args.json_out == "-":
        print(json.dumps(payload, indent=2))
    elif args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(payload, indent=2) + "\n")
    if args.report:
        from eval.report import write_report

        _log(f"report: {write_report(result, Path(args.report))}")
    if args.json_out != "-":
        _print_eval_summary(payload, [m for m in HEADLINE_METRICS if m in payload["pipelines"][settings.pipelines[0]]["metrics"]])
    return 0


def _print_eval_summary(payload: dict[str, Any], metrics: list[str]) -> None:
    baseline = payload["significance"]["baseline"]
    print(f"{payload['dataset']}/{payload['split']}: {payload['queries']} queries, {payload['skipped_queries']} skipped; "
          f"vs {baseline}: +/- = significantly better/worse (both Holm-corrected tests p < {payload['significance']['alpha']})")
    print(f"{'pipeline':<16}" + "".join(f"{m:>10}" for m in metrics) + f"{'p50 ms':>9}{'p95 ms':>9}")
    for name, entry in payload["pipelines"].items():
        comparisons = payload["significance"]["comparisons"].get(name, {})
        cells = "".join(f"{entry['metrics'][m]:>9.4f}{_significance_mark(comparisons.get(m))}" for m in metrics)
        latency = entry["latency_ms"] or {"p50": float("nan"), "p95": float("nan")}
        print(f"{name:<16}{cells}{latency['p50']:>9.1f}{latency['p95']:>9.1f}")
    print(f"run files: {Path(next(iter(payload['pipelines'].values()))['run_file']).parent}")


def _significance_mark(comparison: dict[str, Any] | None) -> str:
    if not comparison or not comparison["significant"]:
        return " "
    return "+" if comparison["mean_difference"] > 0 else "-"


def _log(message: str) -> None:
    print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
