"""The ranking pipeline the service runs: first stage -> filters -> ranker -> rules -> page.

The whole rerank window is ranked once per request and the page is cut from it, so page 2 of a
query is consistent with page 1 (offset + size must fit inside the window).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np

from search.backend import Hit, SearchBackend
from search.pipelines import Pipeline
from search.rules import FieldFilter, diversify, diversity_values, exclude_mask, explore, filter_mask, request_rng


class Ranker(Protocol):
    """The ranker slot (filled by the learning-to-rank model): scores the filtered window."""

    version: str

    def score(self, query: str, window: Sequence[Hit]) -> np.ndarray: ...


class WindowTooSmallError(ValueError):
    """offset + size asks for results beyond the rerank window."""


@dataclass(frozen=True)
class RankingRequest:
    query: str
    request_id: str
    size: int = 10
    offset: int = 0
    filters: Sequence[FieldFilter] = ()
    exclude: frozenset[str] = frozenset()
    diversity_field: str | None = None
    diversity_cap: int | None = None
    explain: bool = False


@dataclass
class RankedResult:
    doc_id: str
    score: float
    position: int  # 1-based, absolute (offset included)
    propensity: float
    first_stage_rank: int
    first_stage_score: float
    fields: dict[str, Any] | None = None


@dataclass
class RankingOutcome:
    results: list[RankedResult]
    window_size: int  # candidates the first stage returned
    eligible: int  # after filters and exclusions
    explored: bool
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class RankingPipeline:
    backend: SearchBackend
    first_stage: Pipeline
    window: int
    ranker: Ranker | None = None
    epsilon: float = 0.0
    protected_top: int = 3
    seed: int = 0

    @property
    def name(self) -> str:
        return self.first_stage.name

    def run(self, request: RankingRequest) -> RankingOutcome:
        if request.offset + request.size > self.window:
            raise WindowTooSmallError(
                f"offset + size = {request.offset + request.size} goes past the rerank window of {self.window} results; "
                f"pages are cut from one ranked window, so ask for offset + size <= {self.window}"
            )
        timings: dict[str, float] = {}
        with _timed(timings, "retrieve"):
            hits = self.first_stage.search(request.query, self.window)
        window_size = len(hits)
        documents: list[dict[str, Any]] | None = None  # fetched once, when a rule needs metadata
        metadata: list[Mapping[str, Any]] | None = None
        if request.filters or request.diversity_field:
            with _timed(timings, "fetch_metadata"):
                documents = [self._document(hit.doc_id) for hit in hits]
                metadata = [filterable_fields(document) for document in documents]
        with _timed(timings, "filter"):
            keep = exclude_mask([h.doc_id for h in hits], request.exclude)
            if request.filters:
                keep &= filter_mask(request.filters, metadata or [], doc_ids=[h.doc_id for h in hits])
            kept = np.flatnonzero(keep)
            hits = [hits[i] for i in kept]
            if documents is not None and metadata is not None:
                documents = [documents[i] for i in kept]
                metadata = [metadata[i] for i in kept]
        scores = np.array([h.score for h in hits], dtype=np.float64)
        if self.ranker is not None and hits:
            with _timed(timings, "rank"):
                scores = np.asarray(self.ranker.score(request.query, hits), dtype=np.float64)
        with _timed(timings, "rules"):
            order = np.argsort(-scores, kind="stable")
            if request.diversity_field and request.diversity_cap:
                values = diversity_values(metadata or [], request.diversity_field)
                order = diversify(order, values, request.diversity_cap)
            exploration = explore(
                order, request_rng(request.request_id, self.seed), self.epsilon,
                page_start=request.offset, page_size=request.size, protected_top=self.protected_top,
            )
        page = range(request.offset, min(request.offset + request.size, len(exploration.order)))
        with _timed(timings, "fetch_fields"):
            results = []
            for position in page:
                i = int(exploration.order[position])
                hit = hits[i]
                results.append(RankedResult(
                    doc_id=hit.doc_id,
                    score=float(scores[i]),
                    position=position + 1,
                    propensity=float(exploration.propensities[position]),
                    first_stage_rank=hit.rank,
                    first_stage_score=hit.score,
                    fields=documents[i] if documents is not None else self._document(hit.doc_id),
                ))
        return RankingOutcome(results, window_size, len(hits), exploration.explored, timings)

    def _document(self, doc_id: str) -> dict[str, Any]:
        return self.backend.document(doc_id) or {}


def filterable_fields(document: Mapping[str, Any]) -> dict[str, Any]:
    """What filters and diversity caps see: the metadata, plus the reserved `id` and `title`."""
    return {**document.get("metadata", {}), "id": document.get("id"), "title": document.get("title")}


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - started) * 1000
