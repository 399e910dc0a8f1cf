"""GET /documents/{id}: one stored document of the served generation."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from search.app.deps import StateDep
from search.app.errors import ApiError
from search.limits import MAX_DOC_ID_LENGTH

router = APIRouter(tags=["documents"])


@router.get("/documents/{doc_id}")
def get_document(doc_id: str, state: StateDep) -> dict[str, Any]:
    snapshot = state.require()
    document = snapshot.index.document(doc_id) if len(doc_id) <= MAX_DOC_ID_LENGTH else None
    if document is None:
        raise ApiError(404, "not_found", f"no document '{doc_id[:200]}' in index '{snapshot.index.name}'")
    return document
