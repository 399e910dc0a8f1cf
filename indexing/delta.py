"""The update journal of an index: document upserts and deletes between rebuilds, durable before acknowledged.

    HOME/indexes/NAME/updates.log     append-only; one JSON line per acknowledged batch
    HOME/indexes/.NAME.updates.lock   held by the one appender at a time (a few milliseconds)

A batch line is {"ops": [{"op": "upsert", "doc": {...}, "vector": base64 float32 | null},
{"op": "delete", "id": "..."}]}. A batch is acknowledged only after its line is written and
fsynced, so `kill -9` after an acknowledgement loses nothing; a line torn by a crash (no final
newline) was never acknowledged: readers ignore it and the next appender cuts it off. A batch
applies whole or not at all.

Positions in the journal are logical byte offsets, stable forever. Every generation records in
its manifest `updates: {source, through}`: it holds its source corpus plus the journal's batches
in (source, through]. The live index is the active generation plus the batches after `through`
(the delta segment, see `search.embedded`). `index compact` folds them into a new generation;
`index rebuild` re-reads the source and folds (source, end]; a build from a new dataset starts a
fresh source (source = through = end).

Truncation (after a compaction, a rebuild or a build from a new source: `truncate_after_compaction`,
called by `indexing.build`): the batches before
`base`, which every kept generation already holds, are dropped. A truncated journal starts with
a fixed-size preamble {"base", "batches_at", "source"} and one line of the net operations of
(source, base] (`net_updates`: what a rebuild from `source` replays instead of them), then the
batches from `base` on, at physical position batches_at + (offset - base). The new file is
written aside, fsynced and renamed over the journal: a crash leaves the old journal or the new one.
"""
from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from indexing.bundle import IndexGeneration, IndexStore
from indexing.config import DEFAULT_LOCK_TIMEOUT_S
from indexing.corpus import Document
from indexing.durable import file_lock, fsync_dir

JOURNAL_FILE = "updates.log"
PREAMBLE_BYTES = 128  # a truncated journal's first line, padded: one small read gives its layout
UPSERT = "upsert"
DELETE = "delete"


@dataclass(frozen=True)
class Update:
    """One operation: an upsert carries the document (and its vector on a dense index), a delete its id."""

    op: str
    doc_id: str
    doc: Document | None = None
    vector: np.ndarray | None = None

    def to_json(self) -> dict[str, Any]:
        if self.op == DELETE:
            return {"op": DELETE, "id": self.doc_id}
        doc = self.doc
        vector = None if self.vector is None else base64.b64encode(np.asarray(self.vector, np.float32).tobytes()).decode()
        return {"op": UPSERT, "doc": {"id": doc.id, "title": doc.title, "text": doc.text, "metadata": doc.metadata},
                "vector": vector}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Update":
        if data["op"] == DELETE:
            return cls(DELETE, str(data["id"]))
        d = data["doc"]
        doc = Document(id=d["id"], title=d["title"], text=d["text"], metadata=d.get("metadata") or {})
        vector = None
        if data.get("vector"):
            vector = np.frombuffer(base64.b64decode(data["vector"]), dtype=np.float32)
        return cls(UPSERT, doc.id, doc, vector)


def updates_lock_path(store: IndexStore, name: str) -> Path:
    return store.root / f".{name}.updates.lock"


def journal_path(index_dir: Path) -> Path:
    return Path(index_dir) / JOURNAL_FILE


class JournalTruncatedError(ValueError):
    """The batches a reader asked for were folded into a generation and dropped from the journal."""


@dataclass(frozen=True)
class JournalLayout:
    """Where logical offsets lie in the journal file (identity for a journal never truncated)."""

    base: int = 0  # the logical offset of the first batch kept
    batches_at: int = 0  # its physical position
    source: int | None = None  # the folded line holds the net operations of (source, base]

    def physical(self, offset: int) -> int:
        return self.batches_at + offset - self.base

    def logical(self, position: int) -> int:
        return self.base + position - self.batches_at

    def preamble(self) -> bytes:
        line = json.dumps({"base": self.base, "batches_at": self.batches_at, "source": self.source}).encode()
        return line.ljust(PREAMBLE_BYTES - 1) + b"\n"


def _layout(handle: Any) -> JournalLayout:
    handle.seek(0)
    head = handle.read(PREAMBLE_BYTES)
    if not head.startswith(b'{"base"'):
        return JournalLayout()
    data = json.loads(head)
    return JournalLayout(int(data["base"]), int(data["batches_at"]), None if data["source"] is None else int(data["source"]))


def journal_end(index_dir: Path) -> int:
    """The offset just after the last complete batch (a torn tail is not part of the journal)."""
    path = journal_path(index_dir)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return 0
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return 0
        layout = _layout(handle)
        return layout.logical(max(_complete_end(handle, size), layout.batches_at))


def _complete_end(handle: Any, size: int) -> int:
    """Offset after the last newline of the file (searching backwards in blocks)."""
    position = size
    block = 1 << 16
    while position > 0:
        start = max(0, position - block)
        handle.seek(start)
        data = handle.read(position - start)
        cut = data.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        position = start
    return 0


def read_updates(index_dir: Path, start: int, end: int | None = None) -> tuple[list[Update], int]:
    """The operations of the complete batches in [start, end) (end: the journal's end), in order,
    and the offset reading stopped at. From a truncated journal, a `start` before its base is
    answered only for the folded source (its net operations stand for the dropped batches)."""
    path = journal_path(index_dir)
    if not path.exists():
        return [], start
    with open(path, "rb") as handle:
        layout = _layout(handle)
        updates: list[Update] = []
        if start < layout.base:
            if start != layout.source or (end is not None and end < layout.base):
                raise JournalTruncatedError(
                    f"{path}: the batches from offset {start} were folded into a generation at compaction and are "
                    f"no longer in the journal (it starts at {layout.base}); reopen the index's active generation")
            updates = _folded(handle, layout, path)
            start = layout.base
        handle.seek(layout.physical(start))
        data = handle.read() if end is None else handle.read(max(0, end - start))
    cut = data.rfind(b"\n")
    if cut < 0:
        return updates, start
    offset = start
    for line in data[:cut + 1].splitlines(keepends=True):
        updates.extend(Update.from_json(op) for op in _batch(line, path, offset)["ops"])
        offset += len(line)
    return updates, offset


def _batch(line: bytes, path: Path, offset: int) -> dict[str, Any]:
    try:
        return json.loads(line)
    except ValueError as exc:
        raise ValueError(f"{path}: the batch at byte {offset} is not valid JSON ({exc}); the journal is damaged") from None


def _folded(handle: Any, layout: JournalLayout, path: Path) -> list[Update]:
    """The net operations a truncated journal keeps for (source, base]."""
    handle.seek(PREAMBLE_BYTES)
    line = handle.read(layout.batches_at - PREAMBLE_BYTES)
    return [Update.from_json(op) for op in _batch(line, path, 0)["folded"]]


def append_updates(index_dir: Path, lock_path: Path, updates: list[Update], timeout_s: float = 30.0) -> int:
    """Append one batch durably (written and fsynced before this returns); returns the journal's
    new end. Appenders are serialised by a file lock; a torn tail left by a crash is cut off first."""
    if not updates:
        return journal_end(index_dir)
    line = _line({"ops": [u.to_json() for u in updates]})
    path = journal_path(index_dir)
    with file_lock(lock_path, timeout_s, "update of the index journal", f"another update of {path} is running"):
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            with os.fdopen(os.dup(fd), "rb") as reader:
                layout = _layout(reader) if size else JournalLayout()
                end = max(_complete_end(reader, size), layout.batches_at) if size else 0
            if end != size:
                os.ftruncate(fd, end)  # a torn batch from a crash: never acknowledged
            os.pwrite(fd, line, end)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(path.parent)
        return layout.logical(end + len(line))


def _line(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def truncate_journal(index_dir: Path, lock_path: Path, base: int, source: int | None,
                     timeout_s: float = 30.0) -> JournalLayout | None:
    """Drop the batches before offset `base` (every generation kept holds them), keeping the net
    operations of (source, base] for a rebuild from `source` (None, or `source` >= `base`: none
    needed). Atomic: the new journal is written aside, fsynced and renamed over the old one, under
    the appenders' lock. Returns the new layout, or None when there was nothing to drop."""
    path = journal_path(index_dir)
    aside = path.with_name(path.name + ".truncating")
    with file_lock(lock_path, timeout_s, "truncation of the index journal", f"another update of {path} is running"):
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            return None
        with handle:
            size = os.fstat(handle.fileno()).st_size
            old = _layout(handle) if size else JournalLayout()
            end = old.logical(max(_complete_end(handle, size), old.batches_at)) if size else 0
            base = min(base, end)
            if base <= old.base:
                return None
            if source is not None and source >= base:
                source = None
            if source is not None and source < old.base and source != old.source:
                return None  # its batches were folded for another source: keep the journal as it is
            folded = net_updates(read_updates(index_dir, source, base)[0]) if source is not None else []
            handle.seek(old.physical(base))
            tail = handle.read(old.physical(end) - old.physical(base))
        folded_line = _line({"folded": [u.to_json() for u in folded]})
        layout = JournalLayout(base, PREAMBLE_BYTES + len(folded_line), source)
        with open(aside, "wb") as out:
            out.write(layout.preamble() + folded_line + tail)
            out.flush()
            os.fsync(out.fileno())
        os.replace(aside, path)
        fsync_dir(path.parent)
        return layout


def net_updates(updates: Iterable[Update]) -> list[Update]:
    """Fewest operations that replay (`apply_updates`) to the same corpus, order included, from
    any starting corpus: per id, its last delete, then (if upserted after it) one upsert of its
    last version at the place of the first upsert after that delete (where it was appended)."""
    updates = list(updates)
    last_delete: dict[str, int] = {}
    for i, update in enumerate(updates):
        if update.op == DELETE:
            last_delete[update.doc_id] = i
    first_upsert: dict[str, int] = {}
    last_upsert: dict[str, Update] = {}
    for i, update in enumerate(updates):
        if update.op == UPSERT and i > last_delete.get(update.doc_id, -1):
            first_upsert.setdefault(update.doc_id, i)
            last_upsert[update.doc_id] = update
    kept = [(i, updates[i]) for i in last_delete.values()]
    kept += [(first_upsert[doc_id], update) for doc_id, update in last_upsert.items()]
    return [update for _, update in sorted(kept, key=lambda pair: pair[0])]


def apply_updates(documents: Mapping[str, Document] | Iterable[Document], updates: Iterable[Update]) -> dict[str, Document]:
    """The corpus after the updates, in the order a corpus file edited the obvious way would have:
    an upsert of a known id replaces it in place, a new id goes to the end, a delete removes it."""
    out = dict(documents) if isinstance(documents, Mapping) else {d.id: d for d in documents}
    for update in updates:
        if update.op == DELETE:
            out.pop(update.doc_id, None)
        else:
            out[update.doc_id] = update.doc
    return out


def updates_entry(source: int, through: int) -> dict[str, int]:
    """The manifest's record of which journal batches a generation holds."""
    return {"source": int(source), "through": int(through)}


def truncate_after_compaction(store: IndexStore, name: str, previous: IndexGeneration,
                              lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> JournalLayout | None:
    """Drop the journal's batches that every generation on disk already holds, and that the
    generation active before this compaction holds (a process may still serve it until it reloads).
    A generation of the active one's source needs its batches from `through` on (a rebuild replays
    the folded net operations of the ones before); one of another source needs them from its source.
    Call under the index's lock, after the compacted generation is active and old ones pruned."""
    source = _updates_of(store.open(name, verify=False))[0]
    needed = []
    for generation in [previous, *(store.open(name, g, verify=False) for g in store.generations(name))]:
        own_source, through = _updates_of(generation)
        needed.append(through if own_source == source else own_source)
    return truncate_journal(store.index_dir(name), updates_lock_path(store, name), min(needed), source, lock_timeout_s)


def _updates_of(generation: IndexGeneration) -> tuple[int, int]:
    recorded = generation.manifest.get("updates") or {}
    return int(recorded.get("source", 0)), int(recorded.get("through", 0))
