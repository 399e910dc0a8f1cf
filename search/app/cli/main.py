"""`ltr-search`: the one command-line entry point for every job.

    ltr-search [--home DIR] index build --dataset PATH [--name NAME] [--no-dense] [--skip-invalid]
    ltr-search [--home DIR] index rebuild|rollback [--name NAME] [--to GENERATION]
    ltr-search [--home DIR] index status [--name NAME] [--json] [--verify]
    ltr-search [--home DIR] index list [--json] | index delete --name NAME --yes
    ltr-search [--home DIR] search "QUERY" [--name NAME] [--pipeline bm25|dense|hybrid|ltr|model:V] [-k 10] [--json]
    ltr-search [--home DIR] search --queries FILE --out RUN [--format trec|jsonl] [--pipeline P]
    ltr-search [--home DIR] eval --dataset PATH [--split test] [--pipeline bm25,dense] [--name INDEX]
               [--json OUT] [--report OUT.md] [--runs DIR] [--folds K] [--run-file PATH ...]
    ltr-search [--home DIR] serve [--host 127.0.0.1] [--port 8000] [--name INDEX] [--config FILE] [--no-access-log]
    ltr-search [--home DIR] train --dataset PATH [--split train] [--name INDEX] [--feature-set text] [--valid-fraction 0.2]
    ltr-search [--home DIR] models list|show V|promote V [--dataset PATH --split SPLIT] [--force]|rollback|delete V|compare A B
    ltr-search [--home DIR] behaviour status|update|rebuild [--name INDEX]
    ltr-search clicks fit --log PATH [--models ctr,pbm,cascade,dbn] [--json OUT] [--report OUT.md]
    ltr-search simulate --qrels QRELS --run RUN --model pbm|cascade|dbn [--out events.jsonl]
    ltr-search --version

This module only builds the parser and dispatches: each command lives in its own module,
imported (with its flags) only when that command runs, so `--help` and a BM25 search start fast.
Input problems exit with status 2 and one precise line on stderr; nothing is half-written.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Sequence

from indexing.home import HOME_ENV_VAR, resolve_home
from search.app.cli.common import CliError

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + 13  # as a Unix tool killed by SIGPIPE: `ltr-search ... | head`
PACKAGE = "ltr-search"


@dataclass(frozen=True)
class Command:
    """A top-level command: the module that adds its flags (`add_arguments(name, parser)`) and
    runs it (`run(home, args)`), and its one-line help."""

    module: str
    help: str


COMMANDS: dict[str, Command] = {
    "index": Command("search.app.cli.index", "build, rebuild, inspect, list, delete and roll back indexes"),
    "search": Command("search.app.cli.query", "run a query for a quick check, or a query file into a run file"),
    "eval": Command("search.app.cli.evaluate", "evaluate pipelines on a judged split, with significance tests"),
    "serve": Command("search.app.cli.serve", "run the HTTP query service (FastAPI on uvicorn)"),
    "train": Command("search.app.cli.models", "train a LambdaMART ranker on judged queries (--dataset) or on logged "
                                              "clicks (--from-events) and store it in the registry"),
    "models": Command("search.app.cli.models", "list, inspect, promote, roll back, delete and compare ranking models"),
    "behaviour": Command("search.app.cli.behaviour", "behaviour aggregates, position propensities and drift"),
    "retrain": Command("search.app.cli.retrain", "the scheduled job: update aggregates, train from clicks, gate, "
                                                 "promote or refuse (exit 0 promoted, 3 refused, 4 nothing new)"),
    "clicks": Command("search.app.cli.clicks", "fit and compare click models on a click log"),
    "judgments": Command("search.app.cli.judgments", "export workbench judgments as qrels (BEIR or TREC), agreement"),
    "simulate": Command("search.app.cli.clicks", "simulate users clicking: live against the query service, "
                                                 "or offline over a TREC run file"),
}

# Errors worth one line (exit 2), by module: looked up only in modules already imported, so that
# catching them loads nothing (an exception of a module never imported cannot have been raised).
USER_ERRORS = (
    ("indexing.bundle", "IndexBundleError"), ("indexing.corpus", "CorpusError"), ("indexing.encoder", "EncoderError"),
    ("indexing.elastic", "ElasticsearchError"), ("search.embedded", "DenseUnavailableError"),
    ("search.event_store", "EventStoreError"), ("ltr.registry", "RegistryError"),
)


class _VersionAction(argparse.Action):
    """`--version`, reading the installed package's version only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(f"{PACKAGE} {package_version()}")
        parser.exit()


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # here for start-up time: only for --version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the commands named in `commands` get their flags (None: all of them).
    The others get their name and help, which is all that `ltr-search --help` shows."""
    parser = argparse.ArgumentParser(prog="ltr-search", description="Learning-to-rank search engine.")
    parser.add_argument("--home", help=f"engine home for indexes, models and events (env {HOME_ENV_VAR}, default ./.ltr-search)")
    parser.add_argument("--version", action=_VersionAction)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        if commands is None or name in commands:
            importlib.import_module(command.module).add_arguments(name, sub)
    return parser


def selected_command(argv: Sequence[str]) -> str | None:
    """The command `argv` runs (its first word that is not an option of the top-level parser)."""
    words = iter(argv)
    for word in words:
        if word == "--home":
            next(words, None)
        elif not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command = selected_command(argv)
        args = build_parser([command] if command else []).parse_args(argv)
        home = resolve_home(args.home)
        try:
            status = importlib.import_module(COMMANDS[args.command].module).run(home, args)
        except Exception as exc:
            if not is_user_error(exc):
                raise
            clear_progress()
            print(f"ltr-search: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        sys.stdout.flush()  # a closed pipe shows here, inside the handler
        return status
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as Unix tools do. Point stdout at
        # /dev/null so the interpreter's last flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, (CliError, ValueError)):
        return True
    for module_name, class_name in USER_ERRORS:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(exc, getattr(module, class_name)):
            return True
    return False


def clear_progress() -> None:
    """Close live progress bars so that no bar residue lands in front of an error message."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is not None:
        for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
            bar.close()
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[K")


if __name__ == "__main__":
    sys.exit(main())
