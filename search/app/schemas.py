"""Typed request and response models of the HTTP API (pydantic, unknown fields refused)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from search.limits import (
    MAX_BATCH_EVENTS, MAX_DOC_ID_LENGTH, MAX_EXCLUDE_IDS, MAX_FIELD_NAME_LENGTH, MAX_ID_LENGTH, MAX_PAGE_SIZE, MAX_QUERY_CHARS,
    MAX_RERANK_WINDOW,
)


RESULT_FIELDS = ("id", "title", "text", "metadata")  # what a stored document holds (indexing/docstore.py)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Diversity(Strict):
    field: str = Field(min_length=1, max_length=MAX_FIELD_NAME_LENGTH, description="metadata field, e.g. author")
    max_per_value: int = Field(ge=1, le=MAX_PAGE_SIZE, description="at most this many results per value")


class SearchRequest(Strict):
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    size: int = Field(10, ge=1, le=MAX_PAGE_SIZE)
    offset: int = Field(0, ge=0, le=MAX_RERANK_WINDOW)
    pipeline: str | None = Field(None, max_length=MAX_ID_LENGTH, description="default: the service's default pipeline")
    filters: dict[str, Any] | None = Field(
        None, description='metadata filters: {"author": "ann", "year": {"gte": 2010}, "journal": {"in": ["a", "b"]}}'
    )
    exclude: list[str] = Field(default_factory=list, max_length=MAX_EXCLUDE_IDS, description="ids already seen")
    diversity: Diversity | None = None
    explain: bool = False
    user_id: str | None = Field(None, min_length=1, max_length=MAX_ID_LENGTH)
    session_id: str | None = Field(None, min_length=1, max_length=MAX_ID_LENGTH)
    fields: list[str] | None = Field(
        None, max_length=len(RESULT_FIELDS),
        description=f"stored fields returned per result, of {', '.join(RESULT_FIELDS)} (default: all; [] for none)",
    )
    highlight: bool = Field(False, description="matched-term snippets of title and text, HTML-escaped with <mark>")


class ResultExplanation(Strict):
    first_stage_rank: int
    first_stage_score: float
    features: dict[str, float | None] | None = Field(None, description="the model's input (null = missing)")
    contributions: dict[str, float | None] | None = Field(
        None, description="per-feature contributions to the score (XGBoost pred_contribs), plus 'bias'"
    )
    stages: dict[str, float] | None = Field(
        None, description="the score by stage: 'fusion' (a staged model's first-stage margin), 'text' (the text "
                          "model's trees and bias), 'behaviour' (behaviour trees, 0 without history)")


class SearchResult(Strict):
    id: str
    score: float
    position: int
    propensity: float
    fields: dict[str, Any]
    explain: ResultExplanation | None = None
    highlights: dict[str, str] | None = Field(
        None, description="highlight=true: field -> snippet, HTML-escaped, matched terms in <mark>"
    )


class IndexInfo(Strict):
    name: str
    generation: str


class RetrieverInfo(Strict):
    answered: bool = Field(description="false: this retriever could not answer the query (e.g. bm25 with no indexable term)")
    terms: int | None = Field(None, description="bm25: indexable query terms after analysis (absent where the backend "
                                                "analyses on its server)")


class SearchResponse(Strict):
    request_id: str
    query: str
    pipeline: str
    index: IndexInfo
    model_version: str | None
    offset: int
    size: int
    window: int = Field(description="candidates the first stage returned (the rerank window)")
    eligible: int = Field(description="candidates left after filters and exclusions: the total a page can reach")
    explored: bool
    results: list[SearchResult]
    took_ms: float
    timings_ms: dict[str, float] | None = None
    interleaved: bool | None = Field(
        None, description="true: the page interleaves the active model with a challenger (an online experiment)"
    )
    retrievers: dict[str, RetrieverInfo] = Field(
        default_factory=dict, description="the first stage's retrievers (bm25, dense) and whether each could answer"
    )
    notes: list[str] | None = Field(None, description="why results are few or none, e.g. a query with no indexable term")


class EventIn(Strict):
    request_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    type: Literal["impression", "click", "dwell"]
    doc_id: str = Field(min_length=1, max_length=MAX_DOC_ID_LENGTH)
    position: int = Field(ge=1, le=MAX_RERANK_WINDOW)
    timestamp: float | None = Field(None, description="unix seconds; default: when the server receives it")
    dwell_ms: float | None = Field(None, ge=0)
    event_id: str | None = Field(None, min_length=1, max_length=MAX_ID_LENGTH, description="makes re-sending harmless")


class EventBatch(Strict):
    events: list[EventIn] = Field(min_length=1, max_length=MAX_BATCH_EVENTS)


class EventsAccepted(Strict):
    stored: int
    duplicates: int


class RebuildRequest(Strict):
    """POST /admin/rebuild takes no options yet: an empty object or no body; any field is refused."""


class JobStatus(Strict):
    job_id: str
    kind: str
    state: Literal["running", "succeeded", "failed"]
    started_at: float
    finished_at: float | None = None
    generation: str | None = None
    error: str | None = None
    log: list[str] = Field(default_factory=list)


class ReloadResponse(Strict):
    index: IndexInfo
    previous_generation: str | None


class HealthResponse(Strict):
    status: Literal["ok"]


class ReadyResponse(Strict):
    ready: bool
    index: IndexInfo | None = None
    reason: str | None = None
    degraded: dict[str, str] | None = None  # store -> last write error: searches serve, writes there fail
