"""`ltr-search serve`: the HTTP query service (FastAPI on uvicorn)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from search.app.cli.common import CliError, add_backend_arguments, log

MAX_WORKERS = 64


def add_arguments(command: str, serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--name", help="index to serve (default: the config's, else the home's only index, else 'default')")
    serve.add_argument("--config", help="TOML settings file (env LTR_SEARCH_CONFIG)")
    serve.add_argument("--pipeline", dest="default_pipeline", help="default pipeline (default ltr, falling back to hybrid while no model is active)")
    serve.add_argument("--window", dest="rerank_window", type=int, help="rerank window (default 200)")
    serve.add_argument("--threads", type=int, help="ONNX Runtime threads per query encoding (default: the cores shared "
                       "out between the workers; BLAS always 1)")
    serve.add_argument("--workers", type=int, default=1,
                       help="worker processes on the one port, sharing the memory-mapped index, the event store, "
                       "reloads and /metrics (default 1)")
    serve.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=None,
                       help="log one line per HTTP request (default: the config's, on)")
    add_backend_arguments(serve)


def run(home: Path, args: argparse.Namespace) -> int:
    from indexing.config import DEFAULT_INDEX_NAME  # lazy: start-up time
    from search.app.config import load_service_config  # here (and below) for start-up time
    from search.app.service import ServeSpec, serve
    from search.backend_factory import resolve_index_name  # lazy: start-up time

    if not 0 < args.port < 65536:
        raise CliError(f"--port must be between 1 and 65535, got {args.port}")
    if not 1 <= args.workers <= MAX_WORKERS:
        raise CliError(f"--workers must be between 1 and {MAX_WORKERS}, got {args.workers}")
    config_file = Path(args.config) if args.config else None
    overrides = {"index": args.name, "default_pipeline": args.default_pipeline, "rerank_window": args.rerank_window,
                 "threads": args.threads, "backend": args.backend, "es_url": args.es_url, "access_log": args.access_log}
    if args.workers > 1 and args.threads is None:  # N encoders each with a pool of every core would oversubscribe
        overrides["threads"] = max(1, (os.cpu_count() or 1) // args.workers)
    config = load_service_config(home, config_file, overrides)
    if args.name is None and config.index == DEFAULT_INDEX_NAME:  # nothing chose an index: the home's only one
        try:
            chosen = resolve_index_name(home, None, config.backend)
        except ValueError:
            chosen = config.index  # none or several: the service reports its missing index itself
        if chosen != config.index:
            config = load_service_config(home, config_file, {**overrides, "index": chosen})
    workers = f", {args.workers} workers" if args.workers > 1 else ""
    log(f"serving index '{config.index}' ({config.backend.describe()}) from {home} on http://{args.host}:{args.port}"
        f"{workers} (admin endpoints {'enabled' if config.admin_token else 'disabled: set LTR_SEARCH_ADMIN_TOKEN'})")
    spec = ServeSpec(str(home), str(config_file) if config_file else None, {**overrides, "index": config.index})
    serve(config, args.host, args.port, workers=args.workers, spec=spec)
    return 0
