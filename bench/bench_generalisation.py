"""Does the learned ranker generalise? `ltr` against the fusion it starts from, on every shared
dataset with text (issue 15, acceptance: the first table).

    .venv/bin/python bench/bench_generalisation.py --home /tmp/genbench_home \\
        --out bench/results/bench_generalisation_baseline.json          # ~25 min on 2 cores
    .venv/bin/python bench/bench_generalisation.py --home H --datasets nfcorpus --folds 3

What it does, per dataset with text under --root (default ../shared/datasets):
1. index   reuses the index named after the dataset folder in --home (`ltr-search index status
           --name D --json`), else builds it (`ltr-search index build`, BM25 + dense) from the
           folder's corpus file: `corpus.jsonl`, else its only `corpus*.jsonl` (NFCorpus ships
           `corpus_preprocessed_partial.jsonl`: lowercased, stop-word-filtered text, so its scores
           are not BEIR NFCorpus scores; see its SOURCE.md).
2. eval    the CLI in a subprocess, exactly as a user runs it:
           `ltr-search --home H eval --dataset D --split test --folds K --pipeline P
            --baseline hybrid-tuned --json HOME/bench_generalisation/D-test.json --quiet`
           Learned pipelines (ltr, hybrid-tuned) are fitted on K-1 folds of the test queries and
           scored on the held-out fold; every pipeline is scored on every test query.
3. report  per pipeline nDCG@10 with its 95% t interval, and against hybrid-tuned the mean
           paired difference, its 95% interval, Holm-corrected p-values (paired t-test and
           randomisation test) and the verdict of `ltr-search eval` (significant = both below
           0.05): '+' better, '-' worse, '=' not significantly different.
Across datasets: the mean over datasets of each pipeline's difference with hybrid-tuned (issue 15
goal for ltr: >= +0.01, and never significantly worse on any dataset).

Folders without text (MSLR feature vectors, the Yandex click log) are listed as not applicable.
The cold-start / tail behaviour figures (the issue's second table) are not measured here: see
bench/bench_behaviour_loop.py and bench/bench_cold_start.py.

    .venv/bin/python bench/bench_generalisation.py --merge a.json b.json --out all.json
           combines the summaries of earlier runs (one dataset each, e.g. run side by side) into one
           table and recomputes the mean across datasets; each dataset keeps the commit it was
           measured on.

The JSON (--out) is a small summary (commit, tree state, per-dataset table, wall times); the full
eval JSONs stay in the home. The 2 cores may be shared with other jobs: wall times are indicative.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CLI = REPO / ".venv" / "bin" / "ltr-search"
METRIC = "nDCG@10"
BASELINE = "hybrid-tuned"
DEFAULT_PIPELINES = "hybrid,hybrid-convex,hybrid-tuned,ltr"
BEHAVIOUR_NOTE = "behaviour figures: see bench/bench_behaviour_loop.py / bench_cold_start.py"


@dataclass
class DatasetFolder:
    """A shared dataset folder and, when it has text, the corpus file to index."""

    name: str
    path: Path
    corpus: Path | None
    reason: str = ""  # why it is not applicable


@dataclass
class PipelineRow:
    """One pipeline on one dataset: its nDCG@10 and how it compares with the baseline."""

    pipeline: str
    ndcg10: float
    ci95: list[float]
    vs_baseline: dict[str, Any] | None = None  # None for the baseline itself

    @property
    def mark(self) -> str:
        if self.vs_baseline is None:
            return "base"
        if not self.vs_baseline["significant"]:
            return "="
        return "+" if self.vs_baseline["mean_difference"] > 0 else "-"


@dataclass
class DatasetResult:
    name: str
    queries: int
    skipped_queries: int
    documents: int
    index_generation: str
    index_built: bool
    index_wall_s: float
    eval_wall_s: float
    eval_json: str
    folds: dict[str, Any] | None
    rows: list[PipelineRow] = field(default_factory=list)


def find_corpus(folder: Path) -> Path | None:
    """`corpus.jsonl`, else the folder's only `corpus*.jsonl` (e.g. NFCorpus' preprocessed one)."""
    if (folder / "corpus.jsonl").is_file():
        return folder / "corpus.jsonl"
    candidates = sorted(folder.glob("corpus*.jsonl"))
    return candidates[0] if len(candidates) == 1 else None


def discover(root: Path, split: str) -> list[DatasetFolder]:
    """Every folder under `root`, with its corpus when it is a text collection judged on `split`."""
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        corpus = find_corpus(folder)
        if corpus is None:
            found.append(DatasetFolder(folder.name, folder, None, "no text corpus (features or click ids only)"))
        elif not (folder / "queries.jsonl").is_file() or not (folder / "qrels" / f"{split}.tsv").is_file():
            found.append(DatasetFolder(folder.name, folder, None, f"no queries.jsonl or qrels/{split}.tsv"))
        else:
            found.append(DatasetFolder(folder.name, folder, corpus))
    return found


def git_state() -> dict[str, Any]:
    """The commit measured, and whether the tree differed from it (others edit it concurrently)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(dirty),
            "dirty_files": [line[3:] for line in dirty.splitlines()]}


def index_status(home: Path, name: str) -> dict[str, Any] | None:
    """The active generation of index `name` in `home`, or None when there is none."""
    done = subprocess.run([str(CLI), "--home", str(home), "index", "status", "--name", name, "--json"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return None
    entry = json.loads(done.stdout)["indexes"].get(name) or {}
    active = [g for g in entry.get("generations", []) if g.get("active")]
    return active[0] if active else None


def ensure_index(home: Path, folder: DatasetFolder) -> tuple[dict[str, Any], bool, float]:
    """(active generation, built now?, seconds spent building)."""
    status = index_status(home, folder.name)
    if status is not None and status.get("dense"):
        print(f"[{folder.name}] reusing index {folder.name}/{status['generation']} ({status['documents']:,} docs)", flush=True)
        return status, False, 0.0
    print(f"[{folder.name}] building index from {folder.corpus} ...", flush=True)
    start = time.perf_counter()
    subprocess.run([str(CLI), "--home", str(home), "index", "build", "--dataset", str(folder.corpus),
                    "--name", folder.name, "--quiet"], check=True)
    wall = time.perf_counter() - start
    status = index_status(home, folder.name)
    if status is None:
        raise RuntimeError(f"index {folder.name} was built but has no active generation")
    return status, True, wall


def run_eval(home: Path, folder: DatasetFolder, args: argparse.Namespace, out: Path) -> float:
    """`ltr-search eval` with k-fold CV in a subprocess; its JSON lands at `out`. Returns seconds."""
    command = [str(CLI), "--home", str(home), "eval", "--dataset", str(folder.path), "--name", folder.name,
               "--split", args.split, "--folds", str(args.folds), "--pipeline", args.pipelines,
               "--baseline", BASELINE, "--metrics", args.metrics, "--json", str(out), "--quiet"]
    print(f"[{folder.name}] {' '.join(command)}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def rows_from_eval(payload: dict[str, Any], metric: str = METRIC) -> list[PipelineRow]:
    """The summary rows of one `ltr-search eval --json` payload, in its pipeline order."""
    comparisons = payload["significance"]["comparisons"]
    rows = []
    for name, entry in payload["pipelines"].items():
        versus = comparisons.get(name, {}).get(metric)
        rows.append(PipelineRow(
            pipeline=name,
            ndcg10=float(entry["metrics"][metric]),
            ci95=[float(x) for x in entry["ci95"][metric]],
            vs_baseline=None if versus is None else {
                key: versus[key] for key in ("mean_difference", "ci95", "t_test_p_holm", "randomisation_p_holm",
                                             "significant", "wins", "losses", "ties")
            },
        ))
    return rows


def across_datasets(results: list[DatasetResult]) -> dict[str, Any]:
    """Per pipeline: the mean over datasets of its difference with the baseline, and where it was
    significantly worse. The issue-15 goal for ltr: mean >= +0.01 and worse nowhere."""
    summary: dict[str, Any] = {}
    names = [row.pipeline for row in results[0].rows if row.vs_baseline is not None] if results else []
    for name in names:
        per_dataset = {r.name: next(row for row in r.rows if row.pipeline == name) for r in results}
        differences = {d: row.vs_baseline["mean_difference"] for d, row in per_dataset.items()}
        summary[name] = {
            "mean_difference": sum(differences.values()) / len(differences),
            "per_dataset": differences,
            "significantly_worse_on": [d for d, row in per_dataset.items() if row.mark == "-"],
            "significantly_better_on": [d for d, row in per_dataset.items() if row.mark == "+"],
        }
    if "ltr" in summary:
        ltr = summary["ltr"]
        ltr["goal"] = {"mean_difference_at_least": 0.01, "never_significantly_worse": True,
                       "met": ltr["mean_difference"] >= 0.01 and not ltr["significantly_worse_on"]}
    return summary


def table_lines(result: DatasetResult) -> list[str]:
    lines = [
        f"{result.name}/test: {result.queries} queries ({result.skipped_queries} skipped), "
        f"{result.documents:,} docs, {result.folds['k'] if result.folds else '-'} folds; "
        f"index {'built' if result.index_built else 'reused'} {result.index_wall_s:.0f} s, eval {result.eval_wall_s:.0f} s",
        f"  {'pipeline':<16}{METRIC:>9}  {'95% CI':<17}{'vs ' + BASELINE:>16}  {'95% CI':<19}{'p(t)':>7}{'p(rand)':>8}  sig  W/L",
    ]
    for row in result.rows:
        head = f"  {row.pipeline:<16}{row.ndcg10:>9.4f}  [{row.ci95[0]:.4f}, {row.ci95[1]:.4f}] "
        versus = row.vs_baseline
        if versus is None:
            lines.append(head + f"{'(baseline)':>16}")
            continue
        lines.append(head + f"{versus['mean_difference']:>+16.4f}  [{versus['ci95'][0]:+.4f}, {versus['ci95'][1]:+.4f}]"
                     f"{versus['t_test_p_holm']:>7.3f}{versus['randomisation_p_holm']:>8.3f}  {row.mark:^3}  "
                     f"{versus['wins']}/{versus['losses']}")
    return lines


def dataset_entry(result: DatasetResult, git: dict[str, Any]) -> dict[str, Any]:
    """One dataset in the summary JSON, with the tree state it was measured on."""
    return {**{k: v for k, v in asdict(result).items() if k not in ("name", "rows")}, "git": git,
            "pipelines": {row.pipeline: {"ndcg10": row.ndcg10, "ci95": row.ci95, "mark": row.mark,
                                         "vs_baseline": row.vs_baseline} for row in result.rows}}


def result_from_entry(name: str, entry: dict[str, Any]) -> DatasetResult:
    """The inverse of `dataset_entry`: a dataset read back from a summary JSON."""
    fields = {k: v for k, v in entry.items() if k not in ("pipelines", "git")}
    rows = [PipelineRow(pipeline, p["ndcg10"], p["ci95"], p["vs_baseline"]) for pipeline, p in entry["pipelines"].items()]
    return DatasetResult(name=name, rows=rows, **fields)


def summary_payload(results: list[DatasetResult], skipped: list[DatasetFolder], args: argparse.Namespace,
                    git: dict[str, Any], wall_s: float, per_dataset_git: dict[str, dict[str, Any]] | None = None
                    ) -> dict[str, Any]:
    per_dataset_git = per_dataset_git or {}
    return {
        "benchmark": "bench_generalisation",
        "git": git,
        "command": " ".join(sys.argv),
        "machine": {"arch": platform.machine(), "python": platform.python_version()},
        "metric": METRIC,
        "baseline": BASELINE,
        "split": args.split,
        "folds": args.folds,
        "pipelines": args.pipelines.split(","),
        "significance": "both Holm-corrected p-values (paired t-test, paired randomisation test) below 0.05, "
                        "as `ltr-search eval` reports it",
        "wall_s": round(wall_s, 1),
        "datasets": {r.name: dataset_entry(r, per_dataset_git.get(r.name, git)) for r in results},
        "across_datasets": across_datasets(results),
        "not_applicable": {f.name: f.reason for f in skipped},
        "behaviour": {"todo": "cold-start and tail behaviour figures (issue 15, second table) are not measured here; "
                              + BEHAVIOUR_NOTE},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", help="engine home holding (or receiving) one index per dataset")
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "datasets"), help="folder of the shared datasets")
    parser.add_argument("--datasets", help="comma-separated folder names (default: every one with text)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--split", default="test")
    parser.add_argument("--pipelines", default=DEFAULT_PIPELINES, help=f"must include {BASELINE}")
    parser.add_argument("--metrics", default="nDCG@10,R@100", help="metrics asked of eval (nDCG@10 is reported)")
    parser.add_argument("--merge", nargs="+", metavar="SUMMARY",
                        help="measure nothing: combine these summary JSONs of earlier runs (same split, folds, pipelines)")
    parser.add_argument("--out", help="summary JSON path (e.g. bench/results/bench_generalisation.json)")
    args = parser.parse_args(argv)
    if not args.merge and not args.home:
        parser.error("--home is required unless --merge is given")
    if BASELINE not in args.pipelines.split(","):
        parser.error(f"--pipelines must include the baseline {BASELINE}")
    if METRIC not in args.metrics.split(","):
        parser.error(f"--metrics must include {METRIC}")
    return args


def select(folders: list[DatasetFolder], datasets: str | None, root: str) -> tuple[list[DatasetFolder], list[DatasetFolder]]:
    """(folders to measure, folders not applicable), restricted to --datasets when given."""
    wanted = set(datasets.split(",")) if datasets else None
    if wanted:
        unknown = wanted - {f.name for f in folders}
        if unknown:
            raise SystemExit(f"unknown datasets under {root}: {', '.join(sorted(unknown))}")
    chosen = [f for f in folders if wanted is None or f.name in wanted]
    return [f for f in chosen if f.corpus is not None], [f for f in chosen if f.corpus is None]


def measure(args: argparse.Namespace, selected: list[DatasetFolder]) -> list[DatasetResult]:
    home = Path(args.home).expanduser().resolve()
    results = []
    for folder in selected:
        status, built, index_wall = ensure_index(home, folder)
        out = home / "bench_generalisation" / f"{folder.name}-{args.split}.json"
        eval_wall = run_eval(home, folder, args, out)
        payload = json.loads(out.read_text())
        results.append(DatasetResult(
            name=folder.name, queries=payload["queries"], skipped_queries=payload["skipped_queries"],
            documents=int(status["documents"]), index_generation=status["generation"], index_built=built,
            index_wall_s=round(index_wall, 1), eval_wall_s=round(eval_wall, 1), eval_json=str(out),
            folds=payload.get("folds"), rows=rows_from_eval(payload),
        ))
        print("\n".join(table_lines(results[-1])) + "\n", flush=True)
    return results


def merge(paths: list[str], args: argparse.Namespace) -> tuple[list[DatasetResult], dict[str, dict[str, Any]], float]:
    """Datasets of earlier summaries (each with the commit it was measured on) and their summed wall time;
    the run settings come from the summaries, which must agree."""
    results: list[DatasetResult] = []
    gits: dict[str, dict[str, Any]] = {}
    wall = 0.0
    settings = None
    for path in paths:
        summary = json.loads(Path(path).read_text())
        these = (summary["split"], summary["folds"], summary["pipelines"])
        if settings not in (None, these):
            raise SystemExit(f"{path}: split/folds/pipelines {these} differ from the other summaries' {settings}")
        settings = these
        wall += summary["wall_s"]
        for name, entry in summary["datasets"].items():
            if name in gits:
                raise SystemExit(f"{path}: dataset {name} appears in two summaries")
            results.append(result_from_entry(name, entry))
            gits[name] = entry.get("git", summary["git"])
    args.split, args.folds, pipelines = settings
    args.pipelines = ",".join(pipelines)
    return results, gits, wall


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    git = git_state()
    if args.merge:
        results, per_dataset_git, wall = merge(args.merge, args)
        git = {"merged": True, "commits": sorted({g["commit"] for g in per_dataset_git.values()}),
               "any_dirty": any(g["dirty"] for g in per_dataset_git.values()), "distinct_states": len({json.dumps(g, sort_keys=True) for g in per_dataset_git.values()})}
        folders = discover(Path(args.root), args.split)
        skipped = [f for f in folders if f.corpus is None]
    else:
        per_dataset_git = {}
        selected, skipped = select(discover(Path(args.root), args.split), args.datasets, args.root)
        print(f"commit {git['commit']}{' (dirty tree)' if git['dirty'] else ''}; home {args.home}", flush=True)
        start = time.perf_counter()
        results = measure(args, selected)
        wall = time.perf_counter() - start

    print(f"=== {METRIC}, {args.folds}-fold CV over the {args.split} queries; vs {BASELINE}: "
          "'+'/'-' significantly better/worse (both Holm-corrected tests p < 0.05), '=' not significant")
    for result in results:
        print("\n".join(table_lines(result)))
    for folder in skipped:
        print(f"{folder.name}: not applicable ({folder.reason})")
    summary = across_datasets(results)
    for name, entry in summary.items():
        worse = ", ".join(entry["significantly_worse_on"]) or "none"
        print(f"mean {name} - {BASELINE} over {len(results)} datasets: {entry['mean_difference']:+.4f} "
              f"(significantly worse on: {worse})")
    if "ltr" in summary:
        print(f"issue-15 goal (ltr >= +0.01 on average, never significantly worse): "
              f"{'met' if summary['ltr']['goal']['met'] else 'NOT met'}")
    print(BEHAVIOUR_NOTE)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        payload = summary_payload(results, skipped, args, git, wall, per_dataset_git)
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"summary: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
