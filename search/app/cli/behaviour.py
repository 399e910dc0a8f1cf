"""`ltr-search behaviour status|update|rebuild`: the behaviour aggregates of an index.

    ltr-search behaviour status [--name INDEX] [--json] [--since T]
    ltr-search behaviour update [--name INDEX]
    ltr-search behaviour rebuild [--name INDEX] [--keep-propensities] [--max-position 10]

The query service applies new events to the aggregates as they arrive; `update` does the same
for events written while no service ran, `rebuild` refits the position propensities on the
request log and recomputes every aggregate from the events (the event store is the source of
truth; the aggregates are derived and disposable). `status` shows the aggregates, the fitted
propensities, how far they lag the event store, and the drift of the active model's served
features against its training data.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

RETENTION_POLICY = (
    "events are kept (append-only, the source of truth); aggregates decay with a 30-day half-life "
    "and can be rebuilt from the events at any time"
)
DRIFT_REQUESTS = 1000  # served requests of the active model compared with its training data


def add_arguments(command: str, behaviour: argparse.ArgumentParser) -> None:
    commands = behaviour.add_subparsers(dest="behaviour_command", required=True)
    status = commands.add_parser("status", help="aggregates, propensities, lag behind the events, feature drift")
    status.add_argument("--name", help="index (default: the service config's)")
    status.add_argument("--json", action="store_true")
    status.add_argument("--since", type=float, help="drift: only requests served at or after this epoch time")
    update = commands.add_parser("update", help="apply events not yet in the aggregates")
    update.add_argument("--name", help="index (default: the service config's)")
    rebuild = commands.add_parser("rebuild", help="refit position propensities and recompute every aggregate")
    rebuild.add_argument("--name", help="index (default: the service config's)")
    rebuild.add_argument("--keep-propensities", action="store_true", help="recompute with the stored propensities")
    rebuild.add_argument("--max-position", type=int, default=10, help="positions fitted (default 10)")


def run(home: Path, args: argparse.Namespace) -> int:
    handler = {"status": cmd_status, "update": cmd_update, "rebuild": cmd_rebuild}
    return handler[args.behaviour_command](home, args)


def _open(home: Path, name: str | None):
    from ltr.behaviour import BehaviourStore  # lazy: start-up time
    from search.event_store import EventStore  # lazy: start-up time
    from ltr.point_in_time import behaviour_sources  # lazy: start-up time
    from search.app.config import load_service_config  # lazy: start-up time

    index = name or load_service_config(home).index
    events_path, _ = behaviour_sources(home, index)
    if not events_path.exists():
        raise ValueError(f"no event store for index '{index}' at {events_path}: serve the index and send events first")
    return index, EventStore(events_path), BehaviourStore.for_index(home, index)


def cmd_update(home: Path, args: argparse.Namespace) -> int:
    index, events, store = _open(home, args.name)
    with events, store:
        summary = store.update(events)
    print(f"behaviour[{index}]: applied {summary.events_applied:,} events ({summary.impressions_added:,} impressions, "
          f"{summary.clicks_added:,} clicks; {summary.unknown_requests} for unknown requests); watermark {summary.watermark}")
    return 0


def cmd_rebuild(home: Path, args: argparse.Namespace) -> int:
    from eval.propensity import fit_propensities  # here for start-up time

    index, events, store = _open(home, args.name)
    with events, store:
        if not args.keep_propensities:
            fit = fit_propensities(store, events, max_position=args.max_position)
            how = (f"click rates on {fit.randomised_pages:,} shuffled pages" if fit.method == "randomised"
                   else f"PBM EM on {fit.sessions:,} served pages ({fit.randomised_pages:,} shuffled: too few)")
            print(f"propensities fitted from {how}; {fit.clicks:,} clicks, {fit.explored_impressions:,} explored impressions:")
            print("  " + "  ".join(f"{i}:{p:.3f}" for i, p in enumerate(fit.propensities, start=1)))
        started = time.perf_counter()
        summary = store.rebuild(events)
    print(f"behaviour[{index}]: rebuilt from {summary.events_applied:,} events in {time.perf_counter() - started:.1f} s "
          f"({summary.impressions_added:,} impressions, {summary.clicks_added:,} clicks); watermark {summary.watermark}")
    return 0


def cmd_status(home: Path, args: argparse.Namespace) -> int:
    index, events, store = _open(home, args.name)
    with events, store:
        status = store.status()
        stored = events.count_events()
        latest = events.last_event_seq()
        drift = _drift(home, index, events, args.since)
    drift["index_changes"] = _index_changes(home, index)
    status.update(index=index, events_in_store=stored, lag_events=max(latest - status["watermark"], 0),
                  retention=RETENTION_POLICY, drift=drift)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    print(f"behaviour aggregates of index '{index}'")
    print(f"  events stored: {sum(stored.values()):,} ({', '.join(f'{k} {v:,}' for k, v in stored.items())})")
    print(f"  applied: {status['events_applied']:,} (watermark {status['watermark']}, {status['lag_events']:,} behind)")
    print(f"  impressions {status['impressions']:,}, clicks {status['clicks']:,}, global CTR {status['global_ctr']:.4f}, "
          f"explored impressions {status['explored_impressions']:,}")
    print(f"  pairs (query, doc): {status['pairs']:,}; docs: {status['docs']:,}")
    propensities = status["propensities"]
    if propensities:
        fitted = dt.datetime.fromtimestamp(status["fitted_at"], dt.timezone.utc).isoformat(timespec="seconds")
        print(f"  position propensities (PBM, fitted {fitted}):")
        print("    " + "  ".join(f"{i}:{p:.3f}" for i, p in enumerate(propensities, start=1)))
    else:
        print("  position propensities: not fitted (COEC = CTR); run `ltr-search behaviour rebuild`")
    print(f"  retention: {RETENTION_POLICY}")
    if drift.get("error"):
        print(f"  drift: {drift['error']}")
    else:
        print(f"  drift of model {drift['model']} (last {drift['requests']} served requests vs its training rows):")
        for line in drift["lines"]:
            print(f"    {line}")
    changes = drift["index_changes"]
    if changes.get("error"):
        print(f"  index changes: {changes['error']}")
    else:
        trained = (f"; the active model was trained on {changes['model_generation']}"
                   if changes.get("model_generation") else "")
        print(f"  index changes: generation {changes['generation']}{trained}; {changes['upserts']:,} documents upserted "
              f"and {changes['deletes']:,} deleted since it (pending in the delta)")
    return 0


def _index_changes(home: Path, index: str) -> dict[str, Any]:
    """How many documents changed under the served model: upserts and deletes in the live delta
    over the active generation, and the generation the active model was trained on (a drift
    report that shows shifted features should say whether the documents changed)."""
    from indexing.bundle import IndexBundleError, IndexStore  # lazy: start-up time
    from indexing.updates import pending_updates  # lazy: start-up time
    from ltr.registry import ModelRegistry  # lazy: start-up time

    try:
        generation = IndexStore(home).open(index, verify=False).generation
        pending = pending_updates(home, index)
    except (IndexBundleError, ValueError, OSError) as exc:
        return {"error": f"index '{index}' cannot be read: {exc}"}
    registry = ModelRegistry(home)
    version = registry.active()
    trained_on = registry.manifest(version).index if version else {}
    return {"generation": generation, "upserts": pending["upserts"], "deletes": pending["deletes"],
            "model_generation": trained_on.get("generation") if trained_on.get("name") == index else None}


def _drift(home: Path, index: str, events, since: float | None) -> dict[str, Any]:
    """The active model's served feature rows against its training reference."""
    from ltr.drift import FeatureReference, drift_report, format_drift, served_rows  # lazy: start-up time
    from ltr.registry import ModelRegistry  # lazy: start-up time

    registry = ModelRegistry(home)
    version = registry.active()
    if version is None:
        return {"error": "no active model"}
    manifest = registry.manifest(version)
    if manifest.reference is None:
        return {"error": f"model {version} has no training reference (trained before drift monitoring); retrain it"}
    reference = FeatureReference.from_dict(manifest.reference)
    rows, scores, time_range = served_rows(events, version, reference.names, since=since, limit_requests=DRIFT_REQUESTS)
    if not len(rows):
        return {"error": f"model {version} has served no logged requests{' since then' if since else ''}"}
    report = drift_report(reference, rows, reference.names, scores, model_version=version, time_range=time_range)
    return {"model": version, "requests": DRIFT_REQUESTS, "lines": format_drift(report), "report": report.to_dict()}
