"""Behaviour models staged on a frozen text model: cold start, tail and head queries (issue 15,
the second table of its acceptance).

    .venv/bin/python bench/bench_staged_behaviour.py --source-home H [--sessions 20] [--seed 0]

H must hold a `scifact` index with dense vectors (e.g. `make demo`'s .ltr-search). In a fresh
experiment home (a copy of that index and encoder):
1. text     the `text` model is trained once on SciFact train (`fit_ranker`, the defaults),
            stored and promoted: it serves the simulated traffic and is the base of every
            behaviour stage below.
2. cold     with zero events, behaviour trees are trained on top of it (`fit_ranker` with
            `base_model`); on SciFact test both rank every query. Goal: |delta nDCG@10| <= 0.002;
            the staged design makes it exactly 0 (rankings compared query by query).
3. tail     simulated users (PBM, examination 1/rank, noise 0.1, exploration 0.1) search every
            TRAIN query `--sessions` times; propensities are refitted and the aggregates
            rebuilt; the behaviour stage is retrained on the train queries (point-in-time
            rows). TEST queries have no history of their own (documents may have some from
            train queries): goal |delta| <= 0.005 against text-only.
4. head     the same users then search every TEST query `--sessions` times; the SAME behaviour
            model (it never saw a test-query click) ranks test queries with their history now
            known. Goal: >= +0.08 against text-only.
Each delta comes with its paired 95% CI and p-values (t-test, randomisation). Writes JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_behaviour_loop import PAGE, replay, serving_loop  # noqa: E402
from eval.click_models import UserBehaviour  # noqa: E402
from eval.datasets import load_dataset  # noqa: E402
from eval.metrics import evaluate_run, parse_metric  # noqa: E402
from eval.propensity import fit_propensities  # noqa: E402
from eval.significance import compare  # noqa: E402
from ltr.features import feature_set  # noqa: E402
from ltr.point_in_time import BehaviourHistory  # noqa: E402
from ltr.ranker import LtrPipeline, index_description  # noqa: E402
from ltr.registry import ModelRegistry  # noqa: E402
from ltr.training import InMemoryModel, TrainingSettings, fit_ranker  # noqa: E402
from search.app.cli.models import save_fitted  # noqa: E402
from search.app.config import load_service_config  # noqa: E402
from search.embedded import EmbeddedIndex  # noqa: E402

INDEX = "scifact"
DATASET = ROOT.parent / "shared" / "datasets" / "scifact"
RESULTS = ROOT / "bench" / "results"
METRIC = "nDCG@10"


def ranked(pipeline: LtrPipeline, queries: dict[str, str], depth: int = 100) -> dict[str, list[tuple[str, float]]]:
    return {q: [(h.doc_id, h.score) for h in pipeline.search(text, depth)] for q, text in queries.items()}


def compare_runs(text_run, staged_run, test) -> dict[str, object]:
    metric = parse_metric(METRIC)
    ids = list(test.queries)
    score = lambda run: evaluate_run({q: dict(run[q]) for q in ids}, test.qrels, [metric])  # noqa: E731
    text, staged = score(text_run), score(staged_run)
    a = text.subset(ids).values[METRIC]
    b = staged.subset(ids).values[METRIC]
    c = compare(b, a)
    identical = sum(1 for q in ids if [d for d, _ in text_run[q]] == [d for d, _ in staged_run[q]])
    return {"text": float(a.mean()), "staged": float(b.mean()), "delta": float(b.mean() - a.mean()),
            "ci95": list(c.ci95), "t_test_p": c.t_test_p, "randomisation_p": c.randomisation_p,
            "queries": len(ids), "identical_rankings": identical}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source-home", required=True)
    parser.add_argument("--home", default="/tmp/bench-staged-behaviour")
    parser.add_argument("--sessions", type=int, default=20, help="sessions per query")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-model", help="a text model of the source home's registry to use instead of training "
                                             "one (it must have been trained on SciFact train with the defaults)")
    parser.add_argument("--out", default=str(RESULTS / "bench_staged_behaviour.json"))
    args = parser.parse_args()
    home, source = Path(args.home), Path(args.source_home)
    if home.exists():
        shutil.rmtree(home)
    (home / "indexes").mkdir(parents=True)
    shutil.copytree(source / "indexes" / INDEX, home / "indexes" / INDEX, symlinks=True)
    if (source / "encoders").exists():
        shutil.copytree(source / "encoders", home / "encoders", symlinks=True)
    index = EmbeddedIndex.open(home, INDEX)
    fusion = load_service_config(home).fusion_for(INDEX)
    train, test = load_dataset(DATASET, "train"), load_dataset(DATASET, "test")
    settings = TrainingSettings(seed=args.seed)
    text_set, full = feature_set("text"), feature_set("text+behaviour")
    report: dict[str, object] = {"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                          capture_output=True, text=True).stdout.strip(),
                                 "sessions_per_query": args.sessions, "seed": args.seed}
    log = lambda m: print(f"  {m}", flush=True)  # noqa: E731

    started = time.perf_counter()
    registry = ModelRegistry(home)
    if args.text_model:
        shutil.copytree(source / "models" / args.text_model, home / "models" / args.text_model)
        text_manifest = registry.manifest(args.text_model)
        from_clicks = text_manifest.training.get("source") == "events"  # `train --from-events`: a train-split click log
        if text_manifest.feature_set["name"] != "text" or not (from_clicks or text_manifest.training.get("split") == "train"):
            raise SystemExit(f"{args.text_model} is not a text model trained on a train split (judgments or clicks)")
    else:
        text_fit = fit_ranker(index, train.queries, train.qrels, text_set, fusion, settings, log=log)
        context = {"dataset": str(DATASET), "dataset_name": "scifact", "split": "train", "window": fusion.to_dict(),
                   "settings": settings.to_dict()}
        text_manifest = save_fitted(registry, text_fit, text_set, index_description(index), context, settings)
    registry.promote(text_manifest.version)
    text_model = registry.load(text_manifest.version)
    report["text_model"] = {"version": text_manifest.version, "trees": text_manifest.trees,
                            "trained_on": "clicks" if text_manifest.training.get("source") == "events" else "judgments",
                            "seconds": time.perf_counter() - started}
    text_pipeline = LtrPipeline(index, text_model, text_set, fusion)
    text_run = ranked(text_pipeline, test.queries)

    def staged_run(history: BehaviourHistory | None, label: str) -> tuple[dict[str, object], LtrPipeline]:
        began = time.perf_counter()
        fitted = fit_ranker(index, train.queries, train.qrels, full, fusion, settings, log=log, history=history,
                            base_model=text_model, base_feature_set=text_set.describe())
        pipeline = LtrPipeline(index, InMemoryModel(fitted.trained), full, fusion)
        result = {"behaviour_trees": fitted.trained.trees, "inner_cv": fitted.trained.inner_cv.to_dict(),
                  **compare_runs(text_run, ranked(pipeline, test.queries), test), "seconds": time.perf_counter() - began}
        print(f"[{label}] text {result['text']:.4f} staged {result['staged']:.4f} delta {result['delta']:+.4f} "
              f"(95% CI {result['ci95'][0]:+.4f}..{result['ci95'][1]:+.4f}); identical rankings "
              f"{result['identical_rankings']}/{result['queries']}; {result['behaviour_trees']} behaviour trees", flush=True)
        return result, pipeline

    report["cold"], _ = staged_run(None, "cold")

    state, events, behaviour = serving_loop(home, 0.1, "shuffle")
    user = UserBehaviour(model="pbm", eta=1.0, noise=0.1)
    report["traffic_train"] = replay(state, events, behaviour, train.queries, train.qrels, user,
                                     args.sessions * len(train.queries), args.seed, "train")
    fit = fit_propensities(behaviour, events, max_position=PAGE)
    behaviour.rebuild(events)
    report["propensities"] = fit.propensities
    history = BehaviourHistory.open(home, INDEX)
    report["tail"], pipeline = staged_run(history, "tail")

    report["traffic_test"] = replay(state, events, behaviour, test.queries, test.qrels, user,
                                    args.sessions * len(test.queries), args.seed + 1, "test")
    behaviour.rebuild(events)
    pipeline = LtrPipeline(index, pipeline.model, full, fusion)  # reads the aggregates as they are now
    report["head"] = {**compare_runs(text_run, ranked(pipeline, test.queries), test),
                      "note": "the tail's behaviour model, never trained on a test-query click"}
    head = report["head"]
    print(f"[head] text {head['text']:.4f} staged {head['staged']:.4f} delta {head['delta']:+.4f} "
          f"(95% CI {head['ci95'][0]:+.4f}..{head['ci95'][1]:+.4f})", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
