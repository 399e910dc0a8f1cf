"""Serving at the limit, in process: per-stage p50/p99 and nDCG@10 of bm25, hybrid-convex and ltr with
the fp32 and the int8 encoder, against the plain peer, all in one run, one query at a time.

    .venv/bin/python bench/bench_serving.py --home /tmp/h17/home --dataset ../shared/datasets/scifact \
        --fp32 scifact --int8 scifact-int8 --out bench/results/bench_serving.json [--compile int8]

Two indexes of the same corpus, built with `EncoderSettings(form="fp32")` and `form="int8"`.

- **Peer** (the issue's plain stack): bm25s (numpy backend, Lucene BM25, k1=0.9 b=0.4, the same
  stemmer and stop words) top-200 + numpy exact dense top-200 with the same fp32 ONNX encoder, the
  union, and a 10-feature LambdaMART (BM25 of title / text / both, cosine, cosine gap to the
  best, BM25 and dense ranks, RRF, title and text lengths; xgboost rank:ndcg, 200 rounds) trained
  on the train split.
- **Ours**, for each form: `bm25`, `hybrid-convex` and `ltr` (LtrPipeline fitted on the train
  split, as `ltr-search eval` fits it). With `--compile FORM`, that form's `ltr` again with its trees compiled
  (ltr.compiled_trees), and a `trees` section timing XGBoost inplace_predict, the compiled
  library and ONNX Runtime's TreeEnsemble (onnxmltools) on the same windows, back to back.

Every variant runs on each query before the next query (interleaved), so machine load hits all
alike; ratios are taken from this run. Caches are cleared before each call (the query-vector LRU,
the ltr window cache): the figures are the work, not the cache. Query encoding is timed inside the
pipelines through a timing wrapper around the index's encoder.
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

import xgboost  # noqa: E402

from bench.bench_service import B, DEPTH, K1, RRF_K, JsonlFields, peer_tokenizer  # noqa: E402
from eval.datasets import load_dataset  # noqa: E402
from eval.metrics import evaluate_run  # noqa: E402
from indexing.encoder import EncoderSettings, OnnxEncoder, encoder_dir_for  # noqa: E402
from bench.bench_trees import log, onnx_scorer, pct, time_scorers  # noqa: E402
from ltr.compiled_trees import DEFAULT_COMPILER, compile_trees, load_library  # noqa: E402
from ltr.ranker import LtrPipeline  # noqa: E402
from ltr.registry import predict_scores, single_threaded  # noqa: E402
from ltr.training import TrainingSettings  # noqa: E402
from search.embedded import EmbeddedIndex  # noqa: E402
from search.hybrid import FusionSettings, HybridPipeline  # noqa: E402
from search.pipelines import BM25Pipeline, DensePipeline  # noqa: E402

K = 10


class TimedEncoder:
    """The index's encoder with its `encode_query` timed (and its LRU cleared per call)."""

    def __init__(self, inner: OnnxEncoder):
        self.inner, self.ms = inner, 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode_query(self, text: str) -> np.ndarray:
        self.inner.clear_query_cache()
        started = time.perf_counter()
        vector = self.inner.encode_query(text)
        self.ms += (time.perf_counter() - started) * 1000
        return vector


# ---------------------------------------------------------------- the peer


class Peer:
    """bm25s + numpy exact dense + the same ONNX encoder + a 10-feature LambdaMART."""

    FEATURES = ("bm25_all", "bm25_title", "bm25_text", "cosine", "cosine_gap", "bm25_rank", "dense_rank", "rrf",
                "len_title", "len_text")

    def __init__(self, corpus: Path, embeddings: np.ndarray, encoder: OnnxEncoder):
        import bm25s

        self.fields = JsonlFields(corpus)
        self.tokenize = peer_tokenizer()
        titles, texts = [], []
        with open(corpus, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    record = json.loads(line)
                    titles.append(record.get("title") or "")
                    texts.append(record.get("text") or "")
        self.retrievers = {}
        lengths = {}
        for name, docs in (("all", [f"{a} {b}" for a, b in zip(titles, texts)]), ("title", titles), ("text", texts)):
            tokens = self.tokenize(docs, return_ids=True)
            lengths[name] = np.array([len(t) for t in tokens.ids], dtype=np.float32)
            if not lengths[name].any():  # e.g. a corpus without titles: the feature is 0
                continue
            retriever = bm25s.BM25(k1=K1, b=B, method="lucene", backend="numpy")
            retriever.index(tokens, show_progress=False)
            self.retrievers[name] = retriever
        self.len_title, self.len_text = lengths["title"], lengths["text"]
        self.embeddings = embeddings
        self.encoder = encoder
        self.booster: xgboost.Booster | None = None

    def window(self, query: str, ms: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
        """(candidate rows, feature matrix) of a query; stage times added to `ms`."""
        started = time.perf_counter()
        tokens = self.tokenize([query], return_ids=False)
        result = self.retrievers["all"].retrieve(tokens, k=min(DEPTH, len(self.fields.ids)), show_progress=False,
                                                 backend_selection="numpy", n_threads=0)
        lexical = result.documents[0][result.scores[0] > 0]
        t1 = time.perf_counter()
        vector = self.encoder.encode([query])[0]
        t2 = time.perf_counter()
        scores = self.embeddings @ vector
        top = np.argpartition(-scores, DEPTH - 1)[:DEPTH]
        semantic = top[np.argsort(-scores[top], kind="stable")]
        t3 = time.perf_counter()
        rows = np.concatenate([lexical, semantic[~np.isin(semantic, lexical)]]).astype(np.int64)
        bm25_rank = np.full(len(rows), np.nan)
        bm25_rank[: len(lexical)] = np.arange(1, len(lexical) + 1)
        dense_rank = np.full(len(rows), np.nan)
        position = {int(r): i for i, r in enumerate(rows.tolist())}
        dense_rank[[position[int(r)] for r in semantic.tolist()]] = np.arange(1, len(semantic) + 1)
        rrf = np.nan_to_num(1 / (RRF_K + bm25_rank)) + np.nan_to_num(1 / (RRF_K + dense_rank))
        per_field = {name: r.get_scores(tokens[0])[rows] if (r := self.retrievers.get(name)) else np.zeros(len(rows))
                     for name in ("all", "title", "text")}
        cosine = scores[rows]
        features = np.column_stack([per_field["all"], per_field["title"], per_field["text"], cosine,
                                    cosine - cosine.max(), bm25_rank, dense_rank, rrf, self.len_title[rows],
                                    self.len_text[rows]]).astype(np.float32)
        t4 = time.perf_counter()
        ms["bm25_retrieval"] = ms.get("bm25_retrieval", 0) + (t1 - started) * 1000
        ms["query_encoding"] = ms.get("query_encoding", 0) + (t2 - t1) * 1000
        ms["dense_retrieval"] = ms.get("dense_retrieval", 0) + (t3 - t2) * 1000
        ms["features"] = ms.get("features", 0) + (t4 - t3) * 1000
        return rows, features

    def fit(self, queries: dict[str, str], qrels: dict[str, dict[str, int]]) -> None:
        xs, ys, groups = [], [], []
        for query_id, text in queries.items():
            rows, features = self.window(text, {})
            judged = qrels.get(query_id, {})
            xs.append(features)
            ys.append(np.array([judged.get(self.fields.ids[r], 0) for r in rows.tolist()], dtype=np.float32))
            groups.append(len(rows))
        matrix = xgboost.DMatrix(np.vstack(xs), label=np.concatenate(ys), missing=np.nan)
        matrix.set_group(groups)
        params = {"objective": "rank:ndcg", "eta": 0.1, "max_depth": 6, "min_child_weight": 1, "nthread": 2, "seed": 0}
        self.booster = single_threaded(xgboost.train(params, matrix, num_boost_round=200))

    def search(self, query: str, ms: dict[str, float]) -> dict[str, float]:
        rows, features = self.window(query, ms)
        started = time.perf_counter()
        scores = self.booster.inplace_predict(features, missing=np.nan)
        top = np.argsort(-scores, kind="stable")[:K]
        page = {self.fields.ids[r]: float(scores[i]) for i, r in zip(top.tolist(), rows[top].tolist())}
        ms["model_scoring"] = (time.perf_counter() - started) * 1000
        return page


# ---------------------------------------------------------------- ours


class CompiledModel:
    """A fitted model whose `predict` runs compiled trees (explanations stay on the original)."""

    def __init__(self, model: Any, compiled: Any):
        self.model, self.compiled, self.version = model, compiled, f"{model.version}+compiled"

    @property
    def stage(self) -> Any:
        return self.model.stage

    def predict(self, features: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
        return self.compiled.predict(features, base)

    def contributions(self, features: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
        return self.model.contributions(features, base)


def compiled_copy(pipeline: LtrPipeline, workdir: Path, sample: np.ndarray) -> LtrPipeline | None:
    trained = pipeline.trained
    if trained is None or trained.link is not None:
        return None
    path = workdir / f"{pipeline.backend.name}.json"
    trained.booster.save_model(str(path))
    started = time.perf_counter()
    library = compile_trees(path, sample, workdir / f"{pipeline.backend.name}.so")
    log(f"   compiled {trained.booster.num_boosted_rounds()} trees in {time.perf_counter() - started:.0f}s")
    twin = LtrPipeline(pipeline.backend, CompiledModel(pipeline.model, load_library(library, DEFAULT_COMPILER, trained.booster)),
                       pipeline.features, pipeline.fusion, name=f"{pipeline.name}+compiled")
    return twin


def ltr_call(pipeline: LtrPipeline, encoder: TimedEncoder) -> Callable[[str, dict[str, float]], dict[str, float]]:
    def call(query: str, ms: dict[str, float]) -> dict[str, float]:
        pipeline._cache.clear()  # bench: the work, not the window cache
        encoder.ms = 0.0
        window = pipeline.rank_window(query)
        started = time.perf_counter()
        hits = window.page(K)
        ms["page"] = (time.perf_counter() - started) * 1000
        ms.update({f"{k}": v for k, v in window.timings_ms.items()})
        ms["query_encoding"] = encoder.ms
        ms["retrieve"] = ms["retrieve"] - encoder.ms  # retrieval without the encoder
        return {h.doc_id: float(h.score) for h in hits}

    return call


def plain_call(pipeline: Any, encoder: TimedEncoder | None) -> Callable[[str, dict[str, float]], dict[str, float]]:
    def call(query: str, ms: dict[str, float]) -> dict[str, float]:
        if encoder is not None:
            encoder.ms = 0.0
        hits = pipeline.search(query, K)
        if encoder is not None:
            ms["query_encoding"] = encoder.ms
        return {h.doc_id: float(h.score) for h in hits}

    return call


def trees_section(pipeline: LtrPipeline, compiled: LtrPipeline, queries: list[str], limit: int) -> dict[str, Any]:
    """XGBoost inplace_predict vs the compiled trees vs ONNX TreeEnsemble on the same real windows
    (bench/bench_trees.py times more: every compiler and SIMD path, 400-row windows)."""
    from ltr.features import extract_features
    from ltr.ranker import window_base
    from ltr.training import candidate_window

    booster = pipeline.trained.booster
    names = list(pipeline.trained.feature_names)
    windows = []
    for query in queries[:limit]:
        window = candidate_window(pipeline.backend, query, pipeline.fusion)
        windows.append((extract_features(pipeline.backend, query, window, pipeline.features),
                        window_base(pipeline.model, window)))
    scorers = {"xgboost inplace_predict": lambda x, b: predict_scores(booster, names, x, b),
               f"{DEFAULT_COMPILER} compiled": compiled.model.predict}
    try:
        scorers["onnxruntime TreeEnsemble"] = onnx_scorer(booster, len(names), *windows[0], names)
    except Exception as exc:  # an optional candidate
        log(f"   onnx TreeEnsemble unavailable: {exc}")
    by_method = time_scorers(scorers, windows, scorers["xgboost inplace_predict"], repeats=1)
    sizes = [len(x) for x, _ in windows]
    return {"windows": len(windows), "window_rows_median": int(np.median(sizes)), "trees": booster.num_boosted_rounds(),
            "by_method": by_method}


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--fp32", default="scifact", help="index built with the fp32 encoder")
    parser.add_argument("--int8", default="scifact-int8", help="the same corpus built with the int8 encoder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--queries", type=int, default=0, help="first N test queries (0: all)")
    parser.add_argument("--train-queries", type=int, default=0, help="first N training queries (0: all; smoke tests)")
    parser.add_argument("--selection", choices=("inner-cv", "holdout"), default=TrainingSettings().selection,
                        help="how ltr is trained (default: the engine's default, as `ltr-search eval` trains it)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--compile", choices=("fp32", "int8"), default=None,
                        help="also ltr of this form with compiled trees, and the trees section on its windows")
    parser.add_argument("--threads", type=int, default=None, help="encoder intra-op threads (default: all cores)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/bench_serving.json")
    args = parser.parse_args()

    test = load_dataset(args.dataset, args.split)
    train = load_dataset(args.dataset, args.train_split)
    if args.train_queries:
        keep = dict(list(train.queries.items())[: args.train_queries])
        train = type(train)(train.path, train.split, keep, {q: train.qrels[q] for q in keep})
    queries = list(test.queries.items())[: args.queries or None]
    variants: dict[str, Callable[[str, dict[str, float]], dict[str, float]]] = {}
    fits: dict[str, float] = {}
    ltr_pipelines: dict[str, LtrPipeline] = {}
    workdir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    for form, name in (("fp32", args.fp32), ("int8", args.int8)):
        index = EmbeddedIndex.open(args.home, name, encoder_threads=args.threads)
        if index.encoder.form != form:
            raise SystemExit(f"index '{name}' was built with the {index.encoder.form} encoder, not {form}")
        encoder = TimedEncoder(index.encoder)
        index.encoder = encoder
        if form == "fp32":  # BM25 does not depend on the encoder
            variants["bm25"] = plain_call(BM25Pipeline(index), None)
        variants[f"dense {form}"] = plain_call(DensePipeline(index), encoder)
        variants[f"hybrid-convex {form}"] = plain_call(
            HybridPipeline(index, FusionSettings(method="convex"), name="hybrid-convex"), encoder)
        started = time.perf_counter()
        log(f"fitting ltr on {len(train.queries)} {args.train_split} queries of '{name}' ...")
        ltr = LtrPipeline(index, settings=TrainingSettings(selection=args.selection)).fit(train.queries, train.qrels)
        fits[f"ltr {form}"] = round(time.perf_counter() - started, 1)
        ltr_pipelines[form] = ltr
        variants[f"ltr {form}"] = ltr_call(ltr, encoder)
        if args.compile and form == args.compile:
            sample_window = ltr.rank_window(queries[0][1])
            twin = compiled_copy(ltr, workdir, sample_window.features)
            if twin is not None:
                variants[f"ltr {form} compiled"] = ltr_call(twin, encoder)
                ltr_pipelines[f"{form} compiled"] = twin

    fp32_index = ltr_pipelines["fp32"].backend
    embeddings = np.asarray(fp32_index.vectors.embeddings if hasattr(fp32_index.vectors, "embeddings")
                            else np.load(fp32_index.generation.path / "vectors" / "embeddings.npy"), dtype=np.float32)
    peer_encoder = OnnxEncoder(encoder_dir_for(args.home, EncoderSettings(form="fp32")), args.threads)
    log("building the peer (bm25s x3) and fitting its LambdaMART ...")
    started = time.perf_counter()
    peer = Peer(Path(fp32_index.generation.manifest["corpus"]["file"]), embeddings, peer_encoder)
    peer.fit(train.queries, train.qrels)
    fits["peer"] = round(time.perf_counter() - started, 1)
    variants = {"peer (bm25s + numpy dense + LambdaMART-10)": peer.search, **variants}

    stage_ms: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    totals: dict[str, list[float]] = {v: [] for v in variants}
    runs: dict[str, dict[str, dict[str, float]]] = {v: {} for v in variants}
    load = [os.getloadavg()[0]]
    log(f"timing {len(variants)} variants on {len(queries)} queries (interleaved) ...")
    for i, (query_id, text) in enumerate(queries[: args.warmup] + queries):
        timed = i >= args.warmup
        for name, call in variants.items():
            ms: dict[str, float] = {}
            started = time.perf_counter()
            page = call(text, ms)
            total = (time.perf_counter() - started) * 1000
            if timed:
                totals[name].append(total)
                for stage, value in ms.items():
                    stage_ms[name].setdefault(stage, []).append(value)
                runs[name][query_id] = page
        if i % 50 == 0:
            load.append(os.getloadavg()[0])
            log(f"   {i}/{len(queries) + args.warmup}")
    load.append(os.getloadavg()[0])

    peer_name = next(iter(variants))
    results: dict[str, Any] = {}
    for name in variants:
        judged = {query_id: test.qrels[query_id] for query_id, _ in queries}  # the queries run, not the split
        ndcg = float(np.mean(evaluate_run(runs[name], judged, ["nDCG@10"]).values["nDCG@10"]))
        results[name] = {"end_to_end": pct(totals[name]), "stages": {s: pct(v) for s, v in stage_ms[name].items()},
                         "nDCG@10": round(ndcg, 4)}
    peer_p50 = results[peer_name]["end_to_end"]["p50"]
    for name, result in results.items():
        result["p50_ratio_to_peer"] = round(result["end_to_end"]["p50"] / peer_p50, 3)
        result["p99_over_own_p50"] = round(result["end_to_end"]["p99"] / result["end_to_end"]["p50"], 3)
    for metric_name in ("dense", "hybrid-convex", "ltr"):
        a, b = results.get(f"{metric_name} fp32"), results.get(f"{metric_name} int8")
        if a and b:
            b["nDCG@10_loss_vs_fp32"] = round(a["nDCG@10"] - b["nDCG@10"], 4)
            b["p50_speedup_vs_fp32"] = round(a["end_to_end"]["p50"] / b["end_to_end"]["p50"], 3)
            qa, qb = a["stages"]["query_encoding"]["p50"], b["stages"]["query_encoding"]["p50"]
            b["query_encoding_speedup_vs_fp32"] = round(qa / qb, 3) if qb else None

    report: dict[str, Any] = {
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=ROOT).stdout.strip(),
        "dataset": str(args.dataset.name), "split": args.split, "queries": len(queries), "k": K,
        "indexes": {"fp32": args.fp32, "int8": args.int8}, "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "load_average_during_run": [round(x, 2) for x in load], "unit": "ms, wall clock, one query at a time",
        "fit_seconds": fits, "peer": peer_name, "variants": results,
    }
    if args.compile and f"{args.compile} compiled" in ltr_pipelines:
        log("trees: xgboost vs compiled vs onnx on the same windows ...")
        report["trees"] = trees_section(ltr_pipelines[args.compile], ltr_pipelines[f"{args.compile} compiled"],
                                        [t for _, t in queries], 100)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")

    print(f"{'variant':44s} {'p50':>8s} {'p99':>8s} {'xpeer':>6s} {'nDCG@10':>8s}  stages p50")
    for name, r in results.items():
        stages = ", ".join(f"{s} {v['p50']:.2f}" for s, v in r["stages"].items())
        print(f"{name:44s} {r['end_to_end']['p50']:8.2f} {r['end_to_end']['p99']:8.2f} {r['p50_ratio_to_peer']:6.2f} "
              f"{r['nDCG@10']:8.4f}  {stages}")
    if "trees" in report:
        for name, r in report["trees"]["by_method"].items():
            print(f"trees: {name:28s} p50 {r['p50']:.3f} ms  p99 {r['p99']:.3f}  max|diff| {r['max_abs_diff_vs_xgboost']:.2g}")
    print(f"load average during the run: {report['load_average_during_run']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
