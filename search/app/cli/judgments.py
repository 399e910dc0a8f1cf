"""`ltr-search judgments export|status`: the judgments made in the workbench (/judge).

    ltr-search judgments export --out DIR [--name INDEX] [--format beir|trec] [--split judged] [--judge NAME]
    ltr-search judgments status [--name INDEX] [--json]

`export` writes a dataset directory that `ltr-search eval --dataset DIR --split judged` and
`ltr-search train --dataset DIR --split judged` read: queries.jsonl and qrels/SPLIT.tsv (BEIR TSV
by default, TREC qrels lines with --format trec). `status` lists the queries, how much of each
pool is graded, and Cohen's kappa between every two judges.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from search.app.cli.common import CliError, add_backend_arguments, backend_from_args, log, plural


def add_arguments(command: str, judgments: argparse.ArgumentParser) -> None:
    commands = judgments.add_subparsers(dest="judgments_command", required=True)
    export = commands.add_parser("export", help="write queries.jsonl and qrels/SPLIT.tsv for eval and train")
    export.add_argument("--out", required=True, help="dataset directory to write (created if missing)")
    export.add_argument("--format", choices=("beir", "trec"), default="beir", help="qrels lines (default beir)")
    export.add_argument("--split", default="judged", help="the split name of the qrels file (default judged)")
    export.add_argument("--judge", help="only this judge's grades (default: every judge, lower median per pair)")
    status = commands.add_parser("status", help="queries, progress and agreement (Cohen's kappa)")
    status.add_argument("--json", action="store_true")
    for sub in (export, status):
        sub.add_argument("--name", help="index whose judgments to read (default: the home's only index)")
        add_backend_arguments(sub)


def run(home: Path, args: argparse.Namespace) -> int:
    from eval.judgments import JudgmentError, JudgmentStore, export_dataset  # lazy: start-up time
    from indexing.home import judgments_path  # lazy: start-up time
    from search.backend_factory import resolve_index_name  # lazy: start-up time

    name = resolve_index_name(home, args.name, backend_from_args(args))
    path = judgments_path(home, name)
    if not path.is_file():
        raise CliError(f"no judgments for index '{name}' ({path}): judge some at http://HOST:PORT/judge first")
    with JudgmentStore(path) as store:
        if args.judgments_command == "export":
            try:
                qrels_file, queries, judged = export_dataset(store, Path(args.out), args.split, args.format, args.judge)
            except JudgmentError as exc:
                raise CliError(str(exc)) from None
            log(f"wrote {plural(queries, 'query', 'queries')} and {plural(judged, 'judgment')} ({args.format}) to {qrels_file}")
            print(f"ltr-search eval --dataset {args.out} --split {args.split} --name {name}")
            return 0
        queries = store.queries()
        agreement = store.agreement()
        if args.json:
            print(json.dumps({"index": name, "queries": [asdict(q) for q in queries],
                              "agreement": [asdict(a) for a in agreement]}, indent=2))
            return 0
        print(f"{plural(len(queries), 'query', 'queries')} in {path}")
        for q in queries:
            print(f"  {q.query_id:<14} pool {q.pool:>3}  judges {q.judges}  {q.text[:70]}")
        for a in agreement:
            kappa = "n/a" if a.kappa is None else f"{a.kappa:.3f} (quadratic-weighted {a.weighted_kappa:.3f})"
            print(f"  kappa {a.judge_a} / {a.judge_b}: {kappa} over {plural(a.pairs, 'pair')}")
    return 0
