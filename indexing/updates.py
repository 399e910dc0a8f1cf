"""Writing document upserts and deletes to an index's journal (CLI and API share this).

An upsert on a dense index is encoded here, before the batch is written, so the journal holds
the vector and no reader (the service, compaction) ever encodes it again; the vector cache is
consulted first, so re-upserting an unchanged document costs no encoding.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from indexing.build import BuildSettings, dense_text, encode_cached, open_document_encoder
from indexing.bundle import IndexGeneration, IndexStore
from indexing.config import DEFAULT_LOCK_TIMEOUT_S
from indexing.corpus import CorpusError, Document, parse_record
from indexing.delta import (DELETE, UPSERT, Update, append_updates, apply_updates, journal_end, journal_path, read_updates,
                            updates_lock_path)
from indexing.docstore import IDS_FILE
from indexing.encoder import OnnxEncoder
from indexing.vector_cache import VectorCache, content_keys

MAX_BATCH = 10_000  # operations per acknowledged batch (one journal line)


class UnknownDocumentError(KeyError):
    """A delete names an id the live index does not hold."""

    def __init__(self, doc_id: str, index: str):
        self.doc_id = doc_id
        super().__init__(f"no document '{doc_id[:200]}' in index '{index}'")

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class UpdateReceipt:
    """What an acknowledged batch did: it is durable in the journal up to `journal_end`."""

    index: str
    upserted: int
    deleted: int
    journal_end: int
    seconds: float
    encoded: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"index": self.index, "upserted": self.upserted, "deleted": self.deleted,
                "journal_end": self.journal_end, "encoded": self.encoded, "seconds": round(self.seconds, 4)}


def write_updates(home: Path, name: str, upserts: Sequence[Document] = (), deletes: Sequence[str] = (),
                  *, is_live: Callable[[str], bool] | None = None, encoder: OnnxEncoder | None = None,
                  lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> UpdateReceipt:
    """Append one batch (upserts first, then deletes, in the given order) and return once it is
    durable. A delete of an id the live index does not hold is refused (`is_live`: the caller's
    view of the live ids; by default read from the active generation and the journal), and so
    is the whole batch. `encoder`: the index's encoder when the caller has it open (the service)."""
    started = time.perf_counter()
    store = IndexStore(home, lock_timeout_s=lock_timeout_s)
    active = store.open(name, verify=False)
    if len(upserts) + len(deletes) > MAX_BATCH:
        raise ValueError(f"a batch holds at most {MAX_BATCH:,} operations, got {len(upserts) + len(deletes):,}")
    if deletes:
        if is_live is None:
            is_live = live_id_set(store, active).__contains__
        pending = {d.id for d in upserts}
        for doc_id in deletes:
            if doc_id not in pending and not is_live(doc_id):
                raise UnknownDocumentError(doc_id, name)
    vectors = [None] * len(upserts)
    encoded = 0
    if upserts and active.manifest.get("dense"):
        vectors, encoded = _vectors(home, active, list(upserts), encoder)
    updates = [Update(UPSERT, d.id, d, v) for d, v in zip(upserts, vectors)]
    updates += [Update(DELETE, doc_id) for doc_id in deletes]
    end = append_updates(store.index_dir(name), updates_lock_path(store, name), updates, lock_timeout_s)
    return UpdateReceipt(name, len(upserts), len(deletes), end, time.perf_counter() - started, encoded)


def _vectors(home: Path, active: IndexGeneration, documents: list[Document], encoder: OnnxEncoder | None):
    """The documents' vectors: from the cache when all are there (the encoder is then never
    loaded, which costs a second), else encoded and cached."""
    texts = [dense_text(d) for d in documents]
    keys = content_keys(texts)
    dense = active.manifest["dense"]
    fingerprint = (dense.get("cache") or {}).get("fingerprint")
    with VectorCache(home) as cache:
        if encoder is None and fingerprint:
            found, vectors = cache.get(fingerprint, keys, int(dense["vectors"]["dim"]))
            if found.all():
                return list(vectors), 0
        if encoder is None:
            encoder = open_document_encoder(home, BuildSettings.from_dict(active.manifest["build"]).encoder)
        vectors, report = encode_cached(encoder, cache, keys, texts, progress=False)
    return list(vectors), report.encoded


def live_id_set(store: IndexStore, active: IndexGeneration) -> set[str]:
    """The ids the live index holds: the active generation's, with the journal's later batches applied."""
    ids = json.loads((active.path / "docs" / IDS_FILE).read_text(encoding="utf-8"))
    through = int((active.manifest.get("updates") or {}).get("through", 0))
    updates, _ = read_updates(store.index_dir(active.name), through)
    live = dict.fromkeys(ids)
    for update in updates:
        if update.op == DELETE:
            live.pop(update.doc_id, None)
        else:
            live[update.doc_id] = None
    return set(live)


def read_upsert_file(path: Path, settings: BuildSettings) -> list[Document]:
    """Documents of a JSONL file in the index's corpus format (its id, title and text fields);
    any invalid line is an error naming it, and a repeated id too (one batch, one version)."""
    documents: list[Document] = []
    first_line: dict[str, int] = {}
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                document = parse_record(json.loads(raw.decode("utf-8")), settings.corpus)
            except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
                raise CorpusError(path, number, str(exc)) from None
            if document.id in first_line:
                raise CorpusError(path, number, f"duplicate id '{document.id}' (first on line {first_line[document.id]})")
            first_line[document.id] = number
            documents.append(document)
    if not documents:
        raise CorpusError(path, None, "no documents to upsert")
    return documents


def pending_updates(home: Path, name: str) -> dict[str, int]:
    """The delta the active generation does not hold yet: batches' operations and journal bytes."""
    store = IndexStore(home)
    active = store.open(name, verify=False)
    through = int((active.manifest.get("updates") or {}).get("through", 0))
    updates, end = read_updates(store.index_dir(name), through)
    upserts = sum(1 for u in updates if u.op == UPSERT)
    try:
        file_bytes = journal_path(store.index_dir(name)).stat().st_size
    except FileNotFoundError:
        file_bytes = 0
    return {"operations": len(updates), "upserts": upserts, "deletes": len(updates) - upserts,
            "bytes": end - through, "journal_bytes": journal_end(store.index_dir(name)),
            "journal_file_bytes": file_bytes}  # smaller than journal_bytes once compaction truncated it


def final_corpus(documents: Iterable[Document], updates: Iterable[Update]) -> list[Document]:
    """The corpus a cold build should see after `updates` (used by the parity tests and bench)."""
    return list(apply_updates(documents, updates).values())
