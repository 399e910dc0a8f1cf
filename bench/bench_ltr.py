"""Cost of the learned ranker: pipeline `ltr` against the `hybrid` pipeline it reranks (in-process
and over HTTP), its scoring stage alone, and the throughput of training-row extraction.

    .venv/bin/python bench/bench_ltr.py                                       # all parts, ~5 min
    .venv/bin/python bench/bench_ltr.py --skip-http --queries 100 --rounds 1   # a quick look

Index `--name` at `--home` with its active model; SciFact test queries for latency, train queries
for training rows; k=10.

1. in-process  `ServingState(config).reload()` as the service does, then `snapshot.pipelines[P].run(
               RankingRequest(query, size=10))`, P = "ltr" vs its peer "hybrid" (RRF of BM25 top-200
               + dense top-200, the first stage whose window ltr rescores and reranks); queries one
               at a time on a worker thread (the service runs requests on its thread pool), BLAS 1
               thread as `serve` sets. Stage p50/p99 from RankingOutcome.timings_ms (ltr's
               `retrieve` includes the exact rescoring of the window). Extra rows: "ltr nthread=1",
               a copy of the served booster set to nthread=1 (served boosters have been
               single-threaded since this benchmark showed the cost of all cores; the "default"
               variants below are therefore set to nthread 0 = all cores explicitly); "ltr main thread", the served pipeline called from the main thread as
               `ltr-search search` / `eval` do (when written: score stage ~20 ms there, ~3 ms on a
               worker thread).
2. HTTP        a real `ltr-search serve` on 127.0.0.1 (uvicorn, one worker), POST /search {"query",
               "size": 10, "pipeline": P} via bench_service's httpx helpers, concurrency 1 and 4.
               Includes the request log (SQLite, fsync per request; for ltr with the results'
               feature rows) in a temp dir under bench/results. Client and server share 2 cores.
3. scoring     the active model on windows of exactly 500 real feature rows (part 4's build_rows
               output cut into consecutive slices, cycled), on a worker thread. ours =
               `predict_scores` (inplace_predict, the serving path); peer = `booster.predict(
               DMatrix(rows))`, DMatrix built in the timing with the booster's thread count. Both
               with nthread 0 (all cores) and 1 (copies of the booster); inplace also from 2
               threads at once. explain = `predict_contributions` of a 10-row page (a third as
               many calls). Back-to-back calls with warm caches: part 1's score stage is the
               in-context figure.
4. train rows  `build_rows` (candidate window + extract_features + labels) over `--train-queries`
               train queries: pairs (candidate rows) per second; then the same work split into
               its two parts, timed per query in build_rows's order (features over ready windows
               in a tight loop run ~2x faster, warm caches). Peer: the serving path
               `LtrPipeline.rank_window` (same window and features, plus scoring with nthread=1)
               on the same queries. Main thread, no BLAS limit, as training runs.

How to read: p50/p99 are per-call latencies in ms; parts 1-3 run each configuration --rounds
times interleaved with its peer, tables show the median over rounds. ratio = ours p50 / peer p50
(above 1: ours slower; ltr/hybrid is what learning-to-rank adds); part 4: ours pairs/s / peer
pairs/s. The 2 cores are shared with other jobs: compare ratios within a run, not absolute
numbers across runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_service import (  # noqa: E402
    K, WARMUP, Run, Server, free_port, http_worker, in_process_pipeline, interleaved, log, measure, ranking_worker,
    write_config,
)
from bench.synthetic_corpus import RESULTS, SCIFACT  # noqa: E402

WINDOW_ROWS = 500
EXPLAIN_ROWS = 10
PIPELINES = ("ltr", "hybrid")  # ours, peer
LTR_1 = "ltr nthread=1"  # the served model with its booster limited to one thread (part 1 only)
LTR_MAIN = "ltr main thread"  # the served pipeline called from the main thread, as the CLI does


def stage_percentiles(stages: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    names = list(dict.fromkeys(name for timings in stages for name in timings))
    return {name: {"p50_ms": float(np.percentile([t.get(name, 0.0) for t in stages], 50)),
                   "p99_ms": float(np.percentile([t.get(name, 0.0) for t in stages], 99))} for name in names}


# ============================================================================ 1. in-process


def single_thread_ltr(served: Any) -> Any:
    """The served ltr RankingPipeline with a copy of its booster set to nthread=1."""
    from ltr.ranker import LtrPipeline
    from ltr.registry import LoadedModel

    ltr = served.first_stage
    booster = ltr.model.booster.copy()
    booster.set_param({"nthread": 1})
    first_stage = LtrPipeline(ltr.backend, LoadedModel(ltr.model.manifest, booster), ltr.features, ltr.fusion, name=ltr.name)
    return dataclasses.replace(served, first_stage=first_stage)


def on_worker_thread(run: Callable[[], Run]) -> Run:
    """Run a measurement on a fresh thread, as the service runs requests on its thread pool (the
    main thread differs: see LTR_MAIN in the docstring)."""
    out: list[Run] = []
    thread = threading.Thread(target=lambda: out.append(run()))
    thread.start()
    thread.join()
    return out[0]


def bench_in_process(args: argparse.Namespace, snapshot: Any, queries: list[str]) -> dict[str, Any]:
    from threadpoolctl import threadpool_limits

    log(f"\n== 1. in-process RankingPipeline.run, {len(queries)} test queries, c=1 (BLAS 1 thread)")
    served = snapshot.pipelines["ltr"]
    pipelines = {"ltr": served, LTR_1: single_thread_ltr(served), "hybrid": snapshot.pipelines["hybrid"], LTR_MAIN: served}
    stages: dict[str, list[dict[str, float]]] = {name: [] for name in pipelines}

    def run(name: str) -> Run:
        def timed() -> Run:
            return measure(ranking_worker(pipelines[name], stages[name]), queries, 1)

        return timed() if name == LTR_MAIN else on_worker_thread(timed)

    with threadpool_limits(limits=1, user_api="blas"):
        results = interleaved([(f"in-process {name} c=1", lambda name=name: run(name)) for name in pipelines], args.rounds)
    results["_stages"] = {name: stage_percentiles(stages[name]) for name in pipelines}
    return results


# ============================================================================ 2. HTTP


def bench_http(args: argparse.Namespace, home: Path, workdir: Path, queries: list[str]) -> dict[str, Any]:
    import httpx

    config = write_config(workdir, workdir / "events-http.sqlite3")
    port = free_port()
    script = Path(sys.executable).with_name("ltr-search")
    command = ([str(script)] if script.is_file() else [sys.executable, "-m", "search.app.cli"]) + [
        "--home", str(home), "serve", "--port", str(port), "--name", args.name, "--config", str(config)]
    log(f"\n== 2. HTTP POST /search, {len(queries)} test queries; starting: {' '.join(command)}")
    with Server(command, workdir, port) as server:
        probe = httpx.post(server.url + "/search", json={"query": queries[0], "size": K, "pipeline": "ltr"}, timeout=60)
        body = probe.json()
        if probe.status_code != 200 or body.get("pipeline") != "ltr" or not body.get("model_version"):
            raise SystemExit(f"the service does not serve 'ltr' with a model: {probe.status_code} {probe.text[:300]}")
        log(f"   serving ltr with model {body['model_version']}")
        configs = [(f"HTTP {name} c={c}", lambda name=name, c=c: measure(http_worker(server.url, name), queries, c,
                                                                        warmup=2 * WARMUP))
                   for c in (1, 4) for name in PIPELINES]
        return interleaved(configs, args.rounds)


# ============================================================================ 3. scoring alone


def bench_scoring(args: argparse.Namespace, model: Any, rows: np.ndarray) -> dict[str, Any]:
    import xgboost as xgb

    from ltr.registry import predict_contributions, predict_scores

    names = list(model.manifest.feature_names)
    boosters = {"default": model.booster.copy(), "nthread=1": model.booster.copy()}
    boosters["default"].set_param({"nthread": 0})  # all cores, XGBoost's own default
    boosters["nthread=1"].set_param({"nthread": 1})  # what the engine serves
    windows = [rows[i:i + WINDOW_ROWS] for i in range(0, len(rows) - WINDOW_ROWS + 1, WINDOW_ROWS)]
    pages = [w[:EXPLAIN_ROWS] for w in windows]
    if not windows:
        raise SystemExit(f"only {len(rows)} feature rows: need at least {WINDOW_ROWS}")

    def via_dmatrix(booster: xgb.Booster, x: np.ndarray) -> np.ndarray:
        threads = int(json.loads(booster.save_config())["learner"]["generic_param"]["nthread"]) or None
        return booster.predict(xgb.DMatrix(x, missing=np.nan, feature_names=names, nthread=threads)).astype(np.float64)

    diff = max(float(np.max(np.abs(predict_scores(boosters["default"], names, w) - via_dmatrix(boosters["default"], w))))
               for w in windows[:20])
    log(f"\n== 3. scoring {WINDOW_ROWS}-row windows: model {model.version} ({model.manifest.trees} trees, "
        f"{len(names)} features), {len(windows)} distinct windows from {len(rows):,} real rows, {args.score_calls} "
        f"calls per run; max |inplace - DMatrix| = {diff:.2g}")
    explain_calls = max(WARMUP + 1, args.score_calls // 3)
    configs: list[tuple[str, Callable[[], Run]]] = []
    for threads, b in boosters.items():
        configs += [
            (f"score inplace {threads} c=1", lambda b=b: on_worker_thread(lambda: measure(
                lambda _: lambda x: predict_scores(b, names, x), windows, 1, total=args.score_calls))),
            (f"score DMatrix {threads} c=1", lambda b=b: on_worker_thread(lambda: measure(
                lambda _: lambda x: via_dmatrix(b, x), windows, 1, total=args.score_calls))),
            (f"score inplace {threads} c=2", lambda b=b: measure(
                lambda _: lambda x: predict_scores(b, names, x), windows, 2, total=args.score_calls)),
            (f"explain {EXPLAIN_ROWS} rows {threads} c=1", lambda b=b: on_worker_thread(lambda: measure(
                lambda _: lambda x: predict_contributions(b, names, x), pages, 1, total=explain_calls))),
        ]
    results = interleaved(configs, args.rounds)
    results["_max_abs_diff_inplace_vs_dmatrix"] = diff
    return results


# ============================================================================ 4. training rows


def bench_training_rows(args: argparse.Namespace, index: Any, ltr: Any) -> tuple[dict[str, Any], np.ndarray]:
    from eval.datasets import load_dataset
    from ltr.features import extract_features
    from ltr.training import build_rows, candidate_window

    train = load_dataset(Path(args.dataset), "train")
    ids = list(train.queries)[: args.train_queries]
    queries = {q: train.queries[q] for q in ids}
    log(f"\n== 4. training rows: build_rows over {len(queries)} train queries, feature set {ltr.features.name} "
        f"({len(ltr.features.names)} features)")
    ltr.rank_window(queries[ids[0]])  # warm up (first ONNX call, caches)
    started = time.perf_counter()
    rows = build_rows(index, queries, train.qrels, ltr.features, ltr.fusion)
    build_s = time.perf_counter() - started
    pairs = len(rows.labels)
    candidate_s, feature_s = 0.0, 0.0  # the split, in build_rows's own order (window, then its features)
    for text in queries.values():
        started = time.perf_counter()
        window = candidate_window(index, text, ltr.fusion)
        middle = time.perf_counter()
        extract_features(index, text, window, ltr.features)
        candidate_s, feature_s = candidate_s + middle - started, feature_s + time.perf_counter() - middle
    started = time.perf_counter()
    served = sum(len(ltr.rank_window(text).hits) for text in queries.values())
    serve_s = time.perf_counter() - started

    def rate(seconds: float, n: int = pairs) -> dict[str, float]:
        return {"seconds": seconds, "pairs_per_s": n / seconds, "ms_per_query": 1e3 * seconds / len(queries)}

    out: dict[str, Any] = {"queries": len(queries), "pairs": pairs, "build_rows": rate(build_s),
                           "candidate_window": rate(candidate_s), "extract_features": rate(feature_s),
                           "rank_window": rate(serve_s, served)}
    for name in ("build_rows", "candidate_window", "extract_features", "rank_window"):
        s = out[name]
        log(f"   {name:<18} {s['seconds']:6.2f} s  {s['ms_per_query']:7.2f} ms/query  {s['pairs_per_s']:9,.0f} pairs/s")
    log(f"   {pairs:,} pairs, {pairs / len(queries):.0f} candidates per query on average")
    return out, rows.features


# ============================================================================ report


def print_stages(stages: dict[str, dict[str, dict[str, float]]]) -> None:
    names = list(dict.fromkeys(n for p in stages for n in stages[p]))
    log("\nper-stage ms (RankingOutcome.timings_ms, part 1), p50 / p99" + "".join(f" {p:>17}" for p in stages))
    for n in names:
        cells = [f"{stages[p][n]['p50_ms']:.2f} / {stages[p][n]['p99_ms']:.2f}" if n in stages[p] else "-" for p in stages]
        log(f"   {n:<57}" + "".join(f" {c:>17}" for c in cells))


def final_table(sections: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(what: str, ours: dict | None, peer: dict | None, note: str) -> None:
        if ours and peer:
            rows.append({"what": what, "ours": f"{ours['p50_ms']:.2f} / {ours['p99_ms']:.2f}",
                         "peer": f"{peer['p50_ms']:.2f} / {peer['p99_ms']:.2f}",
                         "ratio": ours["p50_ms"] / peer["p50_ms"], "note": note})

    s = sections.get("in_process", {})
    add("1. in-process run(), c=1", s.get("in-process ltr c=1"), s.get("in-process hybrid c=1"), "ours ltr, peer hybrid")
    add("1. in-process run(), c=1, booster nthread=1", s.get(f"in-process {LTR_1} c=1"), s.get("in-process hybrid c=1"),
        "ours ltr with booster nthread=1, peer hybrid")
    add("1. in-process ltr from the main thread", s.get(f"in-process {LTR_MAIN} c=1"), s.get("in-process ltr c=1"),
        "ours ltr called on the main thread, peer ltr on a worker thread")
    s = sections.get("http", {})
    for c in (1, 4):
        add(f"2. HTTP POST /search, c={c}", s.get(f"HTTP ltr c={c}"), s.get(f"HTTP hybrid c={c}"), "ours ltr, peer hybrid")
    s = sections.get("scoring", {})
    for threads in ("default", "nthread=1"):
        add(f"3. score {WINDOW_ROWS} rows, {threads}", s.get(f"score inplace {threads} c=1"),
            s.get(f"score DMatrix {threads} c=1"), "ours inplace_predict, peer DMatrix+predict")
    for kind in ("score inplace {} c=1", "score inplace {} c=2", f"explain {EXPLAIN_ROWS} rows {{}} c=1"):
        add(f"3. {kind.format('nthread=1 vs default')}", s.get(kind.format("nthread=1")), s.get(kind.format("default")),
            "ours nthread=1, peer nthread=0 (all cores)")
    t = sections.get("training")
    if t:
        for part in ("build_rows", "candidate_window", "extract_features"):
            rows.append({"what": f"4. {part}, {t['queries']} train queries", "ours": f"{t[part]['pairs_per_s']:,.0f} pairs/s",
                         "peer": f"{t['rank_window']['pairs_per_s']:,.0f} pairs/s",
                         "ratio": t[part]["pairs_per_s"] / t["rank_window"]["pairs_per_s"],
                         "note": f"{t[part]['ms_per_query']:.2f} ms/query; peer rank_window, nthread=1"})
    return rows


def print_final(rows: list[dict[str, Any]]) -> None:
    log("\n| what | ours p50 / p99 ms | peer p50 / p99 ms | ratio | note |")
    log("|---|---|---|---|---|")
    for r in rows:
        log(f"| {r['what']} | {r['ours']} | {r['peer']} | {r['ratio']:.2f} | {r['note']} |")
    log("ratio: ours p50 / peer p50 (above 1: ours slower); part 4: ours pairs/s / peer pairs/s (above 1: ours faster)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Latency of the ltr pipeline vs hybrid, scoring alone, training rows")
    parser.add_argument("--home", help="engine home (default $LTR_SEARCH_HOME, else ./.ltr-search)")
    parser.add_argument("--name", default="scifact", help="index name (default scifact)")
    parser.add_argument("--dataset", default=str(SCIFACT), help=f"BEIR dataset directory (default {SCIFACT})")
    parser.add_argument("--queries", type=int, default=300, help="test queries for parts 1-2 (default all 300)")
    parser.add_argument("--train-queries", type=int, default=200, help="train queries for parts 3-4 (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per configuration (default 3)")
    parser.add_argument("--score-calls", type=int, default=300, help="scoring calls per run in part 3 (default 300)")
    parser.add_argument("--skip-http", action="store_true")
    args = parser.parse_args(argv)

    import xgboost

    from eval.datasets import load_dataset
    from indexing.home import resolve_home

    home = resolve_home(args.home)
    queries = list(load_dataset(Path(args.dataset), "test").queries.values())[: args.queries]
    log(f"xgboost {xgboost.__version__}, numpy {np.__version__}; {os.cpu_count()} cpus, load average "
        f"{os.getloadavg()[0]:.2f}; home {home}, index {args.name}, rounds {args.rounds}")
    sections: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench_ltr-", dir=RESULTS))
    try:
        started = time.perf_counter()
        snapshot = in_process_pipeline(home, args.name, write_config(workdir, workdir / "events-inprocess.sqlite3"))
        if "ltr" not in snapshot.pipelines:
            raise SystemExit(f"index '{args.name}' at {home} does not serve 'ltr': {snapshot.model_error}")
        ltr = snapshot.pipelines["ltr"].first_stage
        log(f"index {snapshot.index.name} generation {snapshot.index.generation_id}, {len(snapshot.index):,} documents; "
            f"model {snapshot.model_version}; rerank window {snapshot.pipelines['ltr'].window}; "
            f"loaded in {time.perf_counter() - started:.1f}s")
        started = time.perf_counter()
        sections["in_process"] = bench_in_process(args, snapshot, queries)
        seconds["in_process"] = time.perf_counter() - started
        started = time.perf_counter()
        single = single_thread_ltr(snapshot.pipelines["ltr"]).first_stage  # part 4's peer: see the docstring
        sections["training"], rows = bench_training_rows(args, snapshot.index, single)
        seconds["training"] = time.perf_counter() - started
        started = time.perf_counter()
        sections["scoring"] = bench_scoring(args, ltr.model, rows)
        seconds["scoring"] = time.perf_counter() - started
        log(f"   seconds per part so far: {json.dumps({k: round(v) for k, v in seconds.items()})}")
        del snapshot, ltr, single, rows
        gc.collect()
        if args.skip_http:
            log("\n== 2. HTTP: skipped (--skip-http)")
        else:
            started = time.perf_counter()
            sections["http"] = bench_http(args, home, workdir, queries)
            seconds["http"] = time.perf_counter() - started
            log(f"   part took {seconds['http']:.0f}s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if "in_process" in sections:
        print_stages(sections["in_process"]["_stages"])
    table = final_table(sections)
    print_final(table)
    out = RESULTS / f"bench_ltr-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"argv": sys.argv[1:], "seconds": seconds, "sections": sections, "final": table}, indent=2,
                              default=str))
    log(f"results: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
