"""LambdaMART training from graded judgments: candidate windows -> feature rows -> XGBoost.

Training sees what serving sees: every query's rows are the window the serving candidate
generator returns (BM25 top-k union dense top-k, scored exactly), featurised by the one
extraction function (`ltr.features.extract_features`). Unjudged candidates are labelled 0.

Models are staged (`fit_ranker`): the trees learn on top of the window's fused score (XGBoost
`base_margin` = `BaseStage.margin`, the function serving calls too), so zero trees rank exactly
as the fusion. Which fusion is the base is measured on the training queries; the base's scale
and the number of trees are chosen by k-fold cross-validation inside the training queries
(`inner_cross_validation`), never on the split being evaluated. When the trees do not beat
the base there, the model is the base alone (zero trees).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import numpy as np
import xgboost as xgb

from ltr.features import FEATURE_SETS, FeatureSet, extract_features, feature_set
from ltr.registry import (BaseStage, ModelBase, column_indices, first_stage_score, model_stage_contributions,
                          model_stage_predict, predict_contributions, predict_scores, single_threaded, staged_base)
from search.backend import SearchBackend
from search.fusion import CONVEX_WEIGHT_GRID, NORMALISATIONS
from search.hybrid import Candidates, FusionSettings, generate_candidates

if TYPE_CHECKING:
    from ltr.point_in_time import BehaviourHistory

Qrels = Mapping[str, Mapping[str, int]]
EARLY_STOPPING_METRIC = "ndcg@10"
SELECTIONS = ("inner-cv", "holdout")
CI_Z = 1.96  # normal 95% interval of a mean over queries
SMALL_TRAINING_ROWS = 100_000  # below this, training runs on one thread (`TrainingSettings.params_for`)
# Regularisation presets the inner CV chooses between (XGBoost parameters over the settings').
# "default" is the setting cross-validated on SciFact train; "strong" holds small data to
# shallower trees with more evidence per leaf, for datasets of a few hundred queries or fewer.
REGULARISATIONS: dict[str, dict[str, float]] = {
    "default": {},
    "strong": {"max_depth": 4, "min_child_weight": 10.0, "reg_lambda": 10.0},
}


@dataclass(frozen=True)
class TrainingSettings:
    """XGBoost LambdaMART parameters, chosen by 5-fold cross-validation on SciFact *train*
    queries only (`bench/bench_ltr_tuning.py --grid small` then `--grid round2`); the test split
    played no part. Mean held-out nDCG@10: these defaults 0.7860 (`--grid round3`); learning
    rate 0.05 0.7864 but with ~40% more trees, i.e. slower scoring (990 trees on SciFact train:
    7.2 ms p50 for a 328-row window, one thread); with early stopping after 50 flat rounds
    instead of 200, 0.7612 (validation nDCG@10 on ~160 queries is noisy enough to stop a model
    at 5-50 trees); max_depth 8 0.7856 (lr 0.05) / 0.7825 (lr 0.1); 4 0.7427; min_child_weight
    10 0.7654; one pair per sample 0.7530; no row/column sampling 0.7458."""

    learning_rate: float = 0.1
    max_depth: int = 6
    min_child_weight: float = 1.0
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    reg_lambda: float = 1.0
    num_pair_per_sample: int = 8
    max_rounds: int = 1000
    early_stopping_rounds: int = 200
    valid_fraction: float = 0.2
    seed: int = 0
    threads: int = 0  # 0: XGBoost's default (all cores)
    # "inner-cv": staged on the fusion, trees and base scale chosen by k-fold CV inside the
    # training queries (`inner_cross_validation`); "holdout": the former plain model with early
    # stopping on `valid_fraction` of them.
    selection: str = "inner-cv"
    # base = scale x fused score, chosen by the inner CV. On SciFact train scales 1, 4 and 16 were
    # within 0.004 held-out nDCG@10 of each other; on NFCorpus train only 1 let trees help
    # (+0.0066, CI +0.003..+0.010; 4 and 16: no gain). 16 never won, so it is left out.
    base_scales: tuple[float, ...] = (1.0, 4.0)
    regularisations: tuple[str, ...] = ("default", "strong")  # `REGULARISATIONS` the inner CV tries
    cv_folds: int = 0  # 0: the rule of `inner_cv_folds`
    # Inner-CV folds stop this many rounds after their held-out fold's best; the curve averaged
    # over the folds is cut at the shortest fold, so the peak must lie within it.
    cv_patience: int = 100

    def __post_init__(self) -> None:
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"valid fraction must be in [0, 1), got {self.valid_fraction}")
        if self.max_rounds < 1:
            raise ValueError(f"max rounds must be >= 1, got {self.max_rounds}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if not self.base_scales or any(not scale > 0 for scale in self.base_scales):
            raise ValueError(f"base scales must be > 0, got {self.base_scales}")
        if self.cv_folds == 1 or self.cv_folds < 0:
            raise ValueError(f"cv folds must be 0 (automatic) or >= 2, got {self.cv_folds}")
        unknown = [name for name in self.regularisations if name not in REGULARISATIONS]
        if not self.regularisations or unknown:
            raise ValueError(f"regularisations must be among {', '.join(REGULARISATIONS)}, got {list(self.regularisations)}")
        if self.cv_patience < 1:
            raise ValueError(f"cv patience must be >= 1, got {self.cv_patience}")

    def xgboost_params(self) -> dict[str, Any]:
        params = {
            "objective": "rank:ndcg",
            "eval_metric": [EARLY_STOPPING_METRIC],
            "tree_method": "hist",
            "learning_rate": self.learning_rate,
            "max_depth": self.max_depth,
            "min_child_weight": self.min_child_weight,
            "subsample": self.subsample,
            "colsample_bytree": self.colsample_bytree,
            "reg_lambda": self.reg_lambda,
            "lambdarank_pair_method": "topk",
            "lambdarank_num_pair_per_sample": self.num_pair_per_sample,
            "seed": self.seed,
        }
        if self.threads:
            params["nthread"] = self.threads
        return params

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def regularised(self, name: str) -> "TrainingSettings":
        """These settings with a `REGULARISATIONS` preset applied."""
        return replace(self, **{key: type(getattr(self, key))(value) for key, value in REGULARISATIONS[name].items()})

    def params_for(self, rows: int) -> dict[str, Any]:
        """XGBoost parameters for training on `rows` rows: one thread under SMALL_TRAINING_ROWS
        unless `threads` says otherwise. OpenMP's per-round synchronisation dominates small
        folds: the inner CV of a 24-query set took 14 s with all cores of a busy 2-core
        machine, 1.6 s with one."""
        params = self.xgboost_params()
        if not self.threads and rows < SMALL_TRAINING_ROWS:
            params["nthread"] = 1
        return params


@dataclass
class RankingRows:
    """Feature rows of judged queries, grouped by query (contiguous), as XGBoost wants them."""

    query_ids: list[str]
    doc_ids: list[str]
    features: np.ndarray  # float32 [row, feature], NaN = missing
    labels: np.ndarray  # graded relevance, 0 for unjudged
    group_sizes: np.ndarray  # rows per query, in query_ids order
    relevant_outside_window: int = 0  # judged-relevant documents the candidate generator missed
    group_weights: np.ndarray | None = None  # one weight per query (XGBoost ranking weighs groups), None = 1
    # Unscaled first-stage score of every row, per candidate base fusion (`fusion_key`); empty
    # for rows built without windows (clicks), which train plain models.
    first_stage: dict[str, np.ndarray] = field(default_factory=dict)

    def base(self, stage: BaseStage | None) -> np.ndarray | None:
        """Every row's base margin under `stage` (None: a plain model)."""
        if stage is None:
            return None
        key = fusion_key(stage.fusion)
        if key not in self.first_stage:
            raise ValueError(f"these rows carry no first-stage score for {key}; they have {sorted(self.first_stage)}")
        return stage.scaled(self.first_stage[key])

    def columns(self, indices: np.ndarray) -> "RankingRows":
        """The same rows with only these feature columns (a model stage's trees read a subset)."""
        return replace(self, features=np.ascontiguousarray(self.features[:, indices]))

    def select(self, query_ids: Iterable[str]) -> "RankingRows":
        wanted = set(query_ids)
        starts = np.concatenate(([0], np.cumsum(self.group_sizes)))
        keep_queries = [i for i, q in enumerate(self.query_ids) if q in wanted]
        rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in keep_queries]) if keep_queries else np.empty(0, int)
        return RankingRows(
            query_ids=[self.query_ids[i] for i in keep_queries],
            doc_ids=[self.doc_ids[r] for r in rows.tolist()],
            features=self.features[rows], labels=self.labels[rows], group_sizes=self.group_sizes[keep_queries],
            group_weights=None if self.group_weights is None else self.group_weights[keep_queries],
            first_stage={key: values[rows] for key, values in self.first_stage.items()},
        )

    def dmatrix(self, feature_names: Iterable[str], stage: BaseStage | None = None,
                margin: np.ndarray | None = None) -> xgb.DMatrix:
        """XGBoost's matrix of these rows, with a staged model's base margin: `stage`'s, or an
        explicit `margin` (one per row, e.g. a frozen model's scores)."""
        matrix = xgb.DMatrix(self.features, label=self.labels, missing=np.nan, feature_names=list(feature_names))
        matrix.set_group(self.group_sizes)
        if margin is None and stage is not None:
            margin = self.base(stage)
        if margin is not None:
            matrix.set_base_margin(np.asarray(margin, dtype=np.float32))
        if self.group_weights is not None:
            matrix.set_weight(np.asarray(self.group_weights, dtype=np.float32))
        return matrix

    def fingerprint(self) -> str:
        """What the model was trained on, in 16 hex digits: query ids, documents, labels (and
        group weights when there are any)."""
        digest = hashlib.sha256()
        for q in self.query_ids:
            digest.update(q.encode() + b"\0")
        digest.update(json.dumps(self.doc_ids).encode())
        digest.update(self.labels.astype(np.float32).tobytes())
        if self.group_weights is not None:
            digest.update(np.asarray(self.group_weights, dtype=np.float32).tobytes())
        return digest.hexdigest()[:16]


def candidate_window(backend: SearchBackend, query: str, fusion: FusionSettings) -> Candidates:
    """The window a learned ranker scores, at training and at serving time alike."""
    return generate_candidates(backend, query, fusion.bm25_candidates, fusion.dense_candidates, exact=True)


def base_fusions(fusion: FusionSettings) -> list[FusionSettings]:
    """The fusions a model may be staged on: convex fusion at every weight and normalisation of
    the `hybrid-tuned` grid (min-max 0.5/0.5 first), RRF (k=60), and the configured fusion when it
    is another. Which one is chosen by its nDCG@10 on the training queries
    (`choose_base_fusion`), as `hybrid-tuned` chooses its own: with zero trees a model is at least
    the tuned fusion, never a fixed one that a dataset does not suit."""
    window = {"bm25_candidates": fusion.bm25_candidates, "dense_candidates": fusion.dense_candidates}
    candidates = [FusionSettings(method="convex", **window)]
    candidates += [FusionSettings(method="convex", dense_weight=weight, normalisation=normalisation, **window)
                   for normalisation in NORMALISATIONS for weight in CONVEX_WEIGHT_GRID
                   if (normalisation, weight) != ("min-max", 0.5)]
    candidates.append(FusionSettings(method="rrf", **window))
    return candidates + ([fusion] if fusion_key(fusion) not in {fusion_key(c) for c in candidates} else [])


def fusion_key(fusion: FusionSettings) -> str:
    """A fusion's name in `RankingRows.first_stage` (the settings that change its scores)."""
    if fusion.method == "rrf":
        return f"rrf k={fusion.rrf_k:g}"
    return f"convex {fusion.normalisation} dense={fusion.dense_weight:g}"


def first_stage_columns(window: Candidates, fusion: FusionSettings) -> dict[str, np.ndarray]:
    """Every candidate base fusion's unscaled score of a window's rows (`BaseStage.margin` scales
    it), as float32: the base margin XGBoost trains on is float32 anyway, and a training set
    carries one column per candidate fusion."""
    return {fusion_key(f): first_stage_score(window, f).astype(np.float32) for f in base_fusions(fusion)}


def concat_first_stage(blocks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([b[key] for b in blocks]) for key in blocks[0]} if blocks else {}


def build_rows(
    backend: SearchBackend, queries: Mapping[str, str], qrels: Qrels, features: FeatureSet, fusion: FusionSettings,
    progress: Callable[[Iterable], Iterable] = lambda items: items, behaviour: Any = None,
) -> RankingRows:
    """One group of rows per query, labelled from qrels (graded; unjudged = 0). `behaviour`: the
    view behaviour features are read from (None: their no-history values)."""
    query_ids, doc_ids, blocks, labels, sizes, first = [], [], [], [], [], []
    missed = 0
    for query_id in progress(list(queries)):
        window = candidate_window(backend, queries[query_id], fusion)
        grades, outside = window_labels(window, qrels.get(query_id, {}))
        missed += outside
        query_ids.append(query_id)
        doc_ids += window.doc_ids
        blocks.append(extract_features(backend, queries[query_id], window, features, behaviour))
        first.append(first_stage_columns(window, fusion))
        labels.append(grades)
        sizes.append(len(window))
    width = len(features.features)
    return RankingRows(
        query_ids=query_ids, doc_ids=doc_ids,
        features=np.concatenate(blocks) if blocks else np.empty((0, width), np.float32),
        labels=np.concatenate(labels) if labels else np.empty(0, np.float32),
        group_sizes=np.array(sizes, dtype=np.int64), relevant_outside_window=missed,
        first_stage=concat_first_stage(first),
    )


def window_labels(window: Candidates, judged: Mapping[str, int]) -> tuple[np.ndarray, int]:
    """Graded labels of a window's candidates (unjudged and negative grades = 0), and how many
    judged-relevant documents the window missed."""
    grades = np.array([max(judged.get(d, 0), 0) for d in window.doc_ids], dtype=np.float32)
    return grades, sum(1 for g in judged.values() if g > 0) - int((grades > 0).sum())


def split_queries(query_ids: list[str], valid_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded random hold-out of training queries for early stopping (train, valid)."""
    if valid_fraction == 0 or len(query_ids) < 2:
        return list(query_ids), []
    order = np.random.default_rng(seed).permutation(len(query_ids))
    n_valid = max(1, int(round(valid_fraction * len(query_ids))))
    valid = {query_ids[i] for i in order[:n_valid].tolist()}
    return [q for q in query_ids if q not in valid], [q for q in query_ids if q in valid]


@dataclass
class TrainedRanker:
    booster: xgb.Booster  # trimmed to the best iteration
    feature_names: tuple[str, ...]
    best_iteration: int  # -1: zero trees (a staged model that is its base alone)
    history: dict[str, list[float]] = field(default_factory=dict)  # per-round metrics
    seconds: float = 0.0
    stage: BaseStage | None = None  # the base the trees add to (None: a plain model)
    inner_cv: "InnerCv | None" = None  # the evidence the trees and the base were chosen on
    params: dict[str, Any] = field(default_factory=dict)  # the XGBoost parameters the trees were trained with
    # A model stage (a behaviour model on a frozen text model): the trees read `link.columns` of
    # rows laid out as `row_names` and add to `base_model`'s score (`ltr.registry.ModelBase`).
    link: ModelBase | None = None
    base_model: Any = None  # the frozen base's scoring model (`predict(features, margin)`, `stage`)
    row_names: tuple[str, ...] = ()  # the model's whole feature set (trees and base read from it)

    @property
    def trees(self) -> int:
        return self.best_iteration + 1

    @property
    def valid_score(self) -> float | None:
        """Validation nDCG@10 at the best iteration (None without a validation set)."""
        values = self.history.get(f"valid {EARLY_STOPPING_METRIC}")
        return float(values[self.best_iteration]) if values and self.best_iteration >= 0 else None

    def importance(self) -> dict[str, float]:
        """Total gain per feature (features never split on get 0), largest first."""
        gain = self.booster.get_score(importance_type="total_gain")
        scores = {name: float(gain.get(name, 0.0)) for name in self.feature_names}
        return dict(sorted(scores.items(), key=lambda item: -item[1]))


@dataclass
class InMemoryModel:
    """A model fitted in this process (e.g. by `ltr-search eval`), not stored in the registry."""

    trained: TrainedRanker
    version: str = "unsaved"

    @property
    def stage(self) -> BaseStage | None:
        if self.trained.link is not None:  # a model stage: its frozen base model's first stage
            return self.trained.base_model.stage
        return self.trained.stage

    def predict(self, features: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
        trained = self.trained
        if trained.link is not None:
            return model_stage_predict(trained.link, trained.booster, trained.base_model, trained.row_names,
                                       features, base)
        return predict_scores(trained.booster, list(trained.feature_names), features,
                              staged_base(self.stage, base, self.version))

    def contributions(self, features: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
        trained = self.trained
        if trained.link is not None:
            return model_stage_contributions(trained.link, trained.booster, trained.base_model, trained.row_names,
                                             features, base)
        return predict_contributions(trained.booster, list(trained.feature_names), features,
                                     staged_base(self.stage, base, self.version))


def train_ranker(rows: RankingRows, feature_names: tuple[str, ...], settings: TrainingSettings,
                 valid: RankingRows | None = None, log: Callable[[str], None] | None = None,
                 extra_params: Mapping[str, Any] | None = None, stage: BaseStage | None = None,
                 rounds: int | None = None, margin_column: str | None = None) -> TrainedRanker:
    """LambdaMART (`rank:ndcg`) with early stopping on `valid` when given. `rows.group_weights`
    (one per group) weigh the groups; `extra_params` are added to (and override) the settings'
    XGBoost parameters, e.g. position debiasing (`lambdarank_unbiased`). With a `stage` the
    trees learn on top of its base margin; `rounds` fixes the number of trees (0 allowed with a
    stage: the model is its base) instead of early stopping. `margin_column` (a key of
    `rows.first_stage`) is an explicit base margin per row instead of the stage's (a model stage)."""
    started = time.perf_counter()
    learnable = _with_relevant(rows)
    if not len(learnable.query_ids):
        raise ValueError("no training query has a relevant document among its candidates; nothing to learn")
    staged = stage is not None or margin_column is not None
    if rounds is not None and (rounds < (0 if staged else 1)):
        raise ValueError(f"rounds must be >= {0 if staged else 1}, got {rounds}")
    train_matrix = learnable.dmatrix(feature_names, stage,
                                     margin=learnable.first_stage[margin_column] if margin_column else None)
    evals = [(train_matrix, "train")]
    valid_learnable = _with_relevant(valid) if valid is not None and rounds is None else None
    if valid_learnable is not None and len(valid_learnable.query_ids):
        evals.append((valid_learnable.dmatrix(feature_names, stage), "valid"))
    history: dict[str, dict[str, list[float]]] = {}
    callbacks = []
    if log is not None:
        callbacks.append(_LogEvery(100, log))
    params = {**settings.params_for(len(learnable.labels)), **(extra_params or {})}
    booster = xgb.train(
        params, train_matrix,
        num_boost_round=settings.max_rounds if rounds is None else rounds, evals=evals,
        early_stopping_rounds=settings.early_stopping_rounds if len(evals) > 1 else None,
        evals_result=history, verbose_eval=False, callbacks=callbacks,
    )
    if rounds is not None:
        best = rounds - 1
    else:
        best = int(booster.best_iteration) if len(evals) > 1 else settings.max_rounds - 1
    trimmed = single_threaded(booster[: best + 1] if best >= 0 else booster)
    flat = {f"{data} {metric}": values for data, metrics in history.items() for metric, values in metrics.items()}
    return TrainedRanker(trimmed, tuple(feature_names), best, flat, time.perf_counter() - started, stage,
                         params={k: v for k, v in params.items() if k != "nthread"})


def inner_cv_folds(queries: int) -> int:
    """How many folds the inner cross-validation uses: 5 under 1,000 training queries, else 3.

    With few queries every held-out query counts: 5 folds train on 80% of them and score every
    query once, so the per-query gain has as many pairs as there are queries (a 20% hold-out
    scored 160 of SciFact's 809 and stopped models anywhere between 2 and 207 trees). From 1,000
    queries a fold of a third holds 300+ queries, enough for a steady curve, at 60% of the
    training cost of 5 folds."""
    return 5 if queries < 1000 else 3


@dataclass
class InnerCv:
    """What the inner cross-validation chose and the evidence for it (held-out nDCG@10 over the
    training queries' folds, per query against the base stage)."""

    stage: BaseStage | None  # the first stage (None: a model stage on a plain text model)
    rounds: int  # trees of the final model (0: the base alone)
    best_rounds: int  # where the mean held-out curve peaked (kept only when its gain is positive)
    gain: float  # mean per-query held-out nDCG@10 of base + trees minus the base's
    ci: tuple[float, float]  # 95% CI of that mean over queries
    folds: int
    queries: int  # held-out queries scored (those with a relevant document in the window)
    base_ndcg: float
    model_ndcg: float
    fusions: dict[str, float]  # base fusion -> nDCG@10 on the training queries (the choice of base)
    grid: dict[str, dict[str, float]]  # "x4 default" (scale, regularisation) -> best mean held-out value, its rounds
    regularisation: str = "default"  # the chosen `REGULARISATIONS` preset
    seconds: float = 0.0
    base: str = "fusion"  # what the gain is measured against: the fusion, or a model stage's frozen text model

    @property
    def positive(self) -> bool:
        return self.rounds > 0

    def to_dict(self) -> dict[str, Any]:
        """The manifest's `training.inner_cv` (the promotion gate reads gain, ci, folds, rounds)."""
        return {"gain": self.gain, "ci": list(self.ci), "folds": self.folds, "rounds": self.rounds,
                "best_rounds": self.best_rounds, "queries": self.queries, "base_ndcg@10": self.base_ndcg,
                "model_ndcg@10": self.model_ndcg, "stage": self.stage.to_dict() if self.stage is not None else None,
                "base": self.base, "fusions": self.fusions,
                "grid": self.grid, "regularisation": self.regularisation, "metric": "nDCG@10 (within the window, gain 2^rel - 1)",
                "seconds": round(self.seconds, 2)}


def ndcg_at_10(labels: np.ndarray, scores: np.ndarray) -> float:
    """nDCG@10 of one group within its window (gain 2^rel - 1, ties in window order), the
    per-query measure of the inner CV; 0 for a group with no relevant row."""
    k = 10
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    gains = np.power(2.0, labels.astype(np.float64)) - 1.0
    ideal = np.sort(gains)[::-1][:k]
    best = float(ideal @ discounts[: len(ideal)])
    if best <= 0:
        return 0.0
    top = gains[np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]]
    return float(top @ discounts[: len(top)]) / best


def group_ndcg(rows: RankingRows, scores: np.ndarray) -> np.ndarray:
    starts = np.concatenate(([0], np.cumsum(rows.group_sizes)))
    return np.array([ndcg_at_10(rows.labels[a:b], scores[a:b]) for a, b in zip(starts[:-1], starts[1:])])


def choose_base_fusion(rows: RankingRows, fusion: FusionSettings) -> tuple[FusionSettings, dict[str, float]]:
    """The candidate base fusion (`base_fusions`, those the rows carry a score of) with the best
    mean nDCG@10 on these (training) rows; no training involved, so no fold is needed. Ties keep
    the first candidate (convex min-max 0.5)."""
    candidates = [f for f in base_fusions(fusion) if fusion_key(f) in rows.first_stage]
    if not candidates:
        raise ValueError(f"these rows carry no first-stage score of a candidate base fusion; they have {sorted(rows.first_stage)}")
    scores = {fusion_key(f): float(group_ndcg(rows, rows.first_stage[fusion_key(f)]).mean()) for f in candidates}
    best = max(candidates, key=lambda f: scores[fusion_key(f)])
    return best, scores


def inner_folds(learnable: RankingRows, settings: TrainingSettings, purpose: str) -> tuple[list[str], list[list[str]]]:
    """The training queries (with a relevant candidate) and their seeded inner-CV folds: the one
    split the inner CV, the model stage's CV and cross-fitting all use."""
    query_ids = list(dict.fromkeys(learnable.query_ids))
    if len(query_ids) < 2:
        raise ValueError(f"{purpose} needs at least 2 training queries with a relevant candidate, got {len(query_ids)}")
    folds = min(settings.cv_folds or inner_cv_folds(len(query_ids)), len(query_ids))
    return query_ids, _fold_ids(query_ids, folds, settings.seed)


def _fold_ids(query_ids: list[str], folds: int, seed: int) -> list[list[str]]:
    order = np.random.default_rng(seed).permutation(len(query_ids))
    dealt: list[list[str]] = [[] for _ in range(folds)]
    for position, i in enumerate(order.tolist()):
        dealt[position % folds].append(query_ids[i])
    return dealt


def _eval_value(booster: xgb.Booster, matrix: xgb.DMatrix) -> float:
    """XGBoost's own metric (the curve's) of `booster` on `matrix`: '[0]\tvalid-ndcg@10:0.71'."""
    return float(booster.eval(matrix, "valid").rsplit(":", 1)[1])


def inner_cross_validation(rows: RankingRows, feature_names: tuple[str, ...], settings: TrainingSettings,
                           fusion: FusionSettings, log: Callable[[str], None] | None = None) -> InnerCv:
    """Choose the base fusion (its nDCG@10 on the training rows), then the base scale, the
    regularisation and the number of trees by k-fold cross-validation grouped by query, inside
    these training rows.

    Per (scale, regularisation), each fold trains on the other folds with its held-out fold as
    the early-stopping watch (patience `cv_patience`, at most `max_rounds`); the folds' held-out
    curves (XGBoost nDCG@10, round 0 = the base alone) are averaged, weighted by queries, and the
    highest peak gives the configuration and the trees. The gain is then measured per held-out
    query at that number of trees against the base (mean and 95% CI over queries). Unless the
    whole CI is above 0 the model keeps zero trees: it is its base. (The CI, not the mean: the
    peak of a noisy curve is above its start by chance; with noise-only features the mean gain at
    the peak was +0.02.) Seeded (`settings.seed`): the same rows give the same choice. The trees
    are picked on the same folds the gain is measured on, so the gain is slightly optimistic;
    the promotion gate's held-out split is the unbiased check."""
    started = time.perf_counter()
    learnable = _with_relevant(rows)
    query_ids, held_out = inner_folds(learnable, settings, "inner cross-validation")
    folds = len(held_out)
    base_fusion, fusions = choose_base_fusion(learnable, fusion)
    parts = [(learnable.select(set(query_ids) - set(ids)), learnable.select(ids)) for ids in held_out]
    margins = {f"x{scale:g}": (lambda part, stage=BaseStage(base_fusion, scale): part.base(stage)) for scale in settings.base_scales}
    search = _grid_search(parts, feature_names, settings, margins, log)
    stage = BaseStage(base_fusion, settings.base_scales[search.margin_index])
    return InnerCv(stage, search.kept, search.rounds, search.gain, search.ci, folds, search.queries, search.base_ndcg,
                   search.model_ndcg, fusions, search.grid, search.regularisation, time.perf_counter() - started)


@dataclass
class GridSearch:
    """The inner CV's choice among (base margin, regularisation) and its per-query evidence."""

    margin_index: int  # which of the margins
    regularisation: str
    rounds: int  # the peak of the mean held-out curve
    kept: int  # trees kept: `rounds` when the gain's CI is above 0, else 0
    gain: float
    ci: tuple[float, float]
    queries: int
    base_ndcg: float
    model_ndcg: float
    grid: dict[str, dict[str, float]]


def _lockstep_curve(params: dict[str, Any], matrices: list[tuple[xgb.DMatrix, xgb.DMatrix]], weights: list[int],
                    max_rounds: int, patience: int) -> tuple[np.ndarray, list[xgb.Booster]]:
    """Train every fold one round at a time, all folds together, and stop when the mean held-out
    curve (weighted by queries; entry 0 = the base alone) has not improved for `patience` rounds:
    early stopping on the quantity the trees are chosen by, not per fold (a fold that stopped
    early would cut every fold's curve short: with per-fold patience 100 the SciFact curve
    peaked at 203 trees, 0.011 below the 421-tree peak that patience 200 found)."""
    boosters = [xgb.Booster(params, [train, valid]) for train, valid in matrices]
    mean = [float(np.average([_eval_value(booster, valid) for booster, (_, valid) in zip(boosters, matrices)],
                             weights=weights))]
    best = 0
    for round_ in range(max_rounds):
        for booster, (train, _) in zip(boosters, matrices):
            booster.update(train, round_)
        mean.append(float(np.average([_eval_value(b, valid) for b, (_, valid) in zip(boosters, matrices)], weights=weights)))
        if mean[-1] > mean[best]:
            best = len(mean) - 1
        elif len(mean) - 1 - best >= patience:
            break
    return np.array(mean), boosters


def _grid_search(parts: list[tuple[RankingRows, RankingRows]], feature_names: tuple[str, ...], settings: TrainingSettings,
                 margins: dict[str, Callable[[RankingRows], np.ndarray]],
                 log: Callable[[str], None] | None = None) -> GridSearch:
    """K-fold CV over (base margin, regularisation): per configuration each fold trains on the
    others with its held-out fold as the early-stopping watch (patience `cv_patience`); the
    folds' held-out curves (round 0 = the base alone) are averaged, weighted by queries, and the
    highest peak wins. Its gain over the base is then measured per held-out query (mean, 95% CI);
    trees are kept only when the whole CI is above 0."""
    rows = len(parts[0][0].labels) + len(parts[0][1].labels)  # every row is in fold 0's train or held-out part
    best: tuple[float, int, str, int, list[xgb.Booster]] | None = None  # (value, margin, regularisation, rounds, boosters)
    grid: dict[str, dict[str, float]] = {}
    for index, (label, margin_of) in enumerate(margins.items()):
        matrices = [(train.dmatrix(feature_names, margin=margin_of(train)), valid.dmatrix(feature_names, margin=margin_of(valid)))
                    for train, valid in parts]
        weights = [len(valid.query_ids) for _, valid in parts]
        for regularisation in settings.regularisations:
            params = settings.regularised(regularisation).params_for(rows)
            mean, boosters = _lockstep_curve(params, matrices, weights, settings.max_rounds, settings.cv_patience)
            rounds = int(np.argmax(mean))
            grid[f"{label} {regularisation}"] = {"held_out_ndcg@10": float(mean[rounds]), "rounds": rounds, "base": float(mean[0])}
            if log is not None:
                log(f"inner CV, base {label}, {regularisation} regularisation: held-out nDCG@10 {mean[0]:.4f} (base) "
                    f"-> {mean[rounds]:.4f} at {rounds} trees")
            if best is None or mean[rounds] > best[0]:
                best = (float(mean[rounds]), index, regularisation, rounds, boosters)
    assert best is not None
    _, index, regularisation, rounds, boosters = best
    margin_of = list(margins.values())[index]
    base_scores, model_scores = [], []
    for (_, valid), booster in zip(parts, boosters):
        base = np.asarray(margin_of(valid), dtype=np.float64)
        predicted = booster.predict(valid.dmatrix(feature_names, margin=base), iteration_range=(0, rounds)) if rounds else base
        base_scores.append(group_ndcg(valid, base))
        model_scores.append(group_ndcg(valid, np.asarray(predicted, dtype=np.float64)))
    base_ndcg, model_ndcg = np.concatenate(base_scores), np.concatenate(model_scores)
    gains = model_ndcg - base_ndcg
    gain = float(gains.mean())
    half = CI_Z * float(gains.std(ddof=1)) / np.sqrt(len(gains)) if len(gains) > 1 else float("inf")
    kept = rounds if gain - half > 0 else 0  # the CI must exclude "no gain": the peak was picked on these folds
    return GridSearch(index, regularisation, rounds, kept, gain, (gain - half, gain + half), len(gains),
                      float(base_ndcg.mean()), float(model_ndcg.mean()), grid)


def cross_fitted_margin(rows: RankingRows, row_names: tuple[str, ...], text_rows: RankingRows, text_names: tuple[str, ...],
                        base_model: Any, settings: TrainingSettings, log: Callable[[str], None] | None = None) -> np.ndarray:
    """The text stage's score of every row of `rows` as it would be on an unseen query: the
    training queries are split into the inner-CV folds and each fold's rows are scored by a text
    model trained, with the base model's recipe (first stage, regularisation, number of trees), on
    the other folds (`text_rows`: one group per query). Serving scores new queries, which the text
    model never saw; a behaviour stage trained on in-sample text scores (SciFact train: held-out
    nDCG@10 0.9997 for the text model on its own queries) would find nothing left to learn.
    Queries in no fold (no relevant candidate) keep the base model's own score."""
    stage, regularisation, rounds = _recipe(base_model)
    text_at = column_indices(list(row_names), text_names)
    base = rows.base(stage) if stage is not None else None
    margin = np.asarray(base_model.predict(rows.features[:, text_at], base), dtype=np.float64)
    if rounds == 0:  # the base is its first stage alone: nothing fitted, nothing to cross-fit
        return margin
    learnable = _with_relevant(text_rows)
    query_ids, held_out = inner_folds(learnable, settings, "cross-fitting")
    folds = len(held_out)
    row_query = np.repeat(np.array(rows.query_ids, dtype=object), rows.group_sizes)
    for k, held in enumerate(held_out):
        trained = train_ranker(learnable.select(set(query_ids) - set(held)), text_names, settings.regularised(regularisation),
                               stage=stage, rounds=rounds)
        mask = np.isin(row_query, held)
        if mask.any():
            margin[mask] = InMemoryModel(trained).predict(rows.features[mask][:, text_at], None if base is None else base[mask])
        if log is not None:
            log(f"cross-fitted text scores: fold {k + 1} of {folds} ({len(held)} queries)")
    return margin


def _recipe(base_model: Any) -> tuple[BaseStage | None, str, int]:
    """How a text model was trained (first stage, regularisation, trees): from its inner-CV
    record, in memory (`InMemoryModel`) or in the registry (`LoadedModel`)."""
    if hasattr(base_model, "trained"):
        trained = base_model.trained
        cv = trained.inner_cv
        return trained.stage, cv.regularisation if cv is not None else "default", trained.trees
    manifest = base_model.manifest
    return manifest.base_stage, (manifest.training.get("inner_cv") or {}).get("regularisation", "default"), manifest.trees


MODEL_BASE_COLUMN = "base model"  # `RankingRows.first_stage` key of a frozen base model's scores


def fit_model_stage(rows: RankingRows, row_names: tuple[str, ...], tree_columns: tuple[str, ...], base_model: Any,
                    base_feature_set: dict[str, Any], cold_row: np.ndarray, settings: TrainingSettings,
                    log: Callable[[str], None] | None = None, margin: np.ndarray | None = None) -> TrainedRanker:
    """Trees on `tree_columns` (the behaviour features) on top of a frozen model's scores: the
    base margin of every row is `base_model`'s score of its own columns and first stage. The
    regularisation and the trees are chosen by the inner CV as for a text model; without a gain
    whose CI is above 0 the stage keeps zero trees and ranks exactly as its base. The returned
    ranker's `link` records the base (version "unsaved" until the base is in the registry).
    `margin` (one per row) replaces the base model's own scores as the training margin: the
    cross-fitted scores of `cross_fitted_margin`, since a base trained on these very queries
    scores them near perfectly and would leave the behaviour trees nothing to learn."""
    started = time.perf_counter()
    text_at, tree_at = column_indices(list(row_names), base_feature_set["features"]), column_indices(list(row_names), tree_columns)
    stage = base_model.stage
    if margin is None:
        margin = base_model.predict(rows.features[:, text_at], rows.base(stage) if stage is not None else None)
    staged = replace(rows, first_stage={**rows.first_stage, MODEL_BASE_COLUMN: np.asarray(margin, dtype=np.float64)})
    trees = staged.columns(tree_at)
    learnable = _with_relevant(trees)
    query_ids, held_out = inner_folds(learnable, settings, "a model stage")
    folds = len(held_out)
    parts = [(learnable.select(set(query_ids) - set(ids)), learnable.select(ids)) for ids in held_out]
    search = _grid_search(parts, tree_columns, settings, {"text model": lambda part: part.first_stage[MODEL_BASE_COLUMN]}, log)
    trained = train_ranker(trees, tree_columns, settings.regularised(search.regularisation), log=log,
                           rounds=search.kept, margin_column=MODEL_BASE_COLUMN)
    cold = np.asarray(cold_row, dtype=np.float32)
    trained.link = ModelBase("unsaved", base_feature_set, tuple(tree_columns), tuple(float(x) for x in cold))
    trained.base_model = base_model
    trained.row_names = tuple(row_names)
    trained.stage = stage
    trained.inner_cv = InnerCv(stage, search.kept, search.rounds, search.gain, search.ci, folds, search.queries,
                               search.base_ndcg, search.model_ndcg, {}, search.grid, search.regularisation,
                               time.perf_counter() - started, base="text model")
    trained.seconds = time.perf_counter() - started
    return trained


@dataclass
class FittedRanker:
    """A trained ranker and what it was trained from (rows, query split, feature time)."""

    rows: RankingRows
    trained: TrainedRanker
    train_ids: list[str]
    valid_ids: list[str]
    feature_seconds: float
    # A model stage's text model when `fit_ranker` trained it too (to be saved first); None when
    # the caller gave the base (`base_model`) or the model is not a model stage.
    base_fit: "FittedRanker | None" = None


def fit_ranker(
    backend: SearchBackend, queries: Mapping[str, str], qrels: Qrels, features: FeatureSet, fusion: FusionSettings,
    settings: TrainingSettings, progress: Callable[[Iterable], Iterable] = lambda items: items,
    log: Callable[[str], None] | None = None, history: "BehaviourHistory | None" = None,
    base_model: Any = None, base_feature_set: dict[str, Any] | None = None,
) -> FittedRanker:
    """Rows from the serving window, then LambdaMART: what `ltr-search train` and the `ltr`
    pipeline of `ltr-search eval` both run. With `settings.selection` "inner-cv" (the default)
    the model is staged on a fusion, its scale and trees chosen by `inner_cross_validation` and
    the final trees trained on every training query; with "holdout" a plain model stops early on
    a seeded hold-out. A feature set with behaviour features takes its rows point in time from
    `history` (without one: no history, every behaviour feature at its cold-start value).

    With "inner-cv", a feature set with behaviour features is trained as a model stage
    (`fit_model_stage`): its behaviour trees add to a frozen text model, `base_model` (with its
    `base_feature_set`) when given, else a text model fitted here first on the set's text
    columns (returned as `base_fit`). A query with no history then ranks exactly as the text model."""
    from ltr.features import uses_behaviour
    from ltr.point_in_time import point_in_time_rows

    base_fit = None
    if settings.selection == "inner-cv" and uses_behaviour(features):
        text = text_part(features)
        if base_model is None:
            if log is not None:
                log(f"stage 1 of 2: the text model ({text.name}, {len(text.names)} features) the behaviour trees add to")
            base_fit = fit_ranker(backend, queries, qrels, text, fusion, settings, progress, log)
            base_model, base_feature_set = InMemoryModel(base_fit.trained), text.describe()
            if log is not None:
                log("stage 2 of 2: behaviour trees on top of the frozen text model")
        elif base_feature_set is None:
            raise ValueError("a base model needs its feature set (base_feature_set)")
    started = time.perf_counter()
    if history is not None and uses_behaviour(features):
        rows = point_in_time_rows(backend, queries, qrels, features, lambda text: candidate_window(backend, text, fusion),
                                  history.event_store, history.propensities, history.moments_per_query,
                                  settings.seed, progress=progress, fusion=fusion)
    else:
        rows = build_rows(backend, queries, qrels, features, fusion, progress=progress)
    feature_seconds = time.perf_counter() - started
    if log is not None:
        rate = len(rows.labels) / feature_seconds if feature_seconds else float("nan")
        log(f"features: {len(rows.labels):,} (query, document) pairs in {feature_seconds:.1f} s ({rate:,.0f} pairs/s); "
            f"{rows.relevant_outside_window} relevant documents fell outside the candidate window")
    if base_model is not None and base_feature_set is not None:
        first = next(iter(queries), None)
        if first is None:
            raise ValueError("no training query")
        cold = extract_features(backend, queries[first], candidate_window(backend, queries[first], fusion), features)[:1]
        columns = tuple(f.name for f in features.features if f.group == "behaviour")
        cold_row = cold[0, column_indices(list(features.names), columns)]
        text = feature_set(base_feature_set["name"]) if base_feature_set["name"] in FEATURE_SETS else text_part(features)
        text_rows = base_fit.rows if base_fit is not None else build_rows(backend, queries, qrels, text, fusion)
        margin = cross_fitted_margin(rows, features.names, text_rows, tuple(base_feature_set["features"]), base_model,
                                     settings, log)
        trained = fit_model_stage(rows, features.names, columns, base_model, base_feature_set, cold_row, settings, log,
                                  margin=margin)
        return FittedRanker(rows, trained, list(dict.fromkeys(rows.query_ids)), [], feature_seconds, base_fit)
    if settings.selection == "inner-cv":
        chosen = inner_cross_validation(rows, features.names, settings, fusion, log=log)
        trained = train_ranker(rows, features.names, settings.regularised(chosen.regularisation), log=log,
                               stage=chosen.stage, rounds=chosen.rounds)
        trained.inner_cv = chosen
        trained.seconds += chosen.seconds
        return FittedRanker(rows, trained, list(dict.fromkeys(rows.query_ids)), [], feature_seconds)
    train_ids, valid_ids = split_queries(list(dict.fromkeys(rows.query_ids)), settings.valid_fraction, settings.seed)
    trained = train_ranker(rows.select(train_ids), features.names, settings, rows.select(valid_ids), log=log)
    return FittedRanker(rows, trained, train_ids, valid_ids, feature_seconds)


def text_part(features: FeatureSet) -> FeatureSet:
    """A set's features without the behaviour group: the registered set with exactly those
    columns (`text` for `text+behaviour`), else the ablation `NAME-without-behaviour`."""
    kept = tuple(f.name for f in features.features if f.group != "behaviour")
    return next((fs for fs in FEATURE_SETS.values() if fs.names == kept), None) or features.without_group("behaviour")


def _with_relevant(rows: RankingRows) -> RankingRows:
    """Queries whose window holds at least one relevant document (the others give LambdaMART
    no pair to learn from and only dilute its metric)."""
    starts = np.concatenate(([0], np.cumsum(rows.group_sizes)))
    keep = [q for i, q in enumerate(rows.query_ids) if rows.labels[starts[i]:starts[i + 1]].max(initial=0) > 0]
    return rows.select(keep)


class _LogEvery(xgb.callback.TrainingCallback):
    def __init__(self, every: int, log: Callable[[str], None]):
        self.every, self.log = every, log

    def after_iteration(self, model, epoch: int, evals_log) -> bool:
        if (epoch + 1) % self.every == 0:
            parts = [f"{data} {metric} {values[-1]:.4f}" for data, metrics in evals_log.items() for metric, values in metrics.items()]
            self.log(f"round {epoch + 1}: " + ", ".join(parts))
        return False
