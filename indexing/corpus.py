"""Corpus readers: BEIR directories and plain JSONL files.

Every bad line is reported with its file, line number and reason. Without `skip_invalid` the
first bad line raises `CorpusError` before anything is written; with it, the rest of the corpus
is read and every skipped line is returned so the build summary can list them. A title or text
field that no record has is an error either way (a typo in `--title-field` must not build an
index without titles): it names the field, the file and the fields the records do have.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from indexing.progress import progress_bar
from indexing.text import plural

BEIR_ID_FIELD = "_id"
BEIR_METADATA_FIELD = "metadata"
DEFAULT_TITLE_FIELD = "title"  # optional: a corpus without titles is fine unless another field is named


class CorpusError(ValueError):
    """A corpus that cannot be indexed: names the file, the line (1-based) and the reason."""

    def __init__(self, path: Path | str, line: int | None, reason: str):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True, slots=True)
class Document:
    """One corpus record. `metadata` keeps every other field, for filters and diversity later."""

    id: str
    title: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SkippedLine:
    path: str
    line: int
    reason: str


@dataclass(frozen=True)
class CorpusSpec:
    """Where a corpus is and how its records map to documents; recorded in the index manifest."""

    path: str
    id_field: str = BEIR_ID_FIELD
    title_field: str | None = DEFAULT_TITLE_FIELD
    text_fields: tuple[str, ...] = ("text",)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["text_fields"] = list(self.text_fields)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CorpusSpec":
        return cls(
            path=data["path"],
            id_field=data["id_field"],
            title_field=data.get("title_field"),
            text_fields=tuple(data["text_fields"]),
        )


@dataclass
class CorpusReadResult:
    documents: list[Document]
    skipped: list[SkippedLine]
    file: Path
    fingerprint: str  # sha256 of the corpus file bytes
    lines: int


def resolve_corpus_file(path: Path | str) -> Path:
    """A BEIR directory resolves to its `corpus.jsonl` (or its single `corpus*.jsonl`)."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(path, None, "no such file or directory")
    if path.is_file():
        return path
    exact = path / "corpus.jsonl"
    if exact.is_file():
        return exact
    candidates = sorted(p for p in path.glob("corpus*.jsonl") if p.is_file())
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CorpusError(path, None, "directory has no corpus.jsonl or corpus*.jsonl file")
    names = ", ".join(p.name for p in candidates)
    raise CorpusError(path, None, f"directory has several corpus files ({names}); pass one file")


def parse_record(record: Any, spec: CorpusSpec) -> Document:
    """Turn one decoded JSON value into a Document; raises ValueError with the reason."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if spec.id_field not in record:
        raise ValueError(f"missing id field '{spec.id_field}'")
    raw_id = record[spec.id_field]
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise ValueError(f"id field '{spec.id_field}' must be a string or integer, got {json_type_name(raw_id)}")
    doc_id = str(raw_id)
    if not doc_id.strip():
        raise ValueError(f"id field '{spec.id_field}' is empty")

    title = ""
    if spec.title_field is not None and spec.title_field in record:
        title = _string_field(record, spec.title_field, allow_null=True)

    missing = [name for name in spec.text_fields if name not in record]
    if len(missing) == len(spec.text_fields):
        wanted = ", ".join(f"'{name}'" for name in spec.text_fields)
        raise ValueError(f"missing text field {wanted} (the record has: {', '.join(record) or 'no fields'})")
    texts = [_string_field(record, name, allow_null=False) for name in spec.text_fields if name in record]
    text = "\n".join(part for part in texts if part)

    used = {spec.id_field, spec.title_field, *spec.text_fields}
    metadata: dict[str, Any] = {}
    for key, value in record.items():
        if key in used:
            continue
        if key == BEIR_METADATA_FIELD and isinstance(value, dict):
            metadata.update(value)  # BEIR nests extra fields under "metadata"
        else:
            metadata[key] = value
    return Document(id=doc_id, title=title, text=text, metadata=metadata)


def read_corpus(spec: CorpusSpec, skip_invalid: bool = False, progress: bool = False) -> CorpusReadResult:
    """Read and validate a whole corpus; see the module docstring for the error policy."""
    file = resolve_corpus_file(spec.path)
    documents: list[Document] = []
    skipped: list[SkippedLine] = []
    fields_seen: set[str] = set()
    first_line_of: dict[str, int] = {}
    digest = hashlib.sha256()
    line_number = 0

    def reject(line: int, reason: str) -> None:
        if not skip_invalid:
            raise CorpusError(file, line, reason)
        skipped.append(SkippedLine(str(file), line, reason))

    bar = _progress_bar(file, progress)
    with open(file, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            digest.update(raw)
            if bar is not None:
                bar.update(len(raw))
            if not raw.strip():
                continue  # blank lines carry no record
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                reject(line_number, f"invalid UTF-8 at byte {exc.start}")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                reject(line_number, f"invalid JSON: {exc.msg} (column {exc.colno})")
                continue
            if isinstance(record, dict):
                fields_seen.update(record)
            try:
                document = parse_record(record, spec)
            except ValueError as exc:
                reject(line_number, str(exc))
                continue
            if document.id in first_line_of:
                reject(line_number, f"duplicate id '{document.id}' (first seen on line {first_line_of[document.id]})")
                continue
            first_line_of[document.id] = line_number
            documents.append(document)
    if bar is not None:
        bar.close()

    check_fields_exist(spec, fields_seen, file)
    if not documents:
        reason = "empty corpus: no valid documents"
        if skipped:
            reason += f" ({plural(len(skipped), 'invalid line')} skipped)"
        raise CorpusError(file, None, reason)
    return CorpusReadResult(documents, skipped, file, digest.hexdigest(), line_number)


def check_fields_exist(spec: CorpusSpec, fields_seen: set[str], file: Path) -> None:
    """Refuse a named title field or a text field that no record of the corpus has (the default
    title field may be absent: many corpora have no titles)."""
    if not fields_seen:
        return  # no record parsed at all: the per-line errors say why
    wanted = [("title", spec.title_field)] if spec.title_field not in (None, DEFAULT_TITLE_FIELD) else []
    wanted += [("text", name) for name in spec.text_fields]
    absent = [f"{kind} field '{name}'" for kind, name in wanted if name not in fields_seen]
    if absent:
        raise CorpusError(file, None, f"{' and '.join(absent)} {'is' if len(absent) == 1 else 'are'} in no record; "
                                      f"the records have: {', '.join(sorted(fields_seen))}")


def _string_field(record: dict[str, Any], name: str, allow_null: bool) -> str:
    value = record[name]
    if value is None and allow_null:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field '{name}' must be a string, got {json_type_name(value)}")
    return value


def json_type_name(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages about input records."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _progress_bar(file: Path, enabled: bool):
    if not enabled:
        return None
    return progress_bar(total=file.stat().st_size, unit="B", unit_scale=True, desc=f"read {file.name}", leave=False)
