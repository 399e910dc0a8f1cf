"""Training from clicks without judgments, and `ltr-search retrain`, the job a scheduler runs.

    ltr-search train --from-events [--method click-model|pairs] [--label-model pbm|dbn] [--events PATH]
    ltr-search retrain [--name INDEX] [--dataset PATH --split SPLIT] [--interleave SHARE] [--report DIR] [--force]

`train --from-events` (method `click-model`, the default) reads every page the request log holds,
whichever pipeline served it (bm25, hybrid, hybrid-convex or a model; interleaved pages skipped),
fits a click model on them, grades every logged (query, document) by its attractiveness, and trains
on the logged queries' candidate windows through the judged-training path (`ltr.training.fit_ranker`:
the one `extract_features`, staged on the fusion, trees chosen by inner CV on the click labels). A
seeded share of the logged queries is held out; the model's self-normalised IPS estimate of a click
metric on their pages, against the logging policy's, is printed with a CI and stored in the
manifest, where `models promote` reads it. `--method pairs` is the earlier pairwise method
(`ltr.click_training.train_from_clicks`, model-served pages only).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from search.app.cli.common import log, open_index, plural
from indexing.progress import progress_bar

SAMPLE_ROWS = 64  # as `train`: feature rows stored with the model and re-scored on every load


def add_click_model_arguments(group: Any) -> None:
    """The flags of the click-model method, added to `train`'s "training from clicks" group."""
    from eval.click_models import DEFAULT_LABEL_THRESHOLDS, LABEL_CANDIDATES, LABEL_MODELS  # lazy: start-up time
    from ltr.click_training import DEFAULT_METHOD, METHODS  # lazy: start-up time

    group.add_argument("--method", choices=METHODS,
                       help=f"{DEFAULT_METHOD} (default): labels from a click model fitted on every logged page, any "
                            "pipeline; pairs: pairwise clicks of model-served pages (implied by --debias/--negatives)")
    group.add_argument("--label-model", choices=LABEL_MODELS, default="pbm",
                       help="click-model method: the click model whose attractiveness grades documents (default pbm)")
    group.add_argument("--label-candidates", choices=LABEL_CANDIDATES, default="shown",
                       help="click-model method: train on the documents the logged pages showed (shown, default) or "
                            "on whole candidate windows, unshown candidates graded 0 (window)")
    group.add_argument("--label-thresholds", type=float, nargs=2, default=list(DEFAULT_LABEL_THRESHOLDS),
                       metavar=("GRADE1", "GRADE2"),
                       help="click-model method: attractiveness for grade 1 and grade 2 (default "
                            f"{DEFAULT_LABEL_THRESHOLDS[0]:g} {DEFAULT_LABEL_THRESHOLDS[1]:g})")


def events_index(home: Path, name: str | None, config_file: str | None) -> str:
    """The index whose clicks to learn from: --name, else the config's index when it has an event
    store, else the only (or the most recently written) event store of the home."""
    from indexing.home import event_store_path  # lazy: start-up time
    from search.app.config import load_service_config  # lazy: start-up time

    if name:
        return name
    configured = load_service_config(home, Path(config_file) if config_file else None).index
    if event_store_path(home, configured).is_file():
        return configured
    stores = sorted(event_store_path(home, "x").parent.glob("*.sqlite3"), key=lambda p: p.stat().st_mtime)
    if not stores:
        return configured
    if len(stores) > 1:
        log(f"no event store for the configured index '{configured}'; using the most recently written one, "
            f"{stores[-1].stem} (of {', '.join(p.stem for p in stores)}); pass --name to choose")
    return stores[-1].stem


def training_settings(args: argparse.Namespace) -> Any:
    from ltr.training import TrainingSettings  # lazy: start-up time

    return TrainingSettings(
        learning_rate=args.learning_rate, max_depth=args.max_depth, max_rounds=args.max_rounds,
        valid_fraction=args.valid_fraction, seed=args.seed, selection=args.selection,
        base_scales=tuple(args.base_scales), cv_folds=args.cv_folds,
    )


def train_click_model(home: Path, args: argparse.Namespace, quiet: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """Train and store a click-model ranker; (manifest, result, training record). Raises
    ValueError (one line for the user) when the log holds nothing to learn from."""
    from eval.click_models import ClickLabelSettings, train_on_click_labels  # lazy: start-up time
    from ltr.click_training import iso_time, parse_time, read_logged_pages  # lazy: start-up time
    from ltr.features import DEFAULT_CLICK_FEATURE_SET, feature_set, leaves_query_out, uses_behaviour  # lazy: start-up time
    from ltr.behaviour import BehaviourStore  # lazy: start-up time
    from ltr.point_in_time import BehaviourHistory  # lazy: start-up time
    from ltr.ranker import index_description  # lazy: start-up time
    from ltr.registry import ModelRegistry  # lazy: start-up time
    from search.app.cli.models import drift_reference  # lazy: start-up time
    from search.app.config import load_service_config  # lazy: start-up time
    from search.event_store import EventStore  # lazy: start-up time

    name = events_index(home, args.name, args.config)
    config = load_service_config(home, Path(args.config) if args.config else None, {"index": name})
    events_path = Path(args.events) if args.events else config.event_store_path
    if not events_path.is_file():
        raise ValueError(f"no event store at {events_path}: serve the index with `ltr-search serve` (or run "
                         "`ltr-search simulate`) to log requests and clicks, or pass --events PATH")
    index = open_index(home, name, args, name)
    fusion = config.fusion_for(index.name)
    features = feature_set(args.feature_set or DEFAULT_CLICK_FEATURE_SET)
    settings = training_settings(args)
    labels = ClickLabelSettings(model=args.label_model, thresholds=tuple(args.label_thresholds),
                                candidates=args.label_candidates)
    with EventStore(events_path) as store:
        pages, stats = read_logged_pages(store, parse_time(args.since), parse_time(args.until), index.name)
    other = {g: n for g, n in stats.index_generations.items() if g != index.generation_id}
    if other:
        # Text features are computed on the generation serving now; pages of another generation
        # would get features they were never ranked with: left out, and said so.
        pages = [p for p in pages if p.request.index_generation == index.generation_id]
        log(f"{sum(other.values()):,} logged pages were served from other generations of {index.name} "
            f"({', '.join(sorted(other))}) than the current {index.generation_id}: left out (point-in-time text features)")
    clicked = sum(1 for p in pages if p.clicked)
    if not clicked:
        raise ValueError(f"no clicked page in {events_path} ({stats.read:,} requests read, {stats.used:,} usable, "
                         f"{stats.interleaved:,} interleaved skipped): nothing to learn from")
    log(f"request log {events_path}: {stats.read:,} pages read, {len(pages):,} used ({clicked:,} with clicks, "
        f"{stats.explored:,} explored) served by " + ", ".join(f"{k} x{v:,}" for k, v in stats.pipelines.items())
        + f"; {stats.interleaved:,} interleaved pages skipped")
    history = aggregates = None
    if uses_behaviour(features) and leaves_query_out(features):
        # Other queries' clicks on each document, as the service reads them (caught up first).
        aggregates = BehaviourStore.for_index(home, index.name)
        with EventStore(events_path) as store:
            aggregates.update(store)
    elif uses_behaviour(features):
        history = BehaviourHistory.open(home, index.name, events_path=events_path)
    progress = (lambda items: items) if quiet else (
        lambda items: progress_bar(items, desc="features", unit="row group"))
    try:
        result = train_on_click_labels(index, pages, features, fusion, settings, labels, history, progress, log,
                                       behaviour=aggregates)
    finally:
        if aggregates is not None:
            aggregates.close()
    fitted, trained = result.fitted, result.fitted.trained
    rows, cv = fitted.rows, trained.inner_cv
    picked = np.random.default_rng(settings.seed).choice(len(rows.labels), min(SAMPLE_ROWS, len(rows.labels)), replace=False)
    base = rows.base(trained.stage)
    record = {
        "source": "events", "method": "click-model", "event_store": str(events_path.resolve()),
        "labels": {**labels.to_dict(), "grades": {str(k): v for k, v in result.labels.grades.items()},
                   "examination": [float(x) for x in result.labels.examination]},
        "pages": stats.to_dict(), "pages_used": len(pages), "clicked_pages": clicked,
        "time_range": {"first": iso_time(stats.first), "last": iso_time(stats.last),
                       "first_ts": stats.first, "last_ts": stats.last},
        "queries": len(result.queries), "train_queries": len(result.train_queries),
        "held_out_queries": len(result.held_out_queries), "pairs": int(len(rows.labels)),
        "fingerprint": rows.fingerprint(), "window": fusion.to_dict(), "settings": settings.to_dict(),
        "feature_seconds": round(fitted.feature_seconds, 2), "train_seconds": round(trained.seconds, 2),
        "off_policy": result.estimate.to_dict() if result.estimate is not None else None,
        "selection": {"by": "off-policy estimate on held-out logged queries", "candidates": result.alternatives},
        **({"inner_cv": {**cv.to_dict(), "labels": "click-model grades"}} if cv is not None else {}),
    }
    manifest = ModelRegistry(home).save(
        trained.booster, feature_set=features.describe(), index=index_description(index), training=record,
        params=settings.xgboost_params(),
        metrics={"off-policy click DCG@10 difference": result.estimate.difference if result.estimate else None,
                 **({"inner-CV gain (click labels)": cv.gain} if cv is not None else {})},
        importance=trained.importance(), sample_features=rows.features[picked],
        best_iteration=trained.best_iteration if trained.trees else None,
        reference=drift_reference(trained, rows, page_rows=True, base=base),
        stage=trained.stage, sample_base=None if base is None else base[picked],
    )
    if not args.no_compile:
        from ltr.compiled_trees import compile_trained  # lazy: start-up time

        line = compile_trained(home, manifest.version)
        if line:
            log(line)
    return manifest, result, record


def cmd_train_from_events(home: Path, args: argparse.Namespace) -> int:
    """`train --from-events`: the click-model method (default), or the pairwise one."""
    from ltr.click_training import DEFAULT_METHOD  # lazy: start-up time
    from search.app.cli.models import inner_cv_report  # lazy: start-up time

    pair_flags = [flag for flag, value, default in (("--debias", args.debias, "none"), ("--negatives", args.negatives, "skip-above"))
                  if value != default]
    if args.method is None:
        args.method = "pairs" if pair_flags else DEFAULT_METHOD
        if pair_flags:
            log(f"{' and '.join(pair_flags)} apply to the pairwise method: training with --method pairs")
    elif args.method != "pairs" and pair_flags:
        raise ValueError(f"{' and '.join(pair_flags)} apply to --method pairs, not --method {args.method}")
    if args.method == "pairs":
        from search.app.cli.models import cmd_train_pairs_from_events  # lazy: start-up time

        return cmd_train_pairs_from_events(home, args)
    manifest, result, record = train_click_model(home, args, quiet=args.quiet)
    trained = result.fitted.trained
    if trained.inner_cv is not None:
        print(inner_cv_report(trained.inner_cv, training_settings(args)).replace("nDCG@10", "click-label nDCG@10"))
    print(f"model {manifest.version}: {plural(trained.trees, 'tree')}"
          + (f" on base {trained.stage.name}" if trained.stage is not None else "")
          + f", learned from {record['clicked_pages']:,} clicked pages of {record['queries']:,} logged queries "
          f"(click model {record['labels']['model']}; grades {record['labels']['grades']}); no judgments read")
    if result.estimate is not None:
        print(result.estimate.line())
    else:
        print("off-policy estimate: none (no held-out logged query with a click; lower --valid-fraction is 0?)")
    if trained.trees:
        print("top features by gain: " + ", ".join(f"{n} {g:.0f}" for n, g in list(trained.importance().items())[:8]))
    print(f"serve it with: ltr-search models promote {manifest.version}")
    return 0


# ---------------------------------------------------------------------------------------------
# `ltr-search retrain`: one scheduler run (cron, systemd timer, the compose service)

EXIT_PROMOTED = 0
EXIT_ERROR = 1  # anything unexpected; 2 stays argparse's usage error
EXIT_REFUSED = 3  # a candidate was trained and the gate refused it: the active model is unchanged
EXIT_NOTHING_NEW = 4  # no clicked page since the last run, or too little click evidence: nothing trained
EXIT_BUSY = 5  # another retrain of this index holds the lock
EXIT_INTERLEAVING = 6  # --interleave: a challenger is interleaved (just started, or still undecided): reload the service
OUTCOMES = {EXIT_PROMOTED: "promoted", EXIT_ERROR: "error", EXIT_REFUSED: "refused", EXIT_NOTHING_NEW: "nothing new",
            EXIT_BUSY: "busy", EXIT_INTERLEAVING: "interleaving"}
DEFAULT_INTERLEAVE_DAYS = 14.0


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    add_retrain_arguments(parser)


def add_retrain_arguments(parser: argparse.ArgumentParser) -> None:
    from search.app.cli.models import add_train_arguments  # the same training flags and defaults as `train`

    parser.description = (
        "Bring the behaviour aggregates up to date, train a candidate from the logged clicks (click-model method), "
        "gate it (held-out judgments when --dataset/--split are given, else the off-policy estimate) and promote it "
        "or refuse; with --interleave, a candidate that passes the gate is first interleaved against the active "
        "model and promoted only once users prefer it. Exit status: 0 promoted, 3 refused, 4 nothing new, 5 another "
        "retrain holds the lock, 6 interleaving (started or undecided), 1 error. Holds a lock per index; killing it "
        "at any point leaves the active model and the events intact.")
    add_train_arguments(parser)
    parser.set_defaults(from_events=True)
    job = parser.add_argument_group("the retraining job")
    job.add_argument("--force", action="store_true", help="promote even when the gate refuses")
    job.add_argument("--min-new-pages", type=int, default=1,
                     help="clicked pages logged since the last run needed to train (default 1)")
    job.add_argument("--train-dataset", metavar="PATH",
                     help="judgments too: also train a candidate on this BEIR dataset's --train-split (as `train "
                          "--dataset`); the gate (--dataset/--split, required then) promotes the better candidate")
    job.add_argument("--train-split", default="train", help="the judged split of --train-dataset (default train)")
    job.add_argument("--interleave", type=float, default=0.0, metavar="SHARE",
                     help="interleave a candidate that passes the gate against the active model on this share of ltr "
                          "requests (0 < SHARE <= 1; the service reads it on reload), instead of promoting it; later "
                          "runs promote it once the always-valid interleaving test prefers it, or end the trial when "
                          "it prefers the active model or after --interleave-days (default 0: promote at once)")
    job.add_argument("--interleave-days", type=float, default=DEFAULT_INTERLEAVE_DAYS, metavar="DAYS",
                     help=f"end an undecided interleaving trial after this many days, keeping the active model "
                          f"(default {DEFAULT_INTERLEAVE_DAYS:g})")
    job.add_argument("--report", metavar="DIR", help="where the markdown report and plot go (default HOME/reports)")
    job.add_argument("--json", dest="json_out", metavar="OUT", help="also write the report as JSON")


def run(home: Path, args: argparse.Namespace) -> int:
    """`ltr-search retrain`; returns one of the EXIT_* codes (errors print one line, exit 1)."""
    try:
        return cmd_retrain(home, args)
    except Exception as exc:  # a scheduler needs the distinct "error" status, and the reason
        print(f"ltr-search: error: retrain failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _state_path(home: Path, index: str) -> Path:
    return home / "retrain" / f"{index}.json"


def _write_atomically(path: Path, text: str) -> None:
    """Write-then-rename, so a kill leaves either the old file or the new one, never half of one."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


class RetrainLock:
    """An exclusive `flock` on HOME/retrain/INDEX.lock: the kernel drops it when the process dies
    (kill -9 included), so a crashed run never blocks the next one."""

    def __init__(self, home: Path, index: str):
        self.path = home / "retrain" / f"{index}.lock"
        self.handle: Any = None

    def acquire(self) -> bool:
        import fcntl
        import os

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            self.handle = None
            return False
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"{os.getpid()}\n")
        self.handle.flush()
        return True

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing drops the flock
            self.handle = None


def cmd_retrain(home: Path, args: argparse.Namespace) -> int:
    import json
    import time

    from eval.click_models import NotEnoughClicksError  # lazy: start-up time
    from indexing.home import reports_dir  # lazy: start-up time
    from ltr.behaviour import BehaviourStore  # lazy: start-up time
    from ltr.registry import ModelRegistry  # lazy: start-up time
    from search.app.cli.models import PromotionRefused, cmd_promote  # lazy: start-up time
    from search.app.config import load_service_config  # lazy: start-up time
    from search.event_store import EventStore  # lazy: start-up time

    if not 0.0 <= args.interleave <= 1.0:
        raise ValueError(f"--interleave must be a share of requests in [0, 1], got {args.interleave:g}")
    if args.interleave_days < 0:
        raise ValueError(f"--interleave-days must be >= 0, got {args.interleave_days:g}")
    started = time.time()
    index = events_index(home, args.name, args.config)
    args.name = index
    lock = RetrainLock(home, index)
    if not lock.acquire():
        print(f"retrain[{index}]: another retrain holds {lock.path}; nothing done", file=sys.stderr)
        return EXIT_BUSY
    try:
        config = load_service_config(home, Path(args.config) if args.config else None, {"index": index})
        events_path = Path(args.events) if args.events else config.event_store_path
        if not events_path.is_file():
            raise ValueError(f"no event store at {events_path}")
        report: dict[str, Any] = {"index": index, "started": started, "event_store": str(events_path)}
        state_path = _state_path(home, index)
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        with EventStore(events_path) as events:
            with BehaviourStore.for_index(home, index) as behaviour:
                summary = behaviour.update(events)
            report["aggregates"] = {"events_applied": summary.events_applied, "watermark": summary.watermark}
            last_seq = events.last_event_seq()
            new_pages = _clicked_pages_since(events, state.get("last_request_ts"))
        report["new_clicked_pages"] = new_pages
        log(f"retrain[{index}]: aggregates +{summary.events_applied:,} events; {new_pages:,} clicked pages since the "
            "last run")
        registry = ModelRegistry(home)
        challenge = registry.challenge()
        if challenge is not None:
            code, credits = _judge_challenge(home, args, report, registry, challenge, config, events_path)
            if code is not None:
                return _finish(home, args, report, code, state_path, state, None, credits)
        if new_pages < max(args.min_new_pages, 1):
            return _finish(home, args, report, EXIT_NOTHING_NEW, state_path, state, None)
        if args.train_dataset and not (args.dataset and args.split):
            raise ValueError("--train-dataset needs the gate's held-out judged queries (--dataset PATH --split SPLIT) "
                             "to choose between the click-trained and the judgment-trained candidate")
        if args.train_dataset and (Path(args.train_dataset).resolve(), args.train_split) == (Path(args.dataset).resolve(), args.split):
            raise ValueError(f"--train-split {args.train_split} is the gate's --split: the gate needs queries neither "
                             "model has seen (another split)")
        try:
            manifest, result, record = train_click_model(home, args, quiet=True)
        except NotEnoughClicksError as exc:  # nothing trained: the next run may have enough
            report["reason"] = str(exc)
            log(f"retrain[{index}]: {exc}")
            return _finish(home, args, report, EXIT_NOTHING_NEW, state_path, state, None)
        report["candidate"] = report["click_candidate"] = manifest.version
        report["training"] = {k: record[k] for k in ("clicked_pages", "queries", "labels", "off_policy", "time_range")}
        report["trees"] = result.fitted.trained.trees
        if result.estimate is not None:
            log(result.estimate.line())
        gated = None  # the gate's result when choosing between candidates ran it already
        if args.train_dataset:
            manifest, gated = _better_candidate(home, args, manifest, report)
        promote_args = argparse.Namespace(
            version=manifest.version, dataset=args.dataset, split=args.split if args.dataset else None,
            name=index, force=args.force, quiet=True, json=False, backend=getattr(args, "backend", None),
            es_url=getattr(args, "es_url", None))
        new_state = {**state, "last_request_ts": record["time_range"]["last_ts"], "last_event_seq": last_seq,
                     "last_candidate": manifest.version}
        trial = args.interleave > 0 and registry.active() is not None  # without an active model: nothing to interleave against
        try:
            cmd_promote(home, promote_args, gated, dry_run=trial)
        except PromotionRefused as exc:
            report["refused"] = str(exc)
            return _finish(home, args, report, EXIT_REFUSED, state_path, new_state, result)
        if trial:
            challenge = registry.start_challenge(manifest.version, args.interleave, time.time())
            report["challenge"] = challenge.to_dict()
            log(f"retrain[{index}]: {manifest.version} passed the gate; interleaved against {challenge.against} on "
                f"{challenge.share:.0%} of ltr requests from the service's next reload, until users prefer one (or "
                f"{args.interleave_days:g} days)")
            return _finish(home, args, report, EXIT_INTERLEAVING, state_path, new_state, result)
        return _finish(home, args, report, EXIT_PROMOTED, state_path, new_state, result)
    finally:
        lock.release()


def _judge_challenge(home: Path, args: argparse.Namespace, report: dict[str, Any], registry: Any, challenge: Any,
                     config: Any, events_path: Path) -> tuple[int | None, np.ndarray | None]:
    """A running interleaving trial: promote the challenger once the always-valid test prefers it,
    end the trial when it prefers the active model or when it has run --interleave-days undecided,
    else keep interleaving; (exit status, the per-request credits read, for the report's plot).
    None: the trial was void (another model was promoted since it started): ended, and this run
    goes on to train as usual."""
    import time

    from ltr.experiments import compare_interleaved  # lazy: start-up time
    from search.app.cli.compare import read_comparison  # lazy: start-up time
    from search.app.cli.models import cmd_promote  # lazy: start-up time

    index = report["index"]
    if registry.active() != challenge.against:
        registry.end_challenge()
        log(f"retrain[{index}]: the interleaving trial of {challenge.version} against {challenge.against} is void: "
            f"{registry.active()} was made active since; ended")
        report["challenge_void"] = challenge.to_dict()
        return None, None
    log_path = config.experiment_log_path
    if log_path.is_file():
        comparison, _ = read_comparison(log_path, events_path, challenge.against, challenge.version, challenge.started)
    else:  # nothing interleaved yet: the empty comparison
        comparison = compare_interleaved(challenge.against, challenge.version, [], [])
    summary, credits = comparison.to_dict(), comparison.credits()
    if not summary["requests"]:  # the usual cause: the service was not reloaded after the trial started
        summary["note"] = (f"no interleaved request of {challenge.against} and {challenge.version} logged since the trial "
                           "started: a running service interleaves from its next reload (POST /admin/reload)")
    days = (time.time() - challenge.started) / 86400
    report["challenge"] = challenge.to_dict()
    report["interleaving"] = {**{k: summary[k] for k in ("requests", "requests_with_clicks", "mean_credit", "p_value",
                                                         "always_valid_p_value", "preferred", "verdict", "note")},
                              "days": round(days, 3)}
    report["candidate"] = challenge.version
    log(f"retrain[{index}]: interleaving {challenge.against} (A) vs {challenge.version} (B) for {days:.1f} days: "
        f"{summary['requests']:,} requests, mean credit {summary['mean_credit']:+.4f}, always-valid p "
        f"{summary['always_valid_p_value']:.3g} -> {summary['verdict']}")
    if summary["preferred"] == challenge.version:
        promote_args = argparse.Namespace(version=challenge.version, dataset=None, split=None, name=index, force=True,
                                          quiet=True, json=False, backend=getattr(args, "backend", None),
                                          es_url=getattr(args, "es_url", None))
        cmd_promote(home, promote_args)  # the gate passed when the trial started; users prefer it now
        registry.end_challenge()
        return EXIT_PROMOTED, credits
    if summary["preferred"] == challenge.against:
        registry.end_challenge()
        report["refused"] = (f"users preferred the active model {challenge.against} over {challenge.version} "
                             f"({summary['verdict']})")
        return EXIT_REFUSED, credits
    if days >= args.interleave_days:
        registry.end_challenge()
        report["refused"] = (f"no preference after {days:.1f} days of interleaving (--interleave-days "
                             f"{args.interleave_days:g}): {challenge.against} stays active")
        return EXIT_REFUSED, credits
    return EXIT_INTERLEAVING, credits


def _better_candidate(home: Path, args: argparse.Namespace, clicked: Any, report: dict[str, Any]) -> tuple[Any, Any]:
    """Train a candidate on the judged `--train-dataset` too (the `train --dataset` path), gate
    both on the held-out `--dataset/--split`, and return the one with the higher gate metric of
    those not significantly worse than a reference (the click candidate when neither is), with its
    gate result (so promoting it does not run the gate again)."""
    import contextlib

    from ltr.registry import ModelRegistry  # lazy: start-up time
    from search.app.cli.models import cmd_train, promotion_gate  # lazy: start-up time

    judged_args = argparse.Namespace(**{**vars(args), "dataset": args.train_dataset, "split": args.train_split,
                                        "from_events": False, "feature_set": None, "base_model": None})
    registry = ModelRegistry(home)
    with contextlib.redirect_stdout(sys.stderr):  # its training report goes to the log
        cmd_train(home, judged_args)
    judged = registry.manifest(registry.version_ids()[-1])
    active = registry.active()
    active_manifest = registry.manifest(active) if active else None
    gates = {m.version: promotion_gate(home, args, m, active_manifest) for m in (clicked, judged)}
    report["candidates"] = {version: {"trained_on": "clicks" if version == clicked.version else
                                      f"judgments ({args.train_dataset}, {args.train_split})", "gate": gate.to_dict()}
                            for version, gate in gates.items()}
    eligible = [m for m in (clicked, judged) if not gates[m.version].worse_than()] or [clicked]
    chosen = max(eligible, key=lambda m: gates[m.version].means[m.version])
    for version, gate in gates.items():
        log(f"retrain[{report['index']}]: candidate {version} ({report['candidates'][version]['trained_on']}): gate "
            f"nDCG@10 {gate.means[version]:.4f}" + (f", worse than {', '.join(gate.worse_than())}" if gate.worse_than() else ""))
    log(f"retrain[{report['index']}]: the better candidate is {chosen.version}")
    report["candidate"] = chosen.version
    return chosen, gates[chosen.version]


def _clicked_pages_since(events: Any, since: float | None) -> int:
    clicked = {e.request_id for e in events.iter_events(types=["click"])}
    return sum(1 for r in events.iter_requests(since=None if since is None else since + 1e-6) if r.request_id in clicked)


def _finish(home: Path, args: argparse.Namespace, report: dict[str, Any], code: int, state_path: Path,
            state: dict[str, Any], result: Any, credits: np.ndarray | None = None) -> int:
    """Write the report (markdown, plots, optional JSON) and the run's state; the state last, so
    a run killed before it is simply redone by the next one. `credits`: an interleaving trial's
    per-request credits, plotted as its p-values request by request."""
    import json
    import time

    from indexing.home import reports_dir  # lazy: start-up time

    report["outcome"], report["exit_status"], report["finished"] = OUTCOMES[code], code, time.time()
    directory = Path(args.report) if args.report else reports_dir(home)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(report["started"]))
    markdown = directory / f"retrain-{report['index']}-{stamp}.md"
    plots = []
    if result is not None:
        plots.append(("examination by position and label grades", _plot_examination(result, markdown.with_suffix(".png"))))
    if credits is not None and len(credits):
        plots.append(("the interleaving trial's p-values, request by request",
                      _plot_trial(credits, markdown.with_name(f"{markdown.stem}-interleaving.png"))))
    _write_atomically(markdown, _markdown(report, [(alt, path) for alt, path in plots if path is not None]))
    if args.json_out:
        _write_atomically(Path(args.json_out), json.dumps(report, indent=2, default=str) + "\n")
    if code in (EXIT_PROMOTED, EXIT_REFUSED, EXIT_INTERLEAVING):
        _write_atomically(state_path, json.dumps(state, indent=2) + "\n")
    print(f"retrain[{report['index']}]: {report['outcome']}"
          + (f" ({report['candidate']})" if report.get("candidate") else "") + f"; report {markdown}")
    return code


def _markdown(report: dict[str, Any], plots: list[tuple[str, Path]]) -> str:
    from datetime import datetime, timezone

    when = datetime.fromtimestamp(report["started"], timezone.utc).isoformat(timespec="seconds")
    lines = [f"# Retrain of index `{report['index']}` at {when}", "",
             f"**Outcome: {report['outcome']}** (exit status {report['exit_status']})", "",
             f"- event store: `{report['event_store']}`",
             f"- behaviour aggregates: +{report['aggregates']['events_applied']:,} events applied",
             f"- clicked pages since the last run: {report['new_clicked_pages']:,}"]
    if report.get("training"):  # a candidate trained by this run (not a running trial's challenger)
        training = report["training"]
        lines += [f"- click-trained candidate: `{report['click_candidate']}` ({report['trees']} trees), from {training['clicked_pages']:,} "
                  f"clicked pages of {training['queries']:,} queries, click model {training['labels']['model']}, "
                  f"grades {training['labels']['grades']}"]
        estimate = training.get("off_policy")
        if estimate:
            lines += [f"- off-policy estimate ({estimate['metric']}) on {estimate['pages']:,} held-out pages: model "
                      f"{estimate['model']:.4f} vs logging policy {estimate['logging']:.4f}, difference "
                      f"{estimate['difference']:+.4f} (95% CI {estimate['ci'][0]:+.4f} .. {estimate['ci'][1]:+.4f}): "
                      f"{estimate['verdict']}"]
    for version, candidate in (report.get("candidates") or {}).items():
        gate = candidate["gate"]
        lines += [f"- candidate `{version}` trained on {candidate['trained_on']}: gate {gate['metric']} "
                  f"{gate['means'][version]:.4f} on {gate['queries']:,} held-out queries"
                  + (f", significantly worse than {', '.join(gate['worse_than'])}" if gate["worse_than"] else "")]
    if report.get("candidates"):
        lines += [f"- chosen: `{report['candidate']}`"]
    if report.get("challenge_void"):
        void = report["challenge_void"]
        lines += [f"- the interleaving trial of `{void['version']}` against `{void['against']}` was void (another model "
                  "was made active since it started): ended"]
    if report.get("interleaving"):
        trial, challenge = report["interleaving"], report["challenge"]
        lines += [f"- interleaving `{challenge['against']}` (A) vs `{challenge['version']}` (B) on {challenge['share']:.0%} "
                  f"of ltr requests for {trial['days']:.1f} days: {trial['requests']:,} requests "
                  f"({trial['requests_with_clicks']:,} with clicks), mean credit {trial['mean_credit']:+.4f}, "
                  f"always-valid p {trial['always_valid_p_value']:.3g} (fixed-sample p {trial['p_value']:.3g}): "
                  f"{trial['verdict']}" + (f"; {trial['note']}" if trial.get("note") else "")]
    elif report.get("challenge"):
        challenge = report["challenge"]
        lines += [f"- interleaving trial started: `{challenge['version']}` against `{challenge['against']}` on "
                  f"{challenge['share']:.0%} of ltr requests, from the service's next reload"]
    if report.get("refused"):
        lines += [f"- refused: {report['refused']}"]
    if report.get("reason"):
        lines += [f"- nothing trained: {report['reason']}"]
    for alt, plot in plots:
        lines += ["", f"![{alt}]({plot.name})"]
    return "\n".join(lines) + "\n"


def _plot_trial(credits: np.ndarray, path: Path) -> Path | None:
    """The always-valid p (what decides) and the fixed-sample t-test's p after each interleaved
    request: the second dips below 0.05 and back when read too often; the first never comes back."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional
        return None
    from ltr.experiments import ALPHA  # lazy: start-up time
    from ltr.sequential_test import always_valid_p_values, t_test_p_values  # lazy: start-up time

    n = np.arange(1, len(credits) + 1)
    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.plot(n, always_valid_p_values(credits), label="always-valid p (decides)")
    axis.plot(n, t_test_p_values(credits), alpha=0.6, label="fixed-sample t-test p")
    axis.axhline(ALPHA, color="grey", linestyle="--", linewidth=1)
    axis.set_yscale("log")
    axis.set_xlabel("interleaved requests")
    axis.set_ylabel("p-value")
    axis.legend()
    axis.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _plot_examination(result: Any, path: Path) -> Path | None:
    """The fitted examination curve (what IPS divides by) and the label grades, one figure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional: the markdown says everything without them
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    gamma = result.labels.examination
    left.plot(range(1, len(gamma) + 1), gamma, marker="o")
    left.set_xlabel("position")
    left.set_ylabel("examination (position 1 = 1)")
    left.grid(alpha=0.3)
    grades = result.labels.grades
    right.bar([str(g) for g in grades], list(grades.values()))
    right.set_xlabel("label grade")
    right.set_ylabel("(query, document) pairs")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
