"""`ltr-search serve`: the HTTP query service (FastAPI on uvicorn)."""
from __future__ import annotations

import argparse
from pathlib import Path

from search.app.cli.common import CliError, add_backend_arguments, log


def add_arguments(command: str, serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--name", help="index to serve (default: the config's, else the home's only index, else 'default')")
    serve.add_argument("--config", help="TOML settings file (env LTR_SEARCH_CONFIG)")
    serve.add_argument("--pipeline", dest="default_pipeline", help="default pipeline (default ltr, falling back to hybrid while no model is active)")
    serve.add_argument("--window", dest="rerank_window", type=int, help="rerank window (default 200)")
    serve.add_argument("--threads", type=int, help="ONNX Runtime threads per query encoding (default: all cores; BLAS always 1)")
    serve.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=None,
                       help="log one line per HTTP request (default: the config's, on)")
    add_backend_arguments(serve)


def run(home: Path, args: argparse.Namespace) -> int:
    from indexing.config import DEFAULT_INDEX_NAME  # lazy: start-up time
    from search.app.config import load_service_config  # here (and below) for start-up time
    from search.app.service import serve
    from search.backend_factory import resolve_index_name  # lazy: start-up time

    if not 0 < args.port < 65536:
        raise CliError(f"--port must be between 1 and 65535, got {args.port}")
    config_file = Path(args.config) if args.config else None
    overrides = {"index": args.name, "default_pipeline": args.default_pipeline, "rerank_window": args.rerank_window,
                 "threads": args.threads, "backend": args.backend, "es_url": args.es_url, "access_log": args.access_log}
    config = load_service_config(home, config_file, overrides)
    if args.name is None and config.index == DEFAULT_INDEX_NAME:  # nothing chose an index: the home's only one
        try:
            chosen = resolve_index_name(home, None, config.backend)
        except ValueError:
            chosen = config.index  # none or several: the service reports its missing index itself
        if chosen != config.index:
            config = load_service_config(home, config_file, {**overrides, "index": chosen})
    log(f"serving index '{config.index}' ({config.backend.describe()}) from {home} on http://{args.host}:{args.port} "
        f"(admin endpoints {'enabled' if config.admin_token else 'disabled: set LTR_SEARCH_ADMIN_TOKEN'})")
    serve(config, args.host, args.port)
    return 0
