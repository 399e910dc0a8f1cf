"""A live index: rebuild after a small change (vector cache) and upserts/deletes between rebuilds.

    python bench/bench_live_index.py                     # both parts on SciFact
    python bench/bench_live_index.py --part rebuild      # cold build vs rebuild after a 1% change
    python bench/bench_live_index.py --part live         # upserts, deltas, query latency, compaction, churn nDCG
    python bench/bench_live_index.py --part latency --live-kinds bm25   # only the query latency at 0/1/10/30%
    python bench/bench_live_index.py --part latency --live-kinds bm25 --synthetic-docs 50000  # and a larger base

Part "rebuild" (dense, the costly case; issue 18 goal: <= 10% of a cold build, same result):
  1. cold build of SciFact in a fresh home (empty vector cache)               -> cold_s
  2. a copy of the corpus with 1% of the documents' text changed;
     `rebuild --dataset COPY` in the same home (cache hits for the other 99%) -> rebuild_s
  3. cold build of the copy in a second fresh home (the peer it must equal)   -> cold_changed_s
  ratio = rebuild_s / mean(cold_s, cold_changed_s) (wall), and the same of process CPU time
  (all threads; steadier than wall time on a loaded machine); parity: BM25 and document-store files
  byte-identical (SHA-256 of the manifests' file lists), embeddings max |diff| (<= 1e-6 asked).
Part "live": see `live_part` (its home, bench/results/live-home, keeps a vector cache between runs).

Every timing is wall time on a shared, loaded machine; the ratios are measured back to back in
one process. Writes bench/results/bench_live_index.json (one key per part, merged).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "bench_live_index.json"
DATASETS = Path(os.environ.get("LTR_SEARCH_DATASETS", ROOT.parent / "shared" / "datasets"))


def quiet(_: str) -> None:
    pass


def changed_copy(corpus: Path, out: Path, fraction: float, seed: int = 18) -> list[str]:
    """Copy a BEIR corpus, appending a sentence to the text of `fraction` of its documents."""
    lines = corpus.read_text(encoding="utf-8").splitlines()
    rng = np.random.default_rng(seed)
    picked = set(rng.choice(len(lines), size=max(1, round(fraction * len(lines))), replace=False).tolist())
    changed = []
    with open(out, "w", encoding="utf-8") as handle:
        for i, line in enumerate(lines):
            record = json.loads(line)
            if i in picked:
                record["text"] = record["text"] + " This abstract was revised for the live index benchmark."
                changed.append(record["_id"])
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return changed


def fresh_home(root: Path, name: str, encoders: Path) -> Path:
    """A new engine home sharing the exported encoder (the export is not what is measured)."""
    home = root / name
    home.mkdir()
    (home / "encoders").symlink_to(encoders, target_is_directory=True)
    return home


def rebuild_part(scifact: Path, fraction: float) -> dict:
    from indexing.build import BuildSettings, build_index, rebuild_index
    from indexing.corpus import CorpusSpec
    from indexing.encoder import EncoderSettings, ensure_onnx_encoder

    root = Path(tempfile.mkdtemp(prefix="bench-live-"))
    try:
        encoder_home = root / "encoder-home"
        ensure_onnx_encoder(encoder_home, EncoderSettings(), progress=False)
        encoders = encoder_home / "encoders"
        changed_corpus = root / "changed.jsonl"
        changed = changed_copy(scifact / "corpus.jsonl", changed_corpus, fraction)

        home = fresh_home(root, "home", encoders)
        started, cpu = time.perf_counter(), time.process_time()
        cold = build_index(home, "scifact", BuildSettings(corpus=CorpusSpec(str(scifact))), progress=False, log=quiet)
        cold_s, cold_cpu = time.perf_counter() - started, time.process_time() - cpu
        keep_cache(home)  # the live part's dense index then costs no encoding
        print(f"cold build: {cold_s:.1f} s", flush=True)

        started, cpu = time.perf_counter(), time.process_time()
        warm = rebuild_index(home, "scifact", progress=False, log=quiet, dataset=changed_corpus)
        rebuild_s, rebuild_cpu = time.perf_counter() - started, time.process_time() - cpu
        print(f"rebuild after {len(changed)} changed documents: {rebuild_s:.1f} s "
              f"({warm.vectors_encoded} encoded, {warm.vectors_cached} from the cache)", flush=True)

        peer_home = fresh_home(root, "peer", encoders)
        started, cpu = time.perf_counter(), time.process_time()
        peer = build_index(peer_home, "scifact", BuildSettings(corpus=CorpusSpec(str(changed_corpus))),
                           progress=False, log=quiet)
        cold_changed_s, peer_cpu = time.perf_counter() - started, time.process_time() - cpu
        print(f"cold build of the changed corpus: {cold_changed_s:.1f} s", flush=True)

        files_warm = json.loads((warm.path / "manifest.json").read_text())["files"]
        files_peer = json.loads((peer.path / "manifest.json").read_text())["files"]
        differing = sorted(f for f in files_warm if files_warm[f]["sha256"] != files_peer.get(f, {}).get("sha256"))
        a = np.load(warm.path / "vectors" / "embeddings.npy")
        b = np.load(peer.path / "vectors" / "embeddings.npy")
        max_diff = float(np.abs(a - b).max())
        cold_mean = (cold_s + cold_changed_s) / 2
        return {
            "dataset": "scifact",
            "documents": cold.documents,
            "changed_documents": len(changed),
            "changed_fraction": fraction,
            "cold_build_s": round(cold_s, 2),
            "cold_build_changed_corpus_s": round(cold_changed_s, 2),
            "rebuild_after_change_s": round(rebuild_s, 2),
            "rebuild_over_cold": round(rebuild_s / cold_mean, 4),
            "cpu_s": {"cold": round(cold_cpu, 1), "rebuild": round(rebuild_cpu, 1), "cold_changed": round(peer_cpu, 1)},
            "rebuild_over_cold_cpu": round(rebuild_cpu / ((cold_cpu + peer_cpu) / 2), 4),
            "vectors_encoded": warm.vectors_encoded,
            "vectors_from_cache": warm.vectors_cached,
            "rebuild_phases_s": {k: round(v, 2) for k, v in warm.seconds.items()},
            "files_differing_from_cold_build": differing,
            "bm25_and_docs_identical": not [f for f in differing if not f.startswith("vectors/")],
            "embeddings_max_abs_diff": max_diff,
            "embeddings_within_1e-6": max_diff <= 1e-6,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


LIVE_HOME = ROOT / "bench" / "results" / "live-home"  # ignored by git; its vector cache makes reruns cheap


def keep_cache(home: Path) -> None:
    """Copy a bench home's vector cache into LIVE_HOME (SQLite's backup API: consistent while open)."""
    import sqlite3

    source = home / "cache" / "vectors.sqlite3"
    target = LIVE_HOME / "cache" / "vectors.sqlite3"
    if not source.exists() or target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)


def _timed(fn, *args, **kwargs) -> tuple[object, float]:
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - started


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000
    return {"mean_ms": round(float(ms.mean()), 3), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def churned(documents: list, fraction: float, seed: int) -> list:
    """`fraction` of the documents with a sentence of another random document appended (their
    statistics change: what a delta segment's frozen statistics lag behind)."""
    from indexing.corpus import Document

    rng = np.random.default_rng(seed)
    picked = rng.choice(len(documents), size=round(fraction * len(documents)), replace=False)
    donors = rng.choice(len(documents), size=len(picked))
    out = []
    for i, j in zip(picked.tolist(), donors.tolist()):
        doc, donor = documents[i], documents[j]
        sentence = donor.text.split(". ")[0]
        out.append(Document(doc.id, doc.title, f"{doc.text} {sentence}", doc.metadata))
    return out


def _ndcg(index, queries: dict, qrels: dict, vectors: dict | None) -> float:
    from eval.metrics import evaluate_run

    run = {}
    for qid, text in queries.items():
        got = index.retrieve_dense(vectors[qid], 10) if vectors is not None else index.retrieve_bm25(text, 10)
        run[qid] = dict(zip(got.doc_ids, got.scores.tolist()))
    return evaluate_run(run, qrels, ["nDCG@10"]).mean()["nDCG@10"]


def live_part(scifact: Path, kinds: tuple[str, ...] = ("bm25", "dense"), latency_only: bool = False) -> dict:
    """BM25 only, then with dense vectors (`dense_too`), on SciFact and its 300 test queries:
      - sustained upsert throughput (batches of 100 unchanged documents, as fast as they go);
      - time to visible at a paced 100 documents/s (5 documents a write every 50 ms, a second index object
        of the same process polls for it: what another process sees, since it goes through the file);
      - query latency with a delta of 0% (compacted), 1%, 10%, 30%: see `latency_part`;
      - nDCG@10 at 10% churn (text changed) before compaction against after (= a cold build of
        the same corpus: the parity test), for BM25 and dense.
    """
    from eval.datasets import read_qrels, read_queries
    from indexing.build import BuildSettings, build_index, compact_index
    from indexing.corpus import CorpusSpec, Document, read_corpus
    from indexing.encoder import EncoderSettings, ensure_onnx_encoder
    from indexing.updates import write_updates
    from search.embedded import EmbeddedIndex

    qrels = read_qrels(scifact / "qrels" / "test.tsv")
    queries = {q: t for q, t in read_queries(scifact / "queries.jsonl").items() if q in qrels}
    documents = read_corpus(CorpusSpec(str(scifact))).documents
    out: dict = {"queries": len(queries), "documents": len(documents)}
    LIVE_HOME.mkdir(parents=True, exist_ok=True)
    ensure_onnx_encoder(LIVE_HOME, EncoderSettings(), progress=False)
    for dense in [kind == "dense" for kind in kinds]:
        label = "dense" if dense else "bm25"
        if latency_only:
            out[label] = {"query_latency": latency_part(scifact, documents, queries, qrels, dense)}
            continue
        name = f"live-{label}"
        home = LIVE_HOME
        build_index(home, name, BuildSettings(corpus=CorpusSpec(str(scifact)), dense=dense, keep=0),
                    progress=False, log=quiet)
        index = EmbeddedIndex.open(home, name)
        vectors = {q: index.encode_query(t) for q, t in queries.items()} if dense else None
        result: dict = {}

        # sustained upsert throughput: unchanged documents (dense: their vectors come from the cache)
        batch = documents[:1000] if not dense else documents[:300]
        encoder = index.encoder  # the service's writes reuse its open encoder too
        _, seconds = _timed(lambda: [write_updates(home, name, batch[i:i + 100], encoder=encoder)
                                     for i in range(0, len(batch), 100)])
        result["upsert_throughput_docs_per_s"] = round(len(batch) / seconds, 1)
        if dense:  # new text: every document encoded on the write path
            fresh = churned(documents, 100 / len(documents), seed=7)
            _, seconds = _timed(lambda: [write_updates(home, name, fresh[i:i + 50], encoder=encoder)
                                         for i in range(0, len(fresh), 50)])
            result["upsert_throughput_encoding_docs_per_s"] = round(len(fresh) / seconds, 1)
        compact_index(home, name, log=quiet)

        # time to visible at a paced 100 docs/s
        reader = EmbeddedIndex.open(home, name)
        visible, started = [], time.perf_counter()
        n_paced, per_write = (300, 5) if not dense else (100, 5)  # 5 documents every 50 ms
        for i in range(0, n_paced, per_write):
            token = f"zzlive{label}{i}q"
            write_updates(home, name, [Document(f"live-{i + j}", "", f"{token} probe document {j}")
                                       for j in range(per_write)], encoder=encoder)
            acked = time.perf_counter()
            while len(reader.retrieve_bm25(token, per_write).doc_ids) < per_write:
                pass
            visible.append(time.perf_counter() - acked)
            time.sleep(max(0.0, started + (i + per_write) / 100 - time.perf_counter()))
        result["time_to_visible_at_100_docs_per_s"] = {**_percentiles(visible), "documents": n_paced, "per_write": per_write,
                                                       "achieved_docs_per_s": round(n_paced / (time.perf_counter() - started), 1)}
        compact_index(home, name, log=quiet)

        # nDCG@10 at 10% churn: live (frozen statistics) vs compacted (= cold build)
        changes = churned(documents, 0.10, seed=11)
        for start in range(0, len(changes), 500):
            write_updates(home, name, changes[start:start + 500], encoder=encoder)
        live = EmbeddedIndex.open(home, name)
        before = _ndcg(live, queries, qrels, vectors)
        bm25_before = _ndcg(live, queries, qrels, None)
        compact_index(home, name, log=quiet)
        compacted = EmbeddedIndex.open(home, name)
        after = _ndcg(compacted, queries, qrels, vectors)
        bm25_after = _ndcg(compacted, queries, qrels, None)
        result["ndcg10_at_10pct_churn"] = {
            "bm25_live": round(bm25_before, 5), "bm25_compacted": round(bm25_after, 5),
            "bm25_difference": round(bm25_before - bm25_after, 5)}
        if dense:
            result["ndcg10_at_10pct_churn"].update(dense_live=round(before, 5), dense_compacted=round(after, 5),
                                                   dense_difference=round(before - after, 5))
        result["query_latency"] = latency_part(scifact, documents, queries, qrels, dense)
        out[label] = result
        print(json.dumps({label: result}, indent=2), flush=True)
    return out


FRACTIONS = (0.0, 0.01, 0.10, 0.30)


def _label(fraction: float) -> str:
    return f"{round(fraction * 100)}%"


def latency_part(scifact: Path, documents: list, queries: dict, qrels: dict, dense: bool,
                 train_queries: int = 200, repeat: int = 3, corpus: Path | None = None,
                 fractions: tuple[float, ...] = FRACTIONS, label: str | None = None) -> dict:
    """Query latency with a delta of 0% (compacted: a build of the same final corpus, which is
    what compaction yields), 1%, 10% and 30% of the corpus, all four indexes open in one process
    and measured per query back to back, in a rotating order (machine load hits all alike):
      - raw: `retrieve_bm25` top 100 (and `retrieve_dense` top 100 from a precomputed vector);
      - request: a whole `RankingPipeline.run` (the service's path: retrieval, the ranker, the
        page's stored fields) for `bm25`, and on a dense index `hybrid-convex` and `ltr` (a
        LambdaMART fitted here on `train_queries` SciFact train queries; its window cache is
        cleared before each request, query vectors come from the warm encoder LRU, the same for all).
    `corpus`: build from this corpus instead of SciFact's (BM25 only; `synthetic_latency`).
    The deltas re-upsert unchanged documents, so every index holds the same final corpus; then
    each delta is compacted (compaction_s). Overheads are ratios to the 0% index minus 1: of the
    means and medians of all samples, and `paired`: the median over queries of (the query's fastest
    of `repeat` runs on this index / its fastest on the 0% index) - 1, the figure least moved by
    other processes' load on a shared machine."""
    from eval.datasets import read_qrels, read_queries
    from indexing.build import BuildSettings, build_index, compact_index
    from indexing.corpus import CorpusSpec
    from indexing.updates import write_updates
    from ltr.ranker import LtrPipeline
    from ltr.training import TrainingSettings
    from search.app.pipelines import create_pipeline
    from search.embedded import EmbeddedIndex
    from search.limits import DEFAULT_RERANK_WINDOW
    from search.ranking import RankingPipeline, RankingRequest

    label = label or ("dense" if dense else "bm25")
    home = LIVE_HOME
    rng = np.random.default_rng(3)
    indexes = {}
    for fraction in fractions:
        name = f"lat-{label}-{round(fraction * 100)}"
        built = build_index(home, name, BuildSettings(corpus=CorpusSpec(str(corpus or scifact)), dense=dense, keep=1),
                            progress=False, log=quiet)
        print(f"built {name}: {built.vectors_encoded} vectors encoded, {built.vectors_cached} from the cache", flush=True)
        picked = rng.choice(len(documents), size=round(fraction * len(documents)), replace=False)
        index = EmbeddedIndex.open(home, name)
        for start in range(0, len(picked), 1000):
            write_updates(home, name, [documents[i] for i in picked[start:start + 1000]], encoder=index.encoder)
        indexes[_label(fraction)] = index
    print(f"{label}: deltas " + ", ".join(f"{k} {v.live_status()['delta_rows']}" for k, v in indexes.items()), flush=True)

    pipelines = {"bm25": lambda index: create_pipeline("bm25", index)}
    fitted_on = None
    if dense:
        pipelines["hybrid-convex"] = lambda index: create_pipeline("hybrid-convex", index)
        train_qrels = read_qrels(scifact / "qrels" / "train.tsv")
        train = {q: t for q, t in read_queries(scifact / "queries.jsonl").items() if q in train_qrels}
        train = dict(list(train.items())[:train_queries])
        fitted, seconds = _timed(LtrPipeline(indexes["0%"], settings=TrainingSettings(
            selection="holdout", max_rounds=300, early_stopping_rounds=50)).fit, train, train_qrels)
        fitted_on = {"train_queries": len(train), "fit_s": round(seconds, 1), "trees": fitted.trained.trees}
        print(f"ltr fitted on {len(train)} train queries in {seconds:.1f} s", flush=True)
        pipelines["ltr"] = lambda index: LtrPipeline(index, model=fitted.model, features=fitted.features)
    served = {key: {name: RankingPipeline(index, make(index), DEFAULT_RERANK_WINDOW) for name, make in pipelines.items()}
              for key, index in indexes.items()}
    vectors = {key: {q: index.encode_query(t) for q, t in queries.items()} for key, index in indexes.items()} if dense else None

    samples: dict[str, dict[str, list[float]]] = {key: {} for key in indexes}

    def timed(key: str, metric: str, fn) -> None:
        started = time.perf_counter()
        fn()
        samples[key].setdefault(metric, []).append(time.perf_counter() - started)

    keys = list(indexes)
    for round_ in range(repeat):
        for i, (qid, text) in enumerate(queries.items()):
            shift = (i + round_) % len(keys)
            for key in keys[shift:] + keys[:shift]:
                index = indexes[key]
                analysed = index.analyse(text)
                timed(key, "raw_bm25", lambda: index.retrieve_bm25(analysed, 100))
                if dense:
                    timed(key, "raw_dense", lambda: index.retrieve_dense(vectors[key][qid], 100))
                for name, pipeline in served[key].items():
                    if name == "ltr":
                        pipeline.first_stage._cache.clear()  # the work, not the window cache
                    request = RankingRequest(text, f"r{round_}-{qid}")
                    timed(key, name, lambda: pipeline.run(request))
    out: dict = {"queries": len(queries), "repeat": repeat, "rerank_window": DEFAULT_RERANK_WINDOW}
    if fitted_on:
        out["ltr_model"] = fitted_on
    for key in keys:
        out[key] = {"delta_rows": indexes[key].live_status()["delta_rows"],
                    **{metric: _percentiles(values) for metric, values in samples[key].items()}}
    peer = out["0%"]

    def fastest(key: str, metric: str) -> np.ndarray:  # per query, its fastest run (samples are round-major)
        return np.asarray(samples[key][metric]).reshape(repeat, len(queries)).min(axis=0)

    for key in keys[1:]:
        out[key]["overhead"] = {metric: {"mean": round(out[key][metric]["mean_ms"] / peer[metric]["mean_ms"] - 1, 3),
                                         "p50": round(out[key][metric]["p50_ms"] / peer[metric]["p50_ms"] - 1, 3),
                                         "paired": round(float(np.median(fastest(key, metric) / fastest("0%", metric))) - 1, 3)}
                                for metric in samples[key]}
        _, seconds = _timed(compact_index, home, f"lat-{label}-{key.rstrip('%')}", log=quiet)
        out[key]["compaction_s"] = round(seconds, 2)
    print(json.dumps({f"{label} overheads": {k: out[k]["overhead"] for k in keys[1:]}}, indent=2), flush=True)
    return out


def synthetic_latency(docs: int, n_queries: int = 300) -> dict:
    """BM25 query latency at delta 0% and 10% on a synthetic corpus of `docs` documents
    (bench/synthetic_corpus.py, 2-8 word queries): how the delta's fixed per-query cost weighs
    against a larger base than SciFact's 5k documents."""
    from bench.synthetic_corpus import SyntheticSpec, ensure_corpus, ensure_queries, read_queries as read_synthetic
    from indexing.corpus import CorpusSpec, read_corpus

    spec = SyntheticSpec(docs=docs)
    corpus = ensure_corpus(spec, log=quiet)
    queries = dict(read_synthetic(ensure_queries(spec, n_queries, log=quiet)))
    documents = read_corpus(CorpusSpec(str(corpus))).documents
    return {"documents": len(documents), **latency_part(DATASETS / "scifact", documents, queries, {}, False, repeat=3,
                                                         corpus=corpus, fractions=(0.0, 0.10), label=f"bm25-syn{docs}")}


def merge_results(part: str, result: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    stamp = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
             "load_avg_1m": round(os.getloadavg()[0], 2)}
    if part in ("live", "latency"):  # one kind (bm25, dense), or only its query latency, may be rerun alone: keep the rest
        merged = existing.get("live", {})
        for key, value in result.items():
            if not isinstance(value, dict):
                merged[key] = value
            elif part == "latency":  # the kind's other figures keep their own stamp
                merged[key] = {**merged.get(key, {}), "query_latency": {**value["query_latency"], **stamp}}
            else:
                merged[key] = {**value, **stamp}
        existing["live"] = merged
    else:
        existing[part] = {**result, **stamp}
    RESULTS.write_text(json.dumps(existing, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["rebuild", "live", "latency", "all"], default="all",
                        help="latency: only the live part's query latency at delta 0/1/10/30%%")
    parser.add_argument("--fraction", type=float, default=0.01, help="share of documents changed before the rebuild")
    parser.add_argument("--live-kinds", default="bm25,dense", help="live part: bm25, dense or both (comma-separated)")
    parser.add_argument("--synthetic-docs", type=int, default=0,
                        help="latency part: also BM25 at delta 0%% and 10%% on a synthetic corpus of this many documents")
    args = parser.parse_args()
    scifact = DATASETS / "scifact"
    if not (scifact / "corpus.jsonl").is_file():
        print(f"skipped: SciFact not found at {scifact} (set LTR_SEARCH_DATASETS)")
        return
    if args.part in ("rebuild", "all"):
        result = rebuild_part(scifact, args.fraction)
        print(json.dumps(result, indent=2))
        merge_results("rebuild", result)
    if args.part in ("live", "latency", "all"):
        result = live_part(scifact, tuple(args.live_kinds.split(",")), latency_only=args.part == "latency")
        print(json.dumps(result, indent=2))
        if args.synthetic_docs:
            result[f"bm25_synthetic_{args.synthetic_docs}"] = {"query_latency": synthetic_latency(args.synthetic_docs)}
        merge_results(args.part if args.part == "latency" else "live", result)


if __name__ == "__main__":
    main()
