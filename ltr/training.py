"""LambdaMART training from graded judgments: candidate windows -> feature rows -> XGBoost.

Training sees what serving sees: every query's rows are the window the serving candidate
generator returns (BM25 top-k union dense top-k, scored exactly), featurised by the one
extraction function (`ltr.features.extract_features`). Unjudged candidates are labelled 0.
Early stopping watches nDCG@10 on queries held out of the training queries, never on the
split being evaluated.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import numpy as np
import xgboost as xgb

from ltr.features import FeatureSet, extract_features
from ltr.registry import single_threaded
from search.backend import SearchBackend
from search.hybrid import Candidates, FusionSettings, generate_candidates

if TYPE_CHECKING:
    from ltr.point_in_time import BehaviourHistory

Qrels = Mapping[str, Mapping[str, int]]
EARLY_STOPPING_METRIC = "ndcg@10"


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

    def __post_init__(self) -> None:
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"valid fraction must be in [0, 1), got {self.valid_fraction}")
        if self.max_rounds < 1:
            raise ValueError(f"max rounds must be >= 1, got {self.max_rounds}")

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
        )

    def dmatrix(self, feature_names: Iterable[str]) -> xgb.DMatrix:
        matrix = xgb.DMatrix(self.features, label=self.labels, missing=np.nan, feature_names=list(feature_names))
        matrix.set_group(self.group_sizes)
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


def build_rows(
    backend: SearchBackend, queries: Mapping[str, str], qrels: Qrels, features: FeatureSet, fusion: FusionSettings,
    progress: Callable[[Iterable], Iterable] = lambda items: items,
) -> RankingRows:
    """One group of rows per query, labelled from qrels (graded; unjudged = 0)."""
    query_ids, doc_ids, blocks, labels, sizes = [], [], [], [], []
    missed = 0
    for query_id in progress(list(queries)):
        window = candidate_window(backend, queries[query_id], fusion)
        grades, outside = window_labels(window, qrels.get(query_id, {}))
        missed += outside
        query_ids.append(query_id)
        doc_ids += window.doc_ids
        blocks.append(extract_features(backend, queries[query_id], window, features))
        labels.append(grades)
        sizes.append(len(window))
    width = len(features.features)
    return RankingRows(
        query_ids=query_ids, doc_ids=doc_ids,
        features=np.concatenate(blocks) if blocks else np.empty((0, width), np.float32),
        labels=np.concatenate(labels) if labels else np.empty(0, np.float32),
        group_sizes=np.array(sizes, dtype=np.int64), relevant_outside_window=missed,
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
    best_iteration: int
    history: dict[str, list[float]] = field(default_factory=dict)  # per-round metrics
    seconds: float = 0.0

    @property
    def trees(self) -> int:
        return self.best_iteration + 1

    @property
    def valid_score(self) -> float | None:
        """Validation nDCG@10 at the best iteration (None without a validation set)."""
        values = self.history.get(f"valid {EARLY_STOPPING_METRIC}")
        return float(values[self.best_iteration]) if values else None

    def importance(self) -> dict[str, float]:
        """Total gain per feature (features never split on get 0), largest first."""
        gain = self.booster.get_score(importance_type="total_gain")
        scores = {name: float(gain.get(name, 0.0)) for name in self.feature_names}
        return dict(sorted(scores.items(), key=lambda item: -item[1]))


def train_ranker(rows: RankingRows, feature_names: tuple[str, ...], settings: TrainingSettings,
                 valid: RankingRows | None = None, log: Callable[[str], None] | None = None,
                 extra_params: Mapping[str, Any] | None = None) -> TrainedRanker:
    """LambdaMART (`rank:ndcg`) with early stopping on `valid` when given. `rows.group_weights`
    (one per group) weigh the groups; `extra_params` are added to (and override) the settings'
    XGBoost parameters, e.g. position debiasing (`lambdarank_unbiased`)."""
    started = time.perf_counter()
    learnable = _with_relevant(rows)
    if not len(learnable.query_ids):
        raise ValueError("no training query has a relevant document among its candidates; nothing to learn")
    train_matrix = learnable.dmatrix(feature_names)
    evals = [(train_matrix, "train")]
    valid_learnable = _with_relevant(valid) if valid is not None else None
    if valid_learnable is not None and len(valid_learnable.query_ids):
        evals.append((valid_learnable.dmatrix(feature_names), "valid"))
    history: dict[str, dict[str, list[float]]] = {}
    callbacks = []
    if log is not None:
        callbacks.append(_LogEvery(100, log))
    booster = xgb.train(
        {**settings.xgboost_params(), **(extra_params or {})}, train_matrix, num_boost_round=settings.max_rounds, evals=evals,
        early_stopping_rounds=settings.early_stopping_rounds if len(evals) > 1 else None,
        evals_result=history, verbose_eval=False, callbacks=callbacks,
    )
    best = int(booster.best_iteration) if len(evals) > 1 else settings.max_rounds - 1
    trimmed = single_threaded(booster[: best + 1])
    flat = {f"{data} {metric}": values for data, metrics in history.items() for metric, values in metrics.items()}
    return TrainedRanker(trimmed, tuple(feature_names), best, flat, time.perf_counter() - started)


@dataclass
class FittedRanker:
    """A trained ranker and what it was trained from (rows, query split, feature time)."""

    rows: RankingRows
    trained: TrainedRanker
    train_ids: list[str]
    valid_ids: list[str]
    feature_seconds: float


def fit_ranker(
    backend: SearchBackend, queries: Mapping[str, str], qrels: Qrels, features: FeatureSet, fusion: FusionSettings,
    settings: TrainingSettings, progress: Callable[[Iterable], Iterable] = lambda items: items,
    log: Callable[[str], None] | None = None, history: "BehaviourHistory | None" = None,
) -> FittedRanker:
    """Rows from the serving window, a seeded hold-out for early stopping, LambdaMART: what
    `ltr-search train` and the `ltr` pipeline of `ltr-search eval` both run. A feature set with
    behaviour features takes its rows point in time from `history` (without one: no history,
    every behaviour feature at its cold-start value)."""
    from ltr.features import uses_behaviour
    from ltr.point_in_time import point_in_time_rows

    started = time.perf_counter()
    if history is not None and uses_behaviour(features):
        rows = point_in_time_rows(backend, queries, qrels, features, lambda text: candidate_window(backend, text, fusion),
                                  history.event_store, history.propensities, history.moments_per_query,
                                  settings.seed, progress=progress)
    else:
        rows = build_rows(backend, queries, qrels, features, fusion, progress=progress)
    feature_seconds = time.perf_counter() - started
    if log is not None:
        rate = len(rows.labels) / feature_seconds if feature_seconds else float("nan")
        log(f"features: {len(rows.labels):,} (query, document) pairs in {feature_seconds:.1f} s ({rate:,.0f} pairs/s); "
            f"{rows.relevant_outside_window} relevant documents fell outside the candidate window")
    train_ids, valid_ids = split_queries(list(dict.fromkeys(rows.query_ids)), settings.valid_fraction, settings.seed)
    trained = train_ranker(rows.select(train_ids), features.names, settings, rows.select(valid_ids), log=log)
    return FittedRanker(rows, trained, train_ids, valid_ids, feature_seconds)


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
