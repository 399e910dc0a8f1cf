"""What every command module shares: the user-error type, logging to stderr, and the backend
flags. Kept free of heavy imports: `ltr-search --help` imports it."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence
from indexing.text import plural  # noqa: F401  (re-exported for the command modules)

BACKEND_CHOICES = ("embedded", "elasticsearch")  # search.backend_factory.BACKENDS (a test keeps them equal)
BACKEND_ENV_VAR = "LTR_SEARCH_BACKEND"
LOG_LIST_ITEMS = 10  # items of a list shown in one log line before "... and N more"


class CliError(Exception):
    """An error worth one line to the user (exit status 2)."""


def log(message: str) -> None:
    """Progress and notes go to stderr; results to stdout."""
    print(message, file=sys.stderr)


def short_list(items: Sequence[Any], limit: int = LOG_LIST_ITEMS) -> str:
    """A comma-separated list cut after `limit` items, so that one log line stays readable."""
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f", ... and {len(items) - limit:,} more" if len(items) > limit else "")


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=BACKEND_CHOICES,
                        help=f"where the index lives: embedded (files in the home, default) or elasticsearch "
                             f"(env {BACKEND_ENV_VAR})")
    parser.add_argument("--es-url", help="Elasticsearch URL, e.g. http://127.0.0.1:9200 (env LTR_SEARCH_ES_URL; "
                                         "credentials, CA and timeouts from LTR_SEARCH_ES_* or [elasticsearch])")


def backend_from_args(args: argparse.Namespace, file_config: Any = None) -> Any:
    """The `BackendChoice` of `--backend`/`--es-url` (then env, then the config file)."""
    from search.backend_factory import choose_backend  # here for start-up time: loads the index code

    return choose_backend(getattr(args, "backend", None), getattr(args, "es_url", None), file_config)


def open_index(home: Path, name: str | None, args: argparse.Namespace, dataset_name: str | None = None) -> Any:
    """The `SearchBackend` a command works on (see `search.backend_factory.resolve_index_name`)."""
    from search.backend_factory import open_index_for_dataset  # here for start-up time

    return open_index_for_dataset(home, name, dataset_name, backend_from_args(args))
