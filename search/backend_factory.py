"""Which backend answers: the embedded index (files in the engine home, the default) or an
Elasticsearch cluster. The one place that chooses and opens it, for every command and the
service: `open_backend` for searching, `index_admin` for building and managing generations.

Choice: `--backend` flag > $LTR_SEARCH_BACKEND > `backend = "..."` in the config file >
embedded. Elasticsearch connection settings: see `indexing.elastic.ElasticsearchSettings`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from indexing.config import DEFAULT_INDEX_NAME, DEFAULT_KEEP_GENERATIONS
from indexing.elastic import BACKEND_ELASTICSEARCH, ElasticsearchSettings
from search.backend import SearchBackend

BACKEND_EMBEDDED = "embedded"
BACKENDS = (BACKEND_EMBEDDED, BACKEND_ELASTICSEARCH)
BACKEND_ENV_VAR = "LTR_SEARCH_BACKEND"

Log = Callable[[str], None]


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


def open_backend(home: Path, name: str, choice: BackendChoice, encoder_threads: int | None = None) -> SearchBackend:
    """The `SearchBackend` serving index `name`: its active generation (embedded) or the
    generation its alias points at (Elasticsearch)."""
    if choice.is_elasticsearch:
        from search.elastic_backend import ElasticsearchBackend  # here for start-up time: the client is heavy

        return ElasticsearchBackend.open(home, name, choice.elasticsearch, encoder_threads=encoder_threads)
    from search.embedded import EmbeddedIndex  # here for start-up time: not needed by Elasticsearch jobs

    return EmbeddedIndex.open(home, name, encoder_threads=encoder_threads)


def resolve_index_name(home: Path, name: str | None, choice: BackendChoice, dataset_name: str | None = None) -> str:
    """The index a command works on: `name` when given; else (embedded) an index named like the
    dataset, the only index of the home, or 'default'; else an error that lists the indexes.
    Elasticsearch cannot list the home's indexes: the dataset's name, else 'default'."""
    if name:
        return name
    if choice.is_elasticsearch:
        return dataset_name or DEFAULT_INDEX_NAME
    from indexing.bundle import IndexStore  # lazy: start-up time

    store = IndexStore(home)
    names = store.names()
    usable = [n for n in names if store.active_generation(n) is not None]
    for candidate in (dataset_name, DEFAULT_INDEX_NAME):
        if candidate in usable:
            return candidate
    if len(usable) == 1:
        return usable[0]
    if not usable:
        raise ValueError(f"no indexes in {store.root}; build one with `ltr-search index build --dataset PATH --name NAME`")
    wanted = f"no index named '{dataset_name}' and " if dataset_name else ""
    raise ValueError(f"{wanted}{len(usable)} indexes in {store.root} ({', '.join(usable)}): choose one with --name")


def open_index_for_dataset(home: Path, name: str | None, dataset_name: str | None, choice: BackendChoice) -> SearchBackend:
    """The backend for a job: `--name`, else the index `resolve_index_name` picks (a missing
    index is reported by the store, with the indexes it has)."""
    chosen = resolve_index_name(home, name, choice, dataset_name)
    return open_backend(home, chosen, choice)


# ---------------------------------------------------------------------------------------------
# Managing generations: the same operations on either backend.


class IndexAdmin(Protocol):
    """Build, rebuild, report, roll back and delete the generations of an index."""

    where: str  # e.g. "/home/indexes" or "Elasticsearch at URL", for messages

    def keep(self, requested: int | None) -> int: ...

    def build(self, name: str, settings: Any, progress: bool, log: Log) -> Any: ...

    def rebuild(self, name: str, progress: bool, log: Log, dataset: str | None = None) -> Any: ...

    def status(self, name: str | None, verify: bool) -> dict[str, Any]: ...

    def rollback(self, name: str, to: str | None, log: Log) -> tuple[str | None, str]: ...

    def delete(self, name: str) -> None: ...

    def heading(self, name: str, info: dict[str, Any]) -> str: ...


@dataclass(frozen=True)
class EmbeddedAdmin:
    home: Path

    @property
    def where(self) -> str:
        from indexing.bundle import IndexStore  # lazy: start-up time

        return str(IndexStore(self.home).root)

    def keep(self, requested: int | None) -> int:
        return DEFAULT_KEEP_GENERATIONS if requested is None else requested

    def build(self, name: str, settings: Any, progress: bool, log: Log) -> Any:
        from indexing.build import build_index  # lazy: start-up time

        return build_index(self.home, name, settings, progress=progress, log=log)

    def rebuild(self, name: str, progress: bool, log: Log, dataset: str | None = None) -> Any:
        from indexing.build import rebuild_index  # lazy: start-up time

        return rebuild_index(self.home, name, progress=progress, log=log, dataset=dataset)

    def status(self, name: str | None, verify: bool) -> dict[str, Any]:
        """Every generation of `name` (or of every index) with its manifest's counts; a
        generation that does not open is reported 'corrupt' with the reason."""
        from indexing.bundle import IndexBundleError, IndexStore  # lazy: start-up time

        store = IndexStore(self.home)
        report: dict[str, Any] = {"home": str(self.home), "indexes": {}}
        for index in [name] if name else store.names():
            active = store.active_generation(index)
            generations = []
            for generation in store.generations(index):
                entry: dict[str, Any] = {"generation": generation, "active": generation == active}
                try:
                    bundle = store.open(index, generation, verify=verify, rehash=verify)  # every byte, stamps aside
                except IndexBundleError as exc:
                    entry.update(status="corrupt", error=str(exc))
                else:
                    manifest = bundle.manifest
                    dense = manifest.get("dense")
                    entry.update(
                        status="ok", created_at=manifest["created_at"], documents=manifest["counts"]["documents"],
                        skipped_lines=manifest["counts"]["skipped_lines"], vocabulary=manifest["counts"]["vocabulary"],
                        dense=dense["vectors"]["kind"] if dense else "none",
                        bytes=sum(f["bytes"] for f in manifest["files"].values()),
                        corpus=manifest["corpus"]["file"], path=str(bundle.path),
                    )
                generations.append(entry)
            if not generations and name and name not in store.names():
                raise ValueError(f"no index named '{name}' in {store.root}")
            report["indexes"][index] = {"active": active, "generations": generations}
        return report

    def rollback(self, name: str, to: str | None, log: Log) -> tuple[str | None, str]:
        from indexing.bundle import IndexStore  # lazy: start-up time

        store = IndexStore(self.home)
        with store.lock(name):
            before = store.active_generation(name)
            target = to or store.previous_generation(name)
            store.activate(name, target)
        return before, target

    def delete(self, name: str) -> None:
        from indexing.bundle import IndexStore  # lazy: start-up time

        store = IndexStore(self.home)
        if name not in store.names():
            raise ValueError(f"no index named '{name}' in {store.root}")
        store.delete_index(name)

    def heading(self, name: str, info: dict[str, Any]) -> str:
        return f"index '{name}'"


@dataclass(frozen=True)
class ElasticAdmin:
    home: Path
    es: ElasticsearchSettings

    @property
    def where(self) -> str:
        return f"Elasticsearch at {self.es.url} (prefix '{self.es.index_prefix}')"

    def keep(self, requested: int | None) -> int:
        return self.es.keep if requested is None else requested

    def build(self, name: str, settings: Any, progress: bool, log: Log) -> Any:
        import dataclasses

        from indexing.elastic_build import build_elastic_index  # lazy: start-up time

        es = dataclasses.replace(self.es, keep=settings.keep)
        return build_elastic_index(self.home, name, settings, es, progress=progress, log=log)

    def rebuild(self, name: str, progress: bool, log: Log, dataset: str | None = None) -> Any:
        from indexing.elastic_build import rebuild_elastic_index  # lazy: start-up time

        return rebuild_elastic_index(self.home, name, self.es, progress=progress, log=log, dataset=dataset)

    def status(self, name: str | None, verify: bool) -> dict[str, Any]:
        from indexing.elastic_build import elastic_index_status  # lazy: start-up time

        return elastic_index_status(name, self.es)

    def rollback(self, name: str, to: str | None, log: Log) -> tuple[str | None, str]:
        from indexing.elastic_build import rollback_elastic_index  # lazy: start-up time

        return rollback_elastic_index(name, self.es, to=to, log=log)

    def delete(self, name: str) -> None:
        raise ValueError("deleting an index is not supported on Elasticsearch; delete its indices and alias "
                         f"'{self.es.index_prefix}{name}' with the cluster's own tools")

    def heading(self, name: str, info: dict[str, Any]) -> str:
        return f"index '{name}' (Elasticsearch at {self.es.url}, alias {info['alias']})"


def index_admin(home: Path, choice: BackendChoice) -> IndexAdmin:
    """The generation manager of the chosen backend."""
    if choice.is_elasticsearch:
        return ElasticAdmin(home, choice.elasticsearch)
    return EmbeddedAdmin(home)
