"""What a ranking pipeline is, and the two single-retriever pipelines.

A pipeline turns a query into a ranked list of `Hit`s. Plain pipelines (`bm25`, `dense`) need
only an index; learned pipelines also have `fit(queries, qrels)`, which the evaluation harness
calls on training queries only (a train split, or the training folds of a cross-validation).
The catalogue of named pipelines (`bm25`, `hybrid`, `ltr`, `model:VERSION`, ...) is wiring
across layers, so it lives in the composition root: `search/app/pipelines.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, runtime_checkable

from search.backend import Hit, Retrieved, SearchBackend

Qrels = Mapping[str, Mapping[str, int]]


@runtime_checkable
class Pipeline(Protocol):
    name: str

    def search(self, query: str, k: int) -> list[Hit]:
        """The top `k` documents for `query`, best first."""
        ...


@runtime_checkable
class WindowRetriever(Pipeline, Protocol):
    """A first stage that hands over its ranking as arrays (backend rows best first, with their
    scores): the ranking pipeline cuts pages from it without a Python object per candidate."""

    def retrieve(self, query: str, k: int) -> Retrieved: ...


@runtime_checkable
class LearnedPipeline(Pipeline, Protocol):
    def fit(self, queries: Mapping[str, str], qrels: Qrels) -> "LearnedPipeline":
        """Learn from judged training queries; never called with evaluation queries."""
        ...


PipelineFactory = Callable[[SearchBackend], Pipeline]


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    factory: PipelineFactory
    learned: bool
    description: str


class BM25Pipeline:
    """BM25 over the combined title + text field."""

    name = "bm25"

    def __init__(self, index: SearchBackend):
        self.index = index

    def retrieve(self, query: str, k: int) -> Retrieved:
        return self.index.retrieve_bm25(query, k)

    def search(self, query: str, k: int) -> list[Hit]:
        return self.retrieve(query, k).hits()


class DensePipeline:
    """Nearest neighbours of the query embedding (cosine)."""

    name = "dense"

    def __init__(self, index: SearchBackend):
        self.index = index

    def retrieve(self, query: str, k: int) -> Retrieved:
        return self.index.retrieve_dense(self.index.encode_query(query), k)

    def search(self, query: str, k: int) -> list[Hit]:
        return self.retrieve(query, k).hits()
