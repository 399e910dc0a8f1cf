"""Feature drift: how far the rows a model serves have moved from the rows it was trained on.

At training time `feature_reference` bins every feature (and the model's score) on the training
rows: interior cut points at the deciles of the non-missing values (deduplicated, so a feature
with point masses gets fewer bins), open-ended outer bins, and missing (NaN) as a category of
its own. The reference is plain JSON and travels in the model's manifest (`reference`).

At serving time the same bins are filled with served rows and compared with the population
stability index, PSI = sum((a - e) * ln(a / e)) over the bins, the missing bin included:

    < PSI_MODERATE (0.1)             stable
    PSI_MODERATE .. PSI_SIGNIFICANT  moderate shift: worth a look
    >= PSI_SIGNIFICANT (0.25)        significant shift: the model sees rows unlike its training rows

The missing share is also reported on its own, training and served, because "this feature is
suddenly missing" is the commonest real-world drift (a broken field, an index without bigrams).

Caveat on what is compared: the training rows are whole candidate windows, while the request log
and the service's `RankingOutcome` hold only the shown page (the model's top results). The top of
a ranking has systematically higher BM25, coverage, fused scores and model scores than the whole
window, so comparing a page against whole windows reports drift that is only selection. Build the
reference with `top_k=<page size>` and the query grouping (`group_sizes`) to compare like with like:
it then describes the rows the model would put on the first page of each training query.

`DriftMonitor` is the service's side: a thread-safe rolling window of the last served rows,
`observe` on every request, `report` on every /metrics scrape (recomputed at most every
`refresh_s` seconds, cached in between).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_BINS = 10
# A value holding at least this share of one bin's worth of values (here half a decile) gets a bin
# of its own: see binned_distribution.
POINT_MASS_SHARE = 0.5
# Floor for a bin's share before the log in PSI: an empty bin on either side would make PSI
# infinite. 1e-4 is the usual choice; it caps one empty bin's term at about (a - 1e-4) * ln(a / 1e-4),
# e.g. 0.05 * ln(500) = 0.31 for a bin holding 5% on the other side.
PSI_EPSILON = 1e-4
PSI_MODERATE = 0.1
PSI_SIGNIFICANT = 0.25
DEFAULT_WINDOW_ROWS = 5000
DEFAULT_MIN_ROWS = 200  # below this a report is mostly sampling noise: report() gives None
DEFAULT_REFRESH_S = 5.0
WORST_FEATURES = 5
REFERENCE_FORMAT = 1

# Gauges a service exports, name -> (help, label names); see `prometheus_samples`.
PROMETHEUS_GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "ltr_search_feature_psi": ("population stability index of a feature, served rows vs training rows", ("feature",)),
    "ltr_search_feature_missing_share": ("share of rows where a feature is missing (NaN)", ("feature", "source")),
    "ltr_search_score_psi": ("population stability index of the model score, served vs training", ()),
    "ltr_search_drift_rows": ("served rows in the drift window", ()),
}


def drift_level(psi: float) -> str:
    """'stable', 'moderate' or 'significant' by the conventional PSI thresholds."""
    if psi >= PSI_SIGNIFICANT:
        return "significant"
    if psi >= PSI_MODERATE:
        return "moderate"
    return "stable"


def population_stability_index(expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray,
                               epsilon: float = PSI_EPSILON) -> float:
    """PSI = sum((a - e) * ln(a / e)) over bin shares. Shares below `epsilon` are raised to it
    (without renormalising) so empty bins give a large but finite term. 0 for identical shares;
    every term is >= 0, so PSI never decreases when one side moves further away."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), epsilon)
    a = np.maximum(np.asarray(actual, dtype=np.float64), epsilon)
    if e.shape != a.shape or e.ndim != 1:
        raise ValueError(f"expected and actual must be 1-D and of one length, got {e.shape} and {a.shape}")
    return float(np.sum((a - e) * np.log(a / e)))


# ----------------------------------------------------------------------------------- reference


@dataclass
class BinnedDistribution:
    """One variable's training distribution. Bin i of the values is [edges[i-1], edges[i]) with
    open outer bins, so there are len(edges) + 1 value bins; `proportions` are their shares of
    ALL rows and `missing_share` is the NaN share, so proportions + [missing_share] sums to 1."""

    edges: list[float]
    proportions: list[float]
    missing_share: float

    def shares(self, values: np.ndarray) -> np.ndarray:
        """The same bins filled with `values`: value-bin shares, then the missing share (sums to 1)."""
        return _shares(np.asarray(values, dtype=np.float64), np.asarray(self.edges, dtype=np.float64))

    def expected(self) -> np.ndarray:
        return np.asarray([*self.proportions, self.missing_share], dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"edges": list(self.edges), "proportions": list(self.proportions), "missing_share": self.missing_share}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], what: str = "distribution") -> BinnedDistribution:
        if not isinstance(data, Mapping) or set(data) != {"edges", "proportions", "missing_share"}:
            raise ValueError(f"{what} must have exactly the keys edges, proportions, missing_share")
        edges = [float(x) for x in data["edges"]]
        proportions = [float(x) for x in data["proportions"]]
        missing = float(data["missing_share"])
        if not all(math.isfinite(x) for x in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"{what}.edges must be finite and strictly increasing")
        if len(proportions) != len(edges) + 1:
            raise ValueError(f"{what} has {len(edges)} edges but {len(proportions)} proportions (expected {len(edges) + 1})")
        if any(not 0.0 <= p <= 1.0 for p in [*proportions, missing]) or abs(sum(proportions) + missing - 1.0) > 1e-6:
            raise ValueError(f"{what}: proportions and missing_share must be shares summing to 1")
        return cls(edges, proportions, missing)


def binned_distribution(values: np.ndarray, bins: int = DEFAULT_BINS) -> BinnedDistribution:
    """Quantile bins of the finite values (NaN is missing; +-inf land in the outer bins).

    Cut points are the inner `bins`-quantiles taken as data values (numpy's "lower" method),
    deduplicated. A value holding at least POINT_MASS_SHARE / bins of the values (a constant, the
    zeros of a sparse feature, the small integers of a count) also gets a cut just above it, so it
    is a bin of its own: a share moving between 0 and "anything above 0" then shows, and for a
    constant any other served value falls in an outer bin that was empty in training. No finite
    values at all (a NaN-only feature): one value bin, empty in training."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    x = np.asarray(values, dtype=np.float64).ravel()
    finite = np.sort(x[np.isfinite(x)])
    edges = np.empty(0)
    if finite.size:
        quantiles = np.quantile(finite, np.linspace(0.0, 1.0, bins + 1)[1:-1], method="lower") if bins > 1 else []
        candidates = np.unique(np.concatenate((quantiles, finite[:1])))  # the minimum too: a mass at it
        counts = np.searchsorted(finite, candidates, side="right") - np.searchsorted(finite, candidates, side="left")
        masses = candidates[counts >= POINT_MASS_SHARE * finite.size / bins]
        edges = np.unique(np.concatenate((quantiles, masses, np.nextafter(masses, np.inf))))
    shares = _shares(x, edges)
    return BinnedDistribution([float(e) for e in edges], [float(p) for p in shares[:-1]], float(shares[-1]))


def _shares(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    n = x.size
    if n == 0:
        return np.zeros(edges.size + 2)
    missing = np.isnan(x)
    index = np.searchsorted(edges, x[~missing], side="right")
    counts = np.bincount(index, minlength=edges.size + 1).astype(np.float64)
    return np.append(counts, missing.sum()) / n


@dataclass
class FeatureReference:
    """Per-feature and score distributions of a model's training rows (JSON via to_dict/from_dict)."""

    names: list[str]
    features: list[BinnedDistribution]  # in `names` order
    score: BinnedDistribution
    rows: int  # training rows the distributions were taken from
    bins: int  # bins asked for (features with point masses have fewer)
    population: str  # which rows: "all training rows" or "top K rows per query by model score"

    def __post_init__(self) -> None:
        if len(self.names) != len(self.features) or len(set(self.names)) != len(self.names):
            raise ValueError("a reference needs one distribution per distinct feature name")

    def feature(self, name: str) -> BinnedDistribution:
        return self.features[self.names.index(name)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REFERENCE_FORMAT, "rows": self.rows, "bins": self.bins, "population": self.population,
            "features": {name: dist.to_dict() for name, dist in zip(self.names, self.features)},
            "score": self.score.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureReference:
        keys = {"format", "rows", "bins", "population", "features", "score"}
        if not isinstance(data, Mapping) or set(data) != keys:
            got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(f"a feature reference must have exactly the keys {sorted(keys)}, got {got}")
        if data["format"] != REFERENCE_FORMAT:
            raise ValueError(f"feature reference format {data['format']!r} is not {REFERENCE_FORMAT} (written by another engine)")
        features = data["features"]
        if not isinstance(features, Mapping) or not features:
            raise ValueError("feature reference 'features' must be a non-empty object of name -> distribution")
        names = [str(name) for name in features]
        return cls(
            names=names,
            features=[BinnedDistribution.from_dict(features[name], f"features[{name!r}]") for name in names],
            score=BinnedDistribution.from_dict(data["score"], "score"),
            rows=int(data["rows"]), bins=int(data["bins"]), population=str(data["population"]),
        )


def feature_reference(features: np.ndarray, names: Sequence[str], scores: np.ndarray, bins: int = DEFAULT_BINS, *,
                      group_sizes: Sequence[int] | np.ndarray | None = None, top_k: int | None = None) -> FeatureReference:
    """The reference of a model from its training rows (float [rows, features], NaN = missing) and
    its scores of those rows. With `group_sizes` (rows per query, contiguous, as in RankingRows)
    and `top_k`, only the k best-scored rows of each query are used: what a served page shows."""
    x = np.asarray(features, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64).ravel()
    names = [str(n) for n in names]
    if x.ndim != 2 or x.shape[1] != len(names) or x.shape[0] != s.size:
        raise ValueError(f"features {x.shape} must be [rows, {len(names)}] with one score per row ({s.size} scores)")
    if x.shape[0] == 0:
        raise ValueError("a reference needs at least one training row")
    population = "all training rows"
    if top_k is not None:
        if group_sizes is None or top_k < 1:
            raise ValueError("top_k needs group_sizes (rows per query) and must be >= 1")
        keep = top_rows(s, group_sizes, top_k)
        x, s = x[keep], s[keep]
        population = f"top {top_k} rows per query by model score"
    return FeatureReference(
        names=names, features=[binned_distribution(x[:, j], bins) for j in range(len(names))],
        score=binned_distribution(s, bins), rows=int(x.shape[0]), bins=int(bins), population=population,
    )


def top_rows(scores: np.ndarray, group_sizes: Sequence[int] | np.ndarray, k: int) -> np.ndarray:
    """Row indices of the k highest scores of each contiguous group (ties: first row first)."""
    sizes = np.asarray(group_sizes, dtype=np.int64)
    if sizes.sum() != len(scores) or (sizes < 0).any():
        raise ValueError(f"group_sizes sum to {int(sizes.sum())} but there are {len(scores)} rows")
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    picked = [start + np.argsort(-scores[start:start + size], kind="stable")[:k] for start, size in zip(starts, sizes)]
    return np.sort(np.concatenate(picked)) if picked else np.empty(0, dtype=np.int64)


# ----------------------------------------------------------------------------------- reports


@dataclass
class FeatureDrift:
    name: str
    psi: float  # over the value bins and the missing bin
    training_missing_share: float
    served_missing_share: float
    served_rows: int

    @property
    def level(self) -> str:
        return drift_level(self.psi)


@dataclass
class DriftReport:
    features: list[FeatureDrift]  # in the reference's feature order
    score_psi: float | None  # None when no scores were given
    rows: int  # served rows compared
    reference_rows: int
    population: str  # which training rows the reference describes
    model_version: str | None = None
    time_range: tuple[float, float] | None = None  # unix seconds of the first and last served row
    worst: list[str] = field(default_factory=list)  # up to WORST_FEATURES names at >= PSI_MODERATE, worst first
    min_rows: int = 0  # below this many served rows nothing is flagged: PSI of a small sample is noise

    @property
    def enough_rows(self) -> bool:
        return self.rows >= self.min_rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows, "reference_rows": self.reference_rows, "population": self.population,
            "model_version": self.model_version, "time_range": list(self.time_range) if self.time_range else None,
            "score_psi": self.score_psi, "worst": list(self.worst), "min_rows": self.min_rows,
            "enough_rows": self.enough_rows,
            "features": [
                {"name": f.name, "psi": f.psi, "level": f.level, "training_missing_share": f.training_missing_share,
                 "served_missing_share": f.served_missing_share, "served_rows": f.served_rows}
                for f in self.features
            ],
        }


def drift_report(reference: FeatureReference, rows: np.ndarray, names: Sequence[str], scores: np.ndarray | None = None,
                 *, model_version: str | None = None, time_range: tuple[float, float] | None = None,
                 epsilon: float = PSI_EPSILON, min_rows: int = DEFAULT_MIN_ROWS) -> DriftReport:
    """Compare served rows (float [n, len(names)], NaN = missing) and their scores with the
    reference. Columns are matched by name; every reference feature must be among `names`.
    Under `min_rows` served rows the PSIs are reported but no feature is flagged (`worst` is
    empty): 5 rows spread over 10 bins give a PSI above 0.25 for every feature by chance alone."""
    x = np.asarray(rows, dtype=np.float64)
    names = list(names)
    if x.ndim != 2 or x.shape[1] != len(names):
        raise ValueError(f"rows must be [n, {len(names)}] for {len(names)} names, got shape {x.shape}")
    column = {name: j for j, name in enumerate(names)}
    absent = [name for name in reference.names if name not in column]
    if absent:
        raise ValueError(f"served rows lack reference features {absent}")
    n = x.shape[0]
    drifts = []
    for name, dist in zip(reference.names, reference.features):
        actual = dist.shares(x[:, column[name]])
        drifts.append(FeatureDrift(
            name=name, psi=population_stability_index(dist.expected(), actual, epsilon) if n else 0.0,
            training_missing_share=dist.missing_share, served_missing_share=float(actual[-1]), served_rows=n,
        ))
    score_psi = None
    if scores is not None:
        s = np.asarray(scores, dtype=np.float64).ravel()
        if s.size != n:
            raise ValueError(f"{s.size} scores for {n} rows")
        score_psi = population_stability_index(reference.score.expected(), reference.score.shares(s), epsilon) if n else 0.0
    ranked = sorted(drifts, key=lambda f: -f.psi)
    worst = [f.name for f in ranked if f.psi >= PSI_MODERATE][:WORST_FEATURES] if n >= min_rows else []
    return DriftReport(drifts, score_psi, n, reference.rows, reference.population, model_version, time_range, worst,
                       min_rows)


def format_drift(report: DriftReport | None) -> list[str]:
    """Lines for the CLI: a summary, then one line per feature, largest PSI first, flagged."""
    if report is None:
        return ["drift: no reference or not enough served rows to compare"]
    span = ""
    if report.time_range:
        first, last = (datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") for t in report.time_range)
        span = f", {first} .. {last} UTC"
    lines = [
        f"drift of model {report.model_version or '?'}: {report.rows} served rows{span} vs {report.reference_rows} "
        f"training rows ({report.population}); PSI < {PSI_MODERATE:g} stable, >= {PSI_SIGNIFICANT:g} significant",
    ]
    flag = _flag if report.enough_rows else (lambda psi: "")
    if not report.enough_rows:
        lines.append(f"  too few served rows to flag drift ({report.rows} < {report.min_rows}): PSI shown for "
                     "information only")
    if report.score_psi is not None:
        lines.append(f"  {'(model score)':<28} PSI {report.score_psi:7.3f}  {flag(report.score_psi)}".rstrip())
    width = max([28, *(len(f.name) for f in report.features)])
    for f in sorted(report.features, key=lambda f: -f.psi):
        lines.append(
            f"  {f.name:<{width}} PSI {f.psi:7.3f}  missing {f.training_missing_share:6.1%} -> "
            f"{f.served_missing_share:6.1%}  {flag(f.psi)}".rstrip()
        )
    return lines


def _flag(psi: float) -> str:
    level = drift_level(psi)
    return {"stable": "", "moderate": "moderate shift", "significant": "SIGNIFICANT SHIFT"}[level]


def prometheus_samples(report: DriftReport | None) -> list[tuple[str, dict[str, str], float]]:
    """(metric name, labels, value) for every gauge in PROMETHEUS_GAUGES; [] without a report."""
    if report is None:
        return []
    samples: list[tuple[str, dict[str, str], float]] = []
    if not report.enough_rows:  # no PSI series an alert rule could fire on; the row count says why
        return [("ltr_search_drift_rows", {}, float(report.rows))]
    for f in report.features:
        samples.append(("ltr_search_feature_psi", {"feature": f.name}, f.psi))
        samples.append(("ltr_search_feature_missing_share", {"feature": f.name, "source": "training"},
                        f.training_missing_share))
        samples.append(("ltr_search_feature_missing_share", {"feature": f.name, "source": "served"},
                        f.served_missing_share))
    if report.score_psi is not None:
        samples.append(("ltr_search_score_psi", {}, report.score_psi))
    samples.append(("ltr_search_drift_rows", {}, float(report.rows)))
    return samples


def set_gauges(gauges: Mapping[str, Any], report: DriftReport | None) -> None:
    """Clear and set prometheus_client Gauges (name -> Gauge, made from PROMETHEUS_GAUGES) from a
    report, so a feature or model that went away leaves no stale value.

    Every series the report does not set reads NaN ("not measured now"), never its last value:
    an unlabelled gauge (`ltr_search_score_psi`) cannot be cleared, and under `serve --workers N`
    (prometheus_client's multiprocess mode) `clear()` removes nothing, since each worker's
    series live on in its sample file. A NaN matches no alert threshold."""
    for gauge in gauges.values():
        if not gauge._labelnames:  # prometheus_client keeps no public list of labels or children
            gauge.set(math.nan)
            continue
        for child in list(gauge._metrics.values()):
            child.set(math.nan)
        gauge.clear()
    for name, labels, value in prometheus_samples(report):
        gauge = gauges[name]
        (gauge.labels(**labels) if labels else gauge).set(value)


# ----------------------------------------------------------------------------------- served rows


def served_rows(event_store: Any, model_version: str, names: Sequence[str], since: float | None = None,
                limit_requests: int = 1000, until: float | None = None
                ) -> tuple[np.ndarray, np.ndarray, tuple[float, float] | None]:
    """Feature rows (float32 [n, len(names)], NaN = missing), their served scores and the (first,
    last) request time of the last `limit_requests` requests `model_version` served in
    [since, until). Results logged without features, or without one of `names`, are skipped.

    The request log is read oldest first (EventStore.iter_requests), so without `since` the whole
    log is scanned to find the most recent requests: pass a `since` on a long-lived store."""
    names = list(names)
    recent: deque[tuple[float, list[list[float]], list[float]]] = deque(maxlen=max(int(limit_requests), 0) or None)
    for request in event_store.iter_requests(since, until):
        if request.model_version != model_version:
            continue
        rows, scores = [], []
        for result in request.results:
            values = result.features
            if values is None or any(name not in values for name in names):
                continue
            rows.append([values[name] for name in names])
            scores.append(result.score)
        if rows:
            recent.append((request.timestamp, rows, scores))
    if not recent or limit_requests <= 0:
        return np.empty((0, len(names)), dtype=np.float32), np.empty(0, dtype=np.float64), None
    features = np.asarray([row for _, rows, _ in recent for row in rows], dtype=np.float32)
    scores = np.asarray([score for _, _, scores in recent for score in scores], dtype=np.float64)
    return features, scores, (recent[0][0], recent[-1][0])


# ----------------------------------------------------------------------------------- the monitor


class DriftMonitor:
    """The last `window` served rows of one model, compared with its training reference on demand.

    `observe` is called by request threads and copies rows into a ring buffer under a lock
    (a deque of rows in effect, without a Python object per row); `report` copies the buffer
    under that lock and computes outside it, at most once per `refresh_s` (one computation at a
    time; concurrent scrapes get the cached report). Wall-clock times of observations give the
    report's time range."""

    def __init__(self, reference: FeatureReference, names: Sequence[str] | None = None, *,
                 model_version: str | None = None, window: int = DEFAULT_WINDOW_ROWS,
                 min_rows: int = DEFAULT_MIN_ROWS, refresh_s: float = DEFAULT_REFRESH_S,
                 clock=time.monotonic, wall_clock=time.time):
        if window < 1:
            raise ValueError(f"window must be >= 1 row, got {window}")
        self.reference = reference
        self.names = list(names) if names is not None else list(reference.names)
        missing = [name for name in reference.names if name not in self.names]
        if missing:
            raise ValueError(f"observed rows would lack reference features {missing}")
        self.model_version = model_version
        self.window, self.min_rows, self.refresh_s = int(window), int(min_rows), float(refresh_s)
        self._clock, self._wall_clock = clock, wall_clock
        self._rows = np.full((self.window, len(self.names)), np.nan, dtype=np.float32)
        self._scores = np.full(self.window, np.nan, dtype=np.float64)
        self._times = np.zeros(self.window, dtype=np.float64)
        self._next = 0  # ring position of the next write
        self._count = 0  # rows held (<= window)
        self._observed = 0  # rows ever observed
        self._lock = threading.Lock()
        self._report_lock = threading.Lock()
        self._cached: DriftReport | None = None
        self._cached_at: float | None = None
        self._cached_observed = -1

    @classmethod
    def for_manifest(cls, manifest: Any, **options: Any) -> DriftMonitor | None:
        """A monitor for a registry model (ModelManifest), or None when its manifest has no
        reference or an unreadable one (logged: drift monitoring never stops a model serving)."""
        data = getattr(manifest, "reference", None)
        if data is None:
            return None
        try:
            reference = FeatureReference.from_dict(data)
            return cls(reference, manifest.feature_names, model_version=manifest.version, **options)
        except (ValueError, TypeError, KeyError) as exc:
            logger.warning("model %s: drift reference unusable, drift not monitored: %s", manifest.version, exc)
            return None

    @property
    def observed(self) -> int:
        """Rows observed since construction (not only those still in the window)."""
        return self._observed

    def __len__(self) -> int:
        return self._count

    def observe(self, feature_rows: np.ndarray, scores: np.ndarray | Sequence[float]) -> None:
        """Add served rows (float [n, len(names)], NaN = missing) and the scores they got."""
        rows = np.asarray(feature_rows, dtype=np.float32)
        s = np.asarray(scores, dtype=np.float64).ravel()
        if rows.ndim != 2 or rows.shape[1] != len(self.names) or rows.shape[0] != s.size:
            raise ValueError(f"observe needs rows [n, {len(self.names)}] and n scores, got {rows.shape} and {s.size}")
        n = rows.shape[0]
        if n == 0:
            return
        if n > self.window:
            rows, s = rows[-self.window:], s[-self.window:]
        now = self._wall_clock()
        with self._lock:
            positions = (self._next + np.arange(len(s))) % self.window
            self._rows[positions] = rows
            self._scores[positions] = s
            self._times[positions] = now
            self._next = int((self._next + len(s)) % self.window)
            self._count = min(self.window, self._count + len(s))
            self._observed += n

    def observe_outcome(self, outcome: Any) -> None:
        """Observe a RankingOutcome's shown results (duck-typed: `model_version`, `feature_names`
        and `results[i].features` / `.score`); outcomes of other models or pipelines are ignored."""
        if outcome.feature_names is None or outcome.model_version != self.model_version:
            return
        results = [r for r in outcome.results if r.features is not None]
        if not results:
            return
        rows = np.stack([np.asarray(r.features, dtype=np.float32) for r in results])
        if list(outcome.feature_names) != self.names:
            order = [list(outcome.feature_names).index(name) for name in self.names]
            rows = rows[:, order]
        self.observe(rows, [r.score for r in results])

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, tuple[float, float] | None]:
        """Copies of the window's rows and scores (oldest first) and its time range."""
        with self._lock:
            count, start = self._count, (self._next - self._count) % self.window
            order = (start + np.arange(count)) % self.window
            rows, scores, times = self._rows[order], self._scores[order], self._times[order]
        return rows, scores, ((float(times[0]), float(times[-1])) if count else None)

    def report(self) -> DriftReport | None:
        """The drift of the current window (None below `min_rows`), recomputed at most every
        `refresh_s` seconds and only when rows arrived since the last one."""
        with self._report_lock:
            now = self._clock()
            fresh = self._cached_at is not None and now - self._cached_at < self.refresh_s
            if fresh or self._cached_observed == self._observed:
                return self._cached
            observed = self._observed
            rows, scores, span = self.snapshot()
            if len(scores) < self.min_rows:
                report = None
            else:
                report = drift_report(self.reference, rows, self.names, scores,
                                      model_version=self.model_version, time_range=span, min_rows=self.min_rows)
            self._cached, self._cached_at, self._cached_observed = report, now, observed
            return report
