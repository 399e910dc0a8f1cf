"""Training rows with point-in-time behaviour features.

A behaviour feature on a training row must only see what the service could have known when the
request the row describes was served: otherwise the model learns from clicks that happened
*after* (or on) the page it is ranking, and looks far better offline than it can be online.

Each judged training query gives row groups at several *moments*:
- one cold moment (no history at all), so the model also learns to rank a query nobody has
  searched yet, exactly as `text` alone would;
- up to `moments_per_query` moments drawn from the times the request log served that query.
  At a moment t the behaviour features come from a scratch behaviour store that has applied
  exactly the events the event store *received* before t (`received_before`), read as of t.

Moments are visited in time order and the scratch store only moves forward, so the whole replay
costs one pass over the events. The candidate window (an index-only function of the query) is
computed once per query and reused at each of its moments.

What is not point in time: the position propensities used for COEC are the live store's current
fit (one curve over positions, not a per-document signal); they are copied into the scratch
store before the replay.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from indexing.home import behaviour_store_path, event_store_path
from ltr.behaviour import BehaviourStore, normalise_query
from search.event_store import EventStore
from ltr.features import FeatureSet, extract_features
from ltr.training import RankingRows, concat_first_stage, first_stage_columns, window_labels
from search.backend import SearchBackend
from search.hybrid import Candidates, FusionSettings

Qrels = Mapping[str, Mapping[str, int]]
DEFAULT_MOMENTS_PER_QUERY = 3


@dataclass(frozen=True)
class BehaviourHistory:
    """Where point-in-time behaviour features of training rows come from."""

    event_store: EventStore
    propensities: Sequence[float] | None = None
    moments_per_query: int = DEFAULT_MOMENTS_PER_QUERY

    @classmethod
    def open(cls, home: Path, index: str, moments_per_query: int = DEFAULT_MOMENTS_PER_QUERY,
             events_path: Path | None = None) -> "BehaviourHistory | None":
        """The service's event store of the index and the propensities fitted on it (if any);
        None when the index has no event store yet (no history: cold-start rows only)."""
        events_path, store_path = behaviour_sources(home, index, events_path)
        if not events_path.exists():
            return None
        propensities = None
        if store_path.exists():
            with BehaviourStore(store_path) as store:
                propensities = store.propensities()
        return cls(EventStore(events_path), propensities, moments_per_query)


@dataclass(frozen=True)
class Moment:
    query_id: str
    timestamp: float | None  # None: before any event (the cold-start group)


def training_moments(event_store: EventStore, queries: Mapping[str, str], moments_per_query: int,
                     seed: int = 0) -> list[Moment]:
    """A cold moment per query, plus up to `moments_per_query` of the times the request log
    served it (seeded sample), in time order (cold moments first)."""
    served: dict[str, list[float]] = {}
    for request in event_store.iter_requests():
        served.setdefault(normalise_query(request.query), []).append(request.timestamp)
    rng = np.random.default_rng(seed)
    moments = []
    for query_id, text in queries.items():
        moments.append(Moment(query_id, None))
        times = served.get(normalise_query(text), [])
        if times and moments_per_query > 0:
            picked = rng.choice(len(times), size=min(moments_per_query, len(times)), replace=False)
            moments += [Moment(query_id, times[i]) for i in sorted(picked.tolist())]
    return sorted(moments, key=lambda m: -math.inf if m.timestamp is None else m.timestamp)


def point_in_time_rows(
    backend: SearchBackend, queries: Mapping[str, str], qrels: Qrels, features: FeatureSet,
    window_of: Callable[[str], Candidates], event_store: EventStore, propensities: Sequence[float] | None,
    moments_per_query: int = DEFAULT_MOMENTS_PER_QUERY, seed: int = 0,
    progress: Callable[[Iterable], Iterable] = lambda items: items, fusion: FusionSettings = FusionSettings(),
) -> RankingRows:
    """Row groups per (query, moment), labelled from qrels; a query's groups share its query id,
    so a query-level hold-out keeps all of a query's moments on one side. Each row carries the
    first-stage scores a staged model may learn on (`fusion`: the window's settings)."""
    moments = training_moments(event_store, queries, moments_per_query, seed)
    windows: dict[str, tuple[Candidates, np.ndarray, dict[str, np.ndarray]]] = {}
    query_ids, doc_ids, blocks, labels, sizes, first = [], [], [], [], [], []
    missed = 0
    with tempfile.TemporaryDirectory(prefix="ltr-pit-") as scratch_dir:
        scratch = BehaviourStore(Path(scratch_dir) / "behaviour.sqlite3")
        try:
            if propensities:
                scratch.set_propensities(propensities)
            for moment in progress(moments):
                query_id = moment.query_id
                if query_id not in windows:
                    window = window_of(queries[query_id])
                    grades, outside = window_labels(window, qrels.get(query_id, {}))
                    missed += outside
                    windows[query_id] = (window, grades, first_stage_columns(window, fusion))
                window, grades, first_stage = windows[query_id]
                if moment.timestamp is not None:
                    scratch.update(event_store, received_before=moment.timestamp)
                behaviour = scratch if moment.timestamp is not None else None
                blocks.append(extract_features(backend, queries[query_id], window, features, behaviour, now=moment.timestamp))
                query_ids.append(query_id)
                doc_ids += window.doc_ids
                labels.append(grades)
                sizes.append(len(window))
                first.append(first_stage)
        finally:
            scratch.close()
    width = len(features.features)
    return RankingRows(
        query_ids=query_ids, doc_ids=doc_ids,
        features=np.concatenate(blocks) if blocks else np.empty((0, width), np.float32),
        labels=np.concatenate(labels) if labels else np.empty(0, np.float32),
        group_sizes=np.array(sizes, dtype=np.int64), relevant_outside_window=missed,
        first_stage=concat_first_stage(first),
    )


def behaviour_sources(home: Path, index: str, events_path: Path | None = None) -> tuple[Path, Path]:
    """(event store, behaviour store) of an index: the home's defaults unless the service is
    configured with another event store (`events_path`, which the caller passes)."""
    return events_path or event_store_path(home, index), behaviour_store_path(home, index)

