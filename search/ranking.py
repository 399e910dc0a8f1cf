"""The ranking pipeline the service runs: first stage -> filters -> ranker -> rules -> page.

The whole rerank window is ranked once per request and the page is cut from it, so page 2 of a
query is consistent with page 1 (offset + size must fit inside the window).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from search.event_store import ServedRequest, ServedResult
from search.backend import SearchBackend
from search.pipelines import Pipeline, WindowRetriever
from search.rules import (
    FieldFilter, diversify, diversity_values, exclude_mask, explore, filterable_fields, request_rng, shuffle_page,
)


@dataclass(frozen=True)
class WindowView:
    """What a `Ranker` sees: the window after filters and exclusions, as positions into the first
    stage's window (0-based, first-stage order) and backend rows; string ids only on demand."""

    positions: np.ndarray  # int64
    rows: np.ndarray  # int64, aligned with positions
    first_stage_scores: np.ndarray  # aligned with positions
    backend: SearchBackend

    def __len__(self) -> int:
        return len(self.positions)

    def doc_ids(self) -> list[str]:
        return self.backend.doc_ids(self.rows)


class Ranker(Protocol):
    """A reranker of the filtered window (team-draft interleaving, a hand-written rule, a test double)."""

    version: str

    def score(self, query: str, window: WindowView) -> np.ndarray: ...


@runtime_checkable
class WindowRanker(Protocol):
    """A first stage that scores its own candidate window with a model (`ltr.ranker.LtrPipeline`):
    features are computed on the whole window, before filters, exactly as at training time."""

    name: str
    version: str
    feature_names: tuple[str, ...]

    def rank_window(self, query: str) -> Any: ...  # ltr.ranker.ScoredWindow

    def contributions(self, features: np.ndarray, base: np.ndarray | None = None) -> np.ndarray: ...


BM25, DENSE = "bm25", "dense"
SERVER_ANALYSED_BACKENDS = frozenset({"elasticsearch"})  # they analyse queries on their server: term counts unknown


@dataclass(frozen=True)
class RetrieverStatus:
    """Whether one first-stage retriever can answer a query, and why not."""

    name: str  # BM25 or DENSE
    answers: bool
    terms: int | None = None  # BM25: indexable terms after analysis; None where unknown


def pipeline_retrievers(pipeline: str, has_dense: bool) -> tuple[str, ...]:
    """The retrievers a pipeline's first stage reads: `bm25` and `dense` alone, every other
    (hybrid, convex, learned) fuses both where the index has vectors."""
    if pipeline == BM25:
        return (BM25,)
    if pipeline == DENSE:
        return (DENSE,)
    return (BM25, DENSE) if has_dense else (BM25,)


def retriever_statuses(retrievers: Sequence[str], bm25_terms: int | None) -> tuple[RetrieverStatus, ...]:
    """Which retrievers can answer a query with `bm25_terms` indexable terms (None: unknown,
    assumed some): BM25 needs a term (`!!!` and `the of and` have none), dense always answers."""
    return tuple(
        RetrieverStatus(name, bm25_terms is None or bm25_terms > 0, bm25_terms) if name == BM25
        else RetrieverStatus(name, True)
        for name in retrievers
    )


def query_retrievers(backend: SearchBackend, query: str, pipeline: str) -> tuple[RetrieverStatus, ...]:
    """`retriever_statuses` of `query` on `pipeline` over `backend` (the service and the CLI
    both ask here before running a pipeline)."""
    retrievers = pipeline_retrievers(pipeline, backend.has_dense)
    terms = None
    if BM25 in retrievers and backend.kind not in SERVER_ANALYSED_BACKENDS:
        terms = len(backend.analyse(query).terms)
    return retriever_statuses(retrievers, terms)


def retriever_notes(statuses: Sequence[RetrieverStatus]) -> list[str]:
    """What a user should know of the statuses: a retriever that could not answer, and who did."""
    silent = [s for s in statuses if not s.answers]
    if not silent:
        return []
    notes = [f"{s.name}: the query has no indexable term (all stop words or punctuation)" if s.name == BM25
             else f"{s.name}: cannot answer" for s in silent]
    answering = [s.name for s in statuses if s.answers]
    notes.append(f"answered by {', '.join(answering)}" if answering else "no retriever can answer: no results")
    return notes


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
    features: np.ndarray | None = None  # the model's input row (WindowRanker first stages)
    contributions: np.ndarray | None = None  # per feature, then the bias (explain only)


@dataclass
class RankingOutcome:
    results: list[RankedResult]
    window_size: int  # candidates the first stage returned
    eligible: int  # after filters and exclusions
    explored: bool
    timings_ms: dict[str, float] = field(default_factory=dict)
    feature_names: tuple[str, ...] | None = None
    model_version: str | None = None


@dataclass
class RankingPipeline:
    backend: SearchBackend
    first_stage: Pipeline
    window: int
    ranker: Ranker | None = None
    epsilon: float = 0.0
    protected_top: int = 3
    seed: int = 0
    exploration: str = "swap"  # or "shuffle" (search.app.config.ExplorationSettings.mode)
    # What the first stage can do, decided once: an isinstance check against a runtime-checkable
    # Protocol walks its attributes, ~0.1 ms a request when made per request (profiled).
    _learned: bool = field(init=False, repr=False, compare=False)
    _retrieves_rows: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._learned = isinstance(self.first_stage, WindowRanker)
        self._retrieves_rows = isinstance(self.first_stage, WindowRetriever)

    @property
    def name(self) -> str:
        return self.first_stage.name

    def check_page(self, request: RankingRequest) -> None:
        if request.offset + request.size > self.window:
            raise WindowTooSmallError(
                f"offset + size = {request.offset + request.size} goes past the rerank window of {self.window} results; "
                f"pages are cut from one ranked window, so ask for offset + size <= {self.window}"
            )

    def nothing(self, request: RankingRequest) -> RankingOutcome:
        """The answer to a query none of the first stage's retrievers can answer (see
        `query_retrievers`): no results, without running the pipeline."""
        self.check_page(request)
        learned = self._learned
        return RankingOutcome([], 0, 0, False, {}, feature_names=self.first_stage.feature_names if learned else None,
                              model_version=self.first_stage.version if learned else None)

    def run(self, request: RankingRequest) -> RankingOutcome:
        """The page of one request. The window travels as arrays (backend rows, first-stage
        scores, model scores and features); string ids and stored fields are fetched for the page
        only, and for the whole window only when a rule needs them (filters, exclusions, diversity)."""
        self.check_page(request)
        timings: dict[str, float] = {}
        features: np.ndarray | None = None
        model_scores: np.ndarray | None = None
        base: np.ndarray | None = None  # a staged model's base margin (explain shows it)
        learned = self._learned
        if learned:
            scored = self.first_stage.rank_window(request.query)
            rows, first_scores = scored.rows, scored.first_stage
            features, model_scores, base = scored.features, scored.scores, scored.base
            timings.update(scored.timings_ms)
        else:
            with _timed(timings, "retrieve"):
                rows, first_scores = self._first_stage_rows(request.query)
        window_size = len(rows)
        positions = np.arange(window_size, dtype=np.int64)  # into the first-stage window; rank = position + 1
        documents: list[dict[str, Any]] | None = None  # fetched once, when a rule needs metadata
        metadata: list[Mapping[str, Any]] | None = None
        if request.diversity_field:
            with _timed(timings, "fetch_metadata"):
                documents = [d or {} for d in self.backend.documents(self.backend.doc_ids(rows))]
                metadata = [filterable_fields(document) for document in documents]
        with _timed(timings, "filter"):
            if request.exclude or request.filters:
                doc_ids = self.backend.doc_ids(rows)
                keep = exclude_mask(doc_ids, request.exclude)
                if request.filters:  # evaluated by the backend: Elasticsearch runs them as a filter query
                    keep &= self.backend.filter_mask(request.filters, doc_ids)
                kept = np.flatnonzero(keep)
                positions = positions[kept]
                if documents is not None and metadata is not None:
                    documents = [documents[i] for i in kept.tolist()]
                    metadata = [metadata[i] for i in kept.tolist()]
        eligible_rows = rows[positions]
        scores = (model_scores if model_scores is not None else first_scores)[positions].astype(np.float64)
        if self.ranker is not None and len(positions):
            with _timed(timings, "rank"):
                view = WindowView(positions, eligible_rows, first_scores[positions], self.backend)
                scores = np.asarray(self.ranker.score(request.query, view), dtype=np.float64)
        with _timed(timings, "rules"):
            order = np.argsort(-scores, kind="stable")
            if request.diversity_field and request.diversity_cap:
                values = diversity_values(metadata or [], request.diversity_field)
                order = diversify(order, values, request.diversity_cap)
            if self.exploration == "shuffle":
                exploration = shuffle_page(order, request_rng(request.request_id, self.seed), self.epsilon,
                                           page_start=request.offset, page_size=request.size)
            else:
                exploration = explore(
                    order, request_rng(request.request_id, self.seed), self.epsilon,
                    page_start=request.offset, page_size=request.size, protected_top=self.protected_top,
                )
        page = range(request.offset, min(request.offset + request.size, len(exploration.order)))
        page_rows = [int(exploration.order[position]) for position in page]  # indexes into the eligible window
        page_positions = positions[page_rows] if page_rows else positions[:0]
        contributions = None
        if learned and request.explain and features is not None and page_rows:
            with _timed(timings, "explain"):
                contributions = self.first_stage.contributions(
                    features[page_positions], None if base is None else base[page_positions])
        with _timed(timings, "fetch_fields"):
            page_ids = self.backend.doc_ids(rows[page_positions])
            if documents is None:  # one batch for the page (one `_mget` on Elasticsearch)
                page_fields = [d or {} for d in self.backend.documents(page_ids)]
            else:
                page_fields = [documents[i] for i in page_rows]
            results = [
                RankedResult(
                    doc_id=doc_id,
                    score=float(scores[i]),
                    position=position + 1,
                    propensity=float(exploration.propensities[position]),
                    first_stage_rank=int(window_position) + 1,
                    first_stage_score=float(first_scores[window_position]),
                    fields=fields,
                    features=features[window_position] if features is not None else None,
                    contributions=contributions[row] if contributions is not None else None,
                )
                for row, (position, i, window_position, doc_id, fields)
                in enumerate(zip(page, page_rows, page_positions.tolist(), page_ids, page_fields))
            ]
        return RankingOutcome(
            results, window_size, len(positions), exploration.explored, timings,
            feature_names=self.first_stage.feature_names if learned else None,
            model_version=self.first_stage.version if learned else None,
        )

    def _first_stage_rows(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        """Rows and scores of a plain first stage, best first: as arrays where it can hand them
        over (`WindowRetriever`), else from its `Hit`s."""
        if self._retrieves_rows:
            retrieved = self.first_stage.retrieve(query, self.window)
            return retrieved.rows, np.asarray(retrieved.scores, dtype=np.float64)
        hits = self.first_stage.search(query, self.window)
        rows = self.backend.rows_of([hit.doc_id for hit in hits])
        return np.asarray(rows, dtype=np.int64), np.array([hit.score for hit in hits], dtype=np.float64)


def served_request(outcome: RankingOutcome, request: RankingRequest, pipeline: str, backend: SearchBackend,
                   timestamp: float, user_id: str | None = None, session_id: str | None = None,
                   interleaved: bool = False) -> ServedRequest:
    """What the request log stores of one answered request: every shown result with its position,
    exploration propensity and the feature row the model scored. The query service and the
    in-process simulator both log through here, so their logs are the same shape."""
    return ServedRequest(
        request_id=request.request_id, timestamp=timestamp, query=request.query, pipeline=pipeline,
        index_name=backend.name, index_generation=backend.generation_id, model_version=outcome.model_version,
        user_id=user_id, session_id=session_id, page_offset=request.offset,
        results=[ServedResult(r.doc_id, r.position, r.score, r.propensity, named_row(outcome.feature_names, r.features))
                 for r in outcome.results],
        explored=outcome.explored, interleaved=interleaved,
    )


def named_row(names: Sequence[str] | None, values: Any) -> dict[str, float] | None:
    """A feature row (or contribution row) as {name: value}; NaN stays NaN for the event log."""
    if names is None or values is None:
        return None
    return dict(zip(names, (float(v) for v in values)))


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - started) * 1000
