"""The update journal of an index: document upserts and deletes between rebuilds, durable before acknowledged.

    HOME/indexes/NAME/updates.log     append-only; one JSON line per acknowledged batch
    HOME/indexes/.NAME.updates.lock   held by the one appender at a time (a few milliseconds)

A batch line is {"ops": [{"op": "upsert", "doc": {...}, "vector": base64 float32 | null},
{"op": "delete", "id": "..."}]}. A batch is acknowledged only after its line is written and
fsynced, so `kill -9` after an acknowledgement loses nothing; a line torn by a crash (no final
newline) was never acknowledged: readers ignore it and the next appender cuts it off. A batch
applies whole or not at all.

Positions in the journal are byte offsets, stable forever (the file is never rewritten). Every
generation records in its manifest `updates: {source, through}`: it holds its source corpus plus
the journal's batches in (source, through]. The live index is the active generation plus the
batches after `through` (the delta segment, see `search.embedded`). `index compact` folds them
into a new generation; `index rebuild` re-reads the source and folds (source, end]; a build from
a new dataset starts a fresh source (source = through = end).
"""
from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from indexing.corpus import Document
from indexing.durable import file_lock, fsync_dir

JOURNAL_FILE = "updates.log"
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


def journal_path(index_dir: Path) -> Path:
    return Path(index_dir) / JOURNAL_FILE


def journal_end(index_dir: Path) -> int:
    """The offset just after the last complete batch (a torn tail is not part of the journal)."""
    path = journal_path(index_dir)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with open(path, "rb") as handle:
        return _complete_end(handle, size)


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
    and the offset reading stopped at."""
    path = journal_path(index_dir)
    if not path.exists():
        return [], start
    with open(path, "rb") as handle:
        handle.seek(start)
        data = handle.read() if end is None else handle.read(max(0, end - start))
    cut = data.rfind(b"\n")
    if cut < 0:
        return [], start
    updates: list[Update] = []
    offset = start
    for line in data[:cut + 1].splitlines(keepends=True):
        try:
            batch = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}: the batch at byte {offset} is not valid JSON ({exc}); the journal is damaged") from None
        updates.extend(Update.from_json(op) for op in batch["ops"])
        offset += len(line)
    return updates, offset


def append_updates(index_dir: Path, lock_path: Path, updates: list[Update], timeout_s: float = 30.0) -> int:
    """Append one batch durably (written and fsynced before this returns); returns the journal's
    new end. Appenders are serialised by a file lock; a torn tail left by a crash is cut off first."""
    if not updates:
        return journal_end(index_dir)
    line = json.dumps({"ops": [u.to_json() for u in updates]}, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    path = journal_path(index_dir)
    with file_lock(lock_path, timeout_s, "update of the index journal", f"another update of {path} is running"):
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            with os.fdopen(os.dup(fd), "rb") as reader:
                end = _complete_end(reader, size) if size else 0
            if end != size:
                os.ftruncate(fd, end)  # a torn batch from a crash: never acknowledged
            os.pwrite(fd, line + b"\n", end)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(path.parent)
        return end + len(line) + 1


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
