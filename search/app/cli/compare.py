"""`ltr-search models compare A B`: which of two models users prefer, from interleaved traffic.

    ltr-search models compare A B [--since T] [--events PATH] [--experiments PATH] [--name INDEX] [--json]

Reads the team-draft interleaved pages of the pair (in either order) from the experiment log
(ltr/experiments.py) and the click events on those pages from the event store. Each click is
credited to the team whose model put the clicked document at that position (a document clicked
twice counts once). Per request, more credited clicks for A is a win for A, more for B a loss,
equal (no clicks included) a tie. A two-sided binomial sign test on wins vs losses (ties left out)
says whether the preference is significant. When the experiment log also has shadow rankings of
one model next to the other's served ranking, their agreement on the top 10 is reported too.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from ltr.click_training import parse_time
from search.event_store import Event
from ltr.experiments import InterleavedRequest, ShadowRanking

ALPHA = 0.05
AGREEMENT_DEPTH = 10
RBO_PERSISTENCE = 0.9


@dataclass
class RequestOutcome:
    request_id: str
    clicks_a: int
    clicks_b: int

    @property
    def outcome(self) -> str:
        return "win" if self.clicks_a > self.clicks_b else "loss" if self.clicks_b > self.clicks_a else "tie"


@dataclass
class InterleavingComparison:
    model_a: str
    model_b: str
    requests: list[RequestOutcome]
    unmatched_clicks: int = 0  # clicks whose position or document is not on the logged page
    shadow: dict[str, Any] | None = None

    @property
    def wins(self) -> int:
        return sum(r.outcome == "win" for r in self.requests)

    @property
    def losses(self) -> int:
        return sum(r.outcome == "loss" for r in self.requests)

    @property
    def ties(self) -> int:
        return sum(r.outcome == "tie" for r in self.requests)

    @property
    def p_value(self) -> float:
        """Two-sided binomial (sign) test of wins against losses under no preference (p = 1/2)."""
        decided = self.wins + self.losses
        if decided == 0:
            return 1.0
        from scipy.stats import binomtest

        return float(binomtest(self.wins, decided, 0.5, alternative="two-sided").pvalue)

    @property
    def preferred(self) -> str | None:
        if self.p_value >= ALPHA or self.wins == self.losses:
            return None
        return self.model_a if self.wins > self.losses else self.model_b

    def verdict(self) -> str:
        preferred = self.preferred
        if preferred is None:
            return "no significant preference"
        return f"{preferred} preferred (p = {self.p_value:.3g} < {ALPHA})"

    def to_dict(self) -> dict[str, Any]:
        clicked = [r for r in self.requests if r.clicks_a or r.clicks_b]
        return {
            "model_a": self.model_a, "model_b": self.model_b, "requests": len(self.requests),
            "requests_with_clicks": len(clicked), "wins_a": self.wins, "wins_b": self.losses, "ties": self.ties,
            "clicks_a": sum(r.clicks_a for r in self.requests), "clicks_b": sum(r.clicks_b for r in self.requests),
            "unmatched_clicks": self.unmatched_clicks, "p_value": self.p_value, "alpha": ALPHA,
            "preferred": self.preferred, "verdict": self.verdict(), "shadow": self.shadow,
            "per_request": [{**asdict(r), "outcome": r.outcome} for r in self.requests],
        }


def compare_interleaved(model_a: str, model_b: str, pages: Iterable[InterleavedRequest],
                        clicks: Iterable[Event]) -> InterleavingComparison:
    """Credit clicks to teams. `pages` of the pair in either order: team labels are turned so that
    'A' is `model_a` here; pages of other pairs are ignored."""
    oriented: dict[str, tuple[InterleavedRequest, bool]] = {}  # request id -> (page, swapped)
    for page in pages:
        if (page.model_a, page.model_b) == (model_a, model_b):
            oriented[page.request_id] = (page, False)
        elif (page.model_a, page.model_b) == (model_b, model_a):
            oriented[page.request_id] = (page, True)
    credited: dict[str, dict[str, set[str]]] = {rid: {"A": set(), "B": set()} for rid in oriented}
    unmatched = 0
    for click in clicks:
        if click.request_id not in oriented or click.type != "click":
            continue
        page, swapped = oriented[click.request_id]
        pick = page.pick_at(click.position)
        if pick is None or pick.doc_id != click.doc_id:
            unmatched += 1
            continue
        team = pick.team if not swapped else ("B" if pick.team == "A" else "A")
        credited[click.request_id][team].add(click.doc_id)
    outcomes = [RequestOutcome(rid, len(credited[rid]["A"]), len(credited[rid]["B"])) for rid in oriented]
    return InterleavingComparison(model_a, model_b, outcomes, unmatched)


# ---------------------------------------------------------------------------------------------
# Shadow agreement


def overlap_at(a: Sequence[str], b: Sequence[str], k: int = AGREEMENT_DEPTH) -> float:
    """Share of the top k the two rankings have in common (k: the shorter list's depth when shorter)."""
    depth = min(k, max(len(a), len(b)))
    return len(set(a[:k]) & set(b[:k])) / depth if depth else 1.0


def rank_biased_overlap(a: Sequence[str], b: Sequence[str], p: float = RBO_PERSISTENCE, k: int = AGREEMENT_DEPTH) -> float:
    """Extrapolated rank-biased overlap of the top k (Webber, Moffat & Zobel 2010, eq. 32): 1 for
    identical lists, 0 for disjoint ones, weighting the top most."""
    a, b = list(a[:k]), list(b[:k])
    depth = min(len(a), len(b))
    if depth == 0:
        return 1.0 if not a and not b else 0.0
    seen_a: set[str] = set()
    seen_b: set[str] = set()
    overlap, total = 0, 0.0
    for d in range(1, depth + 1):
        x, y = a[d - 1], b[d - 1]
        if x == y:
            overlap += 1
        else:
            overlap += (x in seen_b) + (y in seen_a)
        seen_a.add(x)
        seen_b.add(y)
        total += overlap / d * p ** d
    return overlap / depth * p ** depth + (1 - p) / p * total


def shadow_agreement(model_a: str, model_b: str, rows: Iterable[ShadowRanking],
                     k: int = AGREEMENT_DEPTH) -> dict[str, Any] | None:
    """Agreement of shadow and served top-k where one of the pair shadowed the other; None when
    the log has no such rows."""
    pair = {model_a, model_b}
    overlaps, rbos, top1 = [], [], []
    shadows = set()
    for row in rows:
        if {row.model_version, row.served_model} != pair:
            continue
        shadow = [doc_id for doc_id, _ in row.ranking[:k]]
        served = [doc_id for doc_id, _ in row.served_ranking[:k]]
        overlaps.append(overlap_at(shadow, served, k))
        rbos.append(rank_biased_overlap(shadow, served, k=k))
        top1.append(bool(shadow[:1] == served[:1]))
        shadows.add(row.model_version)
    if not overlaps:
        return None
    return {"requests": len(overlaps), "shadow_models": sorted(shadows), "depth": k,
            f"mean_overlap@{k}": sum(overlaps) / len(overlaps), f"mean_rbo@{k}": sum(rbos) / len(rbos),
            "top1_agreement": sum(top1) / len(top1), "rbo_persistence": RBO_PERSISTENCE}


# ---------------------------------------------------------------------------------------------
# The command


def add_compare_parser(models_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    compare = models_subparsers.add_parser(
        "compare", help="interleaving results of two models: clicks credited per team, sign test, shadow agreement")
    compare.add_argument("model_a", help="a model version (team A when it was the active one)")
    compare.add_argument("model_b", help="the other model version")
    compare.add_argument("--since", help="only interleaved requests from this time on: unix seconds or ISO 8601 (UTC unless given)")
    compare.add_argument("--events", help="event store with the clicks (default: the service's, HOME/events/INDEX.sqlite3)")
    compare.add_argument("--experiments", help="experiment log (default HOME/experiments/INDEX.sqlite3)")
    compare.add_argument("--name", help="index (default: the service config's)")
    compare.add_argument("--config", help="service TOML (default $LTR_SEARCH_CONFIG)")
    compare.add_argument("--json", action="store_true")
    return compare


def cmd_models_compare(home: Path, args: argparse.Namespace) -> int:
    from search.event_store import CLOCK_SKEW_ALLOWANCE_S, EventStore
    from ltr.experiments import ExperimentLog, ExperimentLogError
    from search.app.config import load_service_config

    if args.model_a == args.model_b:
        raise ValueError(f"compare two different models, got {args.model_a} twice")
    config = load_service_config(home, Path(args.config) if args.config else None, {"index": args.name})
    since = parse_time(args.since)
    events_path = Path(args.events) if args.events else config.event_store_path
    if not events_path.is_file():
        raise ValueError(f"{events_path}: no event store (pass --events PATH)")
    log_path = Path(args.experiments) if args.experiments else config.experiment_log_path
    try:
        with ExperimentLog(log_path, create=False) as log:
            pages = list(log.iter_interleaved(since, (args.model_a, args.model_b)))
            shadows = list(log.iter_shadow(since))
    except ExperimentLogError as exc:
        raise ValueError(str(exc)) from None
    wanted = {page.request_id for page in pages}
    with EventStore(events_path) as store:
        after = None if since is None else since - CLOCK_SKEW_ALLOWANCE_S
        clicks = [e for e in store.iter_events(since=after, types=["click"]) if e.request_id in wanted]
    comparison = compare_interleaved(args.model_a, args.model_b, pages, clicks)
    comparison.shadow = shadow_agreement(args.model_a, args.model_b, shadows)
    report = comparison.to_dict()
    report["since"] = since
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(render(report))
    return 0


def render(report: dict[str, Any]) -> str:
    a, b = report["model_a"], report["model_b"]
    lines = [f"interleaving {a} (A) vs {b} (B): {report['requests']} interleaved requests, "
             f"{report['requests_with_clicks']} with clicks"
             + (f" (since {datetime.fromtimestamp(report['since'], timezone.utc).isoformat()})" if report["since"] else "")]
    for r in report["per_request"]:
        if r["clicks_a"] or r["clicks_b"]:
            lines.append(f"  {r['request_id']}  A {r['clicks_a']}  B {r['clicks_b']}  {r['outcome']}")
    lines.append(f"wins {a}: {report['wins_a']}, wins {b}: {report['wins_b']}, ties: {report['ties']}; "
                 f"clicks A {report['clicks_a']}, B {report['clicks_b']}"
                 + (f"; {report['unmatched_clicks']} clicks not on a logged page position" if report["unmatched_clicks"] else ""))
    p = report["p_value"]
    lines.append(f"sign test (two-sided binomial, wins vs losses): p = {p:.4g} -> {report['verdict']}")
    shadow = report["shadow"]
    if shadow:
        k = shadow["depth"]
        lines.append(f"shadow agreement ({', '.join(shadow['shadow_models'])} shadowing, {shadow['requests']} requests): "
                     f"overlap@{k} {shadow[f'mean_overlap@{k}']:.3f}, RBO@{k} {shadow[f'mean_rbo@{k}']:.3f}, "
                     f"same top 1 {shadow['top1_agreement']:.0%}")
    return "\n".join(lines)


