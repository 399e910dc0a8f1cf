"""`ltr-search train` and `ltr-search models list|show|promote|rollback`.

    ltr-search train --dataset PATH --split train [--name INDEX] [--feature-set text] [--valid-fraction 0.2]
    ltr-search models list [--json]
    ltr-search models show VERSION
    ltr-search models promote VERSION [--dataset PATH --split SPLIT] [--force]
    ltr-search models rollback
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_ROWS = 64  # feature rows stored with a model and re-scored on every load
GATE_METRIC = "nDCG@10"


class PromotionRefused(ValueError):
    """The candidate is significantly worse than the active model on held-out queries."""


def add_ltr_commands(subparsers: argparse._SubParsersAction) -> None:
    from ltr.features import DEFAULT_FEATURE_SET
    from ltr.training import TrainingSettings

    defaults = TrainingSettings()
    train = subparsers.add_parser("train", help="train a LambdaMART ranker on judged queries and store it in the registry")
    train.add_argument("--dataset", required=True, help="BEIR directory with queries.jsonl and qrels/SPLIT.tsv")
    train.add_argument("--split", default="train", help="judged split to learn from (default train)")
    train.add_argument("--name", help="index (default: the dataset's name when such an index exists)")
    train.add_argument("--feature-set", default=DEFAULT_FEATURE_SET, help=f"default {DEFAULT_FEATURE_SET}")
    train.add_argument("--valid-fraction", type=float, default=defaults.valid_fraction,
                       help=f"training queries held out for early stopping (default {defaults.valid_fraction})")
    train.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    train.add_argument("--max-depth", type=int, default=defaults.max_depth)
    train.add_argument("--max-rounds", type=int, default=defaults.max_rounds)
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--config", help="service TOML (its fusion window is the candidate window trained on)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    models = subparsers.add_parser("models", help="list, inspect, promote and roll back ranking models")
    commands = models.add_subparsers(dest="models_command", required=True)
    listing = commands.add_parser("list", help="every stored model, the active one marked")
    listing.add_argument("--json", action="store_true")
    show = commands.add_parser("show", help="one model's manifest")
    show.add_argument("version")
    promote = commands.add_parser("promote", help="make a model active, if it is not significantly worse than the active one")
    promote.add_argument("version", help="a model version, or 'latest'")
    promote.add_argument("--dataset", help="BEIR directory with the held-out judged queries of the gate")
    promote.add_argument("--split", help="held-out split (must differ from both models' training split)")
    promote.add_argument("--name", help="index to evaluate on (default: the model's)")
    promote.add_argument("--force", action="store_true", help="promote even without, or against, the gate")
    promote.add_argument("--quiet", action="store_true")
    commands.add_parser("rollback", help="re-activate the previously active model")


def run_ltr_command(home: Path, args: argparse.Namespace) -> int:
    if args.command == "train":
        return cmd_train(home, args)
    handler = {"list": cmd_list, "show": cmd_show, "promote": cmd_promote, "rollback": cmd_rollback}
    return handler[args.models_command](home, args)


def cmd_train(home: Path, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from eval.datasets import load_dataset
    from ltr.features import feature_set
    from ltr.ranker import index_description
    from ltr.registry import ModelRegistry
    from ltr.training import TrainingSettings, fit_ranker
    from search.config import load_service_config

    settings = TrainingSettings(
        learning_rate=args.learning_rate, max_depth=args.max_depth, max_rounds=args.max_rounds,
        valid_fraction=args.valid_fraction, seed=args.seed,
    )
    features = feature_set(args.feature_set)
    dataset = load_dataset(args.dataset, args.split)
    index = open_index(home, args.name, dataset.name)
    fusion = load_service_config(home, args.config).fusion_for(index.name)
    log(f"training on {dataset.name}/{dataset.split}: {len(dataset.queries)} judged queries, index "
        f"{index.name}/{index.generation_id}, feature set {features.name} v{features.version} ({len(features.names)} features), "
        f"window BM25 top {fusion.bm25_candidates} + dense top {fusion.dense_candidates}")
    progress = (lambda items: items) if args.quiet else (lambda items: tqdm(items, desc="features", unit="query", file=sys.stderr))
    fitted = fit_ranker(index, dataset.queries, dataset.qrels, features, fusion, settings, progress=progress, log=log)
    rows, trained, train_ids, valid_ids = fitted.rows, fitted.trained, fitted.train_ids, fitted.valid_ids
    extract_seconds = fitted.feature_seconds
    pairs_per_second = len(rows.labels) / extract_seconds if extract_seconds else float("nan")
    sample = rows.features[np.random.default_rng(settings.seed).choice(len(rows.labels), min(SAMPLE_ROWS, len(rows.labels)), replace=False)]
    manifest = ModelRegistry(home).save(
        trained.booster, feature_set=features.describe(), index=index_description(index),
        training={
            "dataset": str(Path(args.dataset).resolve()), "dataset_name": dataset.name, "split": dataset.split,
            "queries": len(rows.query_ids), "train_queries": len(train_ids), "valid_queries": len(valid_ids),
            "pairs": int(len(rows.labels)), "fingerprint": rows.fingerprint(),
            "relevant_outside_window": rows.relevant_outside_window, "window": fusion.to_dict(),
            "settings": settings.to_dict(), "feature_seconds": round(extract_seconds, 2),
            "train_seconds": round(trained.seconds, 2), "pairs_per_second": round(pairs_per_second),
        },
        params=settings.xgboost_params(),
        metrics={"valid nDCG@10": trained.valid_score,
                 "train nDCG@10": float(trained.history["train ndcg@10"][trained.best_iteration])},
        importance=trained.importance(), sample_features=sample, best_iteration=trained.best_iteration,
    )
    valid = f"{trained.valid_score:.4f}" if trained.valid_score is not None else "n/a (no validation queries)"
    print(f"model {manifest.version}: {trained.trees} trees (early stopping on {len(valid_ids)} held-out training queries), "
          f"validation nDCG@10 {valid}, trained in {trained.seconds:.1f} s")
    print("top features by gain: " + ", ".join(f"{name} {gain:.0f}" for name, gain in list(trained.importance().items())[:8]))
    print(f"serve it with: ltr-search models promote {manifest.version}")
    return 0


def cmd_list(home: Path, args: argparse.Namespace) -> int:
    from ltr.registry import ModelRegistry

    registry = ModelRegistry(home)
    active = registry.active()
    manifests = registry.versions()
    if args.json:
        print(json.dumps({"active": active, "models": [summary(m) for m in manifests]}, indent=2))
        return 0
    if not manifests:
        print(f"no models in {home / 'models'}; train one with `ltr-search train --dataset PATH`")
        return 0
    print(f"{'':2}{'version':<9}{'created':<22}{'feature set':<18}{'index':<24}{'trees':>6}{'valid nDCG@10':>15}  trained on")
    for m in manifests:
        valid = m.metrics.get("valid nDCG@10")
        print(f"{'*' if m.version == active else '':2}{m.version:<9}{m.created_at[:19]:<22}"
              f"{m.feature_set['name'] + ' v' + str(m.feature_set['version']):<18}"
              f"{m.index['name'] + '/' + m.index['generation']:<24}{m.trees:>6}"
              f"{'-' if valid is None else format(valid, '.4f'):>15}  {m.training.get('dataset_name')}/{m.training.get('split')}")
    return 0


def summary(manifest: Any) -> dict[str, Any]:
    data = manifest.to_dict()
    data.pop("sample", None)
    return data


def cmd_show(home: Path, args: argparse.Namespace) -> int:
    from ltr.registry import ModelRegistry

    registry = ModelRegistry(home)
    data = summary(registry.manifest(args.version))
    data["active"] = registry.active() == args.version
    print(json.dumps(data, indent=2))
    return 0


def cmd_promote(home: Path, args: argparse.Namespace) -> int:
    from ltr.registry import ModelRegistry

    registry = ModelRegistry(home)
    if args.version == "latest":
        if not registry.version_ids():
            raise ValueError("no models to promote; train one with `ltr-search train --dataset PATH`")
        args.version = registry.version_ids()[-1]
    candidate = registry.manifest(args.version)
    active = registry.active()
    if active == args.version:
        print(f"{args.version} is already active")
        return 0
    if active is None:
        log(f"no active model: {args.version} becomes active without a comparison")
    elif args.dataset and args.split:
        outcome = promotion_gate(home, args, candidate, registry.manifest(active))
        if outcome["significantly_worse"] and not args.force:
            raise PromotionRefused(
                f"{args.version} is significantly worse than the active {active} on {outcome['queries']} held-out "
                f"queries: {GATE_METRIC} {outcome['candidate']:.4f} vs {outcome['active']:.4f} (Holm p: t-test "
                f"{outcome['p_t']:.3g}, randomisation {outcome['p_rand']:.3g}); use --force to promote anyway"
            )
        if outcome["significantly_worse"]:
            log(f"--force: promoting {args.version} although it is significantly worse")
    elif not args.force:
        raise PromotionRefused(
            f"promoting {args.version} over the active {active} needs the held-out judged queries of the gate "
            "(--dataset PATH --split SPLIT), or --force"
        )
    registry.promote(args.version)
    print(f"active model: {args.version} (previous: {active or 'none'}); a running service picks it up on "
          "POST /admin/reload or restart")
    return 0


def promotion_gate(home: Path, args: argparse.Namespace, candidate: Any, active: Any) -> dict[str, Any]:
    """Both models on held-out queries, paired tests from the harness (baseline: the active one)."""
    from eval.datasets import load_dataset
    from eval.experiment import run_queries
    from eval.metrics import evaluate_run
    from eval.significance import DEFAULT_SEED, compare_to_baseline
    from ltr.ranker import registry_pipeline

    dataset = load_dataset(args.dataset, args.split)
    for manifest in (candidate, active):
        trained = manifest.training
        if trained.get("split") == dataset.split and trained.get("dataset") == str(dataset.path.resolve()):
            raise ValueError(f"model {manifest.version} was trained on {dataset.name}/{dataset.split}; "
                             "the gate needs queries neither model has seen (another split)")
    index = open_index(home, args.name or candidate.index["name"], dataset.name)
    values = {}
    for manifest in (active, candidate):
        pipeline = registry_pipeline(index, home, manifest.version, name=manifest.version, warn=log)
        run, _ = run_queries(pipeline.search, dataset.queries, 100, label=manifest.version, progress=not args.quiet)
        values[manifest.version] = evaluate_run(run, dataset.qrels, [GATE_METRIC]).values
    result = compare_to_baseline(values, active.version, [GATE_METRIC], seed=DEFAULT_SEED)[candidate.version][GATE_METRIC]
    means = {v: float(np.mean(vals[GATE_METRIC])) for v, vals in values.items()}
    log(f"gate on {dataset.name}/{dataset.split} ({len(dataset.queries)} queries): {GATE_METRIC} "
        f"{candidate.version} {means[candidate.version]:.4f} vs active {active.version} {means[active.version]:.4f}, "
        f"difference {result.mean_difference:+.4f}")
    return {
        "queries": len(dataset.queries), "candidate": means[candidate.version], "active": means[active.version],
        "significantly_worse": bool(result.significant() and result.mean_difference < 0),
        "p_t": result.t_test_p_holm, "p_rand": result.randomisation_p_holm,
    }


def cmd_rollback(home: Path, args: argparse.Namespace) -> int:
    from ltr.registry import ModelRegistry

    registry = ModelRegistry(home)
    previous = registry.active()
    now = registry.rollback()
    print(f"active model: {now} (rolled back from {previous}); reload a running service with POST /admin/reload")
    return 0


def open_index(home: Path, name: str | None, dataset_name: str) -> Any:
    from indexing.bundle import IndexStore
    from search.embedded import EmbeddedIndex

    store = IndexStore(home)
    chosen = name or (dataset_name if dataset_name in store.names() else "default")
    if chosen not in store.names():
        raise ValueError(f"no index named '{chosen}' in {store.root}; build it with `ltr-search index build --dataset PATH "
                         f"--name {chosen}` (or pass --name)")
    return EmbeddedIndex.open(home, chosen)


def log(message: str) -> None:
    print(message, file=sys.stderr)
