"""`ltr-search serve`: the HTTP query service (FastAPI on uvicorn), in one process or, with
`--workers N`, in N worker processes on one port.

The workers are uvicorn's (spawned, each importing the app afresh); this process only supervises
them, so it never imports the app itself (search/app/service.py): that would cost it the whole
import time again at start-up, on the cores the workers are starting on.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.app.cli.common import CliError, add_backend_arguments, log
from search.limits import MAX_REQUEST_HEAD_BYTES

if TYPE_CHECKING:
    from ltr.ranker import LtrPipeline
    from search.app.config import ServiceConfig
    from search.backend import SearchBackend

MAX_WORKERS = 64
SERVE_SPEC_ENV = "LTR_SEARCH_SERVE_SPEC"  # how `serve --workers N` tells its workers what to serve


@dataclass(frozen=True)
class ServeSpec:
    """What each worker rebuilds its config from (the same `load_service_config` call as the
    CLI's), and the run folder the workers share: reload stamp, job statuses, metric samples."""

    home: str
    config_file: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    run_dir: str | None = None

    @classmethod
    def from_environment(cls) -> "ServeSpec":
        return cls(**json.loads(os.environ[SERVE_SPEC_ENV]))


def serve_workers(spec: ServeSpec, workers: int, host: str, port: int, access_log: bool) -> None:
    """uvicorn's `workers` processes on one socket, each calling `app_from_environment`: each maps
    the same index files (the page cache holds them once), writes the same SQLite stores (WAL, busy
    timeout, retries), follows the others' reloads through a stamp file, and writes its metrics
    where every worker's /metrics sums them (PROMETHEUS_MULTIPROC_DIR, set before they start)."""
    import uvicorn  # lazy: only `serve` needs the server

    run_dir = Path(tempfile.mkdtemp(prefix="ltr-search-serve-"))
    try:
        (run_dir / "metrics").mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(run_dir / "metrics")
        os.environ[SERVE_SPEC_ENV] = json.dumps(asdict(spec) | {"run_dir": str(run_dir)})
        uvicorn.run("search.app.service:app_from_environment", factory=True, workers=workers, host=host, port=port,
                    log_level="info", access_log=access_log, h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


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
    if args.workers > 1:
        spec = ServeSpec(str(home), str(config_file) if config_file else None, {**overrides, "index": config.index})
        serve_workers(spec, args.workers, args.host, args.port, config.access_log)
    else:
        opening, model = open_in_background(config)  # the index and model load while the web stack imports
        from search.app.service import serve  # lazy: the app, in this process only without workers

        serve(config, args.host, args.port, opening, model)
    return 0


def open_in_background(config: ServiceConfig) -> tuple[Future[SearchBackend], Future[LtrPipeline | None]]:
    """Start opening the configured index, then loading its active model, in a thread; return
    their futures (the model's is None for an index without dense vectors, and is the index's
    error when the index did not open).

    Opening is mostly file reads, ONNX Runtime's session set-up and XGBoost's model parsing and
    parity scoring (ctypes calls), which release the GIL, while importing FastAPI and the app is
    Python holding it: overlapped, `serve` is ready sooner. The modules the opening needs are
    imported here first, so the thread imports nothing the main thread is importing at the same
    time, except the ranker's modules, which it imports after the index is open (the main thread
    imports them too, for the app; Python's per-module import locks make either wait for the
    other, and XGBoost is imported once, without scikit-learn, under search/app/preload.py's lock)."""
    from search.backend_factory import open_backend  # lazy: start-up time (this and the next two)
    import search.embedded  # noqa: F401
    from search.app.preload import load_model

    opening: Future[SearchBackend] = Future()
    model: Future[LtrPipeline | None] = Future()

    def work() -> None:
        try:
            index = open_backend(config.home, config.index, config.backend, encoder_threads=config.threads)
        except BaseException as exc:  # the service's first load raises it, as if it had opened the index itself
            opening.set_exception(exc)
            model.set_exception(exc)
            return
        opening.set_result(index)
        try:
            model.set_result(load_model(index, config.home, config.event_store_path) if index.has_dense else None)
        except BaseException as exc:  # the first load reports it as it reports its own loading errors
            model.set_exception(exc)

    threading.Thread(target=work, name="open-index", daemon=True).start()
    return opening, model
