"""Stored fields: the documents of a generation as JSON lines plus a byte-offset table.

Search results, filters and diversity rules need a document's fields by index in O(1) without
loading the whole corpus, so each line's start offset is kept in a memory-mapped array.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from indexing.corpus import Document

DOCS_FILE = "docs.jsonl"
OFFSETS_FILE = "docs.offsets.npy"
IDS_FILE = "doc_ids.json"


def write_docstore(documents: Iterable[Document], directory: Path) -> int:
    """Write stored fields; returns the number of documents."""
    directory.mkdir(parents=True, exist_ok=True)
    offsets = [0]
    ids = []
    with open(directory / DOCS_FILE, "wb") as handle:
        for doc in documents:
            record = {"id": doc.id, "title": doc.title, "text": doc.text, "metadata": doc.metadata}
            line = json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"
            handle.write(line)
            offsets.append(offsets[-1] + len(line))
            ids.append(doc.id)
    (directory / IDS_FILE).write_text(json.dumps(ids, ensure_ascii=False), encoding="utf-8")
    np.save(directory / OFFSETS_FILE, np.asarray(offsets, dtype=np.int64))
    return len(offsets) - 1


class DocStore:
    """Random access to stored documents by index, and ids <-> indices."""

    def __init__(self, directory: Path):
        self._path = directory / DOCS_FILE
        self._offsets = np.load(directory / OFFSETS_FILE, mmap_mode="r")
        self._fd = os.open(self._path, os.O_RDONLY)
        self.ids: list[str] = json.loads((directory / IDS_FILE).read_text(encoding="utf-8"))
        if len(self.ids) != len(self):
            raise ValueError(f"{directory}: {len(self.ids)} ids for {len(self)} stored documents")
        self.index_of: dict[str, int] = {doc_id: i for i, doc_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def get_by_id(self, doc_id: str) -> dict[str, Any] | None:
        index = self.index_of.get(doc_id)
        return None if index is None else self._read(index)

    def all_documents(self) -> list[Document]:
        """Every stored document in index order (compaction reads a generation back this way)."""
        with open(self._path, "rb") as handle:
            return [document_of(json.loads(line)) for line in handle]

    def close(self) -> None:
        os.close(self._fd)

    def _read(self, index: int) -> dict[str, Any]:
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        return json.loads(os.pread(self._fd, end - start, start))  # pread: safe across threads


def document_of(record: dict[str, Any]) -> Document:
    """A stored record back as the `Document` it was written from."""
    return Document(id=record["id"], title=record["title"], text=record["text"], metadata=record.get("metadata") or {})
