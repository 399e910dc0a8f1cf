"""Cold start: `text+behaviour` with zero events against `text`, over several training seeds.

    .venv/bin/python bench/bench_cold_start.py [--seeds 0,1,2] [--home .ltr-search]

With no events every behaviour feature is constant (counts 0, rates missing), so no tree can
split on one; the two models still differ through XGBoost's column sampling (colsample_bytree
draws from 34 columns instead of 24), which acts like a different seed. This script trains both
sets on SciFact train with the same seeds (rows built once, the behaviour columns at their
no-history values) and scores SciFact test, so the cold-start difference can be read against
the seed-to-seed spread of text-only itself.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval.datasets import load_dataset  # noqa: E402
from eval.metrics import evaluate_run, parse_metric  # noqa: E402
from ltr.behaviour import BehaviourStore  # noqa: E402
from ltr.features import feature_set  # noqa: E402
from ltr.ranker import InMemoryModel, LtrPipeline  # noqa: E402
from ltr.training import TrainingSettings, build_rows, split_queries, train_ranker  # noqa: E402
from search.app.config import load_service_config  # noqa: E402
from search.embedded import EmbeddedIndex  # noqa: E402

DATASET = ROOT.parent / "shared" / "datasets" / "scifact"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=str(ROOT / ".ltr-search"))
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    home = Path(args.home)
    index = EmbeddedIndex.open(home, "scifact")
    fusion = load_service_config(home).fusion_for("scifact")
    train, test = load_dataset(DATASET, "train"), load_dataset(DATASET, "test")
    full = feature_set("text+behaviour")
    rows = build_rows(index, train.queries, train.qrels, full, fusion)  # no behaviour store: no-history values
    metric = parse_metric("nDCG@10")
    empty = BehaviourStore(Path(tempfile.mkdtemp(prefix="cold-")) / "behaviour.sqlite3")  # zero events
    results: dict[str, list[float]] = {"text": [], "text+behaviour": []}
    for seed in [int(s) for s in args.seeds.split(",")]:
        settings = TrainingSettings(seed=seed)
        train_ids, valid_ids = split_queries(list(dict.fromkeys(rows.query_ids)), settings.valid_fraction, seed)
        for name in results:
            features = feature_set(name)
            columns = [full.names.index(n) for n in features.names]
            subset = type(rows)(rows.query_ids, rows.doc_ids, rows.features[:, columns], rows.labels, rows.group_sizes)
            trained = train_ranker(subset.select(train_ids), features.names, settings, subset.select(valid_ids))
            pipeline = LtrPipeline(index, InMemoryModel(trained), features, fusion, behaviour=empty)
            run = {q: {h.doc_id: h.score for h in pipeline.search(text, 100)} for q, text in test.queries.items()}
            score = evaluate_run(run, test.qrels, [metric]).mean()["nDCG@10"]
            results[name].append(score)
            print(f"seed {seed}: {name:<15} nDCG@10 {score:.4f} ({trained.trees} trees)", flush=True)
    for name, scores in results.items():
        print(f"{name:<15} mean {np.mean(scores):.4f}  min {np.min(scores):.4f}  max {np.max(scores):.4f}")
    differences = np.array(results["text+behaviour"]) - np.array(results["text"])
    print(f"text+behaviour minus text, per seed: {', '.join(f'{d:+.4f}' for d in differences)}; "
          f"mean {differences.mean():+.4f}; spread of text alone {np.ptp(results['text']):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
