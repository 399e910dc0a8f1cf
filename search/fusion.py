"""Score fusion for hybrid retrieval: small pure functions over aligned numpy arrays.

Every array is indexed by candidate. Ranks are 1-based with NaN for "not retrieved by this
retriever"; scores are NaN where a retriever cannot score a candidate at all.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

DEFAULT_RRF_K = 60.0  # Cormack, Clarke & Buettcher (2009)
NORMALISATIONS = ("min-max", "z-score")
# Dense weights a tuned convex fusion chooses from (0, 0.05, ..., 1), with every normalisation:
# `hybrid-tuned` grid-searches them, and a learned ranker's base fusion is chosen among them.
CONVEX_WEIGHT_GRID = tuple(round(0.05 * i, 2) for i in range(21))


def fuse_reciprocal_rank(ranks: Sequence[np.ndarray], k: float = DEFAULT_RRF_K) -> np.ndarray:
    """Reciprocal rank fusion: sum over retrievers of 1 / (k + rank); a retriever that did not
    return a candidate contributes nothing."""
    if k < 0:
        raise ValueError(f"RRF k must be >= 0, got {k}")
    total = np.zeros(len(ranks[0]) if ranks else 0, dtype=np.float64)
    for rank in ranks:
        rank = np.asarray(rank, dtype=np.float64)
        total += np.where(np.isnan(rank), 0.0, 1.0 / (k + np.nan_to_num(rank, nan=1.0)))
    return total


def normalise_min_max(scores: np.ndarray) -> np.ndarray:
    """Map to [0, 1] over the candidates; a constant list maps to 0 (it carries no preference)."""
    scores = np.asarray(scores, dtype=np.float64)
    finite = scores[np.isfinite(scores)]
    if not len(finite):
        return np.full_like(scores, np.nan)
    low, high = finite.min(), finite.max()
    if high == low:
        return np.where(np.isfinite(scores), 0.0, np.nan)
    return (scores - low) / (high - low)


def normalise_z_score(scores: np.ndarray) -> np.ndarray:
    """Standardise over the candidates; a constant list maps to 0."""
    scores = np.asarray(scores, dtype=np.float64)
    finite = scores[np.isfinite(scores)]
    if not len(finite):
        return np.full_like(scores, np.nan)
    spread = finite.std()
    if spread == 0:
        return np.where(np.isfinite(scores), 0.0, np.nan)
    return (scores - finite.mean()) / spread


_NORMALISERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "min-max": normalise_min_max,
    "z-score": normalise_z_score,
}


def normaliser(name: str) -> Callable[[np.ndarray], np.ndarray]:
    try:
        return _NORMALISERS[name]
    except KeyError:
        raise ValueError(f"unknown normalisation '{name}'; choose {' or '.join(NORMALISATIONS)}") from None


def fuse_convex(scores: Sequence[np.ndarray], weights: Sequence[float], normalisation: str = "min-max") -> np.ndarray:
    """Weighted sum of per-retriever normalised scores. A NaN score (retriever unavailable for
    that candidate) contributes the retriever's lowest normalised value, never a silent 0."""
    if len(scores) != len(weights):
        raise ValueError(f"{len(scores)} score lists but {len(weights)} weights")
    if any(w < 0 for w in weights):
        raise ValueError(f"fusion weights must be >= 0, got {list(weights)}")
    normalise = normaliser(normalisation)
    total = np.zeros(len(scores[0]) if scores else 0, dtype=np.float64)
    for column, weight in zip(scores, weights):
        if weight == 0:
            continue
        normalised = normalise(column)
        if np.isnan(normalised).all():
            continue
        total += weight * np.where(np.isnan(normalised), np.nanmin(normalised), normalised)
    return total
