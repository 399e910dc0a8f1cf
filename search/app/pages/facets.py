"""Filters for the search page, built from the index's metadata fields: a sample of stored
documents spread over the index says which fields exist, which hold a few string values (a
select) and which hold numbers (a range). Computed once per generation."""
from __future__ import annotations

import numbers
import threading
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from search.backend import SearchBackend

SAMPLE_DOCUMENTS = 2000  # documents read per generation to find the fields
MAX_CHOICES = 40  # a string field with more distinct values gets no select
MAX_FACETS = 8


@dataclass(frozen=True)
class Facet:
    field: str
    kind: str  # "choice" (strings or booleans) or "range" (numbers)
    values: tuple[Any, ...] = ()  # choices, sorted
    low: float | None = None
    high: float | None = None


def facets_of(documents: list[Mapping[str, Any] | None]) -> list[Facet]:
    """The filterable metadata fields of these documents, most common first."""
    seen: dict[str, list[Any]] = {}
    for document in documents:
        for field, value in ((document or {}).get("metadata") or {}).items():
            for element in value if isinstance(value, list) else [value]:
                seen.setdefault(field, []).append(element)
    facets: list[Facet] = []
    for field, values in sorted(seen.items(), key=lambda kv: -len(kv[1])):
        numbers_ = [v for v in values if isinstance(v, numbers.Real) and not isinstance(v, bool)]
        choices = {v for v in values if isinstance(v, (str, bool))}
        if numbers_ and len(numbers_) == len(values):
            facets.append(Facet(field, "range", low=float(min(numbers_)), high=float(max(numbers_))))
        elif choices and len(choices) <= MAX_CHOICES and all(isinstance(v, (str, bool)) for v in values):
            facets.append(Facet(field, "choice", tuple(sorted(choices, key=str))))
        if len(facets) == MAX_FACETS:
            break
    return facets


_CACHE: dict[str, list[Facet]] = {}
_LOCK = threading.Lock()


def index_facets(index: SearchBackend) -> list[Facet]:
    key = f"{index.name}/{index.generation_id}"
    with _LOCK:
        cached = _CACHE.get(key)
    if cached is not None:
        return cached
    count = len(index)  # type: ignore[arg-type]  # both backends know their document count
    rows = np.unique(np.linspace(0, max(count - 1, 0), num=min(count, SAMPLE_DOCUMENTS)).astype(np.int64))
    facets = facets_of(index.documents(index.doc_ids(rows))) if count else []
    with _LOCK:
        if len(_CACHE) > 8:
            _CACHE.clear()
        _CACHE[key] = facets
    return facets
