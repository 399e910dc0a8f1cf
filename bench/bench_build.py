"""Index build time and peak memory: our BM25 build and full build job vs bm25s.

    python bench/bench_build.py                    # SciFact (incl. dense) + 1M synthetic documents
    python bench/bench_build.py --skip-synthetic   # SciFact only
    python bench/bench_build.py --docs 100000 --skip-dense

Every measurement runs in a fresh subprocess (`--child`), so one run's allocations cannot inflate
the next one's peak. A child first does its untimed setup (reading or loading pre-analysed
documents), then the timed work, and reports:
  seconds   wall time of the timed work
  peak MB   the child's peak RSS (resource.getrusage ru_maxrss), setup included
  setup MB  RSS just before the timed work (what the pre-read input costs)

Rows (k1=0.9, b=0.4 everywhere):
  ours: bm25 from tokens     BM25Builder.add + build() from our pre-analysed token lists
  ours: bm25 from documents  Analyzer + BM25Builder.add + build() from read_corpus documents
                             (the "bm25" stage of build_index, minus writing it)
  ours: build_index          the whole job, dense=False: read + validate, analyse, BM25 build +
                             save, document store, commit (checksums) and activation
  bm25s: from tokens         bm25s.BM25(method="lucene").index(our token lists, title + text)
  bm25s: from text           bm25s.tokenize(title + " " + text, Lucene stop words, PyStemmer
                             english) + index(): bm25s's own pipeline from the same documents
  ours: build_index dense    build_index(dense=True) (SciFact only): adds ONNX encoding and the
                             vector index; skipped with a message if the encoder is unavailable

"x ours" compares a row with its ours counterpart (bm25s tokens vs ours tokens, bm25s text vs
ours documents, build_index dense vs build_index): above 1 means that build takes longer / more
memory. The dense row uses a persistent home (bench/results/build-home) so the ONNX export is
paid once; its note says whether this run included it.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

K1, B = 0.9, 0.4
MARKER = "BENCH_BUILD_RESULT "


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ----- child side -------------------------------------------------------------------------------
def child(kind: str, corpus: str, home: str | None) -> dict:
    from bench.synthetic_corpus import analyse_corpus
    from indexing.analysis import LUCENE_ENGLISH_STOPWORDS, Analyzer
    from indexing.bm25 import BM25Builder, BM25Settings
    from indexing.corpus import CorpusSpec, read_corpus

    corpus_file = Path(corpus)
    info: dict = {}
    settings = BM25Settings(k1=K1, b=B)
    # ----- untimed setup
    if kind == "ours-tokens":
        analysed = analyse_corpus(corpus_file, log=None)
        docs = list(analysed.fields())
        del analysed
    elif kind == "bm25s-tokens":
        analysed = analyse_corpus(corpus_file, log=None)
        docs = analysed.combined()
        del analysed
    elif kind in ("ours-documents", "bm25s-text"):
        documents = read_corpus(CorpusSpec(str(corpus_file))).documents
        if kind == "bm25s-text":
            docs = [f"{d.title} {d.text}" for d in documents]
            del documents
    elif kind in ("build-index", "build-index-dense"):
        dense = kind == "build-index-dense"
        import indexing.build as build
    else:
        raise ValueError(kind)
    gc.collect()
    setup_mb = current_mb()

    # ----- timed work
    started = time.perf_counter()
    if kind == "ours-tokens":
        builder = BM25Builder()
        for title, text in docs:
            builder.add({"title": title, "text": text})
        index = builder.build(settings)
        info["postings_all"] = int(index.fields["all"].weights.nnz)
    elif kind == "ours-documents":
        analyzer = Analyzer()
        builder = BM25Builder()
        for doc in documents:
            builder.add({"title": analyzer.analyze(doc.title), "text": analyzer.analyze(doc.text)})
        index = builder.build(settings)
        info["postings_all"] = int(index.fields["all"].weights.nnz)
    elif kind in ("bm25s-tokens", "bm25s-text"):
        import bm25s
        import Stemmer

        if kind == "bm25s-text":
            docs = bm25s.tokenize(
                docs, lower=True, stopwords=list(LUCENE_ENGLISH_STOPWORDS), stemmer=Stemmer.Stemmer("english"), show_progress=False
            )
        retriever = bm25s.BM25(k1=K1, b=B, method="lucene", backend="numpy")
        retriever.index(docs, show_progress=False)
        info["postings"] = int(len(retriever.scores["data"]))
    else:
        from indexing.corpus import CorpusSpec as Spec

        assert home is not None
        quiet = lambda message: None  # noqa: E731
        settings_obj = build.BuildSettings(corpus=Spec(str(corpus_file)), bm25=settings, dense=kind == "build-index-dense", keep=0)
        try:
            summary = build.build_index(Path(home), "bench", settings_obj, progress=False, log=quiet)
        except Exception as exc:  # the dense pipeline is still being written: report, do not crash
            if kind == "build-index-dense":
                return {"skipped": f"build_index(dense=True) failed: {type(exc).__name__}: {exc}"}
            raise
        info["stages"] = {k: round(v, 2) for k, v in summary.seconds.items()}
        info["bytes_on_disk"] = summary.bytes_on_disk
        info["dense"] = summary.dense
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "setup_mb": setup_mb, "peak_mb": peak_mb(), **info}


# ----- parent side ------------------------------------------------------------------------------
LABELS = {
    "ours-tokens": "ours: bm25 from tokens",
    "ours-documents": "ours: bm25 from documents",
    "build-index": "ours: build_index",
    "bm25s-tokens": "bm25s: from tokens",
    "bm25s-text": "bm25s: from text",
    "build-index-dense": "ours: build_index dense",
}
REFERENCE = {"bm25s-tokens": "ours-tokens", "bm25s-text": "ours-documents", "build-index-dense": "build-index"}


def measure(kind: str, corpus: Path, home: Path | None = None, timeout: float = 7200) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--corpus", str(corpus)]
    if home is not None:
        command += ["--home", str(home)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - started
    lines = [line for line in result.stdout.splitlines() if line.startswith(MARKER)]
    if result.returncode != 0 or not lines:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        return {"skipped": f"child failed (exit {result.returncode}): " + " | ".join(tail)}
    out = json.loads(lines[-1][len(MARKER):])
    out["process_wall_s"] = wall
    return out


def run_corpus(label: str, corpus: Path, kinds: list[str], rows: list[dict], scratch: Path, dense_home: Path) -> None:
    for kind in kinds:
        home = None
        if kind == "build-index":
            home = scratch / f"home-{label}"
            shutil.rmtree(home, ignore_errors=True)
        elif kind == "build-index-dense":
            home = dense_home  # keeps the exported ONNX encoder between runs (content-addressed)
            exported = (home / "encoders").is_dir() and any((home / "encoders").iterdir())
        print(f"  {label:<14} {LABELS[kind]:<28} ...", end="", flush=True)
        result = measure(kind, corpus, home)
        if home is not None and kind == "build-index":
            shutil.rmtree(home, ignore_errors=True)
        row = {"corpus": label, "kind": kind, "system": LABELS[kind], **result}
        if kind == "build-index-dense" and "skipped" not in result:
            row["note"] = "; ".join(filter(None, [row.get("note", ""), "encoder already exported in the bench home" if exported else "includes the one-off ONNX export"]))
        rows.append(row)
        if "skipped" in result:
            print(f" SKIPPED: {result['skipped']}", flush=True)
        else:
            extra = f"  stages {result['stages']}" if "stages" in result else ""
            note = f"  ({result['note']})" if result.get("note") else ""
            print(f" {result['seconds']:8.1f} s  peak {result['peak_mb']:8,.0f} MB{extra}{note}", flush=True)


def print_table(rows: list[dict]) -> None:
    by_key = {(r["corpus"], r["kind"]): r for r in rows}
    header = f"{'system':<28} {'corpus':<14} {'seconds':>9} {'peak MB':>9} {'setup MB':>9} {'s x ours':>9} {'MB x ours':>10}  note"
    print("\n" + header)
    print("-" * len(header))
    for r in rows:
        if "skipped" in r:
            print(f"{r['system']:<28} {r['corpus']:<14} {'-':>9} {'-':>9} {'-':>9} {'-':>9} {'-':>10}  SKIPPED: {r['skipped']}")
            continue
        ref = by_key.get((r["corpus"], REFERENCE.get(r["kind"], r["kind"])))
        if ref and "skipped" not in ref:
            sx, mx = f"{r['seconds'] / ref['seconds']:.2f}x", f"{r['peak_mb'] / ref['peak_mb']:.2f}x"
        else:
            sx = mx = "-"
        note = r.get("note", "")
        if "stages" in r:
            note = ("; ".join(filter(None, [note, "stages " + ", ".join(f"{k} {v:.1f}s" for k, v in r["stages"].items())])))
        print(f"{r['system']:<28} {r['corpus']:<14} {r['seconds']:>9.1f} {r['peak_mb']:>9,.0f} {r['setup_mb']:>9,.0f} {sx:>9} {mx:>10}  {note}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Index build time and peak memory: ours vs bm25s")
    parser.add_argument("--docs", type=int, default=1_000_000, help="synthetic corpus size (default 1,000,000)")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--skip-scifact", action="store_true")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--skip-bm25s", action="store_true")
    parser.add_argument("--only", help="comma-separated row kinds: " + ",".join(LABELS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        result = child(args.child, args.corpus, args.home)
        print(MARKER + json.dumps(result), flush=True)
        return

    from bench.synthetic_corpus import RESULTS, SCIFACT, SyntheticSpec, analyse_corpus, ensure_corpus

    kinds = ["ours-tokens", "ours-documents", "build-index", "bm25s-tokens", "bm25s-text"]
    if args.skip_bm25s:
        kinds = [k for k in kinds if not k.startswith("bm25s")]
    if args.only:
        kinds = [k for k in kinds if k in args.only.split(",")]
    rows: list[dict] = []
    scratch = Path(tempfile.mkdtemp(prefix="bench-build-", dir=RESULTS if RESULTS.is_dir() else None))
    dense_home = RESULTS / "build-home"
    print(f"python {sys.version.split()[0]}; every row is a fresh subprocess; k1={K1}, b={B}")
    try:
        if args.skip_scifact:
            print("SciFact: skipped (--skip-scifact)")
        elif not (SCIFACT / "corpus.jsonl").is_file():
            print(f"SciFact: SKIPPED, dataset not found at {SCIFACT} (set LTR_SEARCH_DATASETS)")
        else:
            corpus = SCIFACT / "corpus.jsonl"
            analyse_corpus(corpus)  # token cache for the "from tokens" rows (untimed)
            scifact_kinds = kinds + ([] if args.skip_dense or (args.only and "build-index-dense" not in args.only) else ["build-index-dense"])
            run_corpus("scifact", corpus, scifact_kinds, rows, scratch, dense_home)
        if args.skip_synthetic:
            print("synthetic: skipped (--skip-synthetic)")
        else:
            spec = SyntheticSpec(docs=args.docs)
            corpus = ensure_corpus(spec)
            if any(k.endswith("tokens") for k in kinds):
                analyse_corpus(corpus)  # token cache (untimed; minutes the first time)
            label = f"synthetic-{args.docs // 1000}k" if args.docs < 1_000_000 else f"synthetic-{args.docs / 1e6:g}M"
            run_corpus(label, corpus, kinds, rows, scratch, dense_home)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_table(rows)
    out = RESULTS / f"bench_build-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=2))
    print(f"results: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
