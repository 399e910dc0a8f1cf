"""Elasticsearch generations: build, verify, switch, prune, roll back and describe them.

An index NAME lives on the cluster as concrete generation indices `PREFIX NAME -gNNNNNN` and one
alias `PREFIX NAME` that searches use. A build:

1. checks the names, the analysis settings and that the cluster answers (before the slow steps);
2. reads and validates the corpus exactly as the embedded build does (`read_corpus`, the same
   `skip_invalid` semantics) and embeds it with the same ONNX encoder when `settings.dense`;
3. creates the next generation index (refresh off) with `_meta` recording the build, and loads
   every document through the bulk API (`create` operations, retried on 429/502/503/504);
4. if Elasticsearch rejected any document, stops: the alias is not touched, the half-built
   index is deleted, every failure goes to HOME/reports/es-build-NAME-GEN-errors.jsonl and
   `ElasticBuildError` names the first ones;
5. turns refresh back on and verifies the new index: its document count, a search with the
   words of one of its documents, and (dense) a kNN search with that document's embedding;
6. points the alias at it in one `_aliases` request (every remove and the add together, the
   removes with `must_exist`, so searches never see zero or two generations and a concurrent
   switch makes this one fail rather than leave two indices behind the alias);
7. deletes old generations beyond `es.keep` (the active one never).

Concurrency: there is no lock across machines. Creating the generation index is the claim on
its number (a second build racing for the same number fails to create it), and the alias
switch only succeeds against the alias state it read just before.

Every request goes through `cluster_call`, which turns the client's exceptions into
`ElasticsearchError`s that say what was being done and what to check (e.g. "cannot reach
Elasticsearch at URL; is the cluster up?"), never a traceback.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from elastic_transport import ApiError, TransportError
from elasticsearch.helpers import streaming_bulk

from indexing.analysis import Analyzer
from indexing.bm25 import COMBINED_FIELD
from indexing.build import BuildSettings, _corpus_entry, encode_documents, summary_tail
from indexing.bundle import utc_now
from indexing.corpus import CorpusReadResult, Document, SkippedLine, read_corpus
from indexing.progress import progress_bar
from indexing.text import plural
from indexing.elastic import (
    VECTOR_FIELD,
    ElasticsearchError,
    ElasticsearchSettings,
    IncompatibleIndexError,
    IndexMissingError,
    alias_name,
    analysis_settings,
    check_meta,
    connect,
    document_source,
    explain_error,
    generation_index,
    generation_of,
    index_body,
    index_meta,
    next_generation,
)

BULK_MAX_RETRIES = 5  # per document, on the statuses below
BULK_INITIAL_BACKOFF = 1.0  # seconds before the first retry; doubles every retry
BULK_MAX_BACKOFF = 30.0
BULK_RETRY_STATUSES = (429, 502, 503, 504)
REFRESH_INTERVAL = "1s"  # restored after the bulk load (the index is created with refresh off)
SHOWN_FAILURES = 20  # failures named in the error message; the report has all of them
VERIFY_HITS = 10
VERIFY_KNN_CANDIDATES = 100
SAMPLE_WORDS = 12  # words of a document's text used as the verification query when it has no title
META_SKIPPED_LIMIT = 1_000  # skipped corpus lines listed in `_meta` (cluster state); all are counted
REPORTS_DIR = "reports"


class ElasticBuildError(ElasticsearchError):
    """A build that did not switch the alias: documents rejected or verification failed."""

    def __init__(self, message: str, failures: Sequence["BulkFailure"] = (), report: Path | None = None):
        super().__init__(message)
        self.failures = list(failures)
        self.report = report


@dataclass(frozen=True)
class BulkFailure:
    """One document Elasticsearch did not index."""

    doc_id: str | None
    line: int | None  # 1-based line of the corpus file, when known
    status: int | None  # HTTP status of the item (or of the whole bulk request)
    error_type: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"doc_id": self.doc_id, "line": self.line, "status": self.status, "type": self.error_type,
                "reason": self.reason}

    def describe(self) -> str:
        where = f"doc {self.doc_id}" + (f" (corpus line {self.line})" if self.line is not None else "")
        return f"{where}: {self.status} {self.error_type}: {self.reason}"


@dataclass(frozen=True)
class ClusterGeneration:
    """A concrete generation index of one name, as listed on the cluster."""

    index: str
    generation: str
    meta: dict[str, Any] | None  # the mapping's `_meta`
    aliases: tuple[str, ...]


@dataclass
class ElasticBuildSummary:
    name: str
    url: str
    alias: str
    index: str
    generation: str
    previous: list[str]  # indices the alias pointed at before the switch
    documents: int
    skipped: list[SkippedLine]
    failures: int
    dims: int | None
    bytes_in_cluster: int | None
    seconds: dict[str, float] = field(default_factory=dict)
    pruned: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The one-screen summary every build ends with (the embedded build's layout)."""
        was = f"was {', '.join(self.previous)}" if self.previous else "new alias"
        out = [
            f"index '{self.name}' generation {self.generation} is active (Elasticsearch at {self.url})",
            f"  alias          {self.alias} -> {self.index} ({was})",
            f"  documents      {self.documents:,}",
            f"  skipped lines  {len(self.skipped):,}",
            f"  failures       {self.failures:,}",
            f"  dense vectors  {f'{self.dims} dims (hnsw)' if self.dims else 'none'}",
            "  size           " + ("unknown" if self.bytes_in_cluster is None else
                                   f"{self.bytes_in_cluster / 1e6:,.1f} MB in the cluster (all copies)"),
        ]
        return out + summary_tail(self.seconds, self.pruned, self.skipped)


# ---------------------------------------------------------------------------------------------
# Talking to the cluster


@contextlib.contextmanager
def cluster_call(es: ElasticsearchSettings, what: str) -> Iterator[None]:
    """Run requests; a client exception becomes `explain_error(exc, es, what)`."""
    try:
        yield
    except (ApiError, TransportError) as exc:
        raise explain_error(exc, es, what) from exc


@contextlib.contextmanager
def _client_for(client: Any, es: ElasticsearchSettings) -> Iterator[Any]:
    """The caller's client, or a new one closed on the way out."""
    if client is not None:
        yield client
        return
    client = connect(es)
    try:
        yield client
    finally:
        client.close()


def _body(response: Any) -> Any:
    return getattr(response, "body", response)


def alias_targets(client: Any, es: ElasticsearchSettings, alias: str) -> list[str]:
    """The indices `alias` points at (none when it does not exist)."""
    try:
        with cluster_call(es, f"reading alias {alias}"):
            found = _body(client.indices.get_alias(name=alias))
    except IndexMissingError:
        return []
    return sorted(found)


def _refuse_concrete_index(client: Any, es: ElasticsearchSettings, alias: str) -> None:
    """Call when `alias` is not an alias: an index of that name would block creating it."""
    with cluster_call(es, f"checking for an index named {alias}"):
        exists = bool(client.indices.exists(index=alias))
    if exists:
        raise ElasticsearchError(
            f"Elasticsearch at {es.url} has a concrete index named '{alias}', the name the engine needs for the "
            f"alias searches use; delete or reindex it, or choose another elasticsearch.index_prefix")


def list_generations(client: Any, es: ElasticsearchSettings, name: str) -> list[ClusterGeneration]:
    """Every generation index of `name` on the cluster (open or closed), oldest first."""
    pattern = f"{alias_name(es, name)}-g*"
    with cluster_call(es, f"listing indices {pattern}"):
        found = _body(client.indices.get(index=pattern, expand_wildcards="all"))
    out = []
    for index, info in found.items():
        generation = generation_of(es, name, index)
        if generation is not None:
            meta = (info.get("mappings") or {}).get("_meta")
            out.append(ClusterGeneration(index, generation, meta, tuple(info.get("aliases") or {})))
    return sorted(out, key=lambda g: g.generation)


def _read_meta(client: Any, es: ElasticsearchSettings, index: str) -> dict[str, Any] | None:
    with cluster_call(es, f"reading the mapping of {index}"):
        found = _body(client.indices.get_mapping(index=index))
    return ((found.get(index) or {}).get("mappings") or {}).get("_meta")


def _delete_index(client: Any, es: ElasticsearchSettings, index: str) -> None:
    with cluster_call(es, f"deleting index {index}"):
        client.indices.delete(index=index)


# ---------------------------------------------------------------------------------------------
# Pure pieces (unit-tested without a cluster)


def bulk_actions(index: str, documents: Sequence[Document], embeddings: np.ndarray | None = None) -> Iterator[dict[str, Any]]:
    """One bulk `create` action per document (`_source` without `all`, which copy_to fills; the
    embedding only when `embeddings` is given, one row per document)."""
    if embeddings is not None and len(embeddings) != len(documents):
        raise ValueError(f"{len(embeddings)} embeddings for {len(documents)} documents")
    for position, doc in enumerate(documents):
        vector = None if embeddings is None else np.asarray(embeddings[position], dtype=np.float32).tolist()
        yield {"_op_type": "create", "_index": index, "_id": doc.id,
               "_source": document_source(doc.id, doc.title, doc.text, doc.metadata, vector)}


def bulk_failure(item: Mapping[str, Any]) -> BulkFailure:
    """A failed `(False, item)` result of `streaming_bulk`: `{"create": {"_id", "status", "error"}}`,
    where `error` is the item's error object, or a string when the whole bulk request failed
    (then `exception` holds the client's exception)."""
    [(_, info)] = item.items()
    error = info.get("error")
    exception = info.get("exception")
    body = getattr(exception, "body", None)
    if not isinstance(error, Mapping) and isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        error = body["error"]
    if isinstance(error, Mapping):
        kind = str(error.get("type") or "error")
        reason = str(error.get("reason") or "")
        cause = error.get("caused_by")
        if isinstance(cause, Mapping) and cause.get("reason"):
            reason += f" (caused by {cause.get('type', 'error')}: {cause['reason']})"
    else:
        kind = type(exception).__name__ if exception is not None else "error"
        reason = str(error) if error is not None else "no reason given"
    status = info.get("status")
    return BulkFailure(doc_id=info.get("_id"), line=None, status=int(status) if status is not None else None,
                       error_type=kind, reason=reason)


def alias_switch_actions(alias: str, new_index: str, current_indices: Iterable[str]) -> list[dict[str, Any]]:
    """The actions of the one `_aliases` request that moves `alias` to `new_index`: a remove (which
    must exist, so a concurrent switch fails this request as a whole) for every index it points
    at now, and the add."""
    actions: list[dict[str, Any]] = [{"remove": {"index": old, "alias": alias, "must_exist": True}}
                                     for old in sorted(set(current_indices)) if old != new_index]
    actions.append({"add": {"index": new_index, "alias": alias}})
    return actions


def generations_to_prune(generations: Sequence[str], active: str | None, keep: int) -> list[str]:
    """All but the active generation and the `keep` newest others, oldest first."""
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    others = sorted(g for g in set(generations) if g != active)
    return others[: max(len(others) - keep, 0)]


def document_lines(corpus: CorpusReadResult, id_field: str, doc_ids: Iterable[str]) -> dict[str, int]:
    """Corpus line numbers of some documents. The reader keeps documents in file order, leaving
    out blank lines and the lines it reported as skipped, so the file is walked the same way; a
    line whose id field does not hold the expected id stops the walk (no line rather than a
    wrong one)."""
    position_of = {doc.id: position for position, doc in enumerate(corpus.documents)}
    by_position = {position_of[d]: d for d in set(doc_ids) if d in position_of}
    skipped = {s.line for s in corpus.skipped}
    out: dict[str, int] = {}
    position = 0
    with open(corpus.file, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if len(out) == len(by_position):
                break
            if not raw.strip() or number in skipped:
                continue
            doc_id = by_position.get(position)
            position += 1
            if doc_id is None:
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                break
            if not isinstance(record, dict) or str(record.get(id_field)) != doc_id:
                break
            out[doc_id] = number
    return out


def sample_query(documents: Sequence[Document], analyzer: Analyzer, look_at: int = 1_000) -> tuple[Document, str] | None:
    """The first document with words the analyser keeps, and its title (or, without a usable
    title, the first words of its text): the verification search."""
    for doc in documents[:look_at]:
        text = doc.title.strip() if analyzer.analyze(doc.title) else " ".join(doc.text.split()[:SAMPLE_WORDS])
        if analyzer.analyze(text):
            return doc, text
    return None


# ---------------------------------------------------------------------------------------------
# Build steps


def load_documents(client: Any, es: ElasticsearchSettings, index: str, documents: Sequence[Document],
                   embeddings: np.ndarray | None, progress: bool = True) -> list[BulkFailure]:
    """Bulk-load every document into `index` (`create` operations, `es.bulk_batch` a request,
    items retried on 429/502/503/504 with back-off). Returns every document Elasticsearch did
    not index; a lost connection raises the explained error."""
    failures: list[BulkFailure] = []
    bar = progress_bar(total=len(documents), desc=f"bulk {index}", unit="doc", enabled=progress, leave=False)
    try:
        with cluster_call(es, f"bulk loading documents into {index}"):
            for ok, item in streaming_bulk(
                client, bulk_actions(index, documents, embeddings), chunk_size=es.bulk_batch,
                max_retries=BULK_MAX_RETRIES, initial_backoff=BULK_INITIAL_BACKOFF, max_backoff=BULK_MAX_BACKOFF,
                retry_on_status=BULK_RETRY_STATUSES, raise_on_error=False, raise_on_exception=False,
            ):
                bar.update(1)
                if not ok:
                    failures.append(bulk_failure(item))
    finally:
        bar.close()
    return failures


def verify_generation(client: Any, es: ElasticsearchSettings, index: str, documents: Sequence[Document],
                      embeddings: np.ndarray | None, analyzer: Analyzer,
                      log: Callable[[str], None] = print) -> list[str]:
    """Turn refresh back on, refresh, and check `index` serves what was loaded: the document
    count, a `match` on `all` with a document's own words, and (dense) a kNN search with the
    first document's embedding. Returns the problems found (empty: verified)."""
    with cluster_call(es, f"turning refresh back on for {index}"):
        client.indices.put_settings(index=index, settings={"index": {"refresh_interval": REFRESH_INTERVAL}})
        client.indices.refresh(index=index)
    problems: list[str] = []
    with cluster_call(es, f"counting the documents of {index}"):
        count = int(_body(client.count(index=index))["count"])
    if count != len(documents):
        problems.append(f"it holds {count:,} documents but {len(documents):,} were loaded")

    sample = sample_query(documents, analyzer)
    if sample is None:
        log(f"verify: no document of {index} has a word the analyser keeps; search check skipped")
    else:
        doc, text = sample
        match = {"match": {COMBINED_FIELD: {"query": text}}}
        only = {"ids": {"values": [doc.id]}}
        if not _finds(client, es, index, doc.id, f"a search for {text!r}", log, {"query": match},
                      {"query": {"bool": {"must": [match], "filter": [only]}}}):
            problems.append(f"a match search on '{COMBINED_FIELD}' for {text!r} does not find document {doc.id}")
    if embeddings is not None:
        doc = documents[0]
        knn = {"field": VECTOR_FIELD, "query_vector": np.asarray(embeddings[0], dtype=np.float32).tolist(),
               "k": VERIFY_HITS, "num_candidates": VERIFY_KNN_CANDIDATES}
        if not _finds(client, es, index, doc.id, f"a kNN search with the embedding of {doc.id}", log, {"knn": knn},
                      {"knn": {**knn, "filter": {"ids": {"values": [doc.id]}}}}):
            problems.append(f"a kNN search with the embedding of document {doc.id} does not find it")
    return problems


def _finds(client: Any, es: ElasticsearchSettings, index: str, doc_id: str, what: str, log: Callable[[str], None],
           search: dict[str, Any], narrowed: dict[str, Any]) -> bool:
    """Is `doc_id` among the top hits of `search`? When it is not, `narrowed` (the same search
    restricted to that document) tells an outranked document (others share its words or its
    vector: fine) from one the search cannot reach (a broken index)."""
    for attempt, body in enumerate((search, narrowed)):
        with cluster_call(es, f"verifying {index} with {what}"):
            hits = _body(client.search(index=index, size=VERIFY_HITS, source=False, **body))["hits"]["hits"]
        if any(hit["_id"] == doc_id for hit in hits):
            if attempt:
                log(f"verify: {what} reaches document {doc_id} but ranks it below {VERIFY_HITS} "
                    "(other documents share it); accepted")
            return True
    return False


def switch_alias(client: Any, es: ElasticsearchSettings, alias: str, new_index: str, current: Sequence[str]) -> None:
    """Point `alias` at `new_index` alone, in one request (see `alias_switch_actions`)."""
    with cluster_call(es, f"pointing alias {alias} at {new_index}"):
        client.indices.update_aliases(actions=alias_switch_actions(alias, new_index, current))


def prune_generations(client: Any, es: ElasticsearchSettings, name: str, active: str,
                      log: Callable[[str], None] = print) -> list[str]:
    """Delete the generations of `name` beyond the active one and the `es.keep` newest others;
    never one the alias points at. Returns the deleted generation ids (a failed delete is logged:
    the build it follows has already succeeded)."""
    generations = [g.generation for g in list_generations(client, es, name)]
    live = set(alias_targets(client, es, alias_name(es, name)))
    pruned = []
    for generation in generations_to_prune(generations, active, es.keep):
        index = generation_index(es, name, generation)
        if index in live:
            continue
        try:
            _delete_index(client, es, index)
        except ElasticsearchError as exc:
            log(f"could not prune {index}: {exc}")
            continue
        pruned.append(generation)
    return pruned


def write_failure_report(home: Path, name: str, generation: str, failures: Sequence[BulkFailure]) -> Path:
    """HOME/reports/es-build-NAME-GEN-errors.jsonl: one JSON object per failed document."""
    path = home / REPORTS_DIR / f"es-build-{name}-{generation}-errors.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for failure in failures:
            handle.write(json.dumps(failure.to_dict(), ensure_ascii=False) + "\n")
    return path


def _discard(client: Any, es: ElasticsearchSettings, index: str, keep_failed: bool) -> str:
    """Delete a generation that will not go live; says what happened to it."""
    if keep_failed:
        return "was kept for inspection (keep_failed; no alias points at it)"
    try:
        _delete_index(client, es, index)
    except ElasticsearchError as exc:
        return f"could not be deleted ({exc}); delete it by hand"
    return "was deleted"


def _meta_corpus(corpus: CorpusReadResult) -> dict[str, Any]:
    """The embedded manifest's corpus entry; `_meta` lives in the cluster state, so at most
    META_SKIPPED_LIMIT skipped lines are listed there (counts.skipped_lines has the total)."""
    entry = _corpus_entry(corpus)
    if len(entry["skipped"]) > META_SKIPPED_LIMIT:
        entry["skipped"] = entry["skipped"][:META_SKIPPED_LIMIT]
        entry["skipped_truncated"] = True
    return entry


def _store_bytes(client: Any, es: ElasticsearchSettings, index: str) -> int:
    with cluster_call(es, f"reading the size of {index}"):
        stats = _body(client.indices.stats(index=index, metric="store"))
    return int(stats["_all"]["total"]["store"]["size_in_bytes"])


def _bulk_error(failures: list[BulkFailure], sent: int, index: str, alias: str, fate: str,
                report: Path) -> ElasticBuildError:
    lines = [f"Elasticsearch rejected {len(failures):,} of {sent:,} documents loaded into {index}; the alias {alias} "
             f"was not switched and {index} {fate}; every failure is listed in {report}:"]
    lines += [f"  {failure.describe()}" for failure in failures[:SHOWN_FAILURES]]
    if len(failures) > SHOWN_FAILURES:
        lines.append(f"  ... and {len(failures) - SHOWN_FAILURES:,} more")
    return ElasticBuildError("\n".join(lines), failures, report)


# ---------------------------------------------------------------------------------------------
# Jobs


def build_elastic_index(
    home: Path,
    name: str,
    settings: BuildSettings,
    es: ElasticsearchSettings,
    progress: bool = True,
    log: Callable[[str], None] = print,
    client: Any = None,
    keep_failed: bool = False,
) -> ElasticBuildSummary:
    """Build a new generation of index `name` on the cluster, verify it and point the alias at
    it; see the module docstring for the steps.

    `settings.skip_invalid` concerns only corpus lines the reader rejects: they are skipped and
    listed in the summary, as in the embedded build. A document Elasticsearch rejects always
    fails the build, with or without it (no generation goes live with documents missing); the
    failures are written to HOME/reports/es-build-NAME-GEN-errors.jsonl.
    Pruning keeps `es.keep` old generations (`settings.keep` is recorded; the CLI sets both).
    `keep_failed` keeps a generation that failed to load or verify, unaliased, for inspection.
    `client`: an `elasticsearch.Elasticsearch` (default: `connect(es)`, closed at the end).
    """
    alias = alias_name(es, name)
    analysis_settings(settings.analyzer, es.icu)  # a chain Elasticsearch cannot spell fails now, not after encoding
    seconds: dict[str, float] = {}
    with _client_for(client, es) as client:
        if not alias_targets(client, es, alias):  # the cluster answers before anything slow starts
            _refuse_concrete_index(client, es, alias)

        started = time.perf_counter()
        corpus = read_corpus(settings.corpus, skip_invalid=settings.skip_invalid, progress=progress)
        seconds["read"] = time.perf_counter() - started
        log(f"read {len(corpus.documents):,} documents from {corpus.file} ({plural(len(corpus.skipped), 'line')} skipped)")

        embeddings = None
        dense = None
        if settings.dense:
            started = time.perf_counter()
            embeddings, encoder_entry = encode_documents(home, settings.encoder, corpus.documents, progress)
            dense = {"encoder": encoder_entry, "dims": int(embeddings.shape[1])}
            seconds["encode"] = time.perf_counter() - started

        started = time.perf_counter()
        documents = corpus.documents
        manifest = {
            "created_at": utc_now(),
            "build": settings.to_dict(),
            "analyzer": settings.analyzer.to_dict(),
            "bm25": settings.bm25.to_dict(),
            "dense": dense,
            "corpus": _meta_corpus(corpus),
            "counts": {"documents": len(documents), "skipped_lines": len(corpus.skipped)},
        }
        generation = next_generation([g.generation for g in list_generations(client, es, name)])
        index = generation_index(es, name, generation)
        body = index_body(settings.analyzer, settings.bm25, dense and dense["dims"],
                          index_meta(name, generation, manifest), es)
        with cluster_call(es, f"creating index {index}"):
            client.indices.create(index=index, settings=body["settings"], mappings=body["mappings"])
        log(f"created {index}; loading {len(documents):,} documents, {es.bulk_batch} a request")
        problems: list[str] = []
        try:
            failures = load_documents(client, es, index, documents, embeddings, progress)
            seconds["bulk"] = time.perf_counter() - started
            if not failures:
                started = time.perf_counter()
                problems = verify_generation(client, es, index, documents, embeddings, Analyzer(settings.analyzer), log)
                seconds["verify"] = time.perf_counter() - started
        except BaseException:
            log(f"{index} {_discard(client, es, index, keep_failed)}")
            raise
        if failures:
            lines = document_lines(corpus, settings.corpus.id_field, [f.doc_id for f in failures if f.doc_id])
            failures = [replace(f, line=lines.get(f.doc_id or "")) for f in failures]
            report = write_failure_report(home, name, generation, failures)
            raise _bulk_error(failures, len(documents), index, alias, _discard(client, es, index, keep_failed), report)
        if problems:
            raise ElasticBuildError(f"verification of {index} failed: {'; '.join(problems)}; the alias {alias} was not "
                                    f"switched and {index} {_discard(client, es, index, keep_failed)}")

        started = time.perf_counter()
        previous = alias_targets(client, es, alias)
        try:
            switch_alias(client, es, alias, index, previous)
        except ElasticsearchError as exc:
            raise type(exc)(f"{exc}; {index} is complete and verified but not active: `ltr-search index rollback "
                            f"--backend elasticsearch --name {name} --to {generation}` activates it") from exc
        log(f"alias {alias} -> {index}" + (f" (was {', '.join(previous)})" if previous else ""))
        pruned = prune_generations(client, es, name, generation, log)
        seconds["switch"] = time.perf_counter() - started
        try:
            size = _store_bytes(client, es, index)
        except ElasticsearchError as exc:  # the build has succeeded; only the summary misses its size
            log(f"could not read the size of {index}: {exc}")
            size = None

    return ElasticBuildSummary(
        name=name, url=es.url, alias=alias, index=index, generation=generation, previous=previous,
        documents=len(documents), skipped=corpus.skipped, failures=0, dims=dense and dense["dims"],
        bytes_in_cluster=size, seconds=seconds, pruned=pruned,
    )


def rebuild_elastic_index(home: Path, name: str, es: ElasticsearchSettings, progress: bool = True,
                          log: Callable[[str], None] = print, client: Any = None,
                          dataset: str | Path | None = None) -> ElasticBuildSummary:
    """Replay the build settings recorded in the `_meta` of the generation the alias points at
    (re-reading its corpus path, or `dataset` instead) as a new generation."""
    alias = alias_name(es, name)
    with _client_for(client, es) as client:
        current = alias_targets(client, es, alias)
        if len(current) != 1:
            raise IndexMissingError(_no_alias_message(name, es, alias) if not current else
                                    f"alias {alias} points at {len(current)} indices ({', '.join(current)}); "
                                    f"point it at one with `ltr-search index rollback --name {name} --to GEN`")
        meta = check_meta(current[0], _read_meta(client, es, current[0]))
        settings = BuildSettings.from_dict(meta["build"])
        if dataset is not None:
            settings = replace(settings, corpus=replace(settings.corpus, path=str(Path(dataset).resolve())))
        log(f"rebuilding '{name}' from {settings.corpus.path} (active generation {current[0]})")
        return build_elastic_index(home, name, settings, es, progress=progress, log=log, client=client)


def rollback_elastic_index(name: str, es: ElasticsearchSettings, to: str | None = None, client: Any = None,
                           log: Callable[[str], None] = print) -> tuple[str | None, str]:
    """Point the alias at generation `to`, or by default at the newest generation older than the
    active one that can serve (made by this engine, and holding every document its build
    loaded), in the same one-request switch as a build. Returns (previous, new) generation ids."""
    alias = alias_name(es, name)
    with _client_for(client, es) as client:
        current = alias_targets(client, es, alias)
        generations = list_generations(client, es, name)
        active = max((g for g in (generation_of(es, name, i) for i in current) if g), default=None)
        if to is not None:
            candidates = [g for g in generations if g.generation == to]
            if not candidates:
                known = ", ".join(g.generation for g in generations) or "none"
                raise IndexMissingError(f"index '{name}' has no generation {to} on Elasticsearch at {es.url} "
                                        f"(generations: {known})")
        else:
            if not current:
                raise IndexMissingError(_no_alias_message(name, es, alias))
            candidates = [g for g in reversed(generations) if active is None or g.generation < active]
            if not candidates:
                raise IndexMissingError(f"index '{name}' has no generation older than {active} to roll back to")
        refused = []
        for candidate in candidates:
            problem = _cannot_serve(client, es, candidate)
            if problem is None:
                break
            if to is not None:
                raise IncompatibleIndexError(f"cannot roll back to {candidate.index}: {problem}")
            log(f"skipping {candidate.index}: {problem}")
            refused.append(f"{candidate.generation}: {problem}")
        else:
            raise IncompatibleIndexError(f"no older generation of '{name}' can serve: {'; '.join(refused)}")
        switch_alias(client, es, alias, candidate.index, current)
    return active, candidate.generation


def _cannot_serve(client: Any, es: ElasticsearchSettings, generation: ClusterGeneration) -> str | None:
    try:
        meta = check_meta(generation.index, generation.meta)
    except IncompatibleIndexError as exc:
        return str(exc)
    with cluster_call(es, f"counting the documents of {generation.index}"):
        count = int(_body(client.count(index=generation.index))["count"])
    expected = int((meta.get("counts") or {}).get("documents", -1))
    if count != expected:
        return f"it holds {count:,} documents but its build read {expected:,} (an interrupted or failed build)"
    return None


def _no_alias_message(name: str, es: ElasticsearchSettings, alias: str) -> str:
    return (f"no Elasticsearch index named '{name}' at {es.url} (alias {alias} does not exist); build it with "
            f"`ltr-search index build --backend elasticsearch --dataset PATH --name {name}`")


def elastic_index_status(name: str | None, es: ElasticsearchSettings, client: Any = None) -> dict[str, Any]:
    """Every generation of index `name` (or of every index under `es.index_prefix`) on the
    cluster: like the embedded `index status` report, plus index name, health and state."""
    pattern = f"{alias_name(es, name)}-g*" if name else f"{es.index_prefix}*-g*"
    with _client_for(client, es) as client:
        with cluster_call(es, f"listing indices {pattern}"):
            found = _body(client.indices.get(index=pattern, expand_wildcards="all"))
            rows = _body(client.cat.indices(index=pattern, format="json", bytes="b", expand_wildcards="all",
                                            h="index,health,status,docs.count,store.size"))
    cat = {row["index"]: row for row in rows}
    indexes: dict[str, Any] = {}
    for index in sorted(found):
        owner = name or _owner_of(es, index)
        generation = generation_of(es, owner, index) if owner else None
        if generation is None:
            continue
        alias = alias_name(es, owner)
        info = found[index]
        row = cat.get(index, {})
        entry = _status_entry(index, generation, (info.get("mappings") or {}).get("_meta"), row)
        entry["active"] = alias in (info.get("aliases") or {})
        report = indexes.setdefault(owner, {"alias": alias, "active": None, "generations": []})
        report["generations"].append(entry)
        if entry["active"]:
            report["active"] = generation
    if name and not indexes:
        raise IndexMissingError(f"no Elasticsearch index named '{name}' at {es.url} (no {pattern} indices)")
    return {"backend": "elasticsearch", "url": es.url, "indexes": indexes}


def _owner_of(es: ElasticsearchSettings, index: str) -> str | None:
    """The index name a generation index belongs to (None: not a generation index)."""
    rest = index[len(es.index_prefix):] if index.startswith(es.index_prefix) else ""
    owner, _, generation = rest.rpartition("-")
    try:
        return owner if owner and generation_of(es, owner, index) == generation else None
    except ValueError:  # not a name the engine could have given an index
        return None


def _status_entry(index: str, generation: str, meta: Mapping[str, Any] | None, row: Mapping[str, Any]) -> dict[str, Any]:
    count = row.get("docs.count")
    entry: dict[str, Any] = {
        "generation": generation, "index": index, "health": row.get("health"), "state": row.get("status"),
        "documents": int(count) if count not in (None, "") else None, "bytes": int(row.get("store.size") or 0),
    }
    try:
        meta = check_meta(index, meta)
    except IncompatibleIndexError as exc:
        return {**entry, "status": "incompatible", "error": str(exc)}
    expected = (meta.get("counts") or {}).get("documents")
    dense = meta.get("dense")
    entry.update(
        status="ok" if entry["documents"] == expected else "incomplete",
        created_at=meta.get("created_at"),
        expected_documents=expected,
        skipped_lines=(meta.get("counts") or {}).get("skipped_lines"),
        dense="hnsw" if dense else "none",
        dims=dense.get("dims") if dense else None,
        corpus=(meta.get("corpus") or {}).get("file"),
    )
    return entry
