"""Top-1000 BM25 retrieval throughput: ours vs bm25s (numpy backend) vs rank-bm25.

    python bench/bench_bm25.py                       # SciFact test queries + 1M synthetic docs
    python bench/bench_bm25.py --skip-synthetic      # SciFact only (seconds)
    python bench/bench_bm25.py --docs 100000 --queries 500 --skip-rank-bm25

All systems run in this one process, single-threaded, on the same analysed tokens: documents and
queries are analysed once with OUR analyser (indexing.analysis.Analyzer); our index gets the
title and text token lists and is queried on its combined field "all", bm25s and rank-bm25 get
title + text concatenated (the same term counts and lengths). Parameters: k1=0.9, b=0.4.

  ours       BM25Index.top_k(tokens, 1000, field="all")
  bm25s      bm25s.BM25(k1=0.9, b=0.4, method="lucene", backend="numpy").retrieve([tokens], k=1000,
             backend_selection="numpy"), one call per query (per-query latency); the
             "bm25s batch" row is one retrieve() call over all queries (n_threads=0)
  rank-bm25  BM25Okapi(k1=0.9, b=0.4).get_scores(tokens) + argpartition top-1000 + sort; at 1M
             documents only the first --rank-bm25-queries queries are timed (it is very slow)

qps = queries / total seconds of the timed calls, from the fastest of --repeat passes (default
3, after a 10-query warm-up; the machine may be shared); p50/p95 are per-query latencies of
that pass. "ours x" = our qps / that system's qps (above 1: ours is faster). Top-10 agreement with
bm25s is reported per corpus (both use Lucene's idf and exact lengths; rank-bm25 uses a
different idf, so its overlap is only informative).
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.synthetic_corpus import (  # noqa: E402
    RESULTS,
    SCIFACT,
    AnalysedCorpus,
    SyntheticSpec,
    analyse_corpus,
    ensure_corpus,
    ensure_queries,
    read_queries,
    scifact_test_queries,
)
from indexing.analysis import Analyzer  # noqa: E402
from indexing.bm25 import BM25Builder, BM25Settings  # noqa: E402

K = 1000
K1, B = 0.9, 0.4
WARMUP = 10


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, queries: list[list[str]], repeat: int, warmup: int = WARMUP) -> tuple[np.ndarray, list]:
    """Per-query seconds of the fastest of `repeat` passes of fn over the queries (after
    `warmup` untimed calls), and the results of the first pass."""
    for tokens in queries[:warmup]:
        fn(tokens)
    best, results = None, []
    for attempt in range(repeat):
        seconds = []
        for tokens in queries:
            started = time.perf_counter()
            result = fn(tokens)
            seconds.append(time.perf_counter() - started)
            if attempt == 0:
                results.append(result)
        seconds = np.asarray(seconds)
        if best is None or seconds.sum() < best.sum():
            best = seconds
    return best, results


def row(system: str, corpus: str, seconds: np.ndarray, note: str = "") -> dict:
    return {
        "system": system,
        "corpus": corpus,
        "queries": int(len(seconds)),
        "qps": float(len(seconds) / seconds.sum()),
        "p50_ms": float(np.percentile(seconds, 50) * 1e3),
        "p95_ms": float(np.percentile(seconds, 95) * 1e3),
        "note": note,
    }


def top10_agreement(ours: list[np.ndarray], theirs: list[np.ndarray], ours_scores=None, their_scores=None) -> dict:
    """Overlap of the top-10 id lists. With scores: how many differing lists still have the same
    ten scores (to 1e-5 relative), i.e. differ only in which of tied documents they show."""
    overlap, same_list, same_set, tie_only = [], 0, 0, 0
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if ours_scores is not None and list(a[:10]) != list(b[:10]):
            sa, sb = np.asarray(ours_scores[i][:10], np.float64), np.asarray(their_scores[i][:10], np.float64)
            tie_only += len(sa) == len(sb) and bool(np.allclose(sa, sb, rtol=1e-5, atol=1e-6))
        a, b = list(a[:10]), list(b[:10])
        n = max(len(a), len(b))
        if n == 0:
            overlap.append(1.0)
            same_list += 1
            same_set += 1
            continue
        overlap.append(len(set(a) & set(b)) / n)
        same_list += a == b
        same_set += set(a) == set(b)
    return {
        "queries": len(overlap),
        "mean_overlap": float(np.mean(overlap)) if overlap else float("nan"),
        "identical_set": same_set,
        "identical_order": same_list,
        "differing_but_equal_scores": tie_only,
    }


def bench_corpus(name: str, analysed: AnalysedCorpus, query_texts: list[str], args, rank_bm25_queries: int) -> tuple[list[dict], dict]:
    analyzer = Analyzer()
    queries = [analyzer.analyze(text) for text in query_texts]
    rows: list[dict] = []
    info: dict = {"corpus": name, "documents": analysed.n_docs, "queries": len(queries)}
    print(f"\n== {name}: {analysed.n_docs:,} documents, {len(queries):,} queries "
          f"(mean {np.mean([len(q) for q in queries]):.1f} analysed terms)", flush=True)

    # ----- ours ---------------------------------------------------------------------------------
    started = time.perf_counter()
    builder = BM25Builder()
    for title, text in analysed.fields():
        builder.add({"title": title, "text": text})
    index = builder.build(BM25Settings(k1=K1, b=B))
    del builder
    gc.collect()
    all_field = index.fields["all"].weights
    info["vocabulary"] = len(index.vocabulary)
    info["postings_all"] = int(all_field.nnz)
    touched = [int(sum(np.diff(all_field.indptr)[index.query_term_ids(q)[0]])) for q in queries]
    info["mean_postings_touched"] = float(np.mean(touched))
    print(f"   ours: built in {time.perf_counter() - started:.1f}s; {len(index.vocabulary):,} terms, "
          f"{all_field.nnz:,} postings; a query touches {np.mean(touched):,.0f} postings on average "
          f"(median {np.median(touched):,.0f})", flush=True)
    seconds, results = timed(lambda q: index.top_k(q, K, field="all"), queries, args.repeat)
    rows.append(row("ours", name, seconds))
    ours_top = [ids for ids, _ in results]
    ours_scores = [scores for _, scores in results]
    del index, results, all_field
    gc.collect()

    combined = analysed.combined()

    # ----- bm25s, numpy backend ------------------------------------------------------------------
    import bm25s

    started = time.perf_counter()
    retriever = bm25s.BM25(k1=K1, b=B, method="lucene", backend="numpy")
    retriever.index(combined, show_progress=False)
    compute = bm25s.BM25._compute_relevance_from_scores
    backend_ok = retriever.backend == "numpy" and not bm25s.NUMBA_AVAILABLE and type(compute).__name__ == "function"
    info["bm25s_backend"] = {"backend": retriever.backend, "numba_available": bm25s.NUMBA_AVAILABLE, "scorer": type(compute).__name__}
    if not backend_ok:
        print(f"   WARNING: bm25s is not on its plain numpy backend: {info['bm25s_backend']}", flush=True)
    print(f"   bm25s {bm25s.__version__}: built in {time.perf_counter() - started:.1f}s; backend={retriever.backend}, "
          f"numba available={bm25s.NUMBA_AVAILABLE}, selection backend=numpy", flush=True)
    k = min(K, analysed.n_docs)

    def bm25s_one(q):
        return retriever.retrieve([q], k=k, show_progress=False, backend_selection="numpy", n_threads=0)

    seconds, results = timed(bm25s_one, queries, args.repeat)
    rows.append(row("bm25s (numpy)", name, seconds, "one retrieve() per query"))
    bm25s_top = []
    bm25s_scores = []
    for result in results:
        docs, scores = np.asarray(result.documents[0]), np.asarray(result.scores[0])
        positive = scores > 0  # bm25s pads with zero-score documents; ours returns matches only
        bm25s_top.append(docs[positive])
        bm25s_scores.append(scores[positive])
    batch = float("inf")
    for _ in range(args.repeat):
        started = time.perf_counter()
        retriever.retrieve(queries, k=k, show_progress=False, backend_selection="numpy", n_threads=0)
        batch = min(batch, time.perf_counter() - started)
    rows.append({"system": "bm25s (numpy) batch", "corpus": name, "queries": len(queries), "qps": len(queries) / batch,
                 "p50_ms": float("nan"), "p95_ms": float("nan"), "note": "one retrieve() over all queries"})
    agreement = top10_agreement(ours_top, bm25s_top, ours_scores, bm25s_scores)
    diffs = [float(np.max(np.abs(a[:10] - b[:10]))) for a, b in zip(ours_scores, bm25s_scores) if len(a) and len(a) == len(b)]
    agreement["max_abs_score_diff_top10"] = max(diffs) if diffs else 0.0
    info["top10_vs_bm25s"] = agreement
    print(f"   top-10 ours vs bm25s: mean overlap {agreement['mean_overlap']:.4f}, identical sets "
          f"{agreement['identical_set']}/{agreement['queries']}, identical order {agreement['identical_order']}/{agreement['queries']}, "
          f"max |score diff| {agreement['max_abs_score_diff_top10']:.2e}; of the {agreement['queries'] - agreement['identical_order']} "
          f"differing lists {agreement['differing_but_equal_scores']} have the same ten scores (ties / float rounding)", flush=True)
    del retriever, results
    gc.collect()

    # ----- rank-bm25 -----------------------------------------------------------------------------
    if args.skip_rank_bm25:
        print("   rank-bm25: skipped (--skip-rank-bm25)")
    else:
        from rank_bm25 import BM25Okapi

        started = time.perf_counter()
        okapi = BM25Okapi(combined, k1=K1, b=B)
        print(f"   rank-bm25: built in {time.perf_counter() - started:.1f}s", flush=True)
        del combined
        gc.collect()
        n = min(rank_bm25_queries, len(queries))

        def okapi_one(q):
            scores = okapi.get_scores(q)
            top = np.argpartition(scores, len(scores) - k)[len(scores) - k:]
            return top[np.lexsort((top, -scores[top]))]

        seconds, results = timed(okapi_one, queries[:n], args.repeat, warmup=min(2, n))
        note = f"only the first {n} of {len(queries)} queries timed" if n < len(queries) else ""
        rows.append(row("rank-bm25 BM25Okapi", name, seconds, note))
        agreement = top10_agreement(ours_top[:n], results)
        info["top10_vs_rank_bm25"] = agreement
        print(f"   top-10 ours vs rank-bm25 (different idf): mean overlap {agreement['mean_overlap']:.3f}", flush=True)
        del okapi
        gc.collect()
    ours_qps = rows[0]["qps"]
    for r in rows:
        r["ours_x"] = ours_qps / r["qps"]
    info["peak_rss_mb_so_far"] = rss_mb()
    return rows, info


def print_table(rows: list[dict]) -> None:
    header = f"{'system':<22} {'corpus':<18} {'queries':>7} {'qps':>10} {'p50 ms':>8} {'p95 ms':>8} {'ours x':>8}  note"
    print("\n" + header)
    print("-" * len(header))
    for r in rows:
        p50 = "-" if np.isnan(r["p50_ms"]) else f"{r['p50_ms']:.2f}"
        p95 = "-" if np.isnan(r["p95_ms"]) else f"{r['p95_ms']:.2f}"
        print(f"{r['system']:<22} {r['corpus']:<18} {r['queries']:>7} {r['qps']:>10,.1f} {p50:>8} {p95:>8} {r['ours_x']:>7.2f}x  {r['note']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Top-1000 BM25 retrieval throughput: ours vs bm25s vs rank-bm25")
    parser.add_argument("--docs", type=int, default=1_000_000, help="synthetic corpus size (default 1,000,000)")
    parser.add_argument("--queries", type=int, default=1000, help="synthetic queries for ours and bm25s (default 1000)")
    parser.add_argument("--rank-bm25-queries", type=int, default=10, help="synthetic queries timed for rank-bm25 (default 10)")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes per system; the fastest is reported (default 3)")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--skip-scifact", action="store_true")
    parser.add_argument("--skip-rank-bm25", action="store_true")
    args = parser.parse_args(argv)

    import bm25s
    import rank_bm25  # noqa: F401

    print(f"python {platform.python_version()}, numpy {np.__version__}, bm25s {bm25s.__version__}, rank-bm25 0.2.2; "
          f"{platform.processor() or platform.machine()}, single process, k={K}, k1={K1}, b={B}")
    rows, infos = [], []
    if args.skip_scifact:
        print("\nSciFact: skipped (--skip-scifact)")
    else:
        queries = scifact_test_queries()
        if queries is None:
            print(f"\nSciFact: SKIPPED, dataset not found at {SCIFACT} (set LTR_SEARCH_DATASETS)")
        else:
            analysed = analyse_corpus(SCIFACT / "corpus.jsonl")
            r, info = bench_corpus("scifact", analysed, [text for _, text in queries], args, rank_bm25_queries=len(queries))
            rows += r
            infos.append(info)
    if args.skip_synthetic:
        print("\nsynthetic: skipped (--skip-synthetic)")
    else:
        spec = SyntheticSpec(docs=args.docs)
        corpus_file = ensure_corpus(spec)
        query_texts = [text for _, text in read_queries(ensure_queries(spec, args.queries))]
        analysed = analyse_corpus(corpus_file)
        label = f"synthetic-{args.docs // 1000}k" if args.docs < 1_000_000 else f"synthetic-{args.docs / 1e6:g}M"
        r, info = bench_corpus(label, analysed, query_texts, args, rank_bm25_queries=args.rank_bm25_queries)
        del analysed
        rows += r
        infos.append(info)
    print_table(rows)
    for info in infos:
        agreement = info["top10_vs_bm25s"]
        print(f"top-10 agreement ours vs bm25s on {info['corpus']}: mean overlap {agreement['mean_overlap']:.4f}, "
              f"identical sets {agreement['identical_set']}/{agreement['queries']}, identical order {agreement['identical_order']}/{agreement['queries']}, "
              f"differing lists with the same ten scores {agreement['differing_but_equal_scores']}")
    print(f"peak RSS of this process: {rss_mb():,.0f} MB")
    out = RESULTS / f"bench_bm25-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"argv": sys.argv[1:], "rows": rows, "corpora": infos}, indent=2))
    print(f"results: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
