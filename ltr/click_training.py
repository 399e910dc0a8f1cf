"""LambdaMART trained from clicks: the request log (the feature log) joined with click events.

Every served request stores, per shown result, the exact feature row the serving model scored,
so rows built from it are point in time by construction: no feature is recomputed later, with
behaviour aggregates or an index that have moved on since.

The join (`join_clicks`): a served request with at least one click is one query group; its
rows are the shown results whose logged features cover the requested feature set (results logged
without features, i.e. served by a non-model pipeline, are skipped and counted); a clicked
result is labelled 1. Which non-clicked results are negatives (`negatives`):

* `skip-above` (default): those ranked above the request's LAST click; the user scanned past
  them to reach it (Joachims et al. 2005, "skip above").
* `examined`: those at positions <= last click + 1, i.e. skip-above plus the result right below
  the last click, which the user most likely looked at before stopping.

Results below that cut-off are dropped: never examined, so no evidence either way. A request
whose kept rows hold no negative (one click at position 1 under skip-above) gives no pair and is
skipped and counted.

Debiasing clicks for position (`debias`):

* `none`: the plain click labels.
* `ips`: inverse propensity scoring (Joachims, Swaminathan & Schnabel 2017, "Unbiased
  learning-to-rank with biased feedback"): every pair of a click is weighted 1 / p(position of
  the click), p the PBM examination propensity fitted by the behaviour store (position 1 = 1).
  XGBoost's ranking objectives take one weight per query GROUP, so a request is split into one
  group per click (that click plus the request's negatives) weighted 1 / p. Weights are clipped
  at `IPS_MAX_WEIGHT` (= 1 / 0.05) to bound the estimator's variance.
* `unbiased-lambdamart`: XGBoost's own position debiasing (`lambdarank_unbiased`, Hu et al.
  2019), which estimates the bias per position jointly with the ranker. XGBoost reads the
  position of a row from its ORDER inside the group: there is no position field. Its objective
  (src/objective/lambdarank_obj.cc, CalcLambdaForGroup: "We use `idx_high` since it represents
  the original position from the label list, and label list is assumed to be sorted") indexes
  the bias vectors ti+/tj- by the row's index in the group, and its click demo
  (demo/guide-python/learning_to_rank.py) sorts each query's rows by shown position with
  `xgboost.testing.data.sort_ltr_samples` before fitting with `lambdarank_unbiased=True`,
  `lambdarank_pair_method="topk"`. The tutorial ("Learning to Rank" -> "Position Bias", XGBoost
  3.x docs) points to that demo. So rows are fed in shown order, and only requests whose kept
  rows are exactly positions 1..n (no page offset, no unlogged row in between) are used, so that
  row index == position - 1; the others are skipped and counted. Unbiased LambdaMART is run with
  the `topk` pair method (the ranker's default; XGBoost's own parameter strategy,
  xgboost/testing/params.py, never combines `lambdarank_unbiased` with `mean`).

Rows are always emitted in shown order (whatever the mode), so the fingerprint and the
validation groups do not depend on the debias mode.

Validation: a seeded fraction of REQUESTS is held out (`split_queries`), and training early-stops
on click nDCG@10 of those requests (one group per request, plain click labels, no weights). Clicks
are position-biased, so this metric is biased towards the logging ranker: it is only a stopping
rule, not an evaluation of the model.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Literal, Sequence

import numpy as np

from search.event_store import EventStore, ServedRequest
from ltr.features import FEATURE_SETS, FeatureSet, feature_set
from ltr.training import RankingRows, TrainedRanker, TrainingSettings, split_queries, train_ranker

Negatives = Literal["skip-above", "examined"]
Debias = Literal["none", "ips", "unbiased-lambdamart"]
NEGATIVES: tuple[str, ...] = ("skip-above", "examined")
DEBIAS: tuple[str, ...] = ("none", "ips", "unbiased-lambdamart")
# Largest IPS group weight: 1 / 0.05. A click at a position examined 5% of the time (or less,
# including positions the PBM fit saw no data for, whose propensity it floors at 1e-6) counts 20
# times a click at position 1, not 100 or a million times: clipping the propensity trades a little
# bias for a bounded variance.
IPS_MAX_WEIGHT = 1.0 / 0.05
# XGBoost's default `lambdarank_bias_norm` (Lp norm of the position-bias estimates) is 2.0.
DEFAULT_BIAS_NORM = 2.0


@dataclass(frozen=True)
class ClickTrainingSettings:
    """What to read from the logs and how to turn clicks into groups; `ranker` is LambdaMART."""

    negatives: str = "skip-above"
    debias: str = "none"
    max_ips_weight: float = IPS_MAX_WEIGHT
    bias_norm: float = DEFAULT_BIAS_NORM  # lambdarank_bias_norm, unbiased-lambdamart only
    since: float | None = None  # request timestamps, seconds since the epoch: since <= t < until
    until: float | None = None
    index_name: str | None = None  # only requests served from this index (None: all)
    ranker: TrainingSettings = field(default_factory=TrainingSettings)

    def __post_init__(self) -> None:
        if self.negatives not in NEGATIVES:
            raise ValueError(f"unknown negatives '{self.negatives}'; choose from {', '.join(NEGATIVES)}")
        if self.debias not in DEBIAS:
            raise ValueError(f"unknown debias '{self.debias}'; choose from {', '.join(DEBIAS)}")
        if not self.max_ips_weight >= 1.0:
            raise ValueError(f"max IPS weight must be >= 1, got {self.max_ips_weight}")
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError(f"--since ({self.since}) must be before --until ({self.until})")

    def extra_params(self) -> dict[str, Any]:
        """XGBoost parameters added to the ranker's for this debias mode."""
        if self.debias == "unbiased-lambdamart":
            return {"lambdarank_unbiased": True, "lambdarank_bias_norm": self.bias_norm,
                    "lambdarank_pair_method": "topk"}
        return {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ClickedRequest:
    """A served request with at least one click: the shown results and the clicked positions."""

    request: ServedRequest
    clicked: frozenset[int]


@dataclass
class JoinStats:
    """What the join read, used and skipped (all counts of requests unless named otherwise)."""

    requests_read: int = 0  # in the time range
    requests_other_index: int = 0
    requests_without_clicks: int = 0
    clicked_requests: int = 0
    clicks: int = 0  # distinct clicked (request, position) pairs of the clicked requests
    results_without_features: int = 0  # shown results logged with features=None (non-model pipelines)
    first_request: float | None = None  # timestamps of the clicked requests
    last_request: float | None = None
    index_generations: dict[str, int] = field(default_factory=dict)  # clicked requests per index generation

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RowStats:
    """What turning clicked requests into rows used and skipped."""

    requests_used: int = 0
    groups: int = 0
    clicks_used: int = 0
    rows: int = 0
    negatives: int = 0
    rows_not_examined: int = 0  # shown results below the examined cut-off (dropped)
    clicks_without_features: int = 0  # clicks on results logged without features
    requests_without_features: int = 0  # no clicked result has logged features
    requests_without_negatives: int = 0  # no pair to learn from
    requests_not_contiguous: int = 0  # unbiased-lambdamart: rows are not positions 1..n
    clicks_by_position: dict[int, int] = field(default_factory=dict)  # clicks used per shown position

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["clicks_by_position"] = {str(k): v for k, v in sorted(self.clicks_by_position.items())}
        return data


@dataclass
class ClickRows:
    """Rows built from clicks: `rows.query_ids` are group ids (the request id, or
    `request#position` of the click for IPS), in shown order within each group."""

    rows: RankingRows
    group_requests: list[str]  # request id of every group
    positions: np.ndarray  # shown position of every row
    stats: RowStats

    @property
    def group_weights(self) -> np.ndarray | None:
        return self.rows.group_weights


def join_clicks(event_store: EventStore, since: float | None = None, until: float | None = None,
                index_name: str | None = None) -> tuple[list[ClickedRequest], JoinStats]:
    """Served requests in [since, until) with at least one click, in timestamp order. Clicks are
    read whenever they happened (a click after `until` on a request inside the range counts)."""
    clicks: dict[str, set[int]] = {}
    for event in event_store.iter_events(types=["click"]):
        clicks.setdefault(event.request_id, set()).add(event.position)
    stats = JoinStats()
    clicked: list[ClickedRequest] = []
    for request in event_store.iter_requests(since=since, until=until):
        stats.requests_read += 1
        if index_name is not None and request.index_name != index_name:
            stats.requests_other_index += 1
            continue
        positions = clicks.get(request.request_id)
        if not positions:
            stats.requests_without_clicks += 1
            continue
        stats.clicked_requests += 1
        stats.clicks += len(positions)
        stats.results_without_features += sum(1 for r in request.results if r.features is None)
        stats.first_request = request.timestamp if stats.first_request is None else stats.first_request
        stats.last_request = request.timestamp
        stats.index_generations[request.index_generation] = stats.index_generations.get(request.index_generation, 0) + 1
        clicked.append(ClickedRequest(request, frozenset(positions)))
    return clicked, stats


def check_logged_features(clicked: Sequence[ClickedRequest], feature_names: Sequence[str], what: str) -> None:
    """Refuse (ValueError) when logged feature rows lack features of the set, naming them and how
    many clicked requests lack each."""
    lacking: dict[str, int] = {}
    with_rows = 0
    for item in clicked:
        logged = [r.features for r in item.request.results if r.features is not None]
        if not logged:
            continue
        with_rows += 1
        missing = {name for row in logged for name in feature_names if name not in row}
        for name in missing:
            lacking[name] = lacking.get(name, 0) + 1
    if lacking:
        worst = max(lacking.values())
        names = ", ".join(f"{name} ({count})" for name, count in sorted(lacking.items(), key=lambda kv: (-kv[1], kv[0])))
        raise ValueError(
            f"{worst} of {with_rows} clicked requests with logged features lack feature(s) of {what}: "
            f"{names} (requests lacking each in brackets); the serving model logged another feature set. "
            "Train with the feature set that was logged (--feature-set), or restrict to requests "
            "served after the switch (--since)"
        )


def logged_feature_set(clicked: Sequence[ClickedRequest]) -> FeatureSet:
    """The registered feature set (or ablation) whose names are exactly the features most logged
    rows carry: the default when no `--feature-set` is given."""
    counts: dict[frozenset[str], int] = {}
    for item in clicked:
        for result in item.request.results:
            if result.features is not None:
                key = frozenset(result.features)
                counts[key] = counts.get(key, 0) + 1
    if not counts:
        raise ValueError(f"none of the {len(clicked)} clicked requests has logged feature rows "
                         "(they were served by pipelines without a model); nothing to train on")
    logged = max(counts, key=lambda k: counts[k])
    candidates = list(FEATURE_SETS.values())
    for base in FEATURE_SETS.values():
        for group in base.groups:
            try:
                candidates.append(feature_set(f"{base.name}-without-{group}"))
            except ValueError:
                pass
    for candidate in candidates:
        if set(candidate.names) == logged:
            return candidate
    shown = ", ".join(sorted(logged)[:12]) + (", ..." if len(logged) > 12 else "")
    raise ValueError(f"the logged feature rows carry {len(logged)} features ({shown}) that match no registered "
                     f"feature set; choose one with --feature-set ({', '.join(FEATURE_SETS)})")


def propensity_at(propensities: Sequence[float], position: int) -> float:
    """Examination propensity of a position; positions past the fitted ones take the last value
    (the behaviour store's convention)."""
    return float(propensities[min(position, len(propensities)) - 1])


def ips_weight(propensities: Sequence[float], position: int, max_weight: float = IPS_MAX_WEIGHT) -> float:
    return float(min(1.0 / propensity_at(propensities, position), max_weight))


def rows_from_clicks(
    clicked: Sequence[ClickedRequest], feature_names: Sequence[str], negatives: str = "skip-above",
    debias: str = "none", propensities: Sequence[float] | None = None, max_ips_weight: float = IPS_MAX_WEIGHT,
) -> ClickRows:
    """Query groups of labelled rows from clicked requests (see the module docstring)."""
    if negatives not in NEGATIVES:
        raise ValueError(f"unknown negatives '{negatives}'; choose from {', '.join(NEGATIVES)}")
    if debias not in DEBIAS:
        raise ValueError(f"unknown debias '{debias}'; choose from {', '.join(DEBIAS)}")
    if debias == "ips" and not propensities:
        raise ValueError("ips needs fitted position propensities (fit them with the behaviour store)")
    names = list(feature_names)
    stats = RowStats()
    group_ids: list[str] = []
    group_requests: list[str] = []
    sizes: list[int] = []
    weights: list[float] = []
    blocks: list[list[list[float]]] = []
    labels: list[float] = []
    doc_ids: list[str] = []
    positions: list[int] = []
    for item in clicked:
        request = item.request
        logged = [r for r in request.results if r.features is not None]
        clicks = sorted(r.position for r in logged if r.position in item.clicked)
        stats.clicks_without_features += len(item.clicked) - len(clicks)
        if not clicks:
            stats.requests_without_features += 1
            continue
        cutoff = clicks[-1] + (1 if negatives == "examined" else 0)
        kept = sorted((r for r in logged if r.position <= cutoff), key=lambda r: r.position)
        stats.rows_not_examined += len(logged) - len(kept)
        clicked_set = set(clicks)
        negative_rows = [r for r in kept if r.position not in clicked_set]
        if not negative_rows:
            stats.requests_without_negatives += 1
            continue
        if debias == "unbiased-lambdamart" and [r.position for r in kept] != list(range(1, len(kept) + 1)):
            stats.requests_not_contiguous += 1
            continue
        if debias == "ips":
            groups = [(f"{request.request_id}#{c}", [r for r in kept if r.position == c or r.position not in clicked_set],
                       ips_weight(propensities, c, max_ips_weight)) for c in clicks]
        else:
            groups = [(request.request_id, kept, 1.0)]
        for group_id, rows, weight in groups:
            group_ids.append(group_id)
            group_requests.append(request.request_id)
            sizes.append(len(rows))
            weights.append(weight)
            blocks.append([[r.features.get(n, math.nan) for n in names] for r in rows])
            labels += [1.0 if r.position in clicked_set else 0.0 for r in rows]
            doc_ids += [r.doc_id for r in rows]
            positions += [r.position for r in rows]
            stats.rows += len(rows)
        stats.requests_used += 1
        stats.clicks_used += len(clicks)
        stats.negatives += len(negative_rows)
        for c in clicks:
            stats.clicks_by_position[c] = stats.clicks_by_position.get(c, 0) + 1
    stats.groups = len(group_ids)
    features = (np.array([row for block in blocks for row in block], dtype=np.float32).reshape(-1, len(names))
                if blocks else np.empty((0, len(names)), np.float32))
    rows = RankingRows(
        query_ids=group_ids, doc_ids=doc_ids, features=features, labels=np.array(labels, dtype=np.float32),
        group_sizes=np.array(sizes, dtype=np.int64),
        group_weights=np.array(weights, dtype=np.float32) if debias == "ips" else None,
    )
    return ClickRows(rows, group_requests, np.array(positions, dtype=np.int64), stats)


def click_rows(
    event_store: EventStore, feature_names: Sequence[str], negatives: str = "skip-above", debias: str = "none",
    propensities: Sequence[float] | None = None, since: float | None = None, until: float | None = None,
    index_name: str | None = None, max_ips_weight: float = IPS_MAX_WEIGHT,
) -> tuple[ClickRows, JoinStats]:
    """The event store's clicked requests as training rows (group weights in
    `rows.group_weights` for IPS); refuses logged rows that lack features of the set."""
    clicked, join = join_clicks(event_store, since, until, index_name)
    check_logged_features(clicked, feature_names, "the requested feature set")
    return rows_from_clicks(clicked, feature_names, negatives, debias, propensities, max_ips_weight), join


@dataclass
class ClickTrainingResult:
    trained: TrainedRanker
    features: FeatureSet
    settings: ClickTrainingSettings
    train: ClickRows
    valid: ClickRows
    train_requests: list[str]
    valid_requests: list[str]
    join: JoinStats
    params: dict[str, Any]  # every XGBoost parameter the booster was trained with
    propensities: list[float] | None  # used for IPS
    position_bias: dict[str, list[float]] | None  # unbiased-lambdamart: XGBoost's estimated ti+ / tj-

    @property
    def fingerprint(self) -> str:
        """Train and validation rows (groups, documents, labels, weights) in 16 hex digits."""
        return hashlib.sha256(f"{self.train.rows.fingerprint()}:{self.valid.rows.fingerprint()}".encode()).hexdigest()[:16]

    def sample_features(self, n: int) -> np.ndarray:
        rows = self.train.rows.features if len(self.train.rows.labels) else self.valid.rows.features
        pick = np.random.default_rng(self.settings.ranker.seed).choice(len(rows), min(n, len(rows)), replace=False)
        return rows[pick]

    def training_record(self) -> dict[str, Any]:
        """What a model manifest records under `training` (the CLI adds the store's path)."""
        s, t, v = self.settings, self.train.stats, self.valid.stats
        return {
            "source": "events", "debias": s.debias, "negatives": s.negatives,
            "propensities": self.propensities,
            "max_ips_weight": s.max_ips_weight if s.debias == "ips" else None,
            "position_bias": self.position_bias,
            "since": s.since, "until": s.until,
            "requests": {"read": self.join.requests_read, "other_index": self.join.requests_other_index,
                         "without_clicks": self.join.requests_without_clicks,
                         "clicked": self.join.clicked_requests,
                         "used": t.requests_used + v.requests_used,
                         "train": len(self.train_requests), "valid": len(self.valid_requests)},
            "index_generations": self.join.index_generations,
            "time_range": {"first": iso_time(self.join.first_request), "last": iso_time(self.join.last_request),
                           "first_ts": self.join.first_request, "last_ts": self.join.last_request},
            "clicks": self.join.clicks, "clicks_used": t.clicks_used + v.clicks_used,
            "groups": t.groups + v.groups, "train_groups": t.groups, "valid_groups": v.groups,
            "rows": t.rows + v.rows,
            "skipped": {"requests_without_clicks": self.join.requests_without_clicks,
                        "requests_without_features": t.requests_without_features + v.requests_without_features,
                        "requests_without_negatives": t.requests_without_negatives + v.requests_without_negatives,
                        "requests_not_contiguous": t.requests_not_contiguous + v.requests_not_contiguous,
                        "results_without_features": self.join.results_without_features,
                        "clicks_without_features": t.clicks_without_features + v.clicks_without_features,
                        "rows_not_examined": t.rows_not_examined + v.rows_not_examined},
            "train_stats": t.to_dict(), "valid_stats": v.to_dict(),
            "fingerprint": self.fingerprint, "settings": s.to_dict(),
            "train_seconds": round(self.trained.seconds, 2),
            "early_stopping": "click nDCG@10 of held-out requests (position-biased: a stopping rule, not an evaluation)",
        }


def train_from_clicks(
    event_store: EventStore, features: FeatureSet | None = None, settings: ClickTrainingSettings = ClickTrainingSettings(),
    propensities: Sequence[float] | None = None, log: Callable[[str], None] | None = None,
) -> ClickTrainingResult:
    """Join, split by request (seeded), build rows, LambdaMART with early stopping on the
    held-out requests' click nDCG@10. `features` None: the feature set the rows were logged with."""
    clicked, join = join_clicks(event_store, settings.since, settings.until, settings.index_name)
    if not clicked:
        raise ValueError(
            f"no clicked requests in {event_store.path} ({join.requests_read} requests read, "
            f"{join.requests_without_clicks} without clicks, {join.requests_other_index} of another index); "
            "nothing to learn from"
        )
    features = features or logged_feature_set(clicked)
    check_logged_features(clicked, features.names, f"feature set {features.name} v{features.version}")
    used_propensities = list(propensities) if settings.debias == "ips" and propensities else None
    if settings.debias == "ips" and not used_propensities:
        raise ValueError("--debias ips needs fitted position propensities")
    train_ids, valid_ids = split_queries([c.request.request_id for c in clicked],
                                         settings.ranker.valid_fraction, settings.ranker.seed)
    wanted_valid = set(valid_ids)
    train_part = [c for c in clicked if c.request.request_id not in wanted_valid]
    valid_part = [c for c in clicked if c.request.request_id in wanted_valid]
    train = rows_from_clicks(train_part, features.names, settings.negatives, settings.debias,
                             used_propensities, settings.max_ips_weight)
    # Validation groups: one per request with the plain click labels (no IPS split, no weights);
    # shown order and the contiguity rule follow the training mode so both see the same requests.
    valid_debias = "unbiased-lambdamart" if settings.debias == "unbiased-lambdamart" else "none"
    valid = rows_from_clicks(valid_part, features.names, settings.negatives, valid_debias)
    if log is not None:
        log(f"clicks: {join.clicked_requests} clicked requests of {join.requests_read} read "
            f"({join.requests_without_clicks} without clicks); train {train.stats.requests_used} requests -> "
            f"{train.stats.groups} groups, {train.stats.rows} rows; valid {valid.stats.requests_used} requests")
    if not train.stats.groups:
        raise ValueError(
            f"no usable training group: of {len(train_part)} clicked training requests "
            f"{train.stats.requests_without_features} have no logged features on a click, "
            f"{train.stats.requests_without_negatives} have no negative under --negatives {settings.negatives}, "
            f"{train.stats.requests_not_contiguous} are not positions 1..n"
        )
    extra = settings.extra_params()
    trained = train_ranker(train.rows, features.names, settings.ranker,
                           valid.rows if valid.stats.groups else None, log=log, extra_params=extra)
    position_bias = None
    if settings.debias == "unbiased-lambdamart":
        objective = json.loads(trained.booster.save_config())["learner"]["objective"]
        if "ti+" in objective:
            position_bias = {"ti+": [float(x) for x in objective["ti+"]], "tj-": [float(x) for x in objective["tj-"]]}
    return ClickTrainingResult(
        trained=trained, features=features, settings=settings, train=train, valid=valid,
        train_requests=sorted(set(train.group_requests)), valid_requests=sorted(set(valid.group_requests)),
        join=join, params={**settings.ranker.xgboost_params(), **extra},
        propensities=used_propensities, position_bias=position_bias,
    )


def parse_time(text: str | None) -> float | None:
    """Seconds since the epoch, or an ISO 8601 date/time (UTC when no zone is given)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise ValueError(f"'{text}' is not a finite time")
        return value
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"'{text}' is neither seconds since the epoch nor an ISO 8601 date/time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def iso_time(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Click-model training (the default of `train --from-events`): any pipeline's logged pages, a
# click model fitted on them gives per query-document relevance labels (eval.click_models), and
# the ranker is trained on the candidate windows of the logged queries like a judged model.
# What lives here: reading the pages, and the judgment-free off-policy estimate that selects
# and gates the result.

METHODS: tuple[str, ...] = ("click-model", "pairs")
DEFAULT_METHOD = "click-model"
OPE_DEPTH = 10  # the click metric: IPS-weighted clicks, discounted by the rank a ranker gives them, top 10


@dataclass(frozen=True)
class LoggedPage:
    """One served page that may be learned from, and the positions clicked on it."""

    request: ServedRequest
    clicked: frozenset[int]

    @property
    def query_key(self) -> str:
        return normalise(self.request.query)


@dataclass
class PageStats:
    """What reading the request log used and skipped (counts of requests)."""

    read: int = 0
    used: int = 0
    other_index: int = 0
    interleaved: int = 0  # skipped: their propensities are not the logging policy's
    interleaved_unknown: int = 0  # ltr pages logged before schema version 2 (used)
    explored: int = 0
    clicked: int = 0
    pipelines: dict[str, int] = field(default_factory=dict)
    index_generations: dict[str, int] = field(default_factory=dict)
    first: float | None = None
    last: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def normalise(text: str) -> str:
    from ltr.behaviour import normalise_query  # the one query key of behaviour aggregates

    return normalise_query(text)


def read_logged_pages(event_store: EventStore, since: float | None = None, until: float | None = None,
                      index_name: str | None = None) -> tuple[list[LoggedPage], PageStats]:
    """Every page served in [since, until) by ANY pipeline (bm25, hybrid, a model ...), with its
    clicks. Interleaved pages are skipped: they mix two rankers and log propensity 1, which is
    not the probability the logging policy had of showing them there."""
    clicks: dict[str, set[int]] = {}
    for event in event_store.iter_events(types=["click"]):
        clicks.setdefault(event.request_id, set()).add(event.position)
    stats = PageStats()
    pages: list[LoggedPage] = []
    for request in event_store.iter_requests(since=since, until=until):
        stats.read += 1
        if index_name is not None and request.index_name != index_name:
            stats.other_index += 1
            continue
        if request.interleaved:
            stats.interleaved += 1
            continue
        if request.interleaved is None and request.pipeline == "ltr":
            stats.interleaved_unknown += 1
        clicked = frozenset(clicks.get(request.request_id, ()))
        pages.append(LoggedPage(request, clicked))
        stats.used += 1
        stats.clicked += bool(clicked)
        stats.explored += request.was_explored
        stats.pipelines[request.pipeline] = stats.pipelines.get(request.pipeline, 0) + 1
        generation = request.index_generation
        stats.index_generations[generation] = stats.index_generations.get(generation, 0) + 1
        stats.first = request.timestamp if stats.first is None else stats.first
        stats.last = request.timestamp
    return pages, stats


@dataclass(frozen=True)
class OffPolicyEstimate:
    """Self-normalised IPS estimate of a click metric for a new ranker and for the logging policy
    on held-out logged pages (Joachims, Swaminathan & Schnabel 2017; the self-normalisation of
    Swaminathan & Joachims 2015).

    Under a position-based user, a click at logged position p divided by the examination
    propensity gamma(p) is an unbiased estimate of the clicked document's attractiveness, so
        V(ranker) = sum over clicks of  [1 / gamma(p)] * disc(rank the ranker gives the doc)
                    / sum over clicks of  [1 / gamma(p)]
    (disc(k) = 1 / log2(k + 1) for k <= 10, else 0) estimates the attractiveness-weighted DCG@10
    of the ranker, per unit of clicked attractiveness. The logging policy is scored the same way,
    on its own ranking (`off_policy_estimate`'s `baseline`). Both share the denominator; the
    difference's CI is the delta method's over pages. Documents no logged page showed can earn no
    credit; `train --from-events` therefore ranks only the shown documents of each held-out query
    with both rankers (what is estimated is how well a ranker orders what users saw)."""

    model: float
    logging: float
    difference: float
    ci: tuple[float, float]
    pages: int  # held-out pages with a click
    queries: int
    metric: str = "SNIPS click DCG@10 (clicks weighted 1/examination propensity of their logged position)"

    @property
    def significantly_worse(self) -> bool:
        return self.ci[1] < 0

    @property
    def significantly_better(self) -> bool:
        return self.ci[0] > 0

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "logging": self.logging, "difference": self.difference, "ci": list(self.ci),
                "pages": self.pages, "queries": self.queries, "metric": self.metric,
                "verdict": self.verdict}

    @property
    def verdict(self) -> str:
        if self.significantly_worse:
            return "significantly worse than the logging policy"
        if self.significantly_better:
            return "significantly better than the logging policy"
        return "not significantly different from the logging policy"

    def line(self) -> str:
        return (f"off-policy estimate on {self.pages:,} held-out logged pages ({self.queries:,} queries), {self.metric}: "
                f"model {self.model:.4f} vs logging policy {self.logging:.4f}, difference {self.difference:+.4f} "
                f"(95% CI {self.ci[0]:+.4f} .. {self.ci[1]:+.4f}): {self.verdict}")


def _discount(ranks: np.ndarray, depth: int = OPE_DEPTH) -> np.ndarray:
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where((ranks >= 1) & (ranks <= depth), 1.0 / np.log2(np.maximum(ranks, 1.0) + 1.0), 0.0)


def off_policy_estimate(pages: Sequence[LoggedPage], rankings: dict[str, Sequence[str]],
                        examination: Sequence[float], z: float = 1.96,
                        baseline: dict[str, Sequence[str]] | None = None) -> OffPolicyEstimate:
    """The estimate of `OffPolicyEstimate` for `rankings` (query key -> the new ranker's doc ids,
    best first) on the clicked `pages` whose query it ranks. `baseline`: the logging policy's own
    ranking per query (its unexplored page), scored by the same estimator, so that a model ranking
    exactly as the logging policy differs by 0; without it, the logged positions (exploration
    included) are the logging policy's."""
    gamma = np.asarray(examination, dtype=np.float64)
    numerators_new, numerators_log, weights = [], [], []
    queries = set()
    for page in pages:
        ranking = rankings.get(page.query_key)
        if ranking is None or not page.clicked:
            continue
        rank_of = {doc: k + 1 for k, doc in enumerate(ranking)}
        logged_rank = None
        if baseline is not None:
            if page.query_key not in baseline:
                continue
            logged_rank = {doc: k + 1 for k, doc in enumerate(baseline[page.query_key])}
        clicked = [r for r in page.request.results if r.position in page.clicked and r.position <= len(gamma)]
        if not clicked:
            continue
        w = np.array([1.0 / max(gamma[r.position - 1], 1e-3) for r in clicked])
        numerators_new.append(float(w @ _discount(np.array([rank_of.get(r.doc_id, 0) for r in clicked]))))
        old_ranks = [r.position if logged_rank is None else logged_rank.get(r.doc_id, 0) for r in clicked]
        numerators_log.append(float(w @ _discount(np.array(old_ranks))))
        weights.append(float(w.sum()))
        queries.add(page.query_key)
    if not weights:
        raise ValueError("no held-out logged page with a click on a ranked query: nothing to estimate on")
    new, old, w = (np.array(x) for x in (numerators_new, numerators_log, weights))
    model, logging = float(new.sum() / w.sum()), float(old.sum() / w.sum())
    difference = model - logging
    residual = (new - old) - difference * w  # delta method for a ratio of sums
    half = z * float(np.sqrt(residual.var(ddof=1) / len(w)) / w.mean()) if len(w) > 1 else math.inf
    return OffPolicyEstimate(model, logging, difference, (difference - half, difference + half), len(w), len(queries))


def off_policy_refusal(training: dict[str, Any]) -> str | None:
    """Why `models promote` refuses a click-trained model (its manifest's `training`), or None:
    refused when its off-policy estimate is significantly worse than the logging policy's."""
    estimate = training.get("off_policy") if training.get("source") == "events" else None
    if not estimate:
        return None
    low, high = estimate["ci"]
    if high < 0:
        return (f"its off-policy estimate on {estimate['pages']} held-out logged pages is significantly worse than the "
                f"logging policy's ({estimate['model']:.4f} vs {estimate['logging']:.4f}, difference 95% CI "
                f"{low:+.4f} .. {high:+.4f})")
    return None
