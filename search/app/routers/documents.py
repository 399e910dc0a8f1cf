"""Documents of the served index: GET one (public); PUT, DELETE and POST _bulk (admin token).

Writes are acknowledged only once durable (the embedded journal is fsynced; Elasticsearch
answers after its refresh, see `search.elastic_backend`) and are searchable when the call
returns. `POST /documents/_bulk` takes NDJSON, one operation a line:
    {"op": "upsert", "id": "d1", "title": "...", "text": "...", "metadata": {...}}
    {"op": "delete", "id": "d2"}
The whole body is checked before anything is written: a line that is not JSON, or not a valid
operation, is a 400/422 naming the line; a delete of an id the index does not serve is a 404
naming the line. The batch is then written as one unit.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from indexing.corpus import Document
from indexing.updates import MAX_BATCH, UnknownDocumentError
from search.app.deps import StateDep, require_admin
from search.app.errors import ApiError, validation_details
from search.limits import MAX_DOC_ID_LENGTH

router = APIRouter(tags=["documents"])
admin = [Depends(require_admin)]


class DocumentBody(BaseModel):
    """A document's fields (the id is the path's)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    title: str = ""
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class BulkUpsert(DocumentBody):
    op: Literal["upsert"]
    id: str = Field(min_length=1, max_length=MAX_DOC_ID_LENGTH)


class BulkDelete(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    op: Literal["delete"]
    id: str = Field(min_length=1, max_length=MAX_DOC_ID_LENGTH)


@router.get("/documents/{doc_id}")
def get_document(doc_id: str, state: StateDep) -> dict[str, Any]:
    snapshot = state.require()
    document = snapshot.index.document(doc_id) if len(doc_id) <= MAX_DOC_ID_LENGTH else None
    if document is None:
        raise ApiError(404, "not_found", f"no document '{doc_id[:200]}' in index '{snapshot.index.name}'")
    return document


@router.put("/documents/{doc_id}", dependencies=admin)
def put_document(doc_id: str, body: DocumentBody, state: StateDep) -> dict[str, Any]:
    """Add or replace one document."""
    _check_id(doc_id)
    index = _writable(state)
    existed = index.document(doc_id) is not None
    receipt = index.write_documents(upserts=[Document(doc_id, body.title, body.text, body.metadata)])
    return {"id": doc_id, "result": "updated" if existed else "created", **receipt}


@router.delete("/documents/{doc_id}", dependencies=admin)
def delete_document(doc_id: str, state: StateDep) -> dict[str, Any]:
    index = _writable(state)
    if len(doc_id) > MAX_DOC_ID_LENGTH or index.document(doc_id) is None:
        raise ApiError(404, "not_found", f"no document '{doc_id[:200]}' in index '{index.name}'")
    try:
        receipt = index.write_documents(deletes=[doc_id])
    except UnknownDocumentError as exc:  # deleted by another writer in between
        raise ApiError(404, "not_found", str(exc)) from None
    return {"id": doc_id, "result": "deleted", **receipt}


@router.post("/documents/_bulk", dependencies=admin)
async def bulk_documents(request: Request, state: StateDep) -> dict[str, Any]:
    """NDJSON upserts and deletes, checked whole, then written as one durable batch."""
    index = _writable(state)
    upserts, deletes, line_of = parse_bulk(await request.body())
    for doc_id in deletes:
        if doc_id not in {d.id for d in upserts} and index.document(doc_id) is None:
            raise ApiError(404, "not_found", f"line {line_of[('delete', doc_id)]}: no document '{doc_id[:200]}' "
                                             f"in index '{index.name}'; nothing was written")
    try:
        receipt = index.write_documents(upserts=upserts, deletes=deletes)
    except UnknownDocumentError as exc:
        raise ApiError(404, "not_found", f"line {line_of[('delete', exc.doc_id)]}: {exc}; nothing was written") from None
    return {"result": "ok", **receipt}


def parse_bulk(body: bytes) -> tuple[list[Document], list[str], dict[tuple[str, str], int]]:
    """The operations of an NDJSON bulk body; any bad line is an ApiError naming it."""
    upserts: list[Document] = []
    deletes: list[str] = []
    line_of: dict[tuple[str, str], int] = {}
    for number, raw in enumerate(body.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, "invalid_ndjson", f"line {number}: not valid JSON ({exc}); nothing was written") from None
        op = record.get("op") if isinstance(record, dict) else None
        model = {"upsert": BulkUpsert, "delete": BulkDelete}.get(op) if isinstance(op, str) else None
        if model is None:
            raise ApiError(422, "invalid_operation", f"line {number}: expected an object with \"op\": \"upsert\" or "
                                                     f"\"delete\"; nothing was written")
        try:
            item = model.model_validate(record)
        except ValidationError as exc:
            raise ApiError(422, "invalid_operation", f"line {number}: invalid {op}; nothing was written",
                           validation_details(exc.errors())) from None
        _check_id(item.id, number)
        if (op, item.id) in line_of or ("upsert", item.id) in line_of or ("delete", item.id) in line_of:
            raise ApiError(422, "invalid_operation", f"line {number}: id '{item.id[:200]}' appears twice in the batch; "
                                                     "nothing was written")
        line_of[(op, item.id)] = number
        if op == "upsert":
            upserts.append(Document(item.id, item.title, item.text, item.metadata))
        else:
            deletes.append(item.id)
    if not line_of:
        raise ApiError(400, "invalid_ndjson", "the body has no operations (NDJSON: one JSON object a line)")
    if len(line_of) > MAX_BATCH:
        raise ApiError(413, "too_many_operations", f"{len(line_of):,} operations; at most {MAX_BATCH:,} a batch")
    return upserts, deletes, line_of


def _check_id(doc_id: str, line: int | None = None) -> None:
    where = f"line {line}: " if line else ""
    if not doc_id.strip() or len(doc_id) > MAX_DOC_ID_LENGTH:
        raise ApiError(422, "invalid_id", f"{where}a document id must be 1-{MAX_DOC_ID_LENGTH} characters, not blank")


def _writable(state: Any) -> Any:
    index = state.require().index
    if not hasattr(index, "write_documents"):
        raise ApiError(501, "not_supported", f"the {index.kind} backend does not take document updates")
    return index
