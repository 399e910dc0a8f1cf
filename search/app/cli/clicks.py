"""Command-line glue for click models: `ltr-search clicks fit` and `ltr-search simulate`.

`simulate` has two modes: offline over a TREC run file (`--qrels --run`, events JSONL out) and
live replay (`--dataset --split`) against the query service, in process or `--through-api URL`;
the live loop itself is `eval/simulate.py`.

The main CLI builds `clicks` and `simulate` with `add_arguments(command, parser)` and runs them
with `run(home, args)` (`add_click_commands`/`run_click_command` do the same on any subparser set). Errors are `ClickCommandError` (or the readers'
`ClickLogError`), both `ValueError`s with a one-line message, so the main CLI prints them and
exits 2. Progress goes to stderr; results and the summary to stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from eval.datasets import read_qrels, read_run, trec_order
from eval.click_log import ClickLog, read_click_log_jsonl, read_yandex_splits, write_events_jsonl
from eval.click_models import MODELS, ClickModelScores, UserBehaviour, evaluate, make_model, simulate_click_log

DEFAULT_MODELS = "ctr,pbm,cascade,dbn"
TABLE_POSITIONS = 10


class ClickCommandError(ValueError):
    """A problem with the command's input worth one line to the user (exit status 2)."""


SIMULATE_DESCRIPTION = (
    "Simulate users (PBM, cascade or DBN behaviour) clicking on rankings, given relevance grades. "
    "Live replay (--dataset/--split): each session searches the query service (in process, or a running "
    "server with --through-api URL), clicks on the page it got and posts the impressions and clicks to "
    "/events, so the whole behaviour loop runs. Offline (--qrels/--run): sessions over a run file's "
    "rankings, written as an events JSONL. The two modes are exclusive."
)


def add_click_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `clicks fit` and `simulate` on a subcommand set."""
    add_clicks_arguments(subparsers.add_parser("clicks", help="fit and compare click models on a click log"))
    add_simulate_arguments(subparsers.add_parser(
        "simulate", help="simulate users clicking: live against the query service, or offline over a TREC run file"))


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """The flags of `clicks` or `simulate` (this module is imported only when one of them runs)."""
    if command == "clicks":
        add_clicks_arguments(parser)
    else:
        add_simulate_arguments(parser)


def run(home: Path, args: argparse.Namespace) -> int:
    return run_click_command(args)


def add_clicks_arguments(clicks: argparse.ArgumentParser) -> None:
    click_commands = clicks.add_subparsers(dest="clicks_command", required=True)
    fit = click_commands.add_parser(
        "fit",
        help="fit click models on a train split and compare them on a test split",
        description="Fit click models on the train part of a click log and report test log-likelihood and perplexity.",
    )
    fit.add_argument("--log", required=True, help="Yandex sample folder or its clicks.tsv.gz, or a JSONL event file")
    fit.add_argument("--train-split", help="split fitted on (click tables only; default train)")
    fit.add_argument("--test-split", help="split evaluated on (click tables only; default test)")
    fit.add_argument("--test-fraction", type=float, help="JSONL logs only: latest fraction of sessions held out (default 0.25)")
    fit.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated, from {','.join(MODELS)} (default {DEFAULT_MODELS})")
    fit.add_argument("--max-iter", type=int, default=100, help="EM rounds at most for pbm and dbn (default 100)")
    fit.add_argument("--json", dest="json_out", metavar="OUT", help="write the results as JSON")
    fit.add_argument("--report", metavar="OUT.md", help="write a markdown report and a perplexity plot next to it")
    fit.add_argument("--quiet", action="store_true", help="no progress bars")
    fit.set_defaults(click_command="clicks-fit")


def add_simulate_arguments(simulate: argparse.ArgumentParser) -> None:
    simulate.description = SIMULATE_DESCRIPTION
    simulate.add_argument("--model", "--click-model", dest="model", required=True, choices=["pbm", "cascade", "dbn"],
                          help="user behaviour (--click-model is the same option)")
    live = simulate.add_argument_group("live replay against the query service")
    live.add_argument("--dataset", help="BEIR directory whose queries and qrels drive the sessions")
    live.add_argument("--split", help="qrels split (default test)")
    live.add_argument("--sessions", type=int, help="sessions in all, round-robin over the split's queries in a seeded "
                      "shuffled order (default: one per query)")
    live.add_argument("--through-api", metavar="URL", help="drive a running `ltr-search serve` at URL over HTTP; "
                      "then the server's own config decides the index, exploration and default pipeline")
    live.add_argument("--events-db", metavar="PATH", help="with --through-api: the server's SQLite event store, "
                      "to check that every acknowledged event is in it")
    live.add_argument("--name", "--index", dest="index_name", metavar="NAME", help="in process: index to serve (default: the config's, else 'default')")
    live.add_argument("--config", help="in process: service TOML settings file (env LTR_SEARCH_CONFIG)")
    live.add_argument("--exploration", type=float, metavar="EPSILON", help="in process: overrides the config's "
                      "exploration.epsilon (through the API the server's config decides)")
    live.add_argument("--pipeline", help="pipeline to search with (default: the service's default)")
    live.add_argument("--timeout", type=float, help="with --through-api: seconds per HTTP request (default 30)")
    live.add_argument("--json", dest="json_out", metavar="OUT", help="write the run's report as JSON")
    offline = simulate.add_argument_group("offline over a TREC run file")
    offline.add_argument("--qrels", help="BEIR qrels TSV (query-id, corpus-id, score)")
    offline.add_argument("--run", help="TREC run file: qid Q0 docid rank score tag")
    offline.add_argument("--sessions-per-query", type=int, help="default 10")
    offline.add_argument("--out", help="events JSONL (default: stdout)")
    offline.add_argument("--shuffle", action="store_true", help="show each page a random permutation of the top --depth")
    shared = simulate.add_argument_group("users (both modes)")
    shared.add_argument("--seed", type=int, default=0)
    shared.add_argument("--depth", type=int, default=10, help="results shown per page (default 10)")
    shared.add_argument("--eta", type=float, default=1.0, help="pbm examination 1/r**eta (default 1)")
    shared.add_argument("--examination", help="pbm examination per position, comma-separated (overrides --eta)")
    shared.add_argument("--click-probs", help="attraction per grade, e.g. 0:0.05,1:0.5,2:0.95")
    shared.add_argument("--stop-probs", help="dbn satisfaction per grade, e.g. 0:0,1:0.3,2:0.7")
    shared.add_argument("--continuation", type=float, default=0.9, help="dbn probability to go on after an unsatisfying result")
    shared.add_argument("--noise", type=float, default=0.0, help="probability of flipping each attraction decision")
    shared.add_argument("--quiet", action="store_true", help="no progress bar")
    simulate.set_defaults(simulate_parser=simulate)
    simulate.set_defaults(click_command="simulate")


def run_click_command(args: argparse.Namespace) -> int:
    """Run `clicks fit` or `simulate`; returns the exit status (errors raise ValueError)."""
    command = getattr(args, "click_command", None)
    if command == "clicks-fit":
        return cmd_clicks_fit(args)
    if command == "simulate":
        return cmd_simulate(args)
    raise ClickCommandError(f"not a click command: {command!r}")


# ---------------------------------------------------------------------------------------------
# clicks fit


@dataclass
class ModelResult:
    scores: ClickModelScores
    fit_seconds: float
    parameters: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.scores.to_dict(), "fit_seconds": round(self.fit_seconds, 3), "parameters": self.parameters}


def parse_model_names(text: str) -> list[str]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if not names:
        raise ClickCommandError("--models is empty")
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        raise ClickCommandError(f"unknown click model '{unknown[0]}' (choose from {', '.join(MODELS)})")
    return list(dict.fromkeys(names))


def load_train_test(path: Path, train_split: str | None, test_split: str | None, test_fraction: float | None) -> tuple[ClickLog, ClickLog, str]:
    """A click table is split by its `split` column; a JSONL log by time. Returns a description too."""
    if not path.exists():
        raise ClickCommandError(f"{path}: no such file or directory")
    is_table = path.is_dir() or path.name.endswith((".tsv", ".tsv.gz"))
    if is_table:
        if test_fraction is not None:
            raise ClickCommandError("--test-fraction applies to JSONL logs; a click table has --train-split/--test-split")
        train_split, test_split = train_split or "train", test_split or "test"
        if train_split == test_split:
            raise ClickCommandError(f"train and test split are both '{train_split}'")
        logs = read_yandex_splits(path, [train_split, test_split])
        return logs[train_split], logs[test_split], f"splits {train_split} / {test_split}"
    if train_split or test_split:
        raise ClickCommandError("--train-split/--test-split apply to click tables; a JSONL log is split by time (--test-fraction)")
    fraction = 0.25 if test_fraction is None else test_fraction
    log = read_click_log_jsonl(path)
    try:
        train, test = log.split_by_time(fraction)
    except ValueError as exc:
        raise ClickCommandError(f"{path}: {exc}") from None
    return train, test, f"time split, latest {fraction:.0%} of sessions held out"


def compare_click_models(train: ClickLog, test: ClickLog, names: Sequence[str], max_iter: int = 100, progress: bool = False) -> list[ModelResult]:
    """Fit each model on `train`, score it on `test`; the same code path as `clicks fit`."""
    results = []
    for name in names:
        model = make_model(name)
        if hasattr(model, "max_iter"):
            model.max_iter = max_iter
        if progress:
            print(f"fitting {name} on {train.n_sessions:,} sessions ...", file=sys.stderr)
        started = time.perf_counter()
        model.fit(train, progress=progress)
        seconds = time.perf_counter() - started
        results.append(ModelResult(evaluate(model, test), seconds, model.summary()))
    return results


def cmd_clicks_fit(args: argparse.Namespace) -> int:
    names = parse_model_names(args.models)
    if args.max_iter < 1:
        raise ClickCommandError(f"--max-iter must be >= 1, got {args.max_iter}")
    path = Path(args.log)
    progress = not args.quiet
    if progress:
        print(f"reading {path} ...", file=sys.stderr)
    train, test, how = load_train_test(path, args.train_split, args.test_split, args.test_fraction)
    if test.n_positions > train.n_positions:
        raise ClickCommandError(f"the test pages have {test.n_positions} positions but the training pages only {train.n_positions}")
    results = compare_click_models(train, test, names, args.max_iter, progress)
    data = _stats(train, test)
    lines = summary_lines(path, how, data, results)
    print("\n".join(lines))
    payload = {"log": str(path), "split": how, **data, "results": [r.to_dict() for r in results], "winner": _winner(results)}
    if args.json_out:
        _write_text(Path(args.json_out), json.dumps(_json_safe(payload), indent=2) + "\n")
        print(f"json: {args.json_out}")
    if args.report:
        report = Path(args.report)
        plot = report.with_name(report.stem + "-perplexity.png")
        try:
            plot_perplexity_by_position({r.scores.model: r.scores.perplexity_by_position for r in results}, plot)
        except OSError as exc:
            raise ClickCommandError(f"{plot}: cannot write: {exc}") from None
        _write_text(report, markdown_report(path, how, data, results, plot.name))
        print(f"report: {report} (plot {plot})")
    return 0


def _stats(train: ClickLog, test: ClickLog) -> dict[str, Any]:
    seen = set(train.pair_keys())
    _, _, cell_pair = test.pair_index
    unseen_pairs = np.array([key not in seen for key in test.pair_keys()], dtype=bool)
    unseen_cells = float(unseen_pairs[cell_pair[test.mask]].mean()) if test.mask.any() else 0.0

    def describe(log: ClickLog) -> dict[str, Any]:
        return {
            "sessions": log.n_sessions,
            "queries": len(log.query_ids),
            "documents": len(log.doc_ids),
            "positions": log.n_positions,
            "clicks": log.n_clicks,
            "multi_click_sessions": int((log.clicks.sum(axis=1) > 1).sum()),
        }

    return {"train": describe(train), "test": describe(test), "test_impressions_of_unseen_pairs": unseen_cells}


def _winner(results: Sequence[ModelResult]) -> dict[str, str]:
    by_perplexity = min(results, key=lambda r: r.scores.perplexity)
    by_likelihood = max(results, key=lambda r: r.scores.log_likelihood)
    return {"perplexity": by_perplexity.scores.model, "log_likelihood": by_likelihood.scores.model}


def summary_lines(path: Path, how: str, data: dict[str, Any], results: Sequence[ModelResult]) -> list[str]:
    """The one-screen summary: data, a table per model and the winner."""
    tr, te = data["train"], data["test"]
    shown = min(TABLE_POSITIONS, max(len(r.scores.perplexity_by_position) for r in results))
    lines = [
        f"click log {path} ({how})",
        f"  train {tr['sessions']:,} sessions, {tr['queries']:,} queries, {tr['documents']:,} docs, {tr['clicks']:,} clicks "
        f"({tr['multi_click_sessions']:,} multi-click sessions)",
        f"  test  {te['sessions']:,} sessions, {te['queries']:,} queries, {te['documents']:,} docs, {te['clicks']:,} clicks; "
        f"{data['test_impressions_of_unseen_pairs']:.1%} of test impressions are pairs unseen in training",
        "",
    ]
    header = f"{'model':<8} {'loglik':>9} {'perplex':>8}  " + " ".join(f"{'p@' + str(r + 1):>6}" for r in range(shown)) + f"  {'fit s':>6}"
    lines += [header, "-" * len(header)]
    for result in results:
        s = result.scores
        cells = " ".join(f"{p:6.4f}" for p in s.perplexity_by_position[:shown])
        lines.append(f"{s.model:<8} {s.log_likelihood:9.4f} {s.perplexity:8.4f}  {cells}  {result.fit_seconds:6.2f}")
    winner = _winner(results)
    best_p = next(r for r in results if r.scores.model == winner["perplexity"])
    best_l = next(r for r in results if r.scores.model == winner["log_likelihood"])
    lines += [
        "",
        f"winner by perplexity (lower is better): {best_p.scores.model} ({best_p.scores.perplexity:.4f})",
        f"winner by log-likelihood (higher is better): {best_l.scores.model} ({best_l.scores.log_likelihood:.4f})",
    ]
    return lines


def markdown_report(path: Path, how: str, data: dict[str, Any], results: Sequence[ModelResult], plot_name: str) -> str:
    tr, te = data["train"], data["test"]
    shown = min(TABLE_POSITIONS, max(len(r.scores.perplexity_by_position) for r in results))
    winner = _winner(results)
    lines = [
        "# Click models: test log-likelihood and perplexity",
        "",
        f"Log `{path}` ({how}). Train: {tr['sessions']:,} sessions, {tr['clicks']:,} clicks; "
        f"test: {te['sessions']:,} sessions, {te['clicks']:,} clicks; "
        f"{data['test_impressions_of_unseen_pairs']:.1%} of test impressions show a (query, doc) pair unseen in training.",
        "",
        "Log-likelihood: mean per test session, natural log, from click probabilities conditional on the session's "
        "earlier clicks. Perplexity at position r: 2^-(mean log2-likelihood of the click at r under the unconditional "
        "click probability); overall perplexity is the mean over positions (Chuklin, Markov & de Rijke, "
        "*Click Models for Web Search*, 2015, chapter 5). A perfect model has perplexity 1, a coin 2.",
        "",
        "| model | log-likelihood | perplexity | " + " | ".join(f"p@{r + 1}" for r in range(shown)) + " | fit s |",
        "|---|---:|---:|" + "---:|" * shown + "---:|",
    ]
    for result in results:
        s = result.scores
        bold = "**" if s.model == winner["perplexity"] else ""
        cells = " | ".join(f"{p:.4f}" for p in s.perplexity_by_position[:shown])
        lines.append(f"| {bold}{s.model}{bold} | {s.log_likelihood:.4f} | {bold}{s.perplexity:.4f}{bold} | {cells} | {result.fit_seconds:.2f} |")
    lines += [
        "",
        f"Lowest perplexity: **{winner['perplexity']}**; highest log-likelihood: **{winner['log_likelihood']}**.",
        "",
        f"![perplexity by position]({plot_name})",
        "",
        "## Fitted global parameters",
        "",
    ]
    for result in results:
        params = {k: v for k, v in result.parameters.items() if k != "model"}
        lines.append(f"- **{result.scores.model}**: " + ", ".join(f"{k} = {_format(v)}" for k, v in params.items()))
    return "\n".join(lines) + "\n"


def plot_perplexity_by_position(per_position: dict[str, Sequence[float]], path: Path) -> Path:
    """One line per model, perplexity against position (1-based); writes a PNG with Agg."""
    import matplotlib  # plots only: matplotlib costs ~0.5 s to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # plots only: matplotlib costs ~0.5 s to import

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    try:
        for name, values in per_position.items():
            values = list(values)
            ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3.5, linewidth=1.4, label=name)
        ax.set_xlabel("position")
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_title("Click-model perplexity by position")
        longest = max((len(v) for v in per_position.values()), default=1)
        ax.set_xticks(range(1, longest + 1))
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# simulate


LIVE_OPTIONS = {
    "dataset": "--dataset", "split": "--split", "sessions": "--sessions", "through_api": "--through-api",
    "events_db": "--events-db", "index_name": "--name/--index", "config": "--config", "exploration": "--exploration",
    "pipeline": "--pipeline", "timeout": "--timeout", "json_out": "--json",
}
OFFLINE_OPTIONS = {"qrels": "--qrels", "run": "--run", "sessions_per_query": "--sessions-per-query", "out": "--out", "shuffle": "--shuffle"}
IN_PROCESS_OPTIONS = {"index_name": "--name/--index", "config": "--config", "exploration": "--exploration"}


def _given(args: argparse.Namespace, options: dict[str, str]) -> list[str]:
    return [flag for dest, flag in options.items() if getattr(args, dest, None) not in (None, False)]


def _usage_error(args: argparse.Namespace, message: str) -> None:
    """An argparse error (usage and exit 2) when parsed by the CLI, else a ClickCommandError."""
    parser = getattr(args, "simulate_parser", None)
    if parser is not None:
        parser.error(message)
    raise ClickCommandError(message)


def cmd_simulate(args: argparse.Namespace) -> int:
    live, offline = _given(args, LIVE_OPTIONS), _given(args, OFFLINE_OPTIONS)
    if live and offline:
        _usage_error(args, f"{', '.join(live)} (live replay against the service) cannot be combined with "
                           f"{', '.join(offline)} (offline over a run file): choose one mode")
    if not live and not offline:
        _usage_error(args, "choose a mode: --dataset PATH --split SPLIT (live replay against the service) "
                           "or --qrels QRELS --run RUN (offline over a run file)")
    if args.depth < 1:
        raise ClickCommandError(f"--depth must be >= 1, got {args.depth}")
    behaviour = _behaviour(args)
    if live:
        return cmd_simulate_live(args, behaviour)
    if args.qrels is None or args.run is None:
        _usage_error(args, "offline simulation needs both --qrels and --run")
    if args.sessions_per_query is None:
        args.sessions_per_query = 10
    if args.sessions_per_query < 1:
        raise ClickCommandError(f"--sessions-per-query must be >= 1, got {args.sessions_per_query}")
    qrels = read_qrels(args.qrels)
    run = {qid: [doc for doc, _ in trec_order(ranked)] for qid, ranked in read_run(args.run).items()}
    if not run:
        raise ClickCommandError(f"{args.run}: empty run file")
    rankings = {qid: docs for qid, docs in run.items() if qid in qrels}
    skipped = len(run) - len(rankings)
    if not rankings:
        raise ClickCommandError(f"{args.run}: none of its {len(run)} queries has relevance judgments in {args.qrels}")
    grades = {qid: qrels[qid] for qid in rankings}
    try:
        log = simulate_click_log(
            behaviour, rankings, grades, sessions_per_query=args.sessions_per_query, depth=args.depth, shuffle=args.shuffle, seed=args.seed,
            session_prefix=f"sim-{args.model}-s{args.seed}",
        )
    except ValueError as exc:
        raise ClickCommandError(str(exc)) from None
    events = log.to_events()
    if args.out:
        try:
            write_events_jsonl(events, args.out)
        except OSError as exc:
            raise ClickCommandError(f"{args.out}: cannot write: {exc}") from None
        out = sys.stdout
        destination = args.out
    else:
        for event in events:
            sys.stdout.write(json.dumps(event.to_dict(), ensure_ascii=False) + "\n")
        out = sys.stderr  # stdout carries the events
        destination = "stdout"
    ctr = log.clicks.sum(axis=0) / np.maximum(log.mask.sum(axis=0), 1)
    lines = [
        f"simulated {args.model} users over {args.run} with grades from {args.qrels} (seed {args.seed})",
        f"  {len(rankings):,} queries x {args.sessions_per_query:,} sessions = {log.n_sessions:,} sessions, "
        f"{len(events):,} events, {log.n_clicks:,} clicks ({log.n_clicks / log.n_sessions:.2f} per session)",
        "  CTR by position: " + " ".join(f"{p:.3f}" for p in ctr),
        f"  events -> {destination}",
    ]
    if skipped:
        lines.insert(2, f"  {skipped:,} run queries without judgments were skipped")
    print("\n".join(lines), file=out)
    return 0


def _behaviour(args: argparse.Namespace) -> UserBehaviour:
    try:
        return UserBehaviour(
            model=args.model,
            examination=_float_list(args.examination, "--examination") if args.examination else None,
            eta=args.eta,
            click_probs=_grade_map(args.click_probs, "--click-probs") if args.click_probs else None,
            stop_probs=_grade_map(args.stop_probs, "--stop-probs") if args.stop_probs else None,
            continuation=args.continuation,
            noise=args.noise,
        )
    except ClickCommandError:
        raise
    except ValueError as exc:
        raise ClickCommandError(str(exc)) from None


def cmd_simulate_live(args: argparse.Namespace, behaviour: UserBehaviour) -> int:
    """Live replay: sessions against the service in process (the FastAPI app through a
    TestClient, no socket) or through a running server; then check the event store holds
    every event the service acknowledged."""
    from eval.datasets import load_dataset  # lazy: start-up time
    from eval.simulate import SimulationError, SimulationSettings  # lazy: start-up time

    if args.dataset is None:
        _usage_error(args, "live replay needs --dataset PATH (and --split, default test)")
    if args.through_api:
        in_process_only = _given(args, IN_PROCESS_OPTIONS)
        if in_process_only:
            _usage_error(args, f"{', '.join(in_process_only)} apply in process; through the API the server's own config decides")
    elif args.events_db or args.timeout is not None:
        _usage_error(args, "--events-db and --timeout go with --through-api (in process the service's own event store is checked)")
    if args.sessions is not None and args.sessions < 1:
        raise ClickCommandError(f"--sessions must be >= 1, got {args.sessions}")
    if args.depth > 100:
        raise ClickCommandError(f"--depth must be at most 100 (the service's page limit), got {args.depth}")
    dataset = load_dataset(args.dataset, args.split or "test")
    settings = SimulationSettings(
        sessions=args.sessions or len(dataset.queries), depth=args.depth, seed=args.seed, pipeline=args.pipeline,
        id_prefix=f"sim-{args.model}-s{args.seed}-{uuid.uuid4().hex[:8]}",
    )
    progress = not args.quiet
    target, store_path, before = "", None, None
    try:
        if args.through_api:
            target = args.through_api
            store_path = Path(args.events_db) if args.events_db else None
            if store_path is not None and not store_path.is_file():
                raise ClickCommandError(f"{store_path}: no such event store file")
            before = _stored_events(store_path) if store_path else None
            report = _run_through_api(args, dataset, behaviour, settings, progress)
        else:
            config = _in_process_config(args, dataset.name)
            store_path = config.event_store_path
            target = f"index '{config.index}' in {config.home} (in process)"
            store_path.parent.mkdir(parents=True, exist_ok=True)
            before = _stored_events(store_path)
            report = _run_in_process(config, dataset, behaviour, settings, progress)
    except SimulationError as exc:
        partial = getattr(exc, "report", None)
        if partial is not None:
            print("\n".join(["simulation stopped; so far:", *partial.lines()]))
        print(f"ltr-search: error: {exc}", file=sys.stderr)
        return 1
    after = _stored_events(store_path) if store_path else None
    lines = [
        f"simulated {args.model} users on {dataset.name} split {dataset.split} ({len(dataset.queries):,} queries) "
        f"against {target} (seed {args.seed}, sessions {settings.id_prefix}-*)",
        *report.lines(),
    ]
    status, payload_store = 0, None
    if before is not None and after is not None:
        delta = after - before
        missing = max(0, report.events_stored - delta)
        payload_store = {"path": str(store_path), "before": before, "after": after, "stored": delta, "missing": missing}
        lines.append(f"events sent {report.events_sent:,}, stored {delta:,} (event store {store_path}: {before:,} -> {after:,} rows)")
        if delta > report.events_stored:
            lines.append(f"  note: {delta - report.events_stored:,} more rows than acknowledged: other writers, or a retried batch")
        if missing:
            status = 1
    print("\n".join(lines))
    if status:
        print(f"ltr-search: error: {missing:,} acknowledged events are missing from {store_path}", file=sys.stderr)
    if args.json_out:
        payload = {
            "mode": "through-api" if args.through_api else "in-process", "target": target,
            "dataset": str(dataset.path), "split": dataset.split, "queries": len(dataset.queries),
            "click_model": args.model, "seed": args.seed, "depth": args.depth, "id_prefix": settings.id_prefix,
            **report.to_dict(), "event_store": payload_store,
        }
        _write_text(Path(args.json_out), json.dumps(_json_safe(payload), indent=2) + "\n")
        print(f"json: {args.json_out}")
    return status


def _in_process_config(args: argparse.Namespace, dataset_name: str | None = None) -> Any:
    from indexing.config import DEFAULT_INDEX_NAME  # lazy: start-up time
    from indexing.home import resolve_home  # lazy: start-up time
    from search.app.config import load_service_config  # lazy: start-up time
    from search.backend_factory import choose_backend, resolve_index_name  # lazy: start-up time

    home = resolve_home(getattr(args, "home", None))
    config = load_service_config(home, Path(args.config) if args.config else None, {"index": args.index_name})
    if args.index_name is None and config.index == DEFAULT_INDEX_NAME:
        # no index named anywhere: as `eval` and `train`, the index named like the dataset (or the only one)
        name = resolve_index_name(home, None, choose_backend(None, None, None), dataset_name)
        config = load_service_config(home, Path(args.config) if args.config else None, {"index": name})
    if args.exploration is not None:
        exploration = dataclasses.replace(config.exploration, epsilon=args.exploration)  # validates the range
        config = dataclasses.replace(config, exploration=exploration)
    return config


def _run_in_process(config: Any, dataset: Any, behaviour: UserBehaviour, settings: Any, progress: bool) -> Any:
    """The real app, handlers and event store, driven without a socket. The run owns the store, so
    it writes with batched durability: no fsync per page or event batch (under disk contention
    that fsync was most of a session's time), one at the end; a crash mid-run leaves a consistent
    store holding a prefix of the sessions (search/event_store.py)."""
    from fastapi.testclient import TestClient  # in-process service only on this path

    from eval.simulate import check_ready, run_sessions  # lazy: start-up time
    from indexing.home import behaviour_store_path  # lazy: start-up time
    from ltr.behaviour import BehaviourStore  # lazy: start-up time
    from search.app.service import create_app, limit_native_threads  # lazy: start-up time
    from search.event_store import EventStore  # lazy: start-up time

    limit_native_threads()  # as `serve` does: BLAS single-threaded per call
    behaviour_path = behaviour_store_path(config.home, config.index)
    behaviour_path.parent.mkdir(parents=True, exist_ok=True)
    with (EventStore(config.event_store_path, durability="batched") as store,  # close() syncs, even after an error
          BehaviourStore(behaviour_path, synchronous="NORMAL") as aggregates):  # derived: they catch up after a loss
        with TestClient(create_app(config, event_store=store, behaviour_store=aggregates)) as client:
            check_ready(client, f"index '{config.index}' in {config.home}", retries=0)
            return run_sessions(client, dataset.queries, dataset.qrels, behaviour, settings, progress)


def _run_through_api(args: argparse.Namespace, dataset: Any, behaviour: UserBehaviour, settings: Any, progress: bool) -> Any:
    import httpx  # only the HTTP client path needs it

    from eval.simulate import check_ready, run_sessions  # lazy: start-up time

    with httpx.Client(base_url=args.through_api, timeout=args.timeout or 30.0) as client:
        check_ready(client, args.through_api)
        return run_sessions(client, dataset.queries, dataset.qrels, behaviour, settings, progress)


def _stored_events(path: Path) -> int:
    """Rows in an event store, all types (opened and closed here: a reader independent of the service)."""
    from search.event_store import EventStore  # lazy: start-up time

    with EventStore(path) as store:
        return sum(store.count_events().values())


def _float_list(text: str, option: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ClickCommandError(f"{option} must be comma-separated numbers, got {text!r}") from None


def _grade_map(text: str, option: str) -> dict[int, float]:
    result: dict[int, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        grade, sep, value = part.partition(":")
        try:
            if not sep:
                raise ValueError
            result[int(grade)] = float(value)
        except ValueError:
            raise ClickCommandError(f"{option} must look like 0:0.05,1:0.5,2:0.95, got {text!r}") from None
    if not result:
        raise ClickCommandError(f"{option} is empty")
    return result


# ---------------------------------------------------------------------------------------------
# helpers


def _write_text(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ClickCommandError(f"{path}: cannot write: {exc}") from None


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return "[" + ", ".join(_format(v) for v in value) + "]"
    return str(value)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
