"""`ltr-search models compare A B`: which of two models users prefer, from interleaved traffic.

    ltr-search models compare A B [--since T] [--events PATH] [--experiments PATH] [--name INDEX] [--fixed-sample] [--json]

Reads the interleaved pages of the pair (in either order) from the experiment log
(ltr/experiments.py) and the click events on those pages from the event store; a document clicked
twice on a page counts once.
- Optimized interleaving (the service's default): each click adds the clicked document's logged
  credit (1/rank in A - 1/rank in B; 0, team "=", for a document both rank alike). A two-sided
  one-sample t-test of the per-request credit (0 without clicks) against 0 says whether the
  preference is significant; an undecided verdict notes how many requests the observed mean and
  spread would need.
- Team draft: each click is credited to the team whose model put the clicked document there; a
  click on the rankings' common prefix (team "=") is counted but credited to neither. Per request,
  more credited clicks for A is a win for A, more for B a loss, equal (no clicks included) a tie.
  A two-sided binomial sign test on wins vs losses (ties left out) decides; an undecided verdict
  comes with a note when the sample is too small to decide (no decided request, fewer than the 6
  a unanimous result needs, or how many decided requests the observed win rate would need).
  A log with both kinds of page is read with the t-test (a team-draft click counts +1 or -1).
- The verdict, by default, comes from neither: it comes from an always-valid p-value of the mean
  per-request credit (mSPRT, ltr/sequential_test.py), which stays right however often the
  comparison is read while requests come in; the fixed-sample test above is printed next to it
  and decides with --fixed-sample, for a number of requests fixed before the first look.
When the experiment log also has shadow rankings of
one model next to the other's served ranking, their agreement on the top 10 is reported too.
The analysis lives with the other online-experiment code in ltr/experiments.py; this is the command.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ltr.click_training import parse_time
from ltr.experiments import (
    ExperimentLog, ExperimentLogError, InterleavingComparison, ShadowRanking, compare_interleaved, render, shadow_agreement,
)
from search.event_store import CLOCK_SKEW_ALLOWANCE_S, EventStore


def add_compare_parser(models_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    compare = models_subparsers.add_parser(
        "compare", help="interleaving results of two models: clicks credited per model, an always-valid p-value (or "
        "the fixed-sample t-test / sign test), shadow agreement")
    compare.add_argument("model_a", help="a model version (team A when it was the active one)")
    compare.add_argument("model_b", help="the other model version")
    compare.add_argument("--since", help="only interleaved requests from this time on: unix seconds or ISO 8601 (UTC unless given)")
    compare.add_argument("--events", help="event store with the clicks (default: the service's, HOME/events/INDEX.sqlite3)")
    compare.add_argument("--experiments", help="experiment log (default HOME/experiments/INDEX.sqlite3)")
    compare.add_argument("--name", help="index (default: the service config's)")
    compare.add_argument("--config", help="service TOML (default $LTR_SEARCH_CONFIG)")
    compare.add_argument("--fixed-sample", action="store_true",
                         help="take the verdict from the fixed-sample test (t-test or sign test): right only when the "
                              "number of requests was fixed before the first look. Default: the always-valid "
                              "(sequential) p-value, right however often the comparison is read")
    compare.add_argument("--json", action="store_true")
    return compare


def read_comparison(log_path: Path, events_path: Path, model_a: str, model_b: str, since: float | None,
                    reading: str = "sequential") -> tuple[InterleavingComparison, list[ShadowRanking]]:
    """The pair's interleaved pages since `since` (experiment log) credited with their clicks
    (event store), and the shadow rankings of that time; what `models compare` and `retrain`'s
    interleaving verdict read."""
    try:
        with ExperimentLog(log_path, create=False) as log:
            pages = list(log.iter_interleaved(since, (model_a, model_b)))
            shadows = list(log.iter_shadow(since))
    except ExperimentLogError as exc:
        raise ValueError(str(exc)) from None
    wanted = {page.request_id for page in pages}
    with EventStore(events_path) as store:
        after = None if since is None else since - CLOCK_SKEW_ALLOWANCE_S
        clicks = [e for e in store.iter_events(since=after, types=["click"]) if e.request_id in wanted]
    return compare_interleaved(model_a, model_b, pages, clicks, reading=reading), shadows


def cmd_models_compare(home: Path, args: argparse.Namespace) -> int:
    from search.app.config import load_service_config  # its backend factory loads the index code: only when run

    if args.model_a == args.model_b:
        raise ValueError(f"compare two different models, got {args.model_a} twice")
    config = load_service_config(home, Path(args.config) if args.config else None, {"index": args.name})
    since = parse_time(args.since)
    events_path = Path(args.events) if args.events else config.event_store_path
    if not events_path.is_file():
        raise ValueError(f"{events_path}: no event store (pass --events PATH)")
    log_path = Path(args.experiments) if args.experiments else config.experiment_log_path
    comparison, shadows = read_comparison(log_path, events_path, args.model_a, args.model_b, since,
                                          "fixed" if args.fixed_sample else "sequential")
    comparison.shadow = shadow_agreement(args.model_a, args.model_b, shadows)
    report = comparison.to_dict()
    report["since"] = since
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(render(report))
    return 0
