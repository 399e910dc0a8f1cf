"""Which backend answers: the embedded index (files in the engine home, the default) or an
Elasticsearch cluster. One place chooses and opens it for every command and the service.

Choice: `--backend` flag > $LTR_SEARCH_BACKEND > `backend = "..."` in the config file >
embedded. Elasticsearch connection settings: see `indexing.elastic.ElasticsearchSettings`.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from indexing.elastic import BACKEND_ELASTICSEARCH, ElasticsearchSettings

BACKEND_EMBEDDED = "embedded"
BACKENDS = (BACKEND_EMBEDDED, BACKEND_ELASTICSEARCH)
BACKEND_ENV_VAR = "LTR_SEARCH_BACKEND"


@dataclass(frozen=True)
class BackendChoice:
    kind: str = BACKEND_EMBEDDED
    elasticsearch: ElasticsearchSettings | None = None  # set when kind is elasticsearch

    def __post_init__(self) -> None:
        if self.kind not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got '{self.kind}'")
        if self.kind == BACKEND_ELASTICSEARCH and self.elasticsearch is None:
            raise ValueError("the elasticsearch backend needs connection settings")

    @property
    def is_elasticsearch(self) -> bool:
        return self.kind == BACKEND_ELASTICSEARCH

    def describe(self) -> str:
        return f"Elasticsearch at {self.elasticsearch.url}" if self.elasticsearch else "embedded"


def choose_backend(kind: str | None = None, es_url: str | None = None, file_config: Mapping[str, Any] | None = None,
                   environ: Mapping[str, str] | None = None) -> BackendChoice:
    """`kind` and `es_url` are command-line flags (None = not given); `file_config` is the whole
    config file (its `backend` key and `[elasticsearch]` table)."""
    environ = os.environ if environ is None else environ
    file_config = file_config or {}
    chosen = kind or environ.get(BACKEND_ENV_VAR) or file_config.get("backend") or BACKEND_EMBEDDED
    if chosen not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got '{chosen}'")
    if chosen != BACKEND_ELASTICSEARCH:
        if es_url:
            raise ValueError("--es-url needs --backend elasticsearch")
        return BackendChoice()
    section = file_config.get("elasticsearch", {})
    if not isinstance(section, Mapping):
        raise ValueError(f"[elasticsearch] must be a table, got {section!r}")
    settings = ElasticsearchSettings.from_sources(section, environ, {"url": es_url})
    return BackendChoice(BACKEND_ELASTICSEARCH, settings)


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=BACKENDS,
                        help=f"where the index lives: embedded (files in the home, default) or elasticsearch "
                             f"(env {BACKEND_ENV_VAR})")
    parser.add_argument("--es-url", help="Elasticsearch URL, e.g. http://127.0.0.1:9200 (env LTR_SEARCH_ES_URL; "
                                         "credentials, CA and timeouts from LTR_SEARCH_ES_* or [elasticsearch])")


def backend_from_args(args: argparse.Namespace, file_config: Mapping[str, Any] | None = None) -> BackendChoice:
    return choose_backend(getattr(args, "backend", None), getattr(args, "es_url", None), file_config)


def open_backend(home: Path, name: str, choice: BackendChoice, encoder_threads: int | None = None) -> Any:
    """The `SearchBackend` serving index `name`: its active generation (embedded) or the
    generation its alias points at (Elasticsearch)."""
    if choice.is_elasticsearch:
        from search.elastic_backend import ElasticsearchBackend

        return ElasticsearchBackend.open(home, name, choice.elasticsearch, encoder_threads=encoder_threads)
    from search.embedded import EmbeddedIndex

    return EmbeddedIndex.open(home, name, encoder_threads=encoder_threads)


def open_index_for_dataset(home: Path, name: str | None, dataset_name: str, choice: BackendChoice) -> Any:
    """The backend for a job on a dataset: `--name`, else an index named like the dataset, else
    'default' (embedded: among the home's indexes; Elasticsearch: the dataset's name)."""
    if choice.is_elasticsearch:
        return open_backend(home, name or dataset_name, choice)
    from indexing.bundle import IndexStore

    store = IndexStore(home)
    chosen = name or (dataset_name if dataset_name in store.names() else "default")
    if chosen not in store.names():
        raise ValueError(f"no index named '{chosen}' in {store.root}; build it with `ltr-search index build --dataset PATH "
                         f"--name {chosen}` (or pass --name)")
    return open_backend(home, chosen, choice)
