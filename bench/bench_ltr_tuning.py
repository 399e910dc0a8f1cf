"""How the LambdaMART defaults were chosen: K-fold cross-validation on a *training* split.

    python bench/bench_ltr_tuning.py --dataset ../shared/datasets/scifact --split train \
        [--name scifact] [--folds 5] [--feature-set text,basic] [--grid small]

Every configuration is trained on K-1 folds of the training queries (with early stopping on a
hold-out of those) and scored on the remaining fold; the mean held-out nDCG@10 is printed per
configuration and feature set. The test split is never read. Feature rows are cached under
bench/results/ltr-rows-<index>-<split>-<generation>-<set>.npz.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.datasets import load_dataset  # noqa: E402
from eval.experiment import assign_folds  # noqa: E402
from eval.metrics import evaluate_run  # noqa: E402
from indexing.home import resolve_home  # noqa: E402
from ltr.features import feature_set  # noqa: E402
from ltr.training import RankingRows, TrainingSettings, build_rows, split_queries, train_ranker  # noqa: E402
from search.app.config import load_service_config  # noqa: E402
from search.embedded import EmbeddedIndex  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GRIDS = {
    "none": [{}],
    "small": [
        {},
        {"max_depth": 4},
        {"max_depth": 8},
        {"learning_rate": 0.02},
        {"learning_rate": 0.1},
        {"min_child_weight": 10.0},
        {"num_pair_per_sample": 1},
        {"num_pair_per_sample": 32},
        {"subsample": 1.0, "colsample_bytree": 1.0},
    ],
    # second round, around what the first found (deeper trees, larger steps, steadier stopping)
    "round2": [
        {"early_stopping_rounds": 200},
        {"max_depth": 8, "early_stopping_rounds": 200},
        {"max_depth": 8, "learning_rate": 0.1},
        {"max_depth": 8, "min_child_weight": 10.0},
        {"max_depth": 8, "learning_rate": 0.1, "early_stopping_rounds": 200},
        {"max_depth": 10},
    ],
    # third round: the same quality with fewer trees (scoring cost grows with the tree count)
    "round3": [
        {"learning_rate": 0.1},
        {"learning_rate": 0.1, "max_depth": 8},
    ],
}


def cached_rows(index: EmbeddedIndex, dataset, features, fusion) -> RankingRows:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"ltr-rows-{index.name}-{dataset.split}-{index.generation_id}-{features.name}-v{features.version}.npz"
    if path.exists():
        data = np.load(path, allow_pickle=False)
        return RankingRows(list(data["query_ids"]), list(data["doc_ids"]), data["features"], data["labels"], data["group_sizes"])
    started = time.perf_counter()
    rows = build_rows(index, dataset.queries, dataset.qrels, features, fusion)
    seconds = time.perf_counter() - started
    print(f"features: {len(rows.labels):,} pairs of {len(rows.query_ids)} queries in {seconds:.1f} s "
          f"({len(rows.labels) / seconds:,.0f} pairs/s)")
    np.savez(path, query_ids=np.array(rows.query_ids), doc_ids=np.array(rows.doc_ids), features=rows.features,
             labels=rows.labels, group_sizes=rows.group_sizes)
    return rows


def cross_validate(rows: RankingRows, dataset, names, settings: TrainingSettings, folds: int, seed: int) -> tuple[float, list[int]]:
    fold_of = assign_folds(list(dataset.queries), folds, seed)
    per_query: list[float] = []
    trees = []
    for fold in range(folds):
        held_out = [q for q in dataset.queries if fold_of[q] == fold]
        fitting = [q for q in dataset.queries if fold_of[q] != fold]
        train_ids, valid_ids = split_queries(fitting, settings.valid_fraction, settings.seed)
        model = train_ranker(rows.select(train_ids), names, settings, rows.select(valid_ids))
        trees.append(model.trees)
        test = rows.select(held_out)
        scores = model.booster.inplace_predict(test.features, missing=np.nan)
        starts = np.concatenate(([0], np.cumsum(test.group_sizes)))
        run = {q: dict(zip(test.doc_ids[starts[i]:starts[i + 1]], scores[starts[i]:starts[i + 1]].tolist()))
               for i, q in enumerate(test.query_ids)}
        qrels = {q: dataset.qrels[q] for q in held_out}
        per_query += evaluate_run(run, qrels, ["nDCG@10"]).values["nDCG@10"].tolist()
    return float(np.mean(per_query)), trees


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--name", default=None)
    parser.add_argument("--home", default=None)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--feature-set", default="text,basic")
    parser.add_argument("--grid", choices=GRIDS, default="none")
    args = parser.parse_args()
    if args.split == "test":
        sys.exit("tuning on the test split is not allowed; use a training split")
    home = resolve_home(args.home)
    dataset = load_dataset(args.dataset, args.split)
    name = args.name or Path(args.dataset).name
    index = EmbeddedIndex.open(home, name)
    fusion = load_service_config(home).fusion_for(name)
    print(f"{name} {args.split}: {len(dataset.queries)} queries, index generation {index.generation_id}, {args.folds}-fold CV")
    for set_name in args.feature_set.split(","):
        features = feature_set(set_name)
        rows = cached_rows(index, dataset, features, fusion)
        for overrides in GRIDS[args.grid]:
            settings = TrainingSettings(**overrides)
            started = time.perf_counter()
            score, trees = cross_validate(rows, dataset, features.names, settings, args.folds, args.seed)
            label = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"
            print(f"{set_name:<24} {label:<44} CV nDCG@10 {score:.4f}  trees {trees}  {time.perf_counter() - started:.0f} s",
                  flush=True)


if __name__ == "__main__":
    main()
