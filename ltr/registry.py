"""The model registry: versioned XGBoost LambdaMART rankers, stored as data and never as code.

    HOME/models/
        active.json          {"active": "m0003", "history": ["m0001", "m0002"]}, replaced atomically
        .lock                held (indexing.durable.file_lock) by save, promote, rollback and delete, so
                             CLI processes never interleave; a second writer waits, then names the holder
        m0003/model.json     XGBoost's own JSON format (Booster.save_model); no pickle anywhere
        m0003/manifest.json  what the model was trained on, how well it did, checksums, a scored sample,
                             optionally the training distributions for drift monitoring (ltr.drift),
                             and the first stage it is staged on ("stage", see `BaseStage`)
        .m0004.tmp/          a save in progress; never listed, removed by the next save
        .m0002-deleted.tmp/  a version being deleted (renamed first), removed by the next save

A save writes both files into the temp directory, loads the model back from disk to score the
sample, fsyncs and renames the directory to its version, so a crash leaves no half model visible.
Loading verifies the checksum, that the model reads the features the caller computes, and
re-scores the sample: a model that would rank differently from the one that was validated (an
edited file, another xgboost) is refused instead of silently serving other rankings.

A staged model learns on top of a base: its score is the trees' sum plus a base margin computed
from the candidate window (`BaseStage.margin`, e.g. 4 x the convex min-max fusion). The manifest
records the stage; the sample stores each row's base, and parity is checked on trees + base. A
manifest with a stage this engine does not know, or a staged sample without its base, is refused.
Manifests without a stage are plain models (base 0), as before.

A model may also be staged on another stored model ("base_model", see `ModelBase`): a behaviour
model's trees read only the behaviour columns and add to a frozen text model's score, exactly 0
for a document with no history. Loading it loads and verifies its base first, and refuses it
when the base is gone; its sample's predictions are the whole chain's, so parity covers every
stage. The active model's base cannot be deleted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import xgboost

from indexing.home import registry_dir
from indexing.config import DEFAULT_LOCK_TIMEOUT_S, settings_from_dict
from indexing.durable import LockBusyError, file_lock, file_record, fsync_dir, fsync_tree, write_json_durably
from ltr.drift import FeatureReference
from search.hybrid import Candidates, FusionSettings, fused_scores

logger = logging.getLogger("ltr_search.registry")

MODEL_FILE = "model.json"
MANIFEST_FILE = "manifest.json"
ACTIVE_FILE = "active.json"
CHALLENGE_FILE = "challenge.json"  # the model interleaved against the active one (`ltr-search retrain --interleave`)
LOCK_FILE = ".lock"
TMP_SUFFIX = ".tmp"
VERSION_PATTERN = re.compile(r"^m(\d{4,})$")
# Largest |score difference| tolerated between a loaded model and its own save-time predictions.
PARITY_TOLERANCE = 1e-6
FEATURE_SET_KEYS = ("name", "version", "features")
INDEX_KEYS = ("name", "generation", "analyzer", "backend")


class RegistryError(Exception):
    """Base class for model registry problems."""


class ModelNotFoundError(RegistryError):
    pass


class RegistryBusyError(RegistryError, LockBusyError):
    """Another save, promote or rollback held the registry's lock for longer than it waits."""


class ModelInUseError(RegistryError):
    """The active model cannot be deleted: the service would have nothing to load."""


class ModelCorruptError(RegistryError):
    """A checksum mismatch, an unreadable model file or an invalid manifest (names version and file)."""


class ModelParityError(RegistryError):
    """The loaded model no longer scores its stored sample as it did when it was saved."""


class FeatureSetMismatchError(RegistryError):
    """The model reads other features than the caller computes: its scores would be meaningless."""


class MissingBaseError(ValueError):
    """A staged model scored without its base margin: its scores would rank as the trees alone."""


class MissingBaseModelError(RegistryError):
    """A model staged on a frozen model (a behaviour stage on a text model) whose base is gone."""


BASE_KINDS = ("fusion",)


@dataclass(frozen=True)
class BaseStage:
    """The first stage a model is staged on: base margin = `scale` x the window's fused score.

    Convex fusion scores lie in [0, 1] per window (min-max); RRF scores are multiplied by
    (k + 1) / 2 so that theirs do too, so one scale grid fits both. With zero trees a staged
    model ranks exactly as its fusion."""

    fusion: FusionSettings
    scale: float
    kind: str = "fusion"

    def __post_init__(self) -> None:
        if self.kind not in BASE_KINDS:
            raise ValueError(f"unknown base kind {self.kind!r} (this engine knows {', '.join(BASE_KINDS)})")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"base scale must be finite and > 0, got {self.scale}")

    @property
    def name(self) -> str:
        return f"{self.fusion.method} x {self.scale:g}"

    def describe(self) -> str:
        """The fusion with its settings: 'convex z-score dense=0.45 x 4', 'rrf k=60 x 4'."""
        f = self.fusion
        settings = f"k={f.rrf_k:g}" if f.method == "rrf" else f"{f.normalisation} dense={f.dense_weight:g}"
        return f"{f.method} {settings} x {self.scale:g}"

    def to_dict(self) -> dict[str, Any]:
        fusion = {k: v for k, v in self.fusion.to_dict().items() if k not in ("bm25_candidates", "dense_candidates")}
        return {"kind": self.kind, "scale": float(self.scale), "fusion": fusion}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BaseStage":
        """Refuses a stage this engine cannot compute (unknown kind or fusion settings)."""
        if not isinstance(data, dict) or set(data) != {"kind", "scale", "fusion"}:
            raise ValueError(f"stage must hold exactly kind, scale and fusion, got {data!r}")
        if data["kind"] not in BASE_KINDS:
            raise ValueError(f"the model is staged on an unknown base {data['kind']!r} (this engine knows "
                             f"{', '.join(BASE_KINDS)}): it cannot compute the base the trees were trained on")
        return cls(FusionSettings.from_dict(data["fusion"]), float(data["scale"]), data["kind"])

    def margin(self, window: Candidates) -> np.ndarray:
        """The base margin of every candidate of a window: what training and serving both add."""
        return self.scaled(first_stage_score(window, self.fusion))

    def scaled(self, unscaled: np.ndarray) -> np.ndarray:
        return self.scale * np.asarray(unscaled, dtype=np.float64)


def first_stage_score(window: Candidates, fusion: FusionSettings) -> np.ndarray:
    """A fusion's score of every candidate, on a [0, 1]-like scale (see `BaseStage`)."""
    scores = np.asarray(fused_scores(window, fusion), dtype=np.float64)
    return scores * ((fusion.rrf_k + 1) / 2) if fusion.method == "rrf" else scores


@dataclass(frozen=True)
class ModelBase:
    """A frozen registry model another model is staged on: a behaviour stage's trees read only
    the behaviour `columns` and add to the base model's score (computed from the base model's
    own feature columns and first stage). Their output is taken relative to `cold_row` - the
    behaviour values of a document with no history - and is exactly 0 for such rows, so a query
    with no history ranks exactly, bit for bit, as the base model ranks it."""

    version: str  # the base model's registry version
    feature_set: dict[str, Any]  # the base model's feature set (its columns are read from this model's rows)
    columns: tuple[str, ...]  # the columns the trees read
    cold_row: tuple[float, ...]  # `columns` with no history (NaN where a rate is unknown)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "feature_set": _jsonable(self.feature_set), "columns": list(self.columns),
                "cold_row": [None if math.isnan(x) else float(x) for x in self.cold_row]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelBase":
        if not isinstance(data, dict) or set(data) != {"version", "feature_set", "columns", "cold_row"}:
            raise ValueError(f"base_model must hold exactly version, feature_set, columns and cold_row, got {data!r}")
        _require_keys("base_model.feature_set", data["feature_set"], FEATURE_SET_KEYS)
        if len(data["columns"]) != len(data["cold_row"]) or not data["columns"]:
            raise ValueError("base_model.columns and base_model.cold_row must be non-empty and of one length")
        return cls(str(data["version"]), data["feature_set"], tuple(data["columns"]),
                   tuple(float("nan") if x is None else float(x) for x in data["cold_row"]))

    def delta(self, booster: xgboost.Booster, features: np.ndarray) -> np.ndarray:
        """What the trees add to the base model's score for rows of `columns`: their output minus
        their output on the cold row, and exactly 0 on rows equal to the cold row."""
        cold = np.asarray(self.cold_row, dtype=np.float32)
        rows = np.ascontiguousarray(features, dtype=np.float32)
        if not len(rows):
            return np.empty(0)
        raw = predict_scores(booster, list(self.columns), np.vstack([rows, cold[None, :]]), np.zeros(len(rows) + 1))
        delta = raw[:-1] - raw[-1]
        delta[self.cold_mask(rows)] = 0.0
        return delta

    def cold_mask(self, rows: np.ndarray) -> np.ndarray:
        """Rows whose behaviour values are all the cold row's (NaN matching NaN)."""
        cold = np.asarray(self.cold_row, dtype=np.float32)[None, :]
        return np.all((rows == cold) | (np.isnan(rows) & np.isnan(cold)), axis=1)


def describe_feature_set(feature_set: dict[str, Any]) -> str:
    return f"{feature_set['name']} v{feature_set['version']} ({len(feature_set['features'])} features)"


@dataclass
class ModelManifest:
    """Everything needed to trust, explain and reproduce one saved model."""

    version: str
    created_at: str  # UTC, ISO 8601
    xgboost_version: str  # the xgboost that wrote the model and scored the sample
    feature_set: dict[str, Any]  # name, version, features (column names, in order)
    index: dict[str, Any]  # name, generation, analyzer, backend: where the features came from
    training: dict[str, Any]  # free-form: dataset, split, fingerprint, query counts, ...
    params: dict[str, Any]  # xgboost parameters
    metrics: dict[str, Any]  # validation metrics, e.g. {"valid nDCG@10": 0.7}
    importance: dict[str, float]  # gain per feature
    sample: dict[str, list]  # "features" (None for NaN) and the "predictions" the saved file gives
    best_iteration: int | None
    trees: int  # boosting rounds kept (one tree each for a ranker)
    files: dict[str, dict[str, Any]]  # file name -> {"bytes", "sha256"}
    # Training distributions for drift monitoring (ltr.drift.FeatureReference.to_dict()); None for
    # models saved without one, and in manifests written before the field existed.
    reference: dict[str, Any] | None = None
    # The first stage the trees were trained on top of (`BaseStage.to_dict()`); None: a plain
    # model (base 0), as every manifest written before stages existed.
    stage: dict[str, Any] | None = None
    # The frozen model the trees add to (`ModelBase.to_dict()`): a behaviour stage on a text
    # model. None: the trees add to `stage` (or to nothing) directly.
    base_model: dict[str, Any] | None = None

    @property
    def base_stage(self) -> BaseStage | None:
        return BaseStage.from_dict(self.stage) if self.stage is not None else None

    @property
    def model_base(self) -> ModelBase | None:
        return ModelBase.from_dict(self.base_model) if self.base_model is not None else None

    @property
    def tree_columns(self) -> list[str]:
        """The columns the trees read: the feature set's, or a model stage's own columns."""
        return list(self.base_model["columns"]) if self.base_model is not None else self.feature_names

    @property
    def feature_names(self) -> list[str]:
        return list(self.feature_set["features"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelManifest:
        """Refuses unknown keys (a manifest from a newer engine must fail loudly) and missing ones
        (fields with a default, such as `reference`, may be absent: older manifests lack them)."""
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = required - set(data)
        if missing:
            raise ValueError(f"missing ModelManifest keys: {sorted(missing)}")
        manifest: ModelManifest = settings_from_dict(cls, data)  # type: ignore[assignment]
        manifest.validate()
        return manifest

    def validate(self) -> None:
        _require_keys("feature_set", self.feature_set, FEATURE_SET_KEYS)
        _require_keys("index", self.index, INDEX_KEYS)
        names = self.feature_set["features"]
        if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise ValueError("feature_set.features must be a non-empty list of distinct names")
        sample_keys = {"features", "predictions"} | ({"base"} if self.stage is not None else set())
        if not isinstance(self.sample, dict) or set(self.sample) != sample_keys:
            raise ValueError(f"sample must have exactly the keys {sorted(sample_keys)}"
                             + (" (a staged model's sample stores its base)" if self.stage is not None else ""))
        rows, predictions = self.sample["features"], self.sample["predictions"]
        if not rows or len(rows) != len(predictions):
            raise ValueError(f"sample has {len(rows)} rows but {len(predictions)} predictions")
        if self.stage is not None:
            self.base_stage  # raises on an unknown base
        if self.base_model is not None:
            link = self.model_base
            assert link is not None
            missing = [c for c in list(link.columns) + list(link.feature_set["features"]) if c not in names]
            if missing:
                raise ValueError(f"base_model reads columns the feature set does not have: {missing}")
            if len(self.sample["base"]) != len(rows):
                raise ValueError(f"sample has {len(rows)} rows but {len(self.sample['base'])} base values")
        for i, row in enumerate(rows):
            if len(row) != len(names):
                raise ValueError(f"sample row {i} has {len(row)} values for {len(names)} features")
        record = self.files.get(MODEL_FILE) if isinstance(self.files, dict) else None
        if not isinstance(record, dict) or not {"bytes", "sha256"} <= set(record):
            raise ValueError(f"files must record bytes and sha256 of {MODEL_FILE}")
        if self.reference is not None and not isinstance(self.reference, dict):
            raise ValueError(f"reference must be a dict or null, got {type(self.reference).__name__}")

    def check_feature_set(self, expected: dict[str, Any]) -> None:
        """Raise FeatureSetMismatchError unless `expected` names the same set, version and columns."""
        _require_keys("expected feature set", expected, FEATURE_SET_KEYS)
        ours = self.feature_set
        if (ours["name"], ours["version"], list(ours["features"])) == (
            expected["name"], expected["version"], list(expected["features"])
        ):
            return
        theirs = describe_feature_set(expected)
        if (ours["name"], ours["version"]) == (expected["name"], expected["version"]):
            pairs = zip(ours["features"], expected["features"])
            at = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
            if at is None:
                detail = "one list is longer"
            else:
                detail = f"column {at} is {expected['features'][at]!r}, not {ours['features'][at]!r}"
            theirs += f" with other columns ({detail})"
        raise FeatureSetMismatchError(
            f"model {self.version} was trained on feature set {describe_feature_set(ours)} but the "
            f"service computes {theirs}; retrain it with `ltr-search train --feature-set "
            f"{expected['name']}` or serve a matching model"
        )

    def sample_array(self) -> np.ndarray:
        """The stored sample as the float32 matrix it was scored from (None back to NaN)."""
        rows = [[np.nan if x is None else x for x in row] for row in self.sample["features"]]
        return np.asarray(rows, dtype=np.float32)

    def sample_base(self) -> np.ndarray | None:
        """The stored base margin of each sample row (None for a plain model)."""
        return np.asarray(self.sample["base"], dtype=np.float64) if self.stage is not None else None


SCORING_THREADS = 1


def single_threaded(booster: xgboost.Booster) -> xgboost.Booster:
    """Score with one thread: a window is a few hundred rows, the service's parallelism is its
    request pool, and OpenMP threads fighting it cost more than they give (bench_ltr: 500 rows
    at two concurrent callers, p50 1.09 ms single-threaded vs 2.17 ms with all cores; from the
    main thread the all-core booster took 22 ms)."""
    booster.set_param({"nthread": SCORING_THREADS})
    return booster


def predict_scores(booster: xgboost.Booster, feature_names: list[str], features: np.ndarray,
                   base: np.ndarray | None = None) -> np.ndarray:
    """The one scoring path (serving, evaluation, the registry's parity check): float64 scores
    of float32 feature rows, NaN = missing, using every tree of the booster, plus the base
    margin of a staged model (`base`, one per row). In-place prediction skips building a
    DMatrix, which cost more than the trees for a 400-row window (profiled)."""
    array = _checked(feature_names, features)
    margin = None if base is None else _checked_base(base, len(array))
    return np.asarray(booster.inplace_predict(array, missing=np.nan, validate_features=False, base_margin=margin),
                      dtype=np.float64)


def predict_contributions(booster: xgboost.Booster, feature_names: list[str], features: np.ndarray,
                          base: np.ndarray | None = None) -> np.ndarray:
    """Per-feature contributions [n, n_features + 1] (last column the bias); rows sum to scores.
    With a `base` (a staged model) one more column, the base margin itself, follows the bias."""
    matrix = _matrix(feature_names, features)
    if base is None:
        return booster.predict(matrix, pred_contribs=True).astype(np.float64)
    margin = _checked_base(base, matrix.num_row())
    matrix.set_base_margin(margin)
    contributions = booster.predict(matrix, pred_contribs=True).astype(np.float64)
    contributions[:, -1] -= margin  # XGBoost folds the margin into the bias: give it its own column
    return np.column_stack([contributions, margin.astype(np.float64)])


def _checked_base(base: np.ndarray, rows: int) -> np.ndarray:
    margin = np.asarray(base, dtype=np.float32)
    if margin.shape != (rows,):
        raise ValueError(f"the base margin must hold one value per row ({rows}), got shape {margin.shape}")
    return margin


def _checked(names: list[str], features: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(features, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != len(names):
        raise ValueError(f"the model expects a 2-D array with {len(names)} feature columns, got shape {array.shape}")
    return array


def _matrix(names: list[str], features: np.ndarray) -> xgboost.DMatrix:
    return xgboost.DMatrix(_checked(names, features), missing=np.nan, feature_names=list(names))


@dataclass
class LoadedModel:
    """A verified model. `predict` is the one scoring path: serving and the parity check share it."""

    manifest: ModelManifest
    booster: xgboost.Booster
    base_model: "LoadedModel | None" = None  # the frozen model a behaviour stage adds to
    compiled: Any = None  # ltr.compiled_trees.CompiledTrees when a verified library sits next to the model

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def stage(self) -> BaseStage | None:
        """The first stage whose margin the caller computes (a model stage's: its base model's)."""
        return self.base_model.stage if self.base_model is not None else self.manifest.base_stage

    def predict(self, features: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
        link = self.manifest.model_base
        if link is None and self.compiled is not None:  # the same trees as native code (parity-checked)
            return self.compiled.predict(_checked(self.manifest.feature_names, features),
                                         staged_base(self.stage, base, self.version))
        if link is None:
            return predict_scores(self.booster, self.manifest.feature_names, features,
                                  staged_base(self.stage, base, self.version))
        return model_stage_predict(link, self.booster, self.base_model, self.manifest.feature_names, features, base)

    def contributions(self, features: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
        link = self.manifest.model_base
        if link is None:
            return predict_contributions(self.booster, self.manifest.feature_names, features,
                                         staged_base(self.stage, base, self.version))
        return model_stage_contributions(link, self.booster, self.base_model, self.manifest.feature_names, features, base)


def model_stage_predict(link: ModelBase, booster: xgboost.Booster, base_model: Any, names: list[str] | tuple[str, ...],
                        features: np.ndarray, base: np.ndarray | None) -> np.ndarray:
    """A model stage's scores: the frozen base model's score of its own columns (with the first
    stage's margin `base`) plus the trees' `ModelBase.delta` on theirs."""
    if base_model is None:
        raise MissingBaseModelError(f"a model stage on {link.version} was scored without its base model")
    names = list(names)
    array = _checked(names, features)
    text = base_model.predict(array[:, column_indices(names, link.feature_set["features"])], base)
    return text + link.delta(booster, array[:, column_indices(names, link.columns)])


def model_stage_contributions(link: ModelBase, booster: xgboost.Booster, base_model: Any,
                              names: list[str] | tuple[str, ...], features: np.ndarray,
                              base: np.ndarray | None) -> np.ndarray:
    """Per-feature contributions of a model stage: the base model's (its columns, bias and first
    stage margin) plus the trees' on their own columns, 0 on cold rows, the cold row's output
    taken off the bias. Rows sum to `model_stage_predict`."""
    if base_model is None:
        raise MissingBaseModelError(f"a model stage on {link.version} was explained without its base model")
    names = list(names)
    array = _checked(names, features)
    text_at, tree_at = column_indices(names, link.feature_set["features"]), column_indices(names, link.columns)
    inner = base_model.contributions(array[:, text_at], base)  # [n, base columns + bias (+ first stage)]
    out = np.zeros((len(array), len(names) + inner.shape[1] - len(text_at)))
    out[:, text_at] = inner[:, : len(text_at)]
    out[:, len(names):] = inner[:, len(text_at):]
    rows = array[:, tree_at]
    cold = np.asarray(link.cold_row, dtype=np.float32)[None, :]
    trees = predict_contributions(booster, list(link.columns), np.vstack([rows, cold]), np.zeros(len(rows) + 1))
    warm = np.flatnonzero(~link.cold_mask(rows))
    if len(warm):
        out[np.ix_(warm, tree_at)] = trees[warm, : len(tree_at)]
        out[warm, len(names)] += trees[warm, len(tree_at)] - trees[-1, : len(tree_at) + 1].sum()
    return out


def _stage_dict(stage: BaseStage | None) -> dict[str, Any] | None:
    return stage.to_dict() if stage is not None else None


def column_indices(names: list[str], wanted: Any) -> np.ndarray:
    """Where each of `wanted` sits among `names` (a model stage reads its base's columns by name)."""
    at = {name: i for i, name in enumerate(names)}
    return np.array([at[name] for name in wanted], dtype=np.int64)


def staged_base(stage: BaseStage | None, base: np.ndarray | None, version: str) -> np.ndarray | None:
    """The base to add: required for a staged model, refused for a plain one (never a silent 0)."""
    if stage is None:
        if base is not None:
            raise ValueError(f"model {version} has no base stage but was given a base margin")
        return None
    if base is None:
        raise MissingBaseError(f"model {version} is staged on {stage.name}: score it with its base margin "
                               "(BaseStage.margin of the candidate window)")
    return base


@dataclass(frozen=True)
class Challenge:
    """A challenger interleaved against the active model for a share of `ltr` requests until a
    verdict (`ltr-search retrain --interleave`): the service reads it on every (re)load, unless
    its config names an `[experiments] interleave_model` of its own."""

    version: str  # the challenger (team B)
    against: str  # the active model when the challenge started (team A); void once another is active
    share: float  # of `ltr` requests interleaved
    started: float  # unix time: its verdict reads the interleaved requests from here on

    def __post_init__(self) -> None:
        if isinstance(self.share, bool) or not isinstance(self.share, (int, float)) or not 0.0 < self.share <= 1.0:
            raise ValueError(f"a challenge's share of requests must be in (0, 1], got {self.share!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "against": self.against, "share": self.share, "started": self.started}


class ModelRegistry:
    """All model versions of one engine home, and which one is active."""

    def __init__(self, home: Path, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S):
        self.home = Path(home)
        self.root = registry_dir(self.home)
        self.lock_timeout_s = lock_timeout_s

    # ----- reading ---------------------------------------------------------------------------
    def version_ids(self) -> list[str]:
        """Committed versions, oldest first (temp directories of unfinished saves are ignored)."""
        if not self.root.is_dir():
            return []
        ids = [p.name for p in self.root.iterdir() if p.is_dir() and VERSION_PATTERN.match(p.name)]
        return sorted(ids, key=_version_number)

    def versions(self) -> list[ModelManifest]:
        return [self.manifest(version) for version in self.version_ids()]

    def manifest(self, version: str) -> ModelManifest:
        path = self._version_dir(version) / MANIFEST_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            manifest = ModelManifest.from_dict(data)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ModelCorruptError(f"model {version}: {path} is unreadable or invalid: {exc}") from None
        if manifest.version != version:
            raise ModelCorruptError(f"model {version}: {path} describes version {manifest.version}")
        return manifest

    def load(self, version: str, expected_feature_set: dict[str, Any] | None = None) -> LoadedModel:
        """Verify checksum, feature set and sample parity, then return the model ready to score."""
        manifest = self.manifest(version)
        if expected_feature_set is not None:
            manifest.check_feature_set(expected_feature_set)
        return _open_verified(self._version_dir(version), manifest, self._load_base(manifest))

    def _load_base(self, manifest: ModelManifest) -> "LoadedModel | None":
        """The verified base model of a model stage (None for other models); refused when missing."""
        link = manifest.model_base
        if link is None:
            return None
        if link.version not in self.version_ids():
            raise MissingBaseModelError(
                f"model {manifest.version} is staged on model {link.version}, which is not in {self.root}: it "
                f"cannot rank without it (its trees only add to {link.version}'s scores); retrain it on a "
                "text model that is here")
        return self.load(link.version, expected_feature_set=link.feature_set)

    def active(self) -> str | None:
        return self._read_active()["active"]

    def rollback_target(self) -> str | None:
        """The version `rollback` would re-activate (the last one on the history), or None."""
        history = self._read_active()["history"]
        return history[-1] if history else None

    # ----- writing ---------------------------------------------------------------------------
    def save(
        self,
        booster: xgboost.Booster,
        *,
        feature_set: dict[str, Any],
        index: dict[str, Any],
        training: dict[str, Any],
        params: dict[str, Any],
        metrics: dict[str, Any],
        importance: dict[str, float],
        sample_features: np.ndarray,
        best_iteration: int | None,
        reference: Any = None,
        stage: BaseStage | None = None,
        sample_base: np.ndarray | None = None,
        base_model: ModelBase | None = None,
    ) -> ModelManifest:
        """Store a trained booster (trimmed to best_iteration + 1 rounds) as the next version.
        Does not activate it; `promote` does. best_iteration has no default on purpose: forgetting
        it would silently store the overfitted last rounds of an early-stopped booster.
        `reference` (optional): the training distributions for drift monitoring, a
        ltr.drift.FeatureReference or its to_dict(); it must describe the feature set's columns.
        `stage` (optional): the base the trees were trained on, with `sample_base` the base margin
        of each sample row; a staged model may have zero trees (it then ranks as its base).
        `base_model` (optional): the stored model the trees add to (a behaviour stage on a text
        model); the trees then read `base_model.columns`, `stage` is the base model's first stage,
        and `sample_base` its margin."""
        _require_keys("feature_set", feature_set, FEATURE_SET_KEYS)
        names = list(feature_set["features"])
        tree_names = list(base_model.columns) if base_model is not None else names
        base_loaded = self.load(base_model.version, base_model.feature_set) if base_model is not None else None
        if base_loaded is not None and _stage_dict(base_loaded.stage) != _stage_dict(stage):
            raise ValueError(f"a model stage's first stage must be its base model's ({_stage_dict(base_loaded.stage)}), "
                             f"got {_stage_dict(stage)}")
        rounds = booster.num_boosted_rounds()
        if best_iteration is not None:
            if not 0 <= best_iteration < rounds:
                raise ValueError(f"best_iteration {best_iteration} is outside the booster's {rounds} rounds")
            rounds = best_iteration + 1
        min_rounds = 0 if stage is not None or base_model is not None else 1
        if rounds < min_rounds or booster.num_features() != len(tree_names):
            raise ValueError(
                f"booster has {rounds} rounds and {booster.num_features()} features; feature set "
                f"{describe_feature_set(feature_set)} needs at least {min_rounds} round(s) and {len(tree_names)} features"
            )
        if booster.feature_names is not None and list(booster.feature_names) != tree_names:
            raise FeatureSetMismatchError(
                f"booster was trained on columns {booster.feature_names} but the model's trees read {tree_names}"
            )
        sample = np.asarray(sample_features, dtype=np.float32)
        if sample.ndim != 2 or sample.shape[0] < 1 or sample.shape[1] != len(names):
            raise ValueError(f"sample_features must be [>=1, {len(names)}], got shape {sample.shape}")
        if np.isinf(sample).any():
            raise ValueError("sample_features must be finite or NaN (JSON has no infinity)")
        reference_data = _checked_reference(reference, names)
        base = None
        if stage is not None:
            base = _checked_base(np.asarray(sample_base if sample_base is not None else [], dtype=np.float64), len(sample))
            base = base.astype(np.float64)  # the float32 XGBoost reads, stored exactly
            if not np.isfinite(base).all():
                raise ValueError("sample_base must be finite")
        elif sample_base is not None:
            raise ValueError("sample_base given without a stage")
        trimmed = booster[:rounds] if rounds else booster.copy()  # a copy: the caller's booster is left as it was
        trimmed.feature_names = tree_names

        with self._lock("save"):
            self._remove_leftovers()
            ids = self.version_ids()
            version = f"m{(_version_number(ids[-1]) + 1 if ids else 1):04d}"
            staging = self.root / f".{version}{TMP_SUFFIX}"
            staging.mkdir()
            try:
                trimmed.save_model(staging / MODEL_FILE)
                manifest = ModelManifest(
                    version=version,
                    created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    xgboost_version=xgboost.__version__,
                    feature_set=_jsonable(feature_set),
                    index=_jsonable(index),
                    training=_jsonable(training),
                    params=_jsonable(params),
                    metrics=_jsonable(metrics),
                    importance={str(k): float(v) for k, v in importance.items()},
                    sample={"features": _rows_to_json(sample), "predictions": [],
                            **({"base": base.tolist()} if base is not None else {})},
                    best_iteration=None if best_iteration is None else int(best_iteration),
                    trees=rounds,
                    files={MODEL_FILE: file_record(staging / MODEL_FILE)},
                    reference=reference_data,
                    stage=stage.to_dict() if stage is not None else None,
                    base_model=base_model.to_dict() if base_model is not None else None,
                )
                # Score the sample with the model as read back from disk: what a later load gives.
                scores = LoadedModel(manifest, _read_booster(staging / MODEL_FILE, version), base_loaded).predict(sample, base)
                if not np.isfinite(scores).all():
                    raise ValueError(f"model {version} scores its sample as non-finite: {scores.tolist()}")
                manifest.sample["predictions"] = scores.tolist()
                manifest.validate()
                write_json_durably(staging / MANIFEST_FILE, manifest.to_dict())
                _open_verified(staging, manifest, base_loaded)
                fsync_tree(staging)
                os.replace(staging, self.root / version)
                fsync_dir(self.root)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return manifest

    def promote(self, version: str, expected_feature_set: dict[str, Any] | None = None) -> None:
        """Make a version active after it loads cleanly; the previous active goes onto the history."""
        with self._lock(f"promote {version}"):
            self.load(version, expected_feature_set)
            state = self._read_active()
            if state["active"] == version:
                return
            history = state["history"] + ([state["active"]] if state["active"] is not None else [])
            self._write_active(version, history)

    def rollback(self) -> str:
        """Re-activate the previous active version (it must still load cleanly) and return it."""
        with self._lock("rollback"):
            state = self._read_active()
            if not state["history"]:
                raise RegistryError(
                    f"no previous model to roll back to (active: {state['active'] or 'none'}, history empty)"
                )
            previous = state["history"][-1]
            self.load(previous)
            self._write_active(previous, state["history"][:-1])
            return previous

    def start_challenge(self, version: str, share: float, started: float) -> Challenge:
        """Interleave `version` against the active model for `share` of `ltr` requests (replacing
        any earlier challenge); it must load cleanly and differ from the active model."""
        with self._lock(f"challenge {version}"):
            active = self._read_active()["active"]
            if active is None:
                raise RegistryError("no active model to interleave a challenger against: promote one first")
            if version == active:
                raise RegistryError(f"{version} is the active model: interleaving it with itself compares nothing")
            self.load(version)
            challenge = Challenge(version, active, share, float(started))
            write_json_durably(self.root / CHALLENGE_FILE, challenge.to_dict())
            fsync_dir(self.root)
            return challenge

    def challenge(self) -> Challenge | None:
        """The running challenge, or None."""
        path = self.root / CHALLENGE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return Challenge(str(data["version"]), str(data["against"]), data["share"], float(data["started"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelCorruptError(f"{path} is unreadable: {exc}") from None

    def end_challenge(self) -> Challenge | None:
        """Stop interleaving (the service stops on its next reload); the challenge that ran, if any."""
        with self._lock("end challenge"):
            challenge = self.challenge()
            (self.root / CHALLENGE_FILE).unlink(missing_ok=True)
            fsync_dir(self.root)
            return challenge

    def delete(self, version: str) -> None:
        """Delete a model version for good, refusing the active one. It leaves the rollback
        history too. Durable: the directory is renamed to a temp name (removed by the next save if
        this is killed) and the registry directory fsynced before the files go."""
        with self._lock(f"delete {version}"):
            directory = self._version_dir(version)
            state = self._read_active()
            if state["active"] == version:
                raise ModelInUseError(
                    f"model {version} is the active model; promote another (`ltr-search models promote VERSION`) "
                    f"or roll back (`ltr-search models rollback`) before deleting it"
                )
            active = self.manifest(state["active"]) if state["active"] is not None else None
            if active is not None and active.base_model is not None and active.base_model["version"] == version:
                raise ModelInUseError(
                    f"model {version} is the base of the active model {active.version} (a behaviour stage adds to "
                    f"its scores); promote another model before deleting it")
            challenge = self.challenge()
            if challenge is not None and challenge.version == version:
                raise ModelInUseError(f"model {version} is being interleaved against {challenge.against}; end the "
                                      "challenge (`ltr-search retrain`'s verdict, or `ltr-search models challenge --end`) first")
            if version in state["history"]:
                self._write_active(state["active"], [v for v in state["history"] if v != version])
            trash = self.root / f".{version}-deleted{TMP_SUFFIX}"
            os.replace(directory, trash)
            fsync_dir(self.root)
            shutil.rmtree(trash)

    # ----- internals -------------------------------------------------------------------------
    def _version_dir(self, version: str) -> Path:
        if not isinstance(version, str) or not VERSION_PATTERN.match(version):
            raise ModelNotFoundError(f"invalid model version {version!r} (expected m0001 style)")
        path = self.root / version
        if not path.is_dir():
            known = ", ".join(self.version_ids()) or "none"
            raise ModelNotFoundError(f"no model {version} in {self.root} (versions here: {known})")
        return path

    def _read_active(self) -> dict[str, Any]:
        path = self.root / ACTIVE_FILE
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"active": None, "history": []}
        except (OSError, ValueError) as exc:
            raise ModelCorruptError(f"{path} is unreadable: {exc}") from None
        valid = isinstance(state, dict) and set(state) == {"active", "history"}
        if not valid or not isinstance(state["history"], list):
            raise ModelCorruptError(f"{path} must hold exactly 'active' and a 'history' list, got {state!r}")
        return state

    def _write_active(self, version: str | None, history: list[str]) -> None:
        write_json_durably(self.root / ACTIVE_FILE, {"active": version, "history": history})
        fsync_dir(self.root)

    def _remove_leftovers(self) -> None:
        """Temp directories of saves that were killed (call while holding the lock)."""
        for stale in self.root.glob(f".*{TMP_SUFFIX}"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)

    @contextlib.contextmanager
    def _lock(self, purpose: str) -> Iterator[None]:
        """One writer at a time across processes, waiting up to `lock_timeout_s` for another (the
        index store's policy, the same helper). Readers never lock."""
        with file_lock(self.root / LOCK_FILE, self.lock_timeout_s, f"{purpose} in the model registry",
                       "another save, promote or rollback of the model registry is running", RegistryBusyError):
            yield


def _open_verified(directory: Path, manifest: ModelManifest, base: "LoadedModel | None" = None) -> LoadedModel:
    version = manifest.version
    for name, record in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise ModelCorruptError(f"model {version}: {name} is missing from {directory}")
        actual = file_record(path)
        for key in ("bytes", "sha256"):
            if actual[key] != record.get(key):
                raise ModelCorruptError(
                    f"model {version}: {name} has {key} {actual[key]} but the manifest records "
                    f"{record.get(key)} (the file was changed or is corrupt)"
                )
    booster = _read_booster(directory / MODEL_FILE, version)
    if (booster.num_boosted_rounds(), booster.num_features()) != (manifest.trees, len(manifest.tree_columns)):
        raise ModelCorruptError(
            f"model {version}: {MODEL_FILE} has {booster.num_boosted_rounds()} rounds and "
            f"{booster.num_features()} features but the manifest records {manifest.trees} and "
            f"{len(manifest.tree_columns)}"
        )
    loaded = LoadedModel(manifest, booster, base)
    _check_parity(loaded)
    _attach_compiled(directory, loaded)
    return loaded


def _attach_compiled(directory: Path, loaded: LoadedModel) -> None:
    """Serve from the compiled trees next to the model, if any (the first compiler of
    `compiled_trees.COMPILERS` with a library there), once they pass the same sample parity check
    (within their own tolerance); a library that disagrees is refused. One this machine cannot
    load (a home copied from another architecture) is skipped with a warning: the model then
    scores on XGBoost, exactly, only slower."""
    record = loaded.manifest.files.get(MODEL_FILE, {})
    if loaded.manifest.model_base is not None or "sha256" not in record:
        return
    from ltr import compiled_trees  # only models with a compiled library load the native runtime

    found = [(compiler, directory / compiled_trees.library_name(record["sha256"], compiler))
             for compiler in compiled_trees.COMPILERS]
    found = [(compiler, path) for compiler, path in found if path.is_file()]
    if not found:
        return
    compiler, path = found[0]
    try:
        loaded.compiled = compiled_trees.verified_library(path, compiler, loaded)
    except compiled_trees.CompiledLibraryUnloadable as exc:
        logger.warning("%s; scoring with XGBoost instead (same scores, slower): run `ltr-search models compile %s` "
                       "on this machine", exc, loaded.manifest.version)


def _check_parity(loaded: LoadedModel) -> None:
    manifest = loaded.manifest
    expected = np.asarray(manifest.sample["predictions"], dtype=np.float64)
    actual = loaded.predict(manifest.sample_array(), manifest.sample_base())
    diff = np.abs(actual - expected)
    bad = np.flatnonzero(~(diff <= PARITY_TOLERANCE))  # NaN counts as a difference
    if bad.size:
        i = int(bad[0])
        raise ModelParityError(
            f"model {manifest.version}: sample row {i} predicts {actual[i]:.9g} now but {expected[i]:.9g} "
            f"when saved (|diff| {diff[i]:.2g} > {PARITY_TOLERANCE:g}; {bad.size} of {len(expected)} rows "
            f"differ; saved with xgboost {manifest.xgboost_version}, loaded with {xgboost.__version__}); "
            f"the model file or the xgboost version changed"
        )


def _read_booster(path: Path, version: str) -> xgboost.Booster:
    try:
        return single_threaded(xgboost.Booster(model_file=str(path)))
    except xgboost.core.XGBoostError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown error"
        raise ModelCorruptError(f"model {version}: xgboost cannot read {path.name}: {first_line}") from None


def _version_number(version: str) -> int:
    match = VERSION_PATTERN.match(version)
    if not match:
        raise ValueError(f"invalid model version {version!r} (expected m0001 style)")
    return int(match.group(1))


def _rows_to_json(array: np.ndarray) -> list[list[float | None]]:
    """float32 rows as JSON numbers (exact: float32 -> float64 -> float32 round-trips), NaN as None."""
    return [[None if math.isnan(x) else x for x in row] for row in array.astype(np.float64).tolist()]


def _checked_reference(reference: Any, names: list[str]) -> dict[str, Any] | None:
    """The reference as a JSON dict, after checking it parses and covers exactly `names`."""
    if reference is None:
        return None
    data = _jsonable(reference.to_dict() if isinstance(reference, FeatureReference) else reference)
    parsed = FeatureReference.from_dict(data)
    if parsed.names != names:
        raise FeatureSetMismatchError(f"the drift reference describes features {parsed.names} but the feature set lists {names}")
    return data


def _require_keys(what: str, value: Any, keys: tuple[str, ...]) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a dict, got {type(value).__name__}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise ValueError(f"{what} is missing keys {missing}")


def _jsonable(value: Any) -> Any:
    """Plain JSON types (numpy scalars and arrays, tuples converted), so a saved manifest reads back equal."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value
