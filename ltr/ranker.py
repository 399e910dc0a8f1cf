"""The learned ranker as a pipeline stage: candidate window -> feature matrix -> model scores.

`LtrPipeline` is what `ltr-search eval`, `ltr-search search` and the query service run under
the name `ltr`. It scores the whole window the serving candidate generator returns (the same
window training saw), so features such as "rank in the BM25 top-k" mean the same thing in both.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol

import numpy as np

from ltr.behaviour import BehaviourStore
from search.event_store import EventStore
from ltr.features import DEFAULT_FEATURE_SET, FeatureSet, extract_features, feature_set, uses_behaviour
from ltr.point_in_time import BehaviourHistory, behaviour_sources
from ltr.registry import FeatureSetMismatchError, ModelManifest, ModelRegistry, predict_contributions, predict_scores
from indexing.home import registry_dir
from ltr.training import Qrels, TrainedRanker, TrainingSettings, candidate_window, fit_ranker
from search.backend import Hit, SearchBackend
from search.fusion import DEFAULT_RRF_K, fuse_reciprocal_rank
from search.hybrid import FusionSettings, top_hits


WINDOW_CACHE_SIZE = 2048  # scored windows kept per pipeline for repeated queries (behaviour-free sets only)


class ScoringModel(Protocol):
    """A trained model that scores feature rows (a registry model, or one fitted in memory)."""

    version: str

    def predict(self, features: np.ndarray) -> np.ndarray: ...

    def contributions(self, features: np.ndarray) -> np.ndarray: ...


@dataclass
class InMemoryModel:
    """A model fitted in this process (e.g. by `ltr-search eval`), not stored in the registry."""

    trained: TrainedRanker
    version: str = "unsaved"

    def predict(self, features: np.ndarray) -> np.ndarray:
        return predict_scores(self.trained.booster, list(self.trained.feature_names), features)

    def contributions(self, features: np.ndarray) -> np.ndarray:
        return predict_contributions(self.trained.booster, list(self.trained.feature_names), features)


@dataclass
class ScoredWindow:
    """A scored candidate window, in first-stage order (fused RRF score, best first)."""

    hits: list[Hit]  # first-stage score and rank
    scores: np.ndarray  # the model's scores, aligned with hits
    features: np.ndarray  # float32 [candidate, feature], aligned with hits
    feature_names: tuple[str, ...]
    timings_ms: dict[str, float] = field(default_factory=dict)


class LtrPipeline:
    """LambdaMART over the hybrid candidate window.

    Built with a model (served from the registry) or without one, in which case `fit` trains
    it on judged queries exactly as `ltr-search train` does (the harness calls `fit` on
    training queries only).

    A feature set with behaviour features reads the index's live behaviour store when ranking
    and trains from point-in-time rows over the index's event store (`ltr.point_in_time`).
    Without behaviour features a query's scored window depends only on the query, the index
    generation and the model, all fixed for the life of the pipeline, so repeated queries are
    answered from a small LRU cache."""

    def __init__(self, backend: SearchBackend, model: ScoringModel | None = None,
                 features: FeatureSet | None = None, fusion: FusionSettings = FusionSettings(),
                 settings: TrainingSettings = TrainingSettings(), name: str = "ltr",
                 behaviour: BehaviourStore | None = None, history: BehaviourHistory | None = None,
                 events_path: Path | None = None):
        self.backend = backend
        self.model = model
        self.features = features or feature_set(DEFAULT_FEATURE_SET)
        self.fusion = fusion
        self.settings = settings
        self.name = name
        self.trained: TrainedRanker | None = None
        self._behaviour = behaviour
        self._history = history
        self._events_path = events_path  # None: the home's event store of the index
        self._cache: OrderedDict[str, ScoredWindow] = OrderedDict()
        self._cache_lock = threading.Lock()

    @property
    def uses_behaviour(self) -> bool:
        return uses_behaviour(self.features)

    def behaviour_store(self) -> BehaviourStore | None:
        """The live aggregates this pipeline reads (opened on first use, next to the index)."""
        if self._behaviour is None and self.uses_behaviour and hasattr(self.backend, "home"):
            events_path, path = behaviour_sources(self.backend.home, self.backend.name, self._events_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            store = BehaviourStore(path)
            if events_path.exists():  # catch up with events written while nothing applied them
                with EventStore(events_path) as events:
                    store.update(events)
            self._behaviour = store
        return self._behaviour

    def history(self) -> BehaviourHistory | None:
        if self._history is None and self.uses_behaviour and hasattr(self.backend, "home"):
            self._history = BehaviourHistory.open(self.backend.home, self.backend.name, events_path=self._events_path)
        return self._history

    @property
    def version(self) -> str:
        return self.model.version if self.model is not None else "none"

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.features.names

    def fit(self, queries: Mapping[str, str], qrels: Qrels) -> "LtrPipeline":
        self.trained = fit_ranker(self.backend, queries, qrels, self.features, self.fusion, self.settings,
                                  history=self.history()).trained
        self.model = InMemoryModel(self.trained)
        self._cache.clear()
        return self

    def fitted_parameters(self) -> dict[str, object]:
        if self.trained is None:
            return {"model": self.version, "feature_set": self.features.name}
        top = list(self.trained.importance())[:5]
        return {"feature_set": self.features.name, "trees": self.trained.trees,
                "valid nDCG@10": self.trained.valid_score, "top features by gain": top}

    def rank_window(self, query: str) -> ScoredWindow:
        if self.model is None:
            raise ValueError(f"pipeline '{self.name}' has no model: train one (`ltr-search train`) and promote it, "
                             "or evaluate it with `ltr-search eval --train-split`")
        if not self.uses_behaviour:
            with self._cache_lock:
                cached = self._cache.get(query)
                if cached is not None:
                    self._cache.move_to_end(query)
                    return ScoredWindow(cached.hits, cached.scores, cached.features, cached.feature_names, {"cached": 0.0})
        timings: dict[str, float] = {}
        started = time.perf_counter()
        window = candidate_window(self.backend, query, self.fusion)
        fused = fuse_reciprocal_rank([window.bm25_rank, window.dense_rank], DEFAULT_RRF_K)
        order = np.argsort(-fused, kind="stable")  # first-stage order: the hybrid (RRF) ranking
        timings["retrieve"] = _ms_since(started)
        started = time.perf_counter()
        features = extract_features(self.backend, query, window, self.features, self.behaviour_store())[order]
        timings["features"] = _ms_since(started)
        started = time.perf_counter()
        scores = self.model.predict(features) if len(features) else np.empty(0)
        timings["score"] = _ms_since(started)
        hits = [Hit(window.doc_ids[i], float(fused[i]), rank) for rank, i in enumerate(order.tolist(), start=1)]
        scored = ScoredWindow(hits, scores, features, self.features.names, timings)
        if not self.uses_behaviour:
            with self._cache_lock:
                self._cache[query] = scored
                if len(self._cache) > WINDOW_CACHE_SIZE:
                    self._cache.popitem(last=False)
        return scored

    def contributions(self, features: np.ndarray) -> np.ndarray:
        assert self.model is not None
        return self.model.contributions(features)

    def search(self, query: str, k: int) -> list[Hit]:
        window = self.rank_window(query)
        return top_hits([h.doc_id for h in window.hits], window.scores, k)


class ModelUnavailableError(ValueError):
    """No model to serve: none promoted, or the chosen one cannot run on this index."""


def model_window(manifest: ModelManifest) -> FusionSettings:
    """The candidate window a model was trained on, as its manifest records it. Every place that
    scores a registry model (search, eval, the promotion gate, the service) takes it from here, so
    a model is never scored on a window it did not see. Manifests without one were trained on the
    default window."""
    window = manifest.training.get("window")
    return FusionSettings.from_dict(window) if window else FusionSettings()


def registry_pipeline(backend: SearchBackend, home: Path, version: str = "active", name: str = "ltr",
                      warn: Callable[[str], None] | None = None, events_path: Path | None = None) -> LtrPipeline:
    """An `LtrPipeline` serving a registry model (`active` = the promoted one) on the candidate
    window recorded in its manifest.

    The registry re-scores the model's stored sample (parity to 1e-6) and refuses a model whose
    feature set differs from the one this engine computes under that name and version."""
    registry = ModelRegistry(home)
    if version == "active":
        active = registry.active()
        if active is None:
            raise ModelUnavailableError(
                f"no active model in {registry_dir(home)}: train one with `ltr-search train` and "
                "`ltr-search models promote VERSION`"
            )
        version = active
    manifest = registry.manifest(version)
    try:
        features = feature_set(manifest.feature_set["name"])
    except ValueError as exc:
        raise FeatureSetMismatchError(f"model {version}: {exc}") from None
    model = registry.load(version, expected_feature_set=features.describe())
    trained_on = manifest.index
    if warn is not None:
        if trained_on.get("backend") != backend.kind:
            warn(f"model {version} was trained on the {trained_on.get('backend')} backend and is served on {backend.kind}: "
                 "BM25 and analysis details differ between backends (README: Differences from the embedded backend); "
                 "retrain on this backend for the model to see the features it is served")
        if trained_on.get("name") != backend.name:
            warn(f"model {version} was trained on index '{trained_on.get('name')}' and is served on '{backend.name}'")
        elif trained_on.get("generation") != backend.generation_id:
            warn(f"model {version} was trained against generation {trained_on.get('generation')} of '{backend.name}' "
                 f"and is served on {backend.generation_id}: statistics such as IDF moved with the corpus; retrain "
                 "if the corpus changed much (a generation built before forward indexes has no bigram features)")
    return LtrPipeline(backend, model, features, model_window(manifest), name=name, events_path=events_path)


def index_description(backend: SearchBackend) -> dict[str, object]:
    """What a model manifest records of the index it was trained against."""
    analyzer = getattr(backend, "analyzer", None)
    description: dict[str, object] = {
        "name": backend.name, "generation": backend.generation_id, "backend": backend.kind,
        "analyzer": analyzer.settings.to_dict() if analyzer is not None else getattr(backend, "meta", {}).get("analyzer", {}),
    }
    if backend.kind == "elasticsearch":  # the concrete generation index behind the alias
        description["elasticsearch_index"] = backend.index
    return description


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
