"""The learned ranker as a pipeline stage: candidate window -> feature matrix -> model scores.

`LtrPipeline` is what `ltr-search eval`, `ltr-search search` and the query service run under
the name `ltr`. It scores the whole window the serving candidate generator returns (the same
window training saw), so features such as "rank in the BM25 top-k" mean the same thing in both.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np

from ltr.behaviour import BehaviourStore
from search.event_store import EventStore
from ltr.features import DEFAULT_FEATURE_SET, FEATURES, FeatureSet, extract_features, feature_set, uses_behaviour
from ltr.point_in_time import BehaviourHistory, behaviour_sources
from ltr.registry import BaseStage, FeatureSetMismatchError, ModelManifest, ModelRegistry
from indexing.home import registry_dir
from ltr.training import InMemoryModel, Qrels, TrainedRanker, TrainingSettings, candidate_window, fit_ranker
from search.backend import Hit, SearchBackend
from search.hybrid import Candidates, FusionSettings, top_order


WINDOW_CACHE_SIZE = 2048  # scored windows kept per pipeline for repeated queries (behaviour-free sets only)


class ScoringModel(Protocol):
    """A trained model that scores feature rows (a registry model, or one fitted in memory)."""

    version: str

    @property
    def stage(self) -> BaseStage | None: ...  # the base the trees add to (None: a plain model)

    def predict(self, features: np.ndarray, base: np.ndarray | None = None) -> np.ndarray: ...

    def contributions(self, features: np.ndarray, base: np.ndarray | None = None) -> np.ndarray: ...


def stage_contributions(feature_names: Sequence[str], contributions: Sequence[float]) -> dict[str, float]:
    """A result's score split by stage (the `explain` summary): "fusion" (a staged model's first-
    stage margin), "text" (the text model: its text, dense and retrieval features and the bias)
    and "behaviour" (the behaviour trees; 0 for a document with no history). `contributions` is
    the row of `ScoringModel.contributions`: one per feature, the bias, then the margin."""
    names = list(feature_names)
    values = np.nan_to_num(np.asarray(contributions, dtype=np.float64))
    behaviour = [i for i, name in enumerate(names) if FEATURES.get(name, ("",))[0] == "behaviour"]
    text = [i for i in range(len(names)) if i not in set(behaviour)]
    stages = {"fusion": float(values[len(names) + 1]) if len(values) > len(names) + 1 else 0.0,
              "text": float(values[text].sum() + values[len(names)])}
    if behaviour:
        stages["behaviour"] = float(values[behaviour].sum())
    return stages


def window_base(model: ScoringModel, window: Candidates) -> np.ndarray | None:
    """The base margin a staged model adds to its trees for this window (`BaseStage.margin`, the
    function training used); None for a plain model."""
    stage = model.stage
    return stage.margin(window) if stage is not None else None


class ScoredWindow:
    """A scored candidate window, in first-stage order (fused RRF score, best first).

    The window is held as arrays (backend rows and fused scores); `hits` - one `Hit` per
    candidate, with its string id - is made on first use only, for callers that walk the whole
    window (filters and rules in `search.ranking`). `page(k)` makes `Hit`s for the top k only.
    `candidates` is the window itself (aligned with `rows`): shadow and challenger models that read
    another feature set, or stand on another base stage, compute theirs from it."""

    def __init__(self, rows: np.ndarray, first_stage: np.ndarray, id_table: Sequence[str], scores: np.ndarray,
                 features: np.ndarray, feature_names: tuple[str, ...], timings_ms: dict[str, float] | None = None,
                 base: np.ndarray | None = None, stage: BaseStage | None = None, candidates: Candidates | None = None):
        self.rows = rows  # int64 backend rows, first-stage order
        self.first_stage = first_stage  # fused RRF score, aligned with rows
        self.id_table = id_table
        self.scores = scores  # the model's scores, aligned with rows
        self.features = features  # float32 [candidate, feature], aligned with rows
        self.feature_names = feature_names
        self.timings_ms = timings_ms if timings_ms is not None else {}
        self.base = base  # a staged model's base margin, aligned with rows (None: a plain model)
        self.stage = stage  # the stage `base` is the margin of
        self.candidates = candidates  # the candidate window, first-stage order (None: not kept)
        self._hits: list[Hit] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def hits(self) -> list[Hit]:
        """First-stage score and rank of every candidate (made once, on first use)."""
        if self._hits is None:
            table = self.id_table
            self._hits = [Hit(table[row], score, rank) for rank, (row, score)
                          in enumerate(zip(self.rows.tolist(), self.first_stage.tolist()), start=1)]
        return self._hits

    @property
    def doc_ids(self) -> list[str]:
        table = self.id_table
        return [table[row] for row in self.rows.tolist()]

    def page(self, k: int) -> list[Hit]:
        """The `k` best by model score, best first (ties keep first-stage order): ids only for them."""
        order = top_order(self.scores, k)
        table = self.id_table
        return [Hit(table[row], float(self.scores[i]), rank)
                for rank, (i, row) in enumerate(zip(order.tolist(), self.rows[order].tolist()), start=1)]

    def replayed(self) -> "ScoredWindow":
        """The same window answered from the cache (its own timings)."""
        return ScoredWindow(self.rows, self.first_stage, self.id_table, self.scores, self.features,
                            self.feature_names, {"cached": 0.0}, self.base, self.stage, self.candidates)


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
        if self._behaviour is None and self.uses_behaviour:
            events_path, _ = behaviour_sources(self.backend.home, self.backend.name, self._events_path)
            store = BehaviourStore.for_index(self.backend.home, self.backend.name)
            if events_path.exists():  # catch up with events written while nothing applied them
                with EventStore(events_path) as events:
                    store.update(events)
            self._behaviour = store
        return self._behaviour

    def history(self) -> BehaviourHistory | None:
        if self._history is None and self.uses_behaviour:
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
        fitted: dict[str, object] = {"feature_set": self.features.name, "trees": self.trained.trees,
                                     "valid nDCG@10": self.trained.valid_score, "top features by gain": top}
        if self.trained.inner_cv is not None:
            cv = self.trained.inner_cv
            fitted.update({"base": cv.stage.name, "inner-CV gain": round(cv.gain, 4),
                           "inner-CV 95% CI": [round(x, 4) for x in cv.ci], "inner-CV folds": cv.folds})
        return fitted

    def rank_window(self, query: str) -> ScoredWindow:
        if self.model is None:
            raise ValueError(f"pipeline '{self.name}' has no model: train one (`ltr-search train`) and promote it, "
                             "or evaluate it with `ltr-search eval --train-split`")
        key = (query, getattr(self.backend, "revision", None))  # a live index's updates (issue 18) retire its windows
        if not self.uses_behaviour:
            with self._cache_lock:
                cached = self._cache.get(key)
                if cached is not None:
                    self._cache.move_to_end(key)
                    return cached.replayed()
        timings: dict[str, float] = {}
        started = time.perf_counter()
        window = candidate_window(self.backend, query, self.fusion)
        order = np.argsort(-window.rrf, kind="stable")  # first-stage order: the hybrid (RRF) ranking
        window = window.take(order)
        timings["retrieve"] = _ms_since(started)
        started = time.perf_counter()
        features = extract_features(self.backend, query, window, self.features, self.behaviour_store())
        timings["features"] = _ms_since(started)
        started = time.perf_counter()
        base = window_base(self.model, window)
        scores = self.model.predict(features, base) if len(features) else np.empty(0)
        timings["score"] = _ms_since(started)
        scored = ScoredWindow(window.rows, window.rrf, window.id_table, scores, features, self.features.names, timings, base,
                              self.model.stage, window)
        if not self.uses_behaviour:
            with self._cache_lock:
                self._cache[key] = scored
                if len(self._cache) > WINDOW_CACHE_SIZE:
                    self._cache.popitem(last=False)
        return scored

    def contributions(self, features: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
        """Per-feature contributions, the bias, and for a staged model its base (`base`: the
        rows' `ScoredWindow.base`) as one more column; each row sums to the score."""
        assert self.model is not None
        return self.model.contributions(features, base)

    def search(self, query: str, k: int) -> list[Hit]:
        return self.rank_window(query).page(k)


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
    elif version == "latest":  # the newest stored model, e.g. the one `train` just wrote
        stored = registry.version_ids()
        if not stored:
            raise ModelUnavailableError(f"no models in {registry_dir(home)}: train one with `ltr-search train`")
        version = stored[-1]
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
    return backend.describe()


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
