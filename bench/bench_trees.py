"""Tree scoring, back to back on the same real windows: XGBoost inplace_predict, TL2cgen, the
simd kernel (each SIMD path this CPU has) and ONNX Runtime's TreeEnsemble, for a registry model.

    .venv/bin/python bench/bench_trees.py --home HOME --name scifact \
        --dataset ../shared/datasets/scifact --split test [--model active] [--tree-counts 100,200] \
        --out bench/results/bench_trees.json

The windows are the model's own: for each test query its candidate window (as `model:VERSION`
serves it), the window's features and the fusion base margin. Two workloads:
- `real windows`: each query's window as served (up to 400 rows);
- `400-row windows`: the rows of consecutive real windows cut into blocks of exactly 400 (the
  issue's unit: "scoring a 400-candidate window").
Every method scores a window right after the others (interleaved, one thread, each call warmed
once), so machine load hits all alike; ratios are taken from this run. Each method's largest
|score - XGBoost| is recorded. The libraries are compiled into a temporary folder from the
model's JSON: the home is not touched. `--tree-counts` also times the simd kernel on the model cut
to its first N trees (what a smaller model would cost; not a model anyone trained).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval.datasets import load_dataset  # noqa: E402
from ltr.compiled_trees import base_score, compile_trees, load_library  # noqa: E402
from ltr.features import extract_features  # noqa: E402
from ltr.ranker import registry_pipeline, window_base  # noqa: E402
from ltr.registry import ModelRegistry, predict_scores, single_threaded  # noqa: E402
from ltr.simd_trees import SIMD_LEVELS, SimdTrees  # noqa: E402
from ltr.training import candidate_window  # noqa: E402
from search.embedded import EmbeddedIndex  # noqa: E402

Scorer = Callable[[np.ndarray, Any], np.ndarray]
BLOCK = 400


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"p50": round(float(np.percentile(a, 50)), 4), "p99": round(float(np.percentile(a, 99)), 4),
            "mean": round(float(a.mean()), 4)}


def onnx_scorer(booster: Any, features: int, x0: np.ndarray, b0: Any, names: list[str]) -> Scorer:
    """ONNX Runtime's TreeEnsemble (onnxmltools), one thread; its constant offset to XGBoost
    (base_score handling) is measured on the first window and taken off."""
    import onnxmltools
    import onnxruntime as ort
    from onnxmltools.convert.common.data_types import FloatTensorType

    plain = booster.copy()
    plain.feature_names = None  # onnxmltools reads features as f0, f1, ...
    model = onnxmltools.convert_xgboost(plain, initial_types=[("input", FloatTensorType([None, features]))])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    offset = float(np.median(session.run(None, {"input": x0})[0].reshape(-1) - predict_scores(booster, names, x0, b0)
                             + (b0 if b0 is not None else 0)))

    def predict(x: np.ndarray, b: Any) -> np.ndarray:
        raw = session.run(None, {"input": x})[0].reshape(-1).astype(np.float64) - offset
        return raw + b if b is not None else raw

    return predict


def time_scorers(scorers: dict[str, Scorer], windows: list[tuple[np.ndarray, Any]], reference: Scorer,
                 repeats: int) -> dict[str, dict[str, float]]:
    """p50/p99/mean ms per window and the largest |diff| to `reference`, every scorer on a window
    right after the others, after one untimed pass over all windows (the first pass ran 20-30%
    slower than the later ones)."""
    for x, b in windows:
        for predict in scorers.values():
            predict(x, b)
    times: dict[str, list[float]] = {name: [] for name in scorers}
    gaps = {name: 0.0 for name in scorers}
    for _ in range(repeats):
        for x, b in windows:
            want = reference(x, b)
            for name, predict in scorers.items():
                predict(x, b)
                started = time.perf_counter()
                got = predict(x, b)
                times[name].append((time.perf_counter() - started) * 1000)
                if len(x):
                    gaps[name] = max(gaps[name], float(np.max(np.abs(np.asarray(got, dtype=np.float64) - want))))
    return {name: {**pct(times[name]), "max_abs_diff_vs_xgboost": gaps[name]} for name in scorers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--name", default="scifact", help="the index the windows come from")
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--model", default="active", help="a registry version, or 'active'")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tree-counts", default="", help="comma-separated: also simd on the first N trees")
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/bench_trees.json")
    args = parser.parse_args()

    registry = ModelRegistry(args.home)
    version = registry.active() if args.model == "active" else args.model
    if version is None:
        raise SystemExit("no active model; pass --model VERSION")
    index = EmbeddedIndex.open(args.home, args.name)
    pipeline = registry_pipeline(index, args.home, version)
    model = pipeline.model
    booster, names = model.booster, list(model.manifest.feature_names)
    single_threaded(booster)
    queries = list(load_dataset(args.dataset, args.split).queries.values())[: args.queries]
    log(f"windows of model {version} ({booster.num_boosted_rounds()} trees) for {len(queries)} {args.split} queries ...")
    windows = []
    for query in queries:
        window = candidate_window(pipeline.backend, query, pipeline.fusion)
        windows.append((np.ascontiguousarray(extract_features(pipeline.backend, query, window, pipeline.features),
                                             dtype=np.float32), window_base(model, window)))
    rows = np.concatenate([x for x, _ in windows])
    bases = None if windows[0][1] is None else np.concatenate([np.asarray(b, dtype=np.float64) for _, b in windows])
    blocks = [(rows[i:i + BLOCK], None if bases is None else bases[i:i + BLOCK])
              for i in range(0, len(rows) - BLOCK + 1, BLOCK)]

    work = Path(tempfile.mkdtemp(prefix="bench-trees-"))
    model_file = work / "model.json"
    booster.save_model(str(model_file))
    scorers: dict[str, Scorer] = {"xgboost inplace_predict": lambda x, b: predict_scores(booster, names, x, b)}
    compile_seconds = {}
    for compiler in ("tl2cgen", "simd"):
        started = time.perf_counter()
        library = compile_trees(model_file, rows[:256], work / f"{compiler}.so", compiler)
        compile_seconds[compiler] = round(time.perf_counter() - started, 2)
        log(f"   {compiler}: compiled in {compile_seconds[compiler]} s")
        if compiler == "tl2cgen":
            scorers["tl2cgen"] = load_library(library, compiler, booster).predict
        else:
            top = SimdTrees(library).level
            for level in range(top, -1, -1):
                scorers[f"simd {SIMD_LEVELS[level]}"] = SimdTrees(library, base_score(booster), level).predict
    for count in [int(c) for c in args.tree_counts.split(",") if c.strip()]:
        cut = work / f"model-{count}.json"
        booster[:count].save_model(str(cut))
        library = compile_trees(cut, rows[:256], work / f"simd-{count}.so", "simd")
        scorers[f"simd, first {count} trees"] = SimdTrees(library, base_score(booster)).predict
    if not args.no_onnx:
        try:
            scorers["onnxruntime TreeEnsemble"] = onnx_scorer(booster, len(names), *windows[0], names)
        except Exception as exc:  # an optional candidate
            log(f"   onnx TreeEnsemble unavailable: {exc}")

    reference = scorers["xgboost inplace_predict"]
    load = [os.getloadavg()[0]]
    log(f"timing {len(scorers)} scorers on {len(windows)} real windows and {len(blocks)} 400-row windows ...")
    results = {"real windows": time_scorers(scorers, windows, reference, args.repeats)}
    load.append(os.getloadavg()[0])
    results["400-row windows"] = time_scorers(scorers, blocks, reference, args.repeats)
    load.append(os.getloadavg()[0])
    for workload in results.values():
        tl2, xgb = workload["tl2cgen"]["p50"], workload["xgboost inplace_predict"]["p50"]
        for result in workload.values():
            result["p50_ratio_to_tl2cgen"] = round(result["p50"] / tl2, 3)
            result["p50_ratio_to_xgboost"] = round(result["p50"] / xgb, 3)

    report = {
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=ROOT).stdout.strip(),
        "command": "bench/bench_trees.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.processor() or 'cpu'}",
        "model": version, "trees": booster.num_boosted_rounds(), "features": len(names),
        "max_depth": int(model.manifest.params.get("max_depth", 0)) if isinstance(model.manifest.params, dict) else None,
        "dataset": args.dataset.name, "split": args.split, "windows": len(windows),
        "window_rows_median": int(np.median([len(x) for x, _ in windows])), "blocks_of_400": len(blocks),
        "repeats": args.repeats, "compile_seconds": compile_seconds, "load_average_during_run": [round(x, 2) for x in load],
        "unit": "ms per window, wall clock, one thread", "by_workload": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    for workload, table in results.items():
        print(f"{workload} (model {version}, {report['trees']} trees):")
        for name, r in table.items():
            print(f"  {name:30s} p50 {r['p50']:7.3f} ms  p99 {r['p99']:7.3f}  x tl2cgen {r['p50_ratio_to_tl2cgen']:5.2f}  "
                  f"x xgboost {r['p50_ratio_to_xgboost']:5.2f}  max|diff| {r['max_abs_diff_vs_xgboost']:.2g}")
    print(f"load average during the run: {report['load_average_during_run']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
