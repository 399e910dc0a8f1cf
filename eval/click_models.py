"""Click models: fit on a ClickLog, predict click probabilities, simulate users.

Definitions follow Chuklin, Markov & de Rijke, *Click Models for Web Search* (2015), cited
below as "the book":

- `click_probabilities(log)` is P(C_r = 1 | C_1..C_{r-1}) for the session's observed earlier
  clicks (the book's *conditional* probability, section 5.1), used for the log-likelihood.
- `marginal_click_probabilities(log)` is P(C_r = 1) before anything is observed (the book's
  *full/unconditional* probability), used for perplexity (section 5.2).

Both are clipped to [1e-6, 1 - 1e-6] on shown positions (so one "impossible" click costs a
finite penalty) and are 0 where nothing was shown; metrics count shown positions only.

Every model keeps one parameter per (query, doc) pair seen in training. A pair first seen at
prediction time gets the model's *prior*: the mean of the fitted parameter over training
pairs (see each model's `prior_*` attributes). Fitting uses a Beta(1, 1) prior (add-one
smoothing) on every per-pair probability so rarely shown pairs do not sit at exactly 0 or 1.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from eval.click_log import ClickEvent, ClickLog
from indexing.progress import progress_bar

EPS = 1e-6
DEFAULT_PRIOR = (1.0, 1.0)  # Beta(a, b) pseudo-counts for per-pair probabilities


def clip(p: np.ndarray) -> np.ndarray:
    return np.clip(p, EPS, 1.0 - EPS)


# ---------------------------------------------------------------------------------------------
# Per-pair parameter tables


@dataclass
class PairTable:
    """Per-(query, doc) parameter values keyed by strings, so a model fitted on one log can be
    applied to another log with other vocabularies; `default` serves unseen pairs."""

    keys: list[tuple[str, str]] = field(default_factory=list)
    values: np.ndarray = field(default_factory=lambda: np.zeros(0))
    default: float = 0.5

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64)
        self._index = {key: i for i, key in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)

    def get(self, query: str, doc: str) -> float:
        i = self._index.get((query, doc))
        return self.default if i is None else float(self.values[i])

    def cells(self, log: ClickLog) -> np.ndarray:
        """(n_sessions, n_positions) values for the log's cells; 0 where nothing was shown."""
        pair_query, pair_doc, cell_pair = log.pair_index
        local = np.fromiter(
            (self._index.get((log.query_ids[q], log.doc_ids[d]), -1) for q, d in zip(pair_query.tolist(), pair_doc.tolist())),
            dtype=np.int64,
            count=len(pair_query),
        )
        per_pair = np.where(local >= 0, self.values[np.maximum(local, 0)] if len(self.values) else self.default, self.default)
        out = np.zeros(cell_pair.shape, dtype=np.float64)
        shown = cell_pair >= 0
        out[shown] = per_pair[cell_pair[shown]]
        return out


def _beta_mean(successes: np.ndarray, trials: np.ndarray, prior: tuple[float, float]) -> np.ndarray:
    a, b = prior
    return clip((successes + a) / (trials + a + b))


def _require_sessions(log: ClickLog) -> None:
    if log.n_sessions == 0 or not log.mask.any():
        raise ValueError("cannot fit a click model on a log without impressions")


def _positions(log: ClickLog) -> np.ndarray:
    return np.broadcast_to(np.arange(log.n_positions), log.docs.shape)


def _first_click(log: ClickLog) -> np.ndarray:
    """0-based position of each session's first click; n_positions when there is none."""
    any_click = log.clicks.any(axis=1)
    return np.where(any_click, log.clicks.argmax(axis=1), log.n_positions)


def _last_click(log: ClickLog) -> np.ndarray:
    """0-based position of each session's last click; -1 when there is none."""
    any_click = log.clicks.any(axis=1)
    reversed_first = log.clicks[:, ::-1].argmax(axis=1)
    return np.where(any_click, log.n_positions - 1 - reversed_first, -1)


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    return progress_bar(total=total, desc=desc, leave=False, unit="it")


# ---------------------------------------------------------------------------------------------
# Interface


class ClickModel(ABC):
    """scikit-learn style: `fit(log)` returns self; predictions take any ClickLog."""

    name: str = "model"

    @abstractmethod
    def fit(self, log: ClickLog, progress: bool = False) -> "ClickModel":
        ...

    @abstractmethod
    def click_probabilities(self, log: ClickLog) -> np.ndarray:
        """P(C_r = 1 | earlier clicks of the session), shape (n_sessions, n_positions)."""

    @abstractmethod
    def marginal_click_probabilities(self, log: ClickLog) -> np.ndarray:
        """P(C_r = 1) with nothing observed, shape (n_sessions, n_positions)."""

    @abstractmethod
    def simulate(self, rankings: ClickLog, relevance: np.ndarray | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
        """Sample clicks (bool, n_sessions x n_positions) for the pages of `rankings` (its
        clicks are ignored). `relevance` optionally gives each cell's attractiveness (a
        probability) instead of the fitted per-pair values."""

    def summary(self) -> dict[str, Any]:
        """The model's global parameters, for reports (per-pair tables are left out)."""
        return {"model": self.name}

    def _attractiveness_cells(self, log: ClickLog, table: PairTable, relevance: np.ndarray | None) -> np.ndarray:
        if relevance is None:
            return table.cells(log)
        relevance = np.asarray(relevance, dtype=np.float64)
        if relevance.shape != log.docs.shape:
            raise ValueError(f"relevance has shape {relevance.shape}, expected {log.docs.shape}")
        if np.any((relevance < 0) | (relevance > 1)):
            raise ValueError("relevance values are click probabilities and must lie in [0, 1]")
        return np.where(log.mask, relevance, 0.0)


def _finish(probabilities: np.ndarray, log: ClickLog) -> np.ndarray:
    return np.where(log.mask, clip(probabilities), 0.0)


# ---------------------------------------------------------------------------------------------
# Baseline: CTR by position


class CtrByPositionModel(ClickModel):
    """Click probability = the training click-through rate of the position (the book's
    "global CTR by rank" baseline, section 3.1). Clicks are independent, so conditional and
    marginal probabilities coincide."""

    name = "ctr"

    def __init__(self) -> None:
        self.ctr: np.ndarray = np.zeros(0)

    def fit(self, log: ClickLog, progress: bool = False) -> "CtrByPositionModel":
        _require_sessions(log)
        shown = log.mask.sum(axis=0)
        clicked = log.clicks.sum(axis=0)
        self.ctr = clip(np.where(shown > 0, clicked / np.maximum(shown, 1), EPS))
        return self

    def _cells(self, log: ClickLog) -> np.ndarray:
        ctr = np.full(log.n_positions, self.ctr[-1] if len(self.ctr) else EPS)
        n = min(len(self.ctr), log.n_positions)
        ctr[:n] = self.ctr[:n]  # deeper positions than seen in training reuse the last CTR
        return np.broadcast_to(ctr, log.docs.shape)

    def click_probabilities(self, log: ClickLog) -> np.ndarray:
        return _finish(self._cells(log), log)

    def marginal_click_probabilities(self, log: ClickLog) -> np.ndarray:
        return self.click_probabilities(log)

    def simulate(self, rankings: ClickLog, relevance: np.ndarray | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
        if relevance is not None:
            raise ValueError("the CTR-by-position model has no attractiveness: it cannot use relevance")
        rng = rng or np.random.default_rng()
        return (rng.random(rankings.docs.shape) < self._cells(rankings)) & rankings.mask

    def summary(self) -> dict[str, Any]:
        return {"model": self.name, "ctr_by_position": self.ctr.round(6).tolist()}


# ---------------------------------------------------------------------------------------------
# Position-based model


class PositionBasedModel(ClickModel):
    """PBM (the book, sections 3.3 and 4.2): P(C_r = 1) = gamma_r * alpha_{q,d}.

    Fitted by EM (vectorised over all shown cells). Clicks are independent given the
    parameters, so conditional and marginal probabilities coincide.

    `examination` (gamma_r per position) is scaled so that its largest value is 1 (in practice
    gamma_1 = 1), with the attractiveness scaled inversely: clicks only identify the product
    gamma_r * alpha, so absolute examination is a convention, and "the top position is always
    examined" is the usual one. Ratios gamma_r / gamma_1 are what debiasing (inverse
    propensity weighting) needs. Unseen pairs get `prior_attractiveness`, the mean fitted
    attractiveness over training pairs.
    """

    name = "pbm"

    def __init__(self, max_iter: int = 100, tol: float = 1e-6, prior: tuple[float, float] = DEFAULT_PRIOR):
        self.max_iter = max_iter
        self.tol = tol
        self.prior = prior
        self.examination: np.ndarray = np.zeros(0)
        self.attractiveness = PairTable()
        self.n_iter = 0
        self.train_log_likelihood: list[float] = []

    @property
    def prior_attractiveness(self) -> float:
        return self.attractiveness.default

    @classmethod
    def from_parameters(cls, examination: Sequence[float], attractiveness: PairTable | None = None) -> "PositionBasedModel":
        """A PBM with given parameters (for simulation or as a known-truth reference)."""
        model = cls()
        model.examination = np.asarray(examination, dtype=np.float64)
        if np.any((model.examination < 0) | (model.examination > 1)):
            raise ValueError("examination probabilities must lie in [0, 1]")
        model.attractiveness = attractiveness or PairTable()
        return model

    def fit(self, log: ClickLog, progress: bool = False) -> "PositionBasedModel":
        _require_sessions(log)
        pair_query, _, cell_pair = log.pair_index
        n_pairs = len(pair_query)
        shown = log.mask
        pair = cell_pair[shown]
        rank = _positions(log)[shown]
        clicked = log.clicks[shown]
        pair_count = np.bincount(pair, minlength=n_pairs)
        rank_count = np.bincount(rank, minlength=log.n_positions)
        alpha = np.full(n_pairs, 0.5)
        gamma = np.full(log.n_positions, 0.5)
        self.train_log_likelihood = []
        bar = _progress(progress, self.max_iter, "fit pbm (EM)")
        for iteration in range(1, self.max_iter + 1):
            a, g = alpha[pair], gamma[rank]
            p_click = clip(a * g)
            # E-step: posteriors of attraction and examination for unclicked cells (book eq. 4.8-4.9)
            p_attr = np.where(clicked, 1.0, a * (1.0 - g) / (1.0 - p_click))
            p_exam = np.where(clicked, 1.0, g * (1.0 - a) / (1.0 - p_click))
            alpha = _beta_mean(np.bincount(pair, p_attr, n_pairs), pair_count, self.prior)
            gamma = clip(np.bincount(rank, p_exam, log.n_positions) / np.maximum(rank_count, 1))
            ll = float(np.sum(np.where(clicked, np.log(p_click), np.log1p(-p_click)))) / log.n_sessions
            self.train_log_likelihood.append(ll)
            self.n_iter = iteration
            if bar is not None:
                bar.update(1)
                bar.set_postfix(ll=f"{ll:.5f}")
            if iteration > 1 and abs(ll - self.train_log_likelihood[-2]) < self.tol:
                break
        if bar is not None:
            bar.close()
        scale = float(gamma.max())
        self.examination = gamma / scale
        alpha = clip(alpha * scale)
        self.attractiveness = PairTable(log.pair_keys(), alpha, float(alpha.mean()))
        return self

    def _examination_cells(self, log: ClickLog) -> np.ndarray:
        gamma = self.examination
        if len(gamma) < log.n_positions:
            raise ValueError(f"the model knows {len(gamma)} positions; the log has {log.n_positions}")
        return np.broadcast_to(gamma[: log.n_positions], log.docs.shape)

    def click_probabilities(self, log: ClickLog) -> np.ndarray:
        return _finish(self._examination_cells(log) * self.attractiveness.cells(log), log)

    def marginal_click_probabilities(self, log: ClickLog) -> np.ndarray:
        return self.click_probabilities(log)

    def simulate(self, rankings: ClickLog, relevance: np.ndarray | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
        rng = rng or np.random.default_rng()
        alpha = self._attractiveness_cells(rankings, self.attractiveness, relevance)
        p = self._examination_cells(rankings) * alpha
        return (rng.random(rankings.docs.shape) < p) & rankings.mask

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "examination": self.examination.round(6).tolist(),
            "prior_attractiveness": round(self.prior_attractiveness, 6),
            "pairs": len(self.attractiveness),
            "em_iterations": self.n_iter,
        }


# ---------------------------------------------------------------------------------------------
# Cascade model


class CascadeModel(ClickModel):
    """Cascade (the book, sections 3.4 and 4.1): the user scans top-down and clicks the first
    attractive document (probability alpha_{q,d}), then stops.

    Multi-click sessions: the model cannot produce them. For fitting, `multi_click="truncate"`
    (default) keeps every session up to and including its first click and treats what follows
    as unobserved, which is the book's closed-form MLE on sessions with at most one click and
    its natural extension; `multi_click="drop"` trains only on sessions with at most one click,
    as PyClick does. For evaluation, a click after the first has conditional probability 0
    under the model, clipped to 1e-6, so the log-likelihood of multi-click sessions is heavily
    (but finitely) penalised; the marginal probabilities used for perplexity are
    alpha_r * prod_{j<r} (1 - alpha_j) as in the book. Unseen pairs get the mean training
    attractiveness.
    """

    name = "cascade"

    def __init__(self, multi_click: str = "truncate", prior: tuple[float, float] = DEFAULT_PRIOR):
        if multi_click not in ("truncate", "drop"):
            raise ValueError(f"multi_click must be 'truncate' or 'drop', got {multi_click!r}")
        self.multi_click = multi_click
        self.prior = prior
        self.attractiveness = PairTable()
        self.sessions_used = 0

    @property
    def prior_attractiveness(self) -> float:
        return self.attractiveness.default

    def fit(self, log: ClickLog, progress: bool = False) -> "CascadeModel":
        _require_sessions(log)
        pair_query, _, cell_pair = log.pair_index
        observed = log.mask & (_positions(log) <= _first_click(log)[:, None])
        if self.multi_click == "drop":
            keep = log.clicks.sum(axis=1) <= 1
            observed &= keep[:, None]
            self.sessions_used = int(keep.sum())
        else:
            self.sessions_used = log.n_sessions
        pair = cell_pair[observed]
        n_pairs = len(pair_query)
        clicks = np.bincount(pair, log.clicks[observed].astype(np.float64), n_pairs)
        views = np.bincount(pair, minlength=n_pairs)
        alpha = _beta_mean(clicks, views, self.prior)
        self.attractiveness = PairTable(log.pair_keys(), alpha, float(alpha.mean()))
        return self

    def click_probabilities(self, log: ClickLog) -> np.ndarray:
        alpha = self.attractiveness.cells(log)
        before_or_at_first = _positions(log) <= _first_click(log)[:, None]
        return _finish(np.where(before_or_at_first, alpha, 0.0), log)

    def marginal_click_probabilities(self, log: ClickLog) -> np.ndarray:
        alpha = self.attractiveness.cells(log)
        no_click_before = np.cumprod(np.hstack([np.ones((log.n_sessions, 1)), 1.0 - alpha[:, :-1]]), axis=1)
        return _finish(alpha * no_click_before, log)

    def simulate(self, rankings: ClickLog, relevance: np.ndarray | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
        rng = rng or np.random.default_rng()
        alpha = self._attractiveness_cells(rankings, self.attractiveness, relevance)
        attracted = (rng.random(rankings.docs.shape) < alpha) & rankings.mask
        first = np.where(attracted.any(axis=1), attracted.argmax(axis=1), -1)
        clicks = np.zeros(rankings.docs.shape, dtype=bool)
        hit = first >= 0
        clicks[np.flatnonzero(hit), first[hit]] = True
        return clicks

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "multi_click": self.multi_click,
            "sessions_used": self.sessions_used,
            "prior_attractiveness": round(self.prior_attractiveness, 6),
            "pairs": len(self.attractiveness),
        }


# ---------------------------------------------------------------------------------------------
# Dynamic Bayesian network


@dataclass
class _Posteriors:
    """E-step output of the DBN forward-backward pass (all (n_sessions, n_positions))."""

    exam_filtered: np.ndarray  # P(E_r = 1 | C_<r), r = 1..R+1 (one extra column)
    exam: np.ndarray  # P(E_r = 1 | C)
    exam_next: np.ndarray  # P(E_r = 1, E_{r+1} = 1 | C)
    stop_after: np.ndarray  # P(E_r = 1, E_{r+1} = 0 | C)
    log_likelihood: float  # mean per session


def _dbn_forward_backward(alpha: np.ndarray, sigma: np.ndarray, gamma: float, clicks: np.ndarray) -> _Posteriors:
    """Scaled forward-backward over the examination chain E_1..E_R of every session at once.

    Emissions: P(C=1 | E=1) = alpha, P(C=1 | E=0) = 0. Transitions from E_r = 1: continue
    with gamma after a skip, with gamma * (1 - sigma) after a click; E = 0 is absorbing.
    F_r = P(E_r | C_<r) and B_r = P(C_>=r | E_r) / P(C_>=r | C_<r) keep every number bounded,
    so deep pages do not underflow; the normalisers n_r = P(C_r | C_<r) give the likelihood.
    """
    n, r_max = clicks.shape
    emit1 = np.where(clicks, alpha, 1.0 - alpha)  # P(c_r | E_r = 1)
    emit0 = np.where(clicks, 0.0, 1.0)  # P(c_r | E_r = 0)
    cont = np.where(clicks, gamma * (1.0 - sigma), gamma)  # P(E_{r+1} = 1 | E_r = 1, c_r)
    f1 = np.empty((n, r_max + 1))
    f1[:, 0] = 1.0
    norm = np.empty((n, r_max))
    for r in range(r_max):
        joint1 = f1[:, r] * emit1[:, r]
        norm[:, r] = joint1 + (1.0 - f1[:, r]) * emit0[:, r]
        f1[:, r + 1] = joint1 * cont[:, r] / norm[:, r]
    b1 = np.ones(n)
    b0 = np.ones(n)
    exam = np.empty((n, r_max))
    exam_next = np.empty((n, r_max))
    stop_after = np.empty((n, r_max))
    for r in range(r_max - 1, -1, -1):
        step = f1[:, r] * emit1[:, r] / norm[:, r]
        exam_next[:, r] = step * cont[:, r] * b1
        stop_after[:, r] = step * (1.0 - cont[:, r]) * b0
        b1, b0 = (
            emit1[:, r] * (cont[:, r] * b1 + (1.0 - cont[:, r]) * b0) / norm[:, r],
            emit0[:, r] * b0 / norm[:, r],
        )
        exam[:, r] = f1[:, r] * b1
    ll = float(np.log(norm).sum()) / max(n, 1)
    return _Posteriors(f1, np.clip(exam, 0.0, 1.0), exam_next, stop_after, ll)


class DynamicBayesianNetworkModel(ClickModel):
    """DBN (Chapelle & Zhang 2009; the book, sections 3.8 and 4.3).

    The user examines position 1; an examined document is clicked with probability alpha_{q,d};
    after a click the user is satisfied with probability sigma_{q,d} and stops; an unsatisfied
    user examines the next position with probability gamma (one global continuation).

    Fitted by EM: each E-step runs a scaled forward-backward over the examination states,
    vectorised over sessions (a Python loop over positions only); the M-step sets
    alpha = E[attracted] / impressions, sigma = E[satisfied] / clicks (both with the Beta(1, 1)
    prior), gamma = E[continuations] / E[examined and not satisfied] over positions 1..R-1
    of pages that show something further down. Iterates until the training log-likelihood per
    session changes by less than `tol`, or `max_iter` rounds.

    Unseen pairs: attractiveness = mean over training pairs; satisfaction = click-weighted
    mean over training pairs (only clicked pairs carry information about satisfaction).
    Conditional probabilities come from the forward filter P(E_r = 1 | C_<r) * alpha; marginal
    ones from P(E_{r+1} = 1) = P(E_r = 1) * gamma * (1 - alpha_r * sigma_r).
    """

    name = "dbn"

    def __init__(self, max_iter: int = 100, tol: float = 1e-6, prior: tuple[float, float] = DEFAULT_PRIOR, continuation: float = 0.5):
        self.max_iter = max_iter
        self.tol = tol
        self.prior = prior
        self.continuation = continuation  # gamma; the starting value for EM
        self.attractiveness = PairTable()
        self.satisfaction = PairTable()
        self.n_iter = 0
        self.train_log_likelihood: list[float] = []

    @classmethod
    def from_parameters(
        cls, continuation: float, attractiveness: PairTable | None = None, satisfaction: PairTable | None = None
    ) -> "DynamicBayesianNetworkModel":
        if not 0.0 <= continuation <= 1.0:
            raise ValueError(f"continuation must lie in [0, 1], got {continuation}")
        model = cls(continuation=continuation)
        model.attractiveness = attractiveness or PairTable()
        model.satisfaction = satisfaction or PairTable()
        return model

    def fit(self, log: ClickLog, progress: bool = False) -> "DynamicBayesianNetworkModel":
        _require_sessions(log)
        pair_query, _, cell_pair = log.pair_index
        n_pairs = len(pair_query)
        shown = log.mask
        clicks = log.clicks
        pair_shown = cell_pair[shown]
        pair_clicked = cell_pair[clicks]
        impressions = np.bincount(pair_shown, minlength=n_pairs)
        pair_clicks = np.bincount(pair_clicked, minlength=n_pairs)
        # transitions r -> r+1 carry information only if something is shown at or after r+1
        last_shown = np.where(shown.any(axis=1), log.n_positions - 1 - shown[:, ::-1].argmax(axis=1), -1)
        transition = _positions(log) < last_shown[:, None]
        alpha = np.full(n_pairs, 0.5)
        sigma = np.full(n_pairs, 0.5)
        gamma = float(self.continuation)
        self.train_log_likelihood = []
        bar = _progress(progress, self.max_iter, "fit dbn (EM)")
        for iteration in range(1, self.max_iter + 1):
            a_cells = np.zeros(log.docs.shape)
            s_cells = np.zeros(log.docs.shape)
            a_cells[shown] = alpha[pair_shown]
            s_cells[shown] = sigma[pair_shown]
            post = _dbn_forward_backward(a_cells, s_cells, gamma, clicks)
            # attraction: certain on a click; otherwise alpha * P(E_r = 0 | C) (A is independent of C when E_r = 0)
            p_attr = np.where(clicks, 1.0, a_cells * (1.0 - post.exam))
            # satisfaction after a click: only if the chain stopped, with odds sigma : (1-sigma)(1-gamma)
            stop_prob = 1.0 - gamma * (1.0 - s_cells)
            p_sat = np.where(clicks, post.stop_after * s_cells / np.maximum(stop_prob, EPS), 0.0)
            alpha = _beta_mean(np.bincount(pair_shown, p_attr[shown], n_pairs), impressions, self.prior)
            sigma = _beta_mean(np.bincount(pair_clicked, p_sat[clicks], n_pairs), pair_clicks, self.prior)
            continued = post.exam_next[transition].sum()
            could_continue = (post.exam - p_sat)[transition].sum()
            if could_continue > 0:
                gamma = float(np.clip(continued / could_continue, EPS, 1.0 - EPS))
            self.train_log_likelihood.append(post.log_likelihood)
            self.n_iter = iteration
            if bar is not None:
                bar.update(1)
                bar.set_postfix(ll=f"{post.log_likelihood:.5f}", gamma=f"{gamma:.3f}")
            if iteration > 1 and abs(post.log_likelihood - self.train_log_likelihood[-2]) < self.tol:
                break
        if bar is not None:
            bar.close()
        self.continuation = gamma
        keys = log.pair_keys()
        self.attractiveness = PairTable(keys, alpha, float(alpha.mean()))
        weights = pair_clicks / max(int(pair_clicks.sum()), 1)
        self.satisfaction = PairTable(keys, sigma, float((sigma * weights).sum()) if pair_clicks.sum() else 0.5)
        return self

    def _cells(self, log: ClickLog) -> tuple[np.ndarray, np.ndarray]:
        return self.attractiveness.cells(log), self.satisfaction.cells(log)

    def click_probabilities(self, log: ClickLog) -> np.ndarray:
        alpha, sigma = self._cells(log)
        alpha = np.where(log.mask, clip(alpha), 0.0)
        post = _dbn_forward_backward(alpha, clip(sigma), self.continuation, log.clicks)
        return _finish(post.exam_filtered[:, :-1] * alpha, log)

    def marginal_click_probabilities(self, log: ClickLog) -> np.ndarray:
        alpha, sigma = self._cells(log)
        alpha = np.where(log.mask, clip(alpha), 0.0)
        keep_going = self.continuation * (1.0 - alpha * clip(sigma))
        examined = np.cumprod(np.hstack([np.ones((log.n_sessions, 1)), keep_going[:, :-1]]), axis=1)
        return _finish(examined * alpha, log)

    def simulate(
        self,
        rankings: ClickLog,
        relevance: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
        satisfaction: np.ndarray | None = None,
    ) -> np.ndarray:
        """As `ClickModel.simulate`; `satisfaction` optionally gives each cell's sigma."""
        rng = rng or np.random.default_rng()
        alpha = self._attractiveness_cells(rankings, self.attractiveness, relevance)
        sigma = self._attractiveness_cells(rankings, self.satisfaction, satisfaction)
        u_attr, u_sat, u_cont = rng.random((3, *rankings.docs.shape))
        clicks = np.zeros(rankings.docs.shape, dtype=bool)
        examining = np.ones(rankings.n_sessions, dtype=bool)
        for r in range(rankings.n_positions):
            click = examining & rankings.mask[:, r] & (u_attr[:, r] < alpha[:, r])
            clicks[:, r] = click
            satisfied = click & (u_sat[:, r] < sigma[:, r])
            examining &= ~satisfied & (u_cont[:, r] < self.continuation)
        return clicks

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "continuation": round(self.continuation, 6),
            "prior_attractiveness": round(self.attractiveness.default, 6),
            "prior_satisfaction": round(self.satisfaction.default, 6),
            "pairs": len(self.attractiveness),
            "em_iterations": self.n_iter,
        }


class SimplifiedDBNModel(DynamicBayesianNetworkModel):
    """SDBN (the book, section 4.2): DBN with gamma = 1, fitted in closed form.

    With gamma = 1 the user examines everything down to the last click (and, in a session
    without clicks, the whole page); alpha = clicks / those impressions and
    sigma = last clicks / clicks, each with the Beta(1, 1) prior.
    """

    name = "sdbn"

    def __init__(self, prior: tuple[float, float] = DEFAULT_PRIOR):
        super().__init__(prior=prior, continuation=1.0)

    def fit(self, log: ClickLog, progress: bool = False) -> "SimplifiedDBNModel":
        _require_sessions(log)
        pair_query, _, cell_pair = log.pair_index
        n_pairs = len(pair_query)
        last = _last_click(log)
        examined_to = np.where(last >= 0, last, log.n_positions - 1)
        examined = log.mask & (_positions(log) <= examined_to[:, None])
        pair = cell_pair[examined]
        alpha = _beta_mean(np.bincount(pair, log.clicks[examined].astype(np.float64), n_pairs), np.bincount(pair, minlength=n_pairs), self.prior)
        pair_clicked = cell_pair[log.clicks]
        is_last = (_positions(log) == last[:, None])[log.clicks]
        pair_clicks = np.bincount(pair_clicked, minlength=n_pairs)
        sigma = _beta_mean(np.bincount(pair_clicked, is_last.astype(np.float64), n_pairs), pair_clicks, self.prior)
        keys = log.pair_keys()
        self.continuation = 1.0
        self.attractiveness = PairTable(keys, alpha, float(alpha.mean()))
        weights = pair_clicks / max(int(pair_clicks.sum()), 1)
        self.satisfaction = PairTable(keys, sigma, float((sigma * weights).sum()) if pair_clicks.sum() else 0.5)
        self.n_iter = 0
        return self


MODELS: dict[str, Callable[[], ClickModel]] = {
    "ctr": CtrByPositionModel,
    "pbm": PositionBasedModel,
    "cascade": CascadeModel,
    "dbn": DynamicBayesianNetworkModel,
    "sdbn": SimplifiedDBNModel,
}


def make_model(name: str) -> ClickModel:
    try:
        return MODELS[name]()
    except KeyError:
        raise ValueError(f"unknown click model '{name}' (choose from {', '.join(MODELS)})") from None


# ---------------------------------------------------------------------------------------------
# Metrics


def log_likelihood(model: ClickModel, log: ClickLog) -> float:
    """Mean per-session log-likelihood (natural log) from conditional click probabilities:
    (1/S) sum_s sum_r [c log q + (1-c) log(1-q)], shown positions only (the book, eq. 5.1)."""
    q = model.click_probabilities(log)
    terms = np.where(log.clicks, np.log(np.where(log.mask, q, 1.0)), np.log1p(-q))
    return float(np.where(log.mask, terms, 0.0).sum()) / max(log.n_sessions, 1)


def perplexity_by_position(model: ClickModel, log: ClickLog) -> np.ndarray:
    """p_r = 2 ** (-(1/N_r) sum_s [c log2 q + (1-c) log2(1-q)]) with q the marginal click
    probability (the book, eq. 5.3); N_r counts sessions showing position r (NaN if none)."""
    q = model.marginal_click_probabilities(log)
    terms = np.where(log.clicks, np.log2(np.where(log.mask, q, 1.0)), np.log2(1.0 - q))
    terms = np.where(log.mask, terms, 0.0)
    shown = log.mask.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(shown > 0, 2.0 ** (-terms.sum(axis=0) / shown), np.nan)


def perplexity(model: ClickModel, log: ClickLog) -> float:
    """Overall perplexity: the mean of the per-position perplexities (the book, section 5.2)."""
    return float(np.nanmean(perplexity_by_position(model, log)))


@dataclass(frozen=True)
class ClickModelScores:
    model: str
    log_likelihood: float
    perplexity: float
    perplexity_by_position: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "log_likelihood": self.log_likelihood,
            "perplexity": self.perplexity,
            "perplexity_by_position": list(self.perplexity_by_position),
        }


def evaluate(model: ClickModel, log: ClickLog) -> ClickModelScores:
    per_position = perplexity_by_position(model, log)
    return ClickModelScores(model.name, log_likelihood(model, log), float(np.nanmean(per_position)), tuple(float(p) for p in per_position))


# ---------------------------------------------------------------------------------------------
# Simulation


@dataclass(frozen=True)
class UserBehaviour:
    """How simulated users act on a ranking whose documents have relevance grades.

    `model`: 'pbm' (examine position r with `examination[r-1]`, default 1 / r**eta, click if
    attracted), 'cascade' (scan down, click the first attractive document, stop) or 'dbn'
    (scan down, click if attracted, stop satisfied with `stop_probs[grade]`, else continue
    with `continuation`). Attraction is `click_probs[grade]`; `noise` flips each attraction
    decision with that probability (so a non-relevant document with click probability 0 is
    clicked with probability `noise` when examined). Default probabilities grow with
    (2**g - 1) / (2**g_max - 1): click 0.05 .. 0.95, stop 0 .. 0.7. Unjudged documents have
    grade 0 and negative grades count as 0, as in TREC.
    """

    model: str = "pbm"
    examination: Sequence[float] | None = None
    eta: float = 1.0
    click_probs: Mapping[int, float] | None = None
    stop_probs: Mapping[int, float] | None = None
    continuation: float = 0.9
    noise: float = 0.0

    def __post_init__(self) -> None:
        if self.model not in ("pbm", "cascade", "dbn"):
            raise ValueError(f"user behaviour must be pbm, cascade or dbn, got '{self.model}'")
        if not 0.0 <= self.noise <= 0.5:
            raise ValueError(f"noise must lie in [0, 0.5], got {self.noise}")
        if not 0.0 <= self.continuation <= 1.0:
            raise ValueError(f"continuation must lie in [0, 1], got {self.continuation}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        for name in ("click_probs", "stop_probs"):
            for grade, p in (getattr(self, name) or {}).items():
                if not 0.0 <= p <= 1.0:
                    raise ValueError(f"{name}[{grade}] must lie in [0, 1], got {p}")
        if self.examination is not None and any(not 0.0 <= p <= 1.0 for p in self.examination):
            raise ValueError("examination probabilities must lie in [0, 1]")

    def examination_curve(self, depth: int) -> np.ndarray:
        if self.examination is not None:
            if len(self.examination) < depth:
                raise ValueError(f"the examination curve has {len(self.examination)} values; the pages have {depth} positions")
            return np.asarray(self.examination[:depth], dtype=np.float64)
        return 1.0 / np.arange(1, depth + 1, dtype=np.float64) ** self.eta

    def probabilities(self, grades: np.ndarray, max_grade: int, which: str) -> np.ndarray:
        """Map an int array of grades to attraction ('click') or satisfaction ('stop')."""
        table = self.click_probs if which == "click" else self.stop_probs
        grades = np.maximum(grades, 0)
        if table is None:
            top = max(max_grade, 1)
            gain = (2.0 ** grades - 1.0) / (2.0**top - 1.0)
            p = 0.05 + 0.9 * gain if which == "click" else 0.7 * gain
        else:
            missing = sorted(set(np.unique(grades).tolist()) - set(table))
            if missing:
                raise ValueError(f"no {which} probability for relevance grade {missing[0]} (have {sorted(table)})")
            lookup = np.zeros(int(grades.max(initial=0)) + 1)
            for grade, value in table.items():
                if 0 <= grade < len(lookup):
                    lookup[grade] = value
            p = lookup[grades]
        if which == "click" and self.noise:
            p = p * (1.0 - self.noise) + (1.0 - p) * self.noise
        return p


def serp_log(
    rankings: Mapping[str, Sequence[str]],
    sessions_per_query: int,
    depth: int = 10,
    shuffle: bool = False,
    rng: np.random.Generator | None = None,
    start_time: float = 1_700_000_000.0,
    session_interval: float = 60.0,
    session_prefix: str = "sim",
) -> ClickLog:
    """Result pages without clicks: `sessions_per_query` pages per query, queries interleaved in
    time (round-robin) so a time split keeps every query on both sides. `shuffle` shows each
    page a random permutation of the query's top `depth` (result randomisation, which makes
    examination and attractiveness separately identifiable). Session k starts at
    start_time + k * session_interval; position r is shown (r - 1) milliseconds later."""
    if sessions_per_query < 1:
        raise ValueError(f"sessions per query must be >= 1, got {sessions_per_query}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    queries = [q for q, docs in rankings.items() if len(docs)]
    if not queries:
        raise ValueError("no rankings to simulate on")
    rng = rng or np.random.default_rng()
    doc_index: dict[str, int] = {}
    width = min(depth, max(len(rankings[q]) for q in queries))
    top = np.full((len(queries), width), -1, dtype=np.int64)
    for i, query in enumerate(queries):
        docs = list(rankings[query])[:width]
        if len(set(docs)) != len(docs):
            raise ValueError(f"query '{query}': a document appears twice in its ranking")
        top[i, : len(docs)] = [doc_index.setdefault(d, len(doc_index)) for d in docs]
    n_queries = len(queries)
    query_of = np.tile(np.arange(n_queries), sessions_per_query)
    docs = top[query_of]
    if shuffle:
        keys = rng.random(docs.shape) + (docs < 0)  # padding stays at the end
        docs = np.take_along_axis(docs, np.argsort(keys, axis=1, kind="stable"), axis=1)
    n = len(query_of)
    starts = start_time + session_interval * np.arange(n, dtype=np.float64)
    return ClickLog(
        query_ids=queries,
        doc_ids=list(doc_index),
        queries=query_of,
        docs=docs,
        clicks=np.zeros(docs.shape, dtype=bool),
        mask=docs >= 0,
        session_ids=[f"{session_prefix}-{k:08d}" for k in range(n)],
        timestamps=starts[:, None] + 1e-3 * np.arange(width)[None, :],
    )


def simulate_click_log(
    behaviour: UserBehaviour | ClickModel | str,
    rankings: Mapping[str, Sequence[str]],
    grades: Mapping[str, Mapping[str, int]] | None = None,
    *,
    sessions_per_query: int = 10,
    depth: int = 10,
    shuffle: bool = False,
    seed: int | None = None,
    rng: np.random.Generator | None = None,
    start_time: float = 1_700_000_000.0,
    session_interval: float = 60.0,
    session_prefix: str = "sim",
) -> ClickLog:
    """Simulated sessions as a ClickLog (the fast path; `simulate_clicks` returns events).

    `behaviour`: a `UserBehaviour` (or its model name) drives users from relevance `grades`
    (query -> doc -> grade); a fitted `ClickModel` drives them from its own parameters (unseen
    pairs get its prior), or, when `grades` is given, from the grades through the default
    `UserBehaviour` probabilities combined with the model's examination / continuation.
    Same seed, same inputs -> same sessions.
    """
    if rng is None:
        rng = np.random.default_rng(seed)
    if isinstance(behaviour, str):
        behaviour = UserBehaviour(model=behaviour)
    log = serp_log(rankings, sessions_per_query, depth, shuffle, rng, start_time, session_interval, session_prefix)
    if isinstance(behaviour, ClickModel):
        model = behaviour
        relevance = satisfaction = None
        if grades is not None:
            grade_cells = _grade_cells(log, grades)
            top = _max_grade(grades)
            relevance = np.where(log.mask, UserBehaviour().probabilities(grade_cells, top, "click"), 0.0)
            satisfaction = np.where(log.mask, UserBehaviour().probabilities(grade_cells, top, "stop"), 0.0)
    else:
        if grades is None:
            raise ValueError("simulating from a user behaviour needs relevance grades")
        log.clicks = _behaviour_clicks(behaviour, log, _grade_cells(log, grades), _max_grade(grades), rng)
        return log
    if isinstance(model, DynamicBayesianNetworkModel):
        log.clicks = model.simulate(log, relevance, rng, satisfaction=satisfaction)
    else:
        log.clicks = model.simulate(log, relevance, rng)
    return log


def simulate_page_clicks(
    behaviour: UserBehaviour | str,
    grades: Sequence[int],
    rng: np.random.Generator,
    max_grade: int | None = None,
) -> np.ndarray:
    """One simulated user on one result page: clicks (bool, one per position, top first) for a
    page whose documents have relevance `grades` (unjudged = 0).

    The live simulator asks this once per served page, so a user reacts to the ranking the
    service actually returned; it uses the same behaviour models as `simulate_click_log`.
    `max_grade` is the top grade of the whole judgment set, which scales the default
    probabilities (default: the page's own top grade, at least 1)."""
    if isinstance(behaviour, str):
        behaviour = UserBehaviour(model=behaviour)
    grade_row = np.asarray(grades, dtype=np.int64).reshape(1, -1)
    width = grade_row.shape[1]
    if width == 0:
        return np.zeros(0, dtype=bool)
    top = int(grade_row.max()) if max_grade is None else int(max_grade)
    page = ClickLog(
        query_ids=["page"], doc_ids=[str(r) for r in range(width)], queries=np.zeros(1, dtype=np.int64),
        docs=np.arange(width, dtype=np.int64)[None, :], clicks=np.zeros((1, width), dtype=bool),
        mask=np.ones((1, width), dtype=bool), session_ids=["page"],
    )
    return _behaviour_clicks(behaviour, page, grade_row, top, rng)[0]


def _behaviour_clicks(behaviour: UserBehaviour, log: ClickLog, grade_cells: np.ndarray, top: int, rng: np.random.Generator) -> np.ndarray:
    """Clicks of `behaviour`'s users on the pages of `log`, whose cells have `grade_cells`."""
    relevance = np.where(log.mask, behaviour.probabilities(grade_cells, top, "click"), 0.0)
    satisfaction = np.where(log.mask, behaviour.probabilities(grade_cells, top, "stop"), 0.0)
    if behaviour.model == "pbm":
        return PositionBasedModel.from_parameters(behaviour.examination_curve(log.n_positions)).simulate(log, relevance, rng)
    if behaviour.model == "cascade":
        return CascadeModel().simulate(log, relevance, rng)
    model = DynamicBayesianNetworkModel.from_parameters(behaviour.continuation)
    return model.simulate(log, relevance, rng, satisfaction=satisfaction)


def simulate_clicks(
    behaviour: UserBehaviour | ClickModel | str,
    rankings: Mapping[str, Sequence[str]],
    grades: Mapping[str, Mapping[str, int]] | None = None,
    **options: Any,
) -> list[ClickEvent]:
    """Simulated users as `ClickEvent`s: one event per shown document, timestamps increasing,
    session ids unique. See `simulate_click_log` for the arguments."""
    return simulate_click_log(behaviour, rankings, grades, **options).to_events()


def _grade_cells(log: ClickLog, grades: Mapping[str, Mapping[str, int]]) -> np.ndarray:
    pair_query, pair_doc, cell_pair = log.pair_index
    per_pair = np.fromiter(
        (int(grades.get(log.query_ids[q], {}).get(log.doc_ids[d], 0)) for q, d in zip(pair_query.tolist(), pair_doc.tolist())),
        dtype=np.int64,
        count=len(pair_query),
    )
    out = np.zeros(log.docs.shape, dtype=np.int64)
    shown = cell_pair >= 0
    out[shown] = per_pair[cell_pair[shown]]
    return out


def _max_grade(grades: Mapping[str, Mapping[str, int]]) -> int:
    return max((int(g) for docs in grades.values() for g in docs.values()), default=1)


# ---------------------------------------------------------------------------------------------
# Relevance labels from clicks, and a ranker trained on them (`ltr-search train --from-events`)

LABEL_MODELS: tuple[str, ...] = ("pbm", "dbn")
LABEL_CANDIDATES: tuple[str, ...] = ("shown", "window")
# Base scales of the "shown" candidates (see `_fit_on_shown`). x64 left out: by 5-fold CV over the
# logged SciFact train queries (click labels, scored with the train qrels; 100/300 trees) it was
# the worst scale at 5 PBM sessions/query (x4 0.7620/0.7627, x16 0.7628/0.7637, x64 0.7602/0.7575)
# and at 20 (x4 0.7739/0.7832, x16 0.7771/0.7778, x64 0.7699/0.7667), yet the off-policy
# estimate, within noise of the others, picked it on one log.
DEFAULT_SHOWN_SCALES = (4.0, 16.0)
# Unshown candidates kept per query as grade-0 rows: the best the base ranks among those no page
# showed. Without them the trees never see a document from below the page and promote some at
# serving time. Measured on SciFact, 20 PBM sessions/query (test nDCG@10 minus hybrid-convex's,
# 50 trees at base x16): shown only +0.0137, 20 weak negatives +0.0068, 100 +0.0132 (the only
# CI above 0); at x4 the shown-only trees lost up to -0.004.
DEFAULT_WEAK_NEGATIVES = 100
# Attractiveness (PBM) or attractiveness x satisfaction (DBN) at or above these -> grade 1, 2.
DEFAULT_LABEL_THRESHOLDS = (0.4, 0.7)
# Beta(a, b) pseudo-counts of the label model: a mean of 0.25, so a document the users hardly
# examined (deep positions, few sessions) stays below the grade-1 threshold instead of sitting at
# 0.5 (add-one smoothing). Four pseudo-counts rather than two: one noise click on a document
# examined about once (position 5 of five sessions) no longer grades it relevant. Measured by
# 5-fold CV over the LOGGED TRAIN queries of SciFact (trained on click labels, scored with the
# train qrels; x4, 100/300 trees; hybrid-convex 0.7351): 5 PBM sessions/query (0.5, 1.5)
# 0.7574/0.7475, (1, 3) 0.7620/0.7627, (2, 6) 0.7561/0.7601; 20 sessions, two logs: (0.5, 1.5)
# 0.7767/0.7774 and 0.7786/0.7797, (1, 3) 0.7739/0.7832 and 0.7748/0.7796.
DEFAULT_LABEL_PRIOR = (1.0, 3.0)
# Fewer training queries than this with a document the click model grades relevant: too little
# evidence to learn or to cross-validate anything (5 inner folds of 2 queries each).
MIN_RELEVANT_QUERIES = 10


class NotEnoughClicksError(ValueError):
    """The log holds too little click evidence to train on: keep serving and collecting events."""


@dataclass(frozen=True)
class ClickLabelSettings:
    """How logged clicks become graded labels (Chapelle & Zhang 2009: relevance = the click
    model's attractiveness, times satisfaction for DBN), and which pages are read."""

    model: str = "pbm"
    thresholds: tuple[float, float] = DEFAULT_LABEL_THRESHOLDS
    prior: tuple[float, float] = DEFAULT_LABEL_PRIOR
    depth: int = 10  # positions of a page the click model sees
    # "shown": a query's training rows are the documents its logged pages showed (the ones the
    # click model graded); "window": its whole candidate window, unshown candidates graded 0.
    candidates: str = "shown"

    def __post_init__(self) -> None:
        if self.candidates not in LABEL_CANDIDATES:
            raise ValueError(f"unknown candidates '{self.candidates}'; choose from {', '.join(LABEL_CANDIDATES)}")
        if self.model not in LABEL_MODELS:
            raise ValueError(f"unknown label click model '{self.model}'; choose from {', '.join(LABEL_MODELS)}")
        low, high = self.thresholds
        if not 0.0 < low <= high < 1.0:
            raise ValueError(f"label thresholds must satisfy 0 < low <= high < 1, got {self.thresholds}")
        if min(self.prior) <= 0:
            raise ValueError(f"label prior pseudo-counts must be > 0, got {self.prior}")
        if self.depth < 2:
            raise ValueError(f"depth must be >= 2, got {self.depth}")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "thresholds": list(self.thresholds), "prior": list(self.prior), "depth": self.depth,
                "candidates": self.candidates}


@dataclass
class ClickLabels:
    labels: dict[str, dict[str, int]]  # query key -> doc id -> grade (docs of the logged pages)
    relevance: dict[str, dict[str, float]]  # the click model's estimate behind each grade
    examination: np.ndarray  # PBM examination per position, position 1 = 1 (what IPS divides by)
    sessions: int
    grades: dict[int, int]  # labelled (query, doc) pairs per grade


def click_log_of(pages: Sequence[Any], depth: int) -> ClickLog:
    """`ltr.click_training.LoggedPage`s as a ClickLog: one session per page, positions <= depth,
    queries by their behaviour key."""
    events = [
        ClickEvent(page.query_key, r.doc_id, r.position, True, r.position in page.clicked, page.request.timestamp,
                   page.request.request_id)
        for page in pages for r in page.request.results if r.position <= depth
    ]
    if not events:
        raise ValueError("no logged page has a result at positions 1..{depth}: nothing to fit a click model on")
    return ClickLog.from_events(events, n_positions=depth)


def click_model_labels(pages: Sequence[Any], settings: ClickLabelSettings = ClickLabelSettings()) -> ClickLabels:
    """Fit the label click model on the pages, grade every logged (query, document) pair."""
    log = click_log_of(pages, settings.depth)
    pbm = PositionBasedModel(prior=settings.prior).fit(log)
    if settings.model == "dbn":
        dbn = DynamicBayesianNetworkModel(prior=settings.prior).fit(log)
        keys = dbn.attractiveness.keys
        values = dbn.attractiveness.values * np.array([dbn.satisfaction.get(q, d) for q, d in keys])
    else:
        keys, values = pbm.attractiveness.keys, pbm.attractiveness.values
    low, high = settings.thresholds
    grades = np.where(values >= high, 2, np.where(values >= low, 1, 0))
    labels: dict[str, dict[str, int]] = {}
    relevance: dict[str, dict[str, float]] = {}
    for (query, doc), grade, value in zip(keys, grades.tolist(), values.tolist()):
        labels.setdefault(query, {})[doc] = int(grade)
        relevance.setdefault(query, {})[doc] = float(value)
    counts = {g: int((grades == g).sum()) for g in (0, 1, 2)}
    return ClickLabels(labels, relevance, pbm.examination.copy(), log.n_sessions, counts)


@dataclass
class ClickModelTrainingResult:
    fitted: Any  # ltr.training.FittedRanker (on the training queries' candidate windows)
    labels: ClickLabels
    queries: dict[str, str]  # query key -> text searched
    train_queries: list[str]
    held_out_queries: list[str]
    estimate: Any  # ltr.click_training.OffPolicyEstimate, or None without held-out pages
    label_settings: ClickLabelSettings
    alternatives: list[dict[str, Any]] = field(default_factory=list)  # candidates the estimate chose among


def train_on_click_labels(
    backend: Any, pages: Sequence[Any], features: Any, fusion: Any, settings: Any,
    label_settings: ClickLabelSettings = ClickLabelSettings(), history: Any = None,
    progress: Callable = lambda items: items, log: Callable[[str], None] | None = None, behaviour: Any = None,
) -> ClickModelTrainingResult:
    """Labels from a click model fitted on ALL logged pages, a seeded hold-out of the logged
    queries (`settings.valid_fraction`), the judged-training path (`ltr.training.fit_ranker`:
    candidate windows, the one `extract_features`, staged on the fusion with inner CV) on the
    others, and the off-policy estimate of the result on the held-out queries' pages.

    `behaviour`: the live aggregates, read by feature sets whose behaviour features leave the
    query's own history out (`ltr.features.leaves_query_out`, e.g. `text+doc-clicks`): a query's
    labels come from its own clicks, its features only from other queries' clicks, as served."""
    from ltr.click_training import off_policy_estimate
    from ltr.features import leaves_query_out
    from ltr.training import build_rows, fit_ranker, split_queries

    labels = click_model_labels(pages, label_settings)
    queries: dict[str, str] = {}
    for page in pages:
        queries.setdefault(page.query_key, page.request.query)
    keys = sorted(queries)
    train_keys, held_out = split_queries(keys, settings.valid_fraction, settings.seed)
    if log is not None:
        log(f"click model {label_settings.model} on {labels.sessions:,} logged pages: {sum(labels.grades.values()):,} "
            f"(query, document) pairs graded {labels.grades}; examination by position "
            + " ".join(f"{g:.2f}" for g in labels.examination)
            + f"; {len(train_keys):,} queries to train on, {len(held_out):,} held out for the off-policy estimate")
    relevant = sum(1 for k in train_keys if any(g > 0 for g in labels.labels.get(k, {}).values()))
    if relevant < MIN_RELEVANT_QUERIES:
        raise NotEnoughClicksError(
            f"too little click evidence: {relevant} of the {len(train_keys):,} logged training queries "
            f"{'has' if relevant == 1 else 'have'} a document "
            f"the {label_settings.model} click model grades relevant (attractiveness >= {label_settings.thresholds[0]}; "
            f"{labels.sessions:,} logged pages); at least {MIN_RELEVANT_QUERIES} are needed to learn and cross-validate "
            "anything: keep serving and collecting events, then train again")
    train_queries = {k: queries[k] for k in train_keys}
    label_safe = leaves_query_out(features)  # no feature reads the query's own clicks (its labels)
    view = behaviour if label_safe else None
    if label_settings.candidates == "shown" and settings.selection == "inner-cv" and label_safe:
        candidates = _fit_on_shown(backend, train_queries, labels.labels, features, fusion, settings, progress, log,
                                   logged_orders(pages), behaviour=view)
    else:
        candidates = [fit_ranker(backend, train_queries, labels.labels, features, fusion, settings,
                                 progress=progress, log=log, history=history)]
    held = set(held_out)
    held_pages = [p for p in pages if p.query_key in held and p.clicked]
    if not held_pages:
        return ClickModelTrainingResult(candidates[0], labels, queries, train_keys, held_out, None, label_settings)
    rows = build_rows(backend, {k: queries[k] for k in held_out}, {}, features, fusion, behaviour=view)
    # Both rankings are compared on the documents the held-out queries' pages showed: a document no
    # page showed can earn no click credit, so ranking it high would only ever count against a
    # model (measured on SciFact: models 0.01 nDCG@10 better on test read 0.01-0.1 worse). The
    # logging policy's ranking of them is its score's order, i.e. the zero-tree model's.
    shown: dict[str, set[str]] = {}
    for page in pages:
        if page.query_key in held:
            shown.setdefault(page.query_key, set()).update(r.doc_id for r in page.request.results)
    ranked = [_rankings(rows, c.trained, keep=shown) for c in candidates]
    if label_settings.candidates == "shown":  # the base is the logging policy's score (`logging_base`)
        baseline = _rankings(rows, _zero_trees(candidates[0].trained), keep=shown)
    else:  # fit_ranker chose its own base: the logging policy is its logged unexplored pages
        baseline = logged_orders([p for p in pages if p.query_key in held])
    estimates = [off_policy_estimate(held_pages, r, labels.examination, baseline=baseline) for r in ranked]
    # Selection without judgments: of the candidates (zero trees, trees per base scale), the one
    # with the highest off-policy estimate on the held-out logged queries (ties: the first).
    best = max(range(len(candidates)), key=lambda i: (round(estimates[i].model, 6), -i))
    if log is not None and len(candidates) > 1:
        log("selection by the off-policy estimate on held-out logged queries: "
            + "; ".join(f"{_describe(c.trained)} {e.model:.4f} ({e.difference:+.4f} vs logging)"
                        for c, e in zip(candidates, estimates))
            + f" -> {_describe(candidates[best].trained)}")
    result = ClickModelTrainingResult(candidates[best], labels, queries, train_keys, held_out, estimates[best],
                                      label_settings)
    result.alternatives = [{"trees": c.trained.trees, "stage": None if c.trained.stage is None else c.trained.stage.name,
                            "off_policy": e.to_dict()} for c, e in zip(candidates, estimates)]
    return result


def _describe(trained: Any) -> str:
    return f"{trained.trees} trees" + (f" on {trained.stage.name}" if trained.stage is not None and trained.trees else "")


def _zero_trees(trained: Any) -> Any:
    """The same staged model without its trees: its base, the logging policy's score."""
    from ltr.training import TrainedRanker

    if trained.stage is None:
        raise ValueError("the off-policy comparison needs a staged model (its base is the logging policy's score)")
    return TrainedRanker(trained.booster, trained.feature_names, -1, stage=trained.stage)


def _rankings(rows: Any, trained: Any, depth: int = 50,
              keep: Mapping[str, set[str]] | None = None) -> dict[str, list[str]]:
    """Each query's top `depth` window documents as the trained ranker orders them (a staged
    model with zero trees: its base); with `keep`, only those documents of each query."""
    from ltr.registry import predict_scores

    base = rows.base(trained.stage)
    scores = predict_scores(trained.booster, list(trained.feature_names), rows.features, base) if trained.trees else base
    if scores is None:
        raise ValueError("the model has no trees and no base stage")
    rankings: dict[str, list[str]] = {}
    start = 0
    for key, size in zip(rows.query_ids, rows.group_sizes.tolist()):
        block = np.asarray(scores[start:start + size])
        docs = rows.doc_ids[start:start + size]
        ordered = [docs[i] for i in np.argsort(-block, kind="stable").tolist()]
        if keep is not None:
            wanted = keep.get(key, set())
            ordered = [d for d in ordered if d in wanted]
        rankings[key] = ordered[:depth]
        start += size
    return rankings


def logged_orders(pages: Sequence[Any], depth: int = 10) -> dict[str, list[str]]:
    """Query key -> the documents of its first unexplored logged page, in shown order: the
    logging policy's own ranking (what the base stage should reproduce)."""
    orders: dict[str, list[str]] = {}
    for page in pages:
        request = page.request
        if request.page_offset == 0 and not request.was_explored and page.query_key not in orders:
            orders[page.query_key] = [r.doc_id for r in request.results[:depth]]
    return orders


def logging_base(rows: Any, orders: Mapping[str, Sequence[str]]) -> tuple[str, dict[str, float]]:
    """The first-stage column whose top of each window agrees best with the logged pages
    (share of positions holding the logged document): the logging policy's score, which the
    trees are stacked on, so that a model with zero trees ranks as the traffic it learned from."""
    agreement: dict[str, list[float]] = {key: [] for key in rows.first_stage}
    start = 0
    for query_id, size in zip(rows.query_ids, rows.group_sizes.tolist()):
        logged = orders.get(query_id)
        if logged:
            docs = rows.doc_ids[start:start + size]
            for key, values in rows.first_stage.items():
                top = np.argsort(-values[start:start + size], kind="stable")[:len(logged)]
                agreement[key].append(float(np.mean([docs[i] == d for i, d in zip(top.tolist(), logged)])))
        start += size
    means = {key: float(np.mean(v)) if v else 0.0 for key, v in agreement.items()}
    return max(means, key=lambda key: means[key]), means


def _fit_on_shown(backend: Any, queries: Mapping[str, str], labels: Mapping[str, Mapping[str, int]], features: Any,
                  fusion: Any, settings: Any, progress: Callable, log: Callable[[str], None] | None,
                  orders: Mapping[str, Sequence[str]] | None = None,
                  scales: Sequence[float] = DEFAULT_SHOWN_SCALES,
                  weak_negatives: int = DEFAULT_WEAK_NEGATIVES, behaviour: Any = None) -> list[Any]:
    """`fit_ranker`'s inner-CV path on the logged documents of each query's window, plus the
    best `weak_negatives` unshown candidates of the logging policy's score at grade 0.

    A document no page showed has no click evidence; grading every unshown candidate 0 (the
    "window" scope) drowns the page in them and credits the logging policy in the inner CV, while
    training on shown documents alone let the trees promote unshown ones at serving time (they
    never saw one). The trees are stacked on the logging policy's score (`logging_base`).

    Candidates returned: zero trees (the logging policy itself), then, per base scale in
    `scales` (how far the base holds a document the trees like), the trees at the inner CV's
    peak; the caller picks one by the off-policy estimate, which ranks whole windows."""
    import time

    from ltr.training import FittedRanker, build_rows, inner_cross_validation, train_ranker

    started = time.perf_counter()
    rows = build_rows(backend, queries, labels, features, fusion, progress=progress, behaviour=behaviour)
    if orders:
        key, agreement = logging_base(rows, orders)
        rows.first_stage = {key: rows.first_stage[key]}  # the only base the inner CV may choose
        if log is not None:
            log(f"base stage: the logging policy's score, {key} (its top 10 matches {agreement[key]:.1%} of the "
                f"logged positions; next best {sorted(agreement.values())[-2]:.1%})")
    rows = keep_labelled(rows, labels, weak_negatives)
    feature_seconds = time.perf_counter() - started
    if log is not None:
        log(f"features: {len(rows.labels):,} (query, document) pairs, shown ones and weak negatives, of {len(rows.query_ids):,} queries in "
            f"{feature_seconds:.1f} s")
    fitted = []
    for scale in scales:  # the base's weight against the trees: how far the trees may move a document
        scaled = replace(settings, base_scales=(scale,))
        chosen = inner_cross_validation(rows, features.names, scaled, fusion, log=log)
        wanted = [0, chosen.best_rounds] if not fitted else [chosen.best_rounds] if chosen.best_rounds else []
        for rounds in dict.fromkeys(wanted):  # zero trees (once): the logging policy itself
            trained = train_ranker(rows, features.names, scaled.regularised(chosen.regularisation), log=log,
                                   stage=chosen.stage, rounds=rounds)
            trained.inner_cv = chosen
            trained.seconds += chosen.seconds
            fitted.append(FittedRanker(rows, trained, list(dict.fromkeys(rows.query_ids)), [], feature_seconds))
    return fitted


def keep_labelled(rows: Any, labels: Mapping[str, Mapping[str, int]], weak_negatives: int = 0) -> Any:
    """The rows whose (query, document) has a label, plus per query the `weak_negatives`
    unlabelled rows its (single) first-stage column ranks best, at grade 0; groups that keep no
    labelled row are dropped."""
    from ltr.training import RankingRows

    keep = np.zeros(len(rows.doc_ids), dtype=bool)
    sizes, query_ids = [], []
    base = next(iter(rows.first_stage.values())) if weak_negatives and rows.first_stage else None
    start = 0
    for query_id, size in zip(rows.query_ids, rows.group_sizes.tolist()):
        graded = labels.get(query_id, {})
        mask = np.fromiter((doc in graded for doc in rows.doc_ids[start:start + size]), dtype=bool, count=size)
        if base is not None and mask.any():
            unshown = np.flatnonzero(~mask)
            best = unshown[np.argsort(-base[start:start + size][unshown], kind="stable")[:weak_negatives]]
            mask[best] = True
        keep[start:start + size] = mask
        if mask.any():
            sizes.append(int(mask.sum()))
            query_ids.append(query_id)
        start += size
    index = np.flatnonzero(keep)
    return RankingRows(
        query_ids=query_ids, doc_ids=[rows.doc_ids[i] for i in index.tolist()], features=rows.features[index],
        labels=rows.labels[index], group_sizes=np.array(sizes, dtype=np.int64),
        relevant_outside_window=rows.relevant_outside_window,
        group_weights=None, first_stage={key: values[index] for key, values in rows.first_stage.items()},
    )
