"""`ltr-search eval`: pipelines on a judged split, with significance tests.

In eval, `ltr` is a LambdaMART fitted here on the training split (or the other folds), not the
promoted model: `search.app.pipelines.resolve_pipeline(name, "fit")`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from search.app.cli.common import CliError, add_backend_arguments, log, open_index
from search.app.pipelines import check_pipelines, describe_pipelines, parse_pipeline_list, pipeline_spec, resolve_pipeline


def add_arguments(command: str, evaluate: argparse.ArgumentParser) -> None:
    evaluate.add_argument("--dataset", required=True, help="BEIR directory with queries.jsonl and qrels/SPLIT.tsv")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--pipeline", default="bm25,dense",
                          help="comma-separated (first = baseline): " + describe_pipelines("fit"))
    evaluate.add_argument("--name", help="index name (default: the dataset folder's name if such an index exists, "
                                         "else the home's only index, else 'default')")
    evaluate.add_argument("--metrics", help="comma-separated, ir_measures names (default: nDCG@1,3,5,10,100 P@1,5,10 R@10,100,1000 MAP@100 RR@10 judged@10)")
    evaluate.add_argument("--baseline", help="pipeline the others are tested against (default: the first)")
    evaluate.add_argument("--depth", type=int, default=1000, help="documents retrieved per query")
    evaluate.add_argument("--train-split", help="split learned pipelines are fitted on (default: train, when it exists and differs)")
    evaluate.add_argument("--folds", type=int, help="k-fold cross-validation of learned pipelines over the evaluated split")
    evaluate.add_argument("--seed", type=int, help="seed of the folds and the randomisation test")
    evaluate.add_argument("--resamples", type=int, default=10_000, help="sign flips of the randomisation test")
    evaluate.add_argument("--run-file", action="append", default=[], help="also score this TREC run file (named by its file stem); repeatable")
    evaluate.add_argument("--ablation", action="store_true",
                          help="for each learned ltr[:SET] pipeline, also train it without each feature group "
                               "(ltr:SET-without-GROUP) and report which groups help on this dataset")
    evaluate.add_argument("--json", dest="json_out", help="write the results as JSON here ('-' for stdout)")
    evaluate.add_argument("--report", help="write a markdown report here, with PNG plots next to it")
    evaluate.add_argument("--runs", help="directory for the TREC run files (default: HOME/runs/DATASET-SPLIT)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    add_backend_arguments(evaluate)


def run(home: Path, args: argparse.Namespace) -> int:
    from eval.datasets import available_splits, load_dataset, read_run  # here (and below) for start-up time
    from eval.experiment import ExperimentSettings, run_experiment
    from eval.metrics import DEFAULT_METRICS, HEADLINE_METRICS, parse_metric_list  # lazy: start-up time
    from eval.significance import DEFAULT_SEED  # lazy: start-up time
    from indexing.home import runs_dir  # lazy: start-up time

    dataset = load_dataset(args.dataset, args.split)
    external = {}
    for run_path in args.run_file:
        stem = Path(run_path).stem
        if stem in external:
            raise CliError(f"two run files are named '{stem}'")
        external[stem] = read_run(run_path)
    names = [n.strip() for n in args.pipeline.split(",") if n.strip()] if args.pipeline else []
    ablations = ablation_plan(names) if args.ablation else {}
    names += [name for plan in ablations.values() for name in plan.values() if name not in names]
    own = [resolve_pipeline(n, "fit") for n in parse_pipeline_list(",".join(names))] if names else []
    clash = sorted(set(own) & set(external))
    if clash:
        raise CliError(f"run file name '{clash[0]}' clashes with a pipeline name; rename the file")
    settings = ExperimentSettings(
        pipelines=own + list(external),
        metrics=parse_metric_list(args.metrics or ",".join(DEFAULT_METRICS)),
        depth=args.depth,
        baseline=args.baseline,
        folds=args.folds,
        seed=DEFAULT_SEED if args.seed is None else args.seed,
        resamples=args.resamples,
    )
    train = None
    if any(pipeline_spec(n).learned for n in own) and not args.folds:
        train_split = args.train_split or ("train" if "train" in available_splits(dataset.path) else None)
        if train_split is None or train_split == args.split:
            raise CliError("learned pipelines need a training split other than the evaluated one (--train-split), or --folds K")
        train = load_dataset(args.dataset, train_split)

    index = open_index(home, args.name, args, dataset.name)
    check_pipelines(own, index)  # before any pipeline runs: no half-done evaluation
    runs = Path(args.runs) if args.runs else runs_dir(home, dataset.name, dataset.split)
    log(f"evaluating {', '.join(settings.pipelines)} on {dataset.name}/{dataset.split}: "
        f"{len(dataset.queries)} queries ({len(dataset.skipped)} skipped), index {index.name}/{index.generation_id} ({index.kind})")
    result = run_experiment(
        index, dataset, settings, runs, catalog=pipeline_spec, train=train, external_runs=external,
        progress=not args.quiet, log=log,
    )
    payload = result.to_json()
    if ablations:
        from eval.ablation import feature_group_ablation  # lazy: start-up time

        headline = "nDCG@10" if "nDCG@10" in payload["pipelines"][settings.pipelines[0]]["metrics"] else settings.metrics[0].name
        payload["ablation"] = {
            full: feature_group_ablation(
                {name: result.pipelines[name].scores.subset(result.pipelines[full].scores.query_ids).values
                 for name in [full, *plan.values()]},
                full, plan, headline, resamples=settings.resamples, seed=settings.seed)
            for full, plan in ablations.items()}
    if args.json_out == "-":
        print(json.dumps(payload, indent=2))
    elif args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(payload, indent=2) + "\n")
    if args.report:
        from eval.report import write_report  # here for start-up time: matplotlib

        log(f"report: {write_report(result, Path(args.report))}")
    if args.json_out != "-":
        headline = [m for m in HEADLINE_METRICS if m in payload["pipelines"][settings.pipelines[0]]["metrics"]]
        print("\n".join(summary_lines(payload, headline)))
        if ablations:
            from eval.ablation import ablation_lines  # lazy: start-up time

            for full, ablation in payload["ablation"].items():
                print("\n".join(ablation_lines(full, ablation)))
    return 0


def ablation_plan(names: list[str]) -> dict[str, dict[str, str]]:
    """Learned ranker pipeline -> {feature group: the pipeline without it} (`--ablation`)."""
    from eval.ablation import ABLATION_MARK, ablation_pipeline_names  # lazy: start-up time
    from ltr.features import DEFAULT_FEATURE_SET, feature_set  # lazy: start-up time

    plan: dict[str, dict[str, str]] = {}
    for name in names:
        family, _, set_name = name.partition(":")
        if family != "ltr" or ABLATION_MARK in set_name:
            continue
        features = feature_set(set_name or DEFAULT_FEATURE_SET)
        without = ablation_pipeline_names(name, features.name, features.groups)
        if without:
            plan[name] = dict(zip(features.groups, without))
    if not plan:
        raise CliError("--ablation needs a learned pipeline with two or more feature groups among --pipeline, e.g. ltr")
    return plan


def summary_lines(payload: dict[str, Any], metrics: list[str]) -> list[str]:
    """The eval table: headline metrics, significance marks, latency ('n/a' for run files,
    which were not timed here)."""
    baseline = payload["significance"]["baseline"]
    lines = [
        f"{payload['dataset']}/{payload['split']}: {payload['queries']} queries, {payload['skipped_queries']} skipped; "
        f"vs {baseline}: +/- = significantly better/worse (both Holm-corrected tests p < {payload['significance']['alpha']})",
        f"{'pipeline':<16}" + "".join(f"{m:>10}" for m in metrics) + f"{'p50 ms':>9}{'p95 ms':>9}",
    ]
    for name, entry in payload["pipelines"].items():
        comparisons = payload["significance"]["comparisons"].get(name, {})
        cells = "".join(f"{entry['metrics'][m]:>9.4f}{_significance_mark(comparisons.get(m))}" for m in metrics)
        latency = entry["latency_ms"]
        timing = f"{latency['p50']:>9.1f}{latency['p95']:>9.1f}" if latency else f"{'n/a':>9}{'n/a':>9}"
        lines.append(f"{name:<16}{cells}{timing}")
    lines.append(f"run files: {Path(next(iter(payload['pipelines'].values()))['run_file']).parent}")
    return lines


def _significance_mark(comparison: dict[str, Any] | None) -> str:
    if not comparison or not comparison["significant"]:
        return " "
    return "+" if comparison["mean_difference"] > 0 else "-"
