"""End-to-end latency of the query service: the hybrid (RRF) pipeline in-process, through HTTP,
and against a plain peer written in this script; plus the thread settings for serving.

    python bench/bench_service.py                    # SciFact + 1M synthetic documents (~7 min
                                                     # once the one-time builds are cached)
    python bench/bench_service.py --skip-synthetic   # SciFact only (~2.5 minutes)
    python bench/bench_service.py --prepare-only     # just the one-time synthetic builds (~15 min:
                                                     # BM25 index, 1M vectors + HNSW graph, bm25s)
    python bench/bench_service.py --rounds 1 --queries 100 --skip-threads    # a quick look

What is measured (k=10 results, RRF k=60 over BM25 top-200 + dense top-200, BM25 k1=0.9 b=0.4):

1. SciFact (index `scifact` at --home / $LTR_SEARCH_HOME, built with BM25 + dense; the 300 test
   queries of /work/shared/datasets/scifact):
   ours in-process  `ServingState(config).reload()`, then `snapshot.pipelines["hybrid"].run(
                    RankingRequest(...))`: the object the service runs per request (first stage,
                    filters, rules, page, stored fields of the 10 results). BLAS limited to one
                    thread, as `ltr-search serve` does; ONNX threads = config `threads` (default:
                    all cores).
   ours HTTP        a real `python -m search.app.cli serve` subprocess on 127.0.0.1 (uvicorn, one
                    worker), POST /search {"query", "size": 10} from httpx clients (one keep-alive
                    client per client thread), concurrency 1 and 16. Each request also writes the
                    request log (request + 10 results) to the SQLite event store, WAL with
                    synchronous=FULL, i.e. an fsync per request; the store lives in a temporary
                    directory under bench/results, not in the engine home. Client and server share
                    the same 2 cores, so the client's own CPU (httpx, JSON) is in these figures.
   peer             the same hybrid written plainly: bm25s (numpy backend, method="lucene",
                    k1=0.9, b=0.4) top-200 over its own index of title + " " + text, tokenised by
                    bm25s.tokenize with the Lucene English stop words and PyStemmer's English
                    stemmer (differences from ours: bm25s's token pattern drops one-character
                    tokens and does no NFKC normalisation; ours indexes title and text as fields
                    and searches their combined field - the same term counts); numpy exact inner
                    product top-200 over the index generation's own document embeddings (loaded
                    into memory) with the same ONNX query encoder object; RRF in a dict; the
                    10 results' stored fields read by byte offset from the corpus file.
2. 1M synthetic documents (bench/synthetic_corpus.py's Zipf corpus and queries):
   ours             our BM25 (`ltr-search index build --no-dense` into
                    bench/results/service-home/<corpus key>, cached) + synthetic unit vectors in
                    our HnswVectorIndex (hnswlib, M=16, ef_construction=200, ef_search=128; the
                    graph is cached next to the corpus), behind a small SearchBackend
                    (SyntheticBackend below; encode_query looks the precomputed query vector up by
                    query text), run by the service's own RankingPipeline + HybridPipeline (built
                    by ServingState._build, as the service builds them). HTTP: this script serves
                    the same backend with `create_app` in a child process (`--serve-synthetic`),
                    by handing the app's ServingState a reload that installs it.
   peer             bm25s (as above; its index cached next to the corpus) top-200 + plain hnswlib
                    on the same cached graph file (ef = max(128, 200), one thread) top-200, RRF.
   Vectors: `clusters` random unit centres (standard normal, normalised); each document is
   centre + Gaussian noise with per-component sd noise/sqrt(dim) (noise norm ~ noise x centre
   norm), L2-normalised; a query is a random centre + the same noise. Seeded, chunked, so
   reproducible. Not real text embeddings: dense and BM25 results are unrelated to each other.
3. Thread settings (SciFact, in-process hybrid): ONNX Runtime intra-op threads 1 vs 2
   (`EmbeddedIndex.open(..., encoder_threads=N)`, via the config's `threads`) x BLAS threads 1 vs 2
   (threadpoolctl) x 1 vs 4 concurrent request threads.

Components: after the interleaved rounds, one run of each building block alone (ONNX encode,
BM25 top-200, dense top-200, the exact rescoring of the candidate union, the peer's bm25s and
dense top-200) shows where the time goes; the in-process rows also report the pipeline's own
per-stage medians (RankingOutcome.timings_ms).

Timing: every configuration runs `--rounds` times, interleaved with the others (ours, peer, ours,
peer, ...); each run first warms up on 10 queries, then sends each query once (concurrency c: c
threads walk the same list round-robin from different offsets; HTTP c=16 sends 2x the list).
p50/p99 are per-request latencies of a run, q/s = requests / wall time of the run; tables show the
median over rounds. ratio = ours q/s / peer q/s (above 1: ours is faster); in the thread-setting
rows of the final table the "peer" column is the service's default setting (ONNX threads = all
cores, BLAS 1). The machine has 2 cores
shared with other jobs, so single runs are noisy.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.synthetic_corpus import (  # noqa: E402
    RESULTS,
    SyntheticSpec,
    ensure_corpus,
    ensure_queries,
    read_queries,
    scifact_test_queries,
)

K = 10
DEPTH = 200  # per retriever, as FusionSettings' default
K1, B = 0.9, 0.4
RRF_K = 60.0
WARMUP = 10
SYNTHETIC_INDEX = "synthetic"


def log(message: str) -> None:
    print(message, flush=True)


# ============================================================================ measurement


@dataclass
class Run:
    latencies: np.ndarray  # seconds per request
    wall: float
    errors: int

    @property
    def stats(self) -> dict[str, float]:
        ms = self.latencies * 1e3
        return {
            "requests": int(len(ms)),
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()),
            "qps": float(len(ms) / self.wall),
            "errors": int(self.errors),
        }


def measure(make_worker: Callable[[int], Callable[[Any], Any]], items: Sequence[Any], concurrency: int = 1,
            total: int | None = None, warmup: int = WARMUP) -> Run:
    """`concurrency` threads (each with its own `make_worker(i)` callable) together make `total`
    calls (default: one per item), thread i taking items i, i + c, i + 2c, ... round-robin."""
    total = total or len(items)
    workers = [make_worker(i) for i in range(concurrency)]
    for j in range(min(warmup, len(items))):
        workers[j % concurrency](items[j])
    per_thread = [total // concurrency + (i < total % concurrency) for i in range(concurrency)]
    latencies = [np.empty(n) for n in per_thread]
    errors = [0] * concurrency
    barrier = threading.Barrier(concurrency + 1)

    def loop(i: int) -> None:
        call, out, n = workers[i], latencies[i], len(items)
        barrier.wait()
        for j in range(per_thread[i]):
            item = items[(i + j * concurrency) % n]
            started = time.perf_counter()
            try:
                call(item)
            except Exception:  # counted and reported; a benchmark should not die on one request
                errors[i] += 1
            out[j] = time.perf_counter() - started

    if concurrency == 1:
        barrier = threading.Barrier(1)
        started = time.perf_counter()
        loop(0)
        wall = time.perf_counter() - started
    else:
        threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(concurrency)]
        for thread in threads:
            thread.start()
        barrier.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
    return Run(np.concatenate(latencies), wall, sum(errors))


def summarise(runs: list[Run]) -> dict[str, Any]:
    """Median over rounds of each statistic, plus the pooled latencies' percentiles."""
    per_round = [run.stats for run in runs]
    pooled = np.concatenate([run.latencies for run in runs]) * 1e3
    out = {key: float(np.median([s[key] for s in per_round])) for key in ("p50_ms", "p99_ms", "mean_ms", "qps")}
    out.update({
        "requests_per_round": per_round[0]["requests"],
        "rounds": len(runs),
        "errors": int(sum(s["errors"] for s in per_round)),
        "qps_rounds": [round(s["qps"], 2) for s in per_round],
        "p50_ms_rounds": [round(s["p50_ms"], 3) for s in per_round],
        "p99_ms_rounds": [round(s["p99_ms"], 3) for s in per_round],
        "pooled_p50_ms": float(np.percentile(pooled, 50)),
        "pooled_p99_ms": float(np.percentile(pooled, 99)),
    })
    return out


def interleaved(configs: list[tuple[str, Callable[[], Run]]], rounds: int) -> dict[str, dict[str, Any]]:
    """Run every config once per round, in order, `rounds` times; summarise each."""
    runs: dict[str, list[Run]] = {name: [] for name, _ in configs}
    for r in range(rounds):
        for name, run in configs:
            result = run()
            runs[name].append(result)
            s = result.stats
            log(f"   round {r + 1}/{rounds} {name:<44} p50 {s['p50_ms']:7.2f} ms  p99 {s['p99_ms']:7.2f} ms  "
                f"{s['qps']:8.1f} q/s" + (f"  ERRORS {s['errors']}" if s["errors"] else ""))
            gc.collect()
    return {name: summarise(r) for name, r in runs.items()}


# ============================================================================ the peer


class JsonlFields:
    """The peer's document store: a JSONL corpus read by byte offset (thread-safe pread)."""

    def __init__(self, path: Path):
        self.path = path
        offsets, ids, position = [], [], 0
        with open(path, "rb") as handle:
            for line in handle:
                if line.strip():
                    offsets.append(position)
                    ids.append(json.loads(line)["_id"])
                position += len(line)
        offsets.append(position)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.ids: list[str] = [str(i) for i in ids]
        self.row_of = {doc_id: i for i, doc_id in enumerate(self.ids)}
        self.fd = os.open(path, os.O_RDONLY)

    def texts(self, chunk: int = 100_000):
        """title + " " + text per document, in corpus order, in chunks (lists)."""
        out = []
        with open(self.path, "rb") as handle:
            for line in handle:
                if line.strip():
                    record = json.loads(line)
                    out.append(f"{record.get('title') or ''} {record.get('text') or ''}")
                    if len(out) == chunk:
                        yield out
                        out = []
        if out:
            yield out

    def get(self, doc_id: str) -> dict[str, Any]:
        row = self.row_of[doc_id]
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        return json.loads(os.pread(self.fd, end - start, start))


def peer_tokenizer():
    import bm25s
    import Stemmer

    from indexing.analysis import LUCENE_ENGLISH_STOPWORDS

    stem = Stemmer.Stemmer("english").stemWords
    stopwords = list(LUCENE_ENGLISH_STOPWORDS)

    def tokenize(texts: list[str], return_ids: bool):
        return bm25s.tokenize(texts, stopwords=stopwords, stemmer=stem, return_ids=return_ids, show_progress=False)

    return tokenize


def build_peer_bm25(fields: JsonlFields, cache: Path | None = None):
    """bm25s over title + " " + text (numpy backend); saved to / loaded from `cache` if given."""
    import bm25s

    if cache is not None and (cache / "done").is_file():
        started = time.perf_counter()
        retriever = bm25s.BM25.load(str(cache), mmap=False, show_progress=False)
        retriever.backend = "numpy"
        log(f"   bm25s: loaded cached index {cache.relative_to(ROOT)} in {time.perf_counter() - started:.1f}s")
        return retriever
    started = time.perf_counter()
    tokenize = peer_tokenizer()
    vocab: dict[str, int] = {}
    corpus_ids: list[list[int]] = []
    for texts in fields.texts():
        for tokens in tokenize(texts, return_ids=False):
            corpus_ids.append([vocab.setdefault(t, len(vocab)) for t in tokens])
    retriever = bm25s.BM25(k1=K1, b=B, method="lucene", backend="numpy")
    retriever.index(bm25s.tokenization.Tokenized(ids=corpus_ids, vocab=vocab), show_progress=False)
    del corpus_ids
    gc.collect()
    log(f"   bm25s: indexed {len(fields.ids):,} documents in {time.perf_counter() - started:.1f}s")
    if cache is not None:
        tmp = cache.with_name(cache.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        retriever.save(str(tmp), show_progress=False)
        (tmp / "done").write_text("ok")
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
    return retriever


class PeerHybrid:
    """bm25s top-200 + dense top-200 (a `dense_top(query) -> (rows, scores)` callable), RRF, top 10
    with stored fields. `dense_ids[row]` names a dense row."""

    def __init__(self, retriever, fields: JsonlFields, encode: Callable[[str], np.ndarray],
                 dense_top: Callable[[np.ndarray, int], np.ndarray], dense_ids: list[str]):
        self.retriever, self.fields, self.encode, self.dense_top, self.dense_ids = retriever, fields, encode, dense_top, dense_ids
        self.tokenize = peer_tokenizer()
        self.k = min(DEPTH, len(fields.ids))

    def search(self, query: str) -> list[tuple[str, float, dict[str, Any]]]:
        tokens = self.tokenize([query], return_ids=False)
        result = self.retriever.retrieve(tokens, k=self.k, show_progress=False, backend_selection="numpy", n_threads=0)
        rows, scores = result.documents[0], result.scores[0]
        lexical = [self.fields.ids[r] for r in rows[scores > 0].tolist()]  # bm25s pads with zero scores
        dense_rows = self.dense_top(self.encode(query), DEPTH)
        fused: dict[str, float] = {}
        for ranked in (lexical, [self.dense_ids[r] for r in dense_rows.tolist()]):
            for rank, doc_id in enumerate(ranked, start=1):
                fused[doc_id] = fused.get(doc_id, 0.0) + 1.0 / (RRF_K + rank)
        best = sorted(fused.items(), key=lambda item: -item[1])[:K]
        return [(doc_id, score, self.fields.get(doc_id)) for doc_id, score in best]


def exact_top(embeddings: np.ndarray):
    def top(query_vector: np.ndarray, k: int) -> np.ndarray:
        scores = embeddings @ query_vector
        part = np.argpartition(-scores, k - 1)[:k]
        return part[np.argsort(-scores[part], kind="stable")]

    return top


def overlap_at_10(ours: list[list[str]], theirs: list[list[str]]) -> float:
    return float(np.mean([len(set(a[:K]) & set(b[:K])) / max(1, min(K, len(a), len(b))) for a, b in zip(ours, theirs)]))


# ============================================================================ the HTTP service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A service subprocess on 127.0.0.1; stops it (SIGINT, then SIGKILL) on exit."""

    def __init__(self, command: list[str], workdir: Path, port: int, ready_timeout: float = 600):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / f"server-{port}.log"
        self.command, self.ready_timeout = command, ready_timeout
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        import httpx

        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("LTR_SEARCH_ADMIN_TOKEN", None)
        self.process = subprocess.Popen(self.command, cwd=ROOT, env=env, stdout=open(self.log_path, "wb"),
                                        stderr=subprocess.STDOUT)
        started = time.perf_counter()
        while time.perf_counter() - started < self.ready_timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    log(f"   service ready on {self.url} after {time.perf_counter() - started:.1f}s")
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the service was not ready after {self.ready_timeout}s:\n{self.log_tail()}")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def http_worker(url: str, pipeline: str | None = None):
    import httpx

    def make(_: int):
        client = httpx.Client(base_url=url, timeout=60)

        def call(query: str) -> None:
            body = {"query": query, "size": K}
            if pipeline:
                body["pipeline"] = pipeline
            response = client.post("/search", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.text[:200]}")
            response.json()

        return call

    return make


def http_configs(label: str, url: str, queries: list[str]) -> list[tuple[str, Callable[[], Run]]]:
    make = http_worker(url)
    return [
        (f"{label} HTTP c=1", lambda: measure(make, queries, 1, warmup=2 * WARMUP)),
        (f"{label} HTTP c=16", lambda: measure(make, queries, 16, total=2 * len(queries), warmup=2 * WARMUP)),
    ]


def logged_requests(path: Path) -> int:
    import sqlite3

    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        return int(connection.execute("SELECT COUNT(*) FROM requests").fetchone()[0])


def write_config(workdir: Path, events: Path, threads: int | None = None) -> Path:
    path = workdir / "service.toml"
    lines = [f'events_path = "{events}"']
    if threads:
        lines.append(f"threads = {threads}")
    path.write_text("\n".join(lines) + "\n")
    return path


# ============================================================================ 1. SciFact


def in_process_pipeline(home: Path, name: str, config_file: Path, threads: int | None = None):
    """The hybrid RankingPipeline exactly as the service builds it."""
    from search.app.config import load_service_config
    from search.app.service import ServingState

    config = load_service_config(home, config_file, {"index": name, "threads": threads})
    state = ServingState(config)
    state.reload()
    return state.snapshot


def ranking_worker(pipeline, stages: list[dict[str, float]] | None = None):
    """Workers calling `pipeline.run`; with `stages`, each run's per-stage timings are kept."""
    from search.ranking import RankingRequest

    def make(_: int):
        def call(query: str):
            outcome = pipeline.run(RankingRequest(query=query, request_id=uuid.uuid4().hex, size=K))
            if stages is not None:
                stages.append(outcome.timings_ms)
            return outcome

        return call

    return make


def stage_medians(stages: list[dict[str, float]]) -> dict[str, float]:
    names = sorted({name for timings in stages for name in timings})
    return {name: float(np.median([t.get(name, 0.0) for t in stages])) for name in names}


def components(label: str, parts: list[tuple[str, Callable[[str], Any]]], queries: list[str]) -> dict[str, dict[str, Any]]:
    """One run of each building block alone, one query at a time (where the time goes)."""
    results = {}
    for name, fn in parts:
        run = measure(lambda _: fn, queries, 1)
        results[f"{label} component: {name}"] = summarise([run])
        s = run.stats
        log(f"   component {name:<46} p50 {s['p50_ms']:7.2f} ms  p99 {s['p99_ms']:7.2f} ms  ({len(queries)} queries)")
    return results


def bench_scifact(args, home: Path, workdir: Path) -> dict[str, Any]:
    from threadpoolctl import threadpool_limits

    from indexing.build import VECTORS_DIR
    from indexing.vectors import EMBEDDINGS_FILE
    from search.ranking import RankingRequest

    queries = [text for _, text in scifact_test_queries()][: args.queries]
    config_file = write_config(workdir, workdir / "events-inprocess.sqlite3")
    snapshot = in_process_pipeline(home, args.name, config_file)
    index = snapshot.index
    if "hybrid" not in snapshot.pipelines:
        raise SystemExit(f"index '{args.name}' at {home} has no dense vectors: the hybrid pipeline is not served")
    pipeline = snapshot.pipelines["hybrid"]
    log(f"\n== SciFact: index '{index.name}' generation {index.generation_id} at {home}: {len(index):,} documents, "
        f"vectors {index.vectors.kind}, encoder threads {index.encoder.threads or 'all cores'}; {len(queries)} test queries")

    # ----- the peer -------------------------------------------------------------------------------
    corpus_file = Path(index.generation.manifest["corpus"]["file"])
    fields = JsonlFields(corpus_file)
    retriever = build_peer_bm25(fields)
    embeddings = np.load(index.generation.path / VECTORS_DIR / EMBEDDINGS_FILE)  # in memory
    peer = PeerHybrid(retriever, fields, lambda q: index.encoder.encode([q])[0], exact_top(embeddings), index.docs.ids)

    with threadpool_limits(limits=1, user_api="blas"):
        ours_top = [[r.doc_id for r in pipeline.run(RankingRequest(query=q, request_id="x", size=K)).results] for q in queries]
        peer_top = [[d for d, _, _ in peer.search(q)] for q in queries]
        agreement = overlap_at_10(ours_top, peer_top)
        log(f"   top-10 overlap ours vs peer: {agreement:.3f} (tokenisers differ slightly; RRF ties)")
        stages: list[dict[str, float]] = []
        configs = [
            ("scifact ours in-process c=1", lambda: measure(ranking_worker(pipeline, stages), queries, 1)),
            ("scifact peer c=1", lambda: measure(lambda _: peer.search, queries, 1)),
        ]
        results = interleaved(configs, args.rounds)
        results["_ours_stage_medians_ms"] = stage_medians(stages)
        log(f"   ours, median ms per stage: {json.dumps({k: round(v, 3) for k, v in results['_ours_stage_medians_ms'].items()})}")
        vectors = {q: index.encode_query(q) for q in queries}
        results.update(components("scifact", [
            ("ours+peer ONNX encode (one query)", lambda q: index.encoder.encode([q])[0]),
            ("ours BM25 top-200 (retrieve_bm25)", lambda q: index.retrieve_bm25(q, DEPTH)),
            ("ours dense top-200 (retrieve_dense, exact)", lambda q: index.retrieve_dense(vectors[q], DEPTH)),
            ("ours exact rescoring (bm25_scores+dense_scores)",
             lambda q: (index.bm25_scores(q, rows := index.retrieve_bm25(q, DEPTH).rows), index.dense_scores(vectors[q], rows))),
            ("peer bm25s tokenize + top-200", lambda q: peer.retriever.retrieve(
                peer.tokenize([q], return_ids=False), k=peer.k, show_progress=False, backend_selection="numpy", n_threads=0)),
            ("peer numpy exact top-200", lambda q: peer.dense_top(vectors[q], DEPTH)),
        ], queries))

    if args.skip_http:
        log("   HTTP: skipped (--skip-http)")
    else:
        events = workdir / "events-http.sqlite3"
        http_config = write_config(workdir, events)
        port = free_port()
        command = [sys.executable, "-m", "search.app.cli", "--home", str(home), "serve", "--port", str(port),
                   "--name", args.name, "--config", str(http_config)]
        log(f"   starting: {' '.join(command[1:])}")
        with Server(command, workdir, port) as server:
            results.update(interleaved(http_configs("scifact ours", server.url, queries), args.rounds))
        logged = logged_requests(events)
        log(f"   the service logged {logged:,} requests to {events.name} (fsync per request)")
        results["_http_logged_requests"] = logged
    results["_top10_overlap_vs_peer"] = agreement
    del peer, retriever, embeddings, snapshot, pipeline
    gc.collect()
    return results


# ============================================================================ 3. thread settings


def bench_threads(args, home: Path, workdir: Path) -> dict[str, Any]:
    from threadpoolctl import threadpool_limits

    queries = [text for _, text in scifact_test_queries()][: args.queries]
    config_file = write_config(workdir, workdir / "events-threads.sqlite3")
    log(f"\n== thread settings: SciFact hybrid in-process, {len(queries)} queries, ONNX intra-op threads x BLAS "
        f"threads x concurrency")
    pipelines = {n: in_process_pipeline(home, args.name, config_file, threads=n).pipelines["hybrid"] for n in (1, 2)}
    configs = []
    for onnx in (1, 2):
        for blas in (1, 2):
            for concurrency in (1, 4):
                def run(onnx=onnx, blas=blas, concurrency=concurrency) -> Run:
                    with threadpool_limits(limits=blas, user_api="blas"):
                        return measure(ranking_worker(pipelines[onnx]), queries, concurrency)

                configs.append((f"onnx={onnx} blas={blas} c={concurrency}", run))
    results = interleaved(configs, args.rounds)
    del pipelines
    gc.collect()
    return results


# ============================================================================ 2. 1M synthetic


@dataclass(frozen=True)
class VectorSpec:
    count: int
    dim: int = 384
    clusters: int = 500
    noise: float = 1.0
    seed: int = 20261121
    queries: int = 1000

    @property
    def key(self) -> str:
        return f"vectors-n{self.count}_d{self.dim}_c{self.clusters}_z{self.noise:g}_s{self.seed}_q{self.queries}"


HNSW_M, HNSW_EFC, HNSW_EF = 16, 200, 128
VECTOR_CHUNK = 50_000


def ensure_vectors(spec: VectorSpec, directory: Path) -> tuple[Path, Path]:
    """(embeddings.npy, queries.npy) for `spec`, generated once (seeded, chunked)."""
    directory.mkdir(parents=True, exist_ok=True)
    docs_path, queries_path = directory / "embeddings.npy", directory / "queries.npy"
    if docs_path.is_file() and queries_path.is_file():
        return docs_path, queries_path
    started = time.perf_counter()
    centres = np.random.default_rng([spec.seed, 11]).standard_normal((spec.clusters, spec.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    scale = np.float32(spec.noise / np.sqrt(spec.dim))

    def draw(rng: np.random.Generator, n: int) -> np.ndarray:
        x = centres[rng.integers(0, spec.clusters, n)] + rng.standard_normal((n, spec.dim), dtype=np.float32) * scale
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    tmp = docs_path.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(spec.count, spec.dim))
    for chunk, first in enumerate(range(0, spec.count, VECTOR_CHUNK)):
        n = min(VECTOR_CHUNK, spec.count - first)
        out[first:first + n] = draw(np.random.default_rng([spec.seed, 12, chunk]), n)
    out.flush()
    del out
    os.replace(tmp, docs_path)
    np.save(queries_path, draw(np.random.default_rng([spec.seed, 13]), spec.queries))
    (directory / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
    log(f"   generated {spec.count:,} x {spec.dim} synthetic vectors in {time.perf_counter() - started:.0f}s ({directory.relative_to(ROOT)})")
    return docs_path, queries_path


def ensure_hnsw(embeddings_path: Path, threads: int = 2) -> Path:
    """Our HnswVectorIndex's graph (hnswlib, M=16, efC=200) over the embeddings, built once.
    Inserted in chunks (with progress) with exactly HnswVectorIndex.build's parameters."""
    import hnswlib

    from indexing.vectors import _HNSW_SEED, HnswVectorIndex

    path = embeddings_path.parent / f"hnsw-M{HNSW_M}-efc{HNSW_EFC}.bin"
    if path.is_file():
        return path
    x = np.load(embeddings_path)
    started = time.perf_counter()
    graph = hnswlib.Index(space="ip", dim=int(x.shape[1]))
    graph.init_index(max_elements=len(x), M=HNSW_M, ef_construction=HNSW_EFC, random_seed=_HNSW_SEED)
    step = 100_000
    for first in range(0, len(x), step):
        graph.add_items(x[first:first + step], np.arange(first, min(first + step, len(x)), dtype=np.int64), num_threads=threads)
        log(f"   hnsw: {min(first + step, len(x)):,}/{len(x):,} vectors inserted ({time.perf_counter() - started:.0f}s)")
    tmp = path.with_suffix(".tmp")
    HnswVectorIndex(graph, HNSW_EF, None).save(tmp)
    os.replace(tmp, path)
    (path.with_suffix(".json")).write_text(json.dumps({"build_seconds": round(time.perf_counter() - started, 1), "threads": threads,
                                                      "M": HNSW_M, "ef_construction": HNSW_EFC, "count": len(x)}))
    log(f"   hnsw: built and saved {path.relative_to(ROOT)} in {time.perf_counter() - started:.0f}s")
    return path


def ensure_bm25_index(spec: SyntheticSpec, corpus: Path) -> Path:
    """Our BM25-only index of the corpus in a bench home keyed by the corpus spec (built once)."""
    home = RESULTS / "service-home" / spec.key
    marker = home / "built.json"
    if marker.is_file() and json.loads(marker.read_text()).get("corpus_bytes") == corpus.stat().st_size:
        return home
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    command = [sys.executable, "-m", "search.app.cli", "--home", str(home), "index", "build", "--dataset", str(corpus),
               "--name", SYNTHETIC_INDEX, "--no-dense", "--quiet", "--keep", "1"]
    log(f"   building our BM25 index: {' '.join(command[1:])}")
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    marker.write_text(json.dumps({"corpus_bytes": corpus.stat().st_size, "build_seconds": round(time.perf_counter() - started, 1)}))
    log(f"   our BM25 index built in {time.perf_counter() - started:.0f}s ({home.relative_to(ROOT)})")
    return home


def synthetic_label(docs: int) -> str:
    return f"{docs / 1e6:g}M" if docs >= 1_000_000 else f"{docs // 1000}k"


def synthetic_paths(args) -> dict[str, Any]:
    spec = SyntheticSpec(docs=args.docs)
    vectors = VectorSpec(count=min(args.vectors or args.docs, args.docs), clusters=args.clusters, seed=spec.seed)
    return {"spec": spec, "vectors": vectors, "vector_dir": spec.directory / vectors.key, "query_file_n": 1000}


def prepare_synthetic(args) -> dict[str, Any]:
    """Every cached input of the synthetic section, built if missing. The BM25 build runs in a
    subprocess concurrently with the vector work."""
    paths = synthetic_paths(args)
    spec, vspec = paths["spec"], paths["vectors"]
    corpus = ensure_corpus(spec, log=log)
    query_file = ensure_queries(spec, paths["query_file_n"], log=log)
    builder = threading.Thread(target=lambda: paths.__setitem__("home", ensure_bm25_index(spec, corpus)))
    builder.start()
    embeddings, query_vectors = ensure_vectors(vspec, paths["vector_dir"])
    graph = ensure_hnsw(embeddings)
    builder.join()
    if "home" not in paths:
        raise SystemExit("building our BM25 index failed (see above)")
    bm25s_dir = spec.directory / f"bm25s-lucene-k{K1:g}-b{B:g}-english-lucenestop"
    if not (bm25s_dir / "done").is_file():
        build_peer_bm25(JsonlFields(corpus), bm25s_dir)
    paths.update(corpus=corpus, query_file=query_file, embeddings=embeddings, query_vectors=query_vectors, graph=graph,
                 bm25s_dir=bm25s_dir)
    return paths


class SyntheticBackend:
    """A SearchBackend: BM25 and stored fields from our embedded index, dense retrieval from a
    synthetic HnswVectorIndex whose row i is document i of the index; `encode_query` returns the
    precomputed synthetic vector of a known query text (KeyError otherwise)."""

    def __init__(self, index, vectors, query_vectors: dict[str, np.ndarray], label: str):
        self.index, self.vectors, self.query_vectors, self.label = index, vectors, query_vectors, label
        self.ids = index.docs.ids
        self.index_of = index.docs.index_of
        self.count = vectors.size

    @property
    def name(self) -> str:
        return self.index.name

    @property
    def generation_id(self) -> str:
        return f"{self.index.generation_id}+{self.label}"

    @property
    def has_dense(self) -> bool:
        return True

    def retrieve_bm25(self, query: str, k: int):
        return self.index.retrieve_bm25(query, k)

    def encode_query(self, query: str) -> np.ndarray:
        return self.query_vectors[query]

    def retrieve_dense(self, query_vector: np.ndarray, k: int):
        from search.backend import Retrieved

        scores, rows = self.vectors.search(query_vector, k)
        keep = rows[0] >= 0
        return Retrieved(rows[0][keep].astype(np.int64), scores[0][keep].astype(np.float32, copy=False), self.ids)

    def bm25_scores(self, query: str, rows):
        return self.index.bm25_scores(query, rows)

    def dense_scores(self, query_vector: np.ndarray, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.full(len(rows), np.nan, dtype=np.float32)
        covered = rows < self.count
        out[covered] = self.vectors.similarity(query_vector, rows[covered])
        return out

    def candidate_stats(self, query: str, rows):
        return self.index.candidate_stats(query, rows)

    def document(self, doc_id: str):
        return self.index.document(doc_id)

    def __getattr__(self, name: str):  # the rest of SearchBackend (analyse, rows_of, doc_ids, home, ...): the index's
        if name == "index":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.index, name)


def open_synthetic_backend(paths: dict[str, Any], threads: int | None = None):
    from indexing.vectors import HnswVectorIndex
    from search.embedded import EmbeddedIndex

    index = EmbeddedIndex.open(paths["home"], SYNTHETIC_INDEX)
    embeddings = np.load(paths["embeddings"], mmap_mode="r")
    vectors = HnswVectorIndex.load(paths["graph"], embeddings.shape[1], HNSW_EF, embeddings, threads)
    texts = [text for _, text in read_queries(paths["query_file"])]
    query_matrix = np.load(paths["query_vectors"])
    query_vectors: dict[str, np.ndarray] = {}
    for text, vector in zip(texts, query_matrix):
        query_vectors.setdefault(text, vector)
    if index.docs.ids[:3] != ["s0", "s1", "s2"]:
        raise SystemExit("the synthetic index's document order is not the corpus order; vectors would not line up")
    return SyntheticBackend(index, vectors, query_vectors, paths["vectors"].key)


def service_config_for(home: Path, name: str, config_file: Path | None = None):
    from search.app.config import load_service_config

    return load_service_config(home, config_file, {"index": name})


def serve_synthetic(args) -> None:
    """Child mode: the FastAPI app from create_app, serving the synthetic backend."""
    import uvicorn

    from search.app.service import create_app, limit_native_threads

    paths = synthetic_paths(args)
    spec = paths["spec"]
    paths.update(home=RESULTS / "service-home" / spec.key, query_file=spec.queries_file(paths["query_file_n"], 7),
                 embeddings=paths["vector_dir"] / "embeddings.npy", query_vectors=paths["vector_dir"] / "queries.npy",
                 graph=paths["vector_dir"] / f"hnsw-M{HNSW_M}-efc{HNSW_EFC}.bin")
    limit_native_threads()
    config = service_config_for(paths["home"], SYNTHETIC_INDEX, Path(args.config))
    app = create_app(config)
    state = app.state.serving
    backend = open_synthetic_backend(paths)

    def reload():  # what lifespan calls at startup: install the synthetic backend instead
        state._snapshot = state._build(backend)
        return None, state._snapshot

    state.reload = reload
    uvicorn.run(app, host="127.0.0.1", port=args.serve_synthetic, log_level="warning", access_log=False)


def bench_synthetic(args, paths: dict[str, Any], workdir: Path) -> dict[str, Any]:
    import hnswlib
    from threadpoolctl import threadpool_limits

    from search.app.service import ServingState

    spec, vspec = paths["spec"], paths["vectors"]
    label = synthetic_label(spec.docs)
    queries = [text for _, text in read_queries(paths["query_file"])][: args.synthetic_queries]
    started = time.perf_counter()
    backend = open_synthetic_backend(paths)
    config = service_config_for(paths["home"], SYNTHETIC_INDEX, write_config(workdir, workdir / "events-synthetic.sqlite3"))
    pipeline = ServingState(config)._build(backend).pipelines["hybrid"]
    log(f"\n== synthetic: {len(backend.ids):,} documents (BM25), {backend.count:,} x {vspec.dim} vectors in "
        f"{vspec.clusters} clusters (HNSW M={HNSW_M} efC={HNSW_EFC} ef={HNSW_EF}), {len(queries)} queries; "
        f"loaded in {time.perf_counter() - started:.1f}s")

    fields = JsonlFields(paths["corpus"])
    retriever = build_peer_bm25(fields, paths["bm25s_dir"])
    graph = hnswlib.Index(space="ip", dim=vspec.dim)
    graph.load_index(str(paths["graph"]))
    graph.set_ef(max(HNSW_EF, DEPTH))

    def hnsw_top(query_vector: np.ndarray, k: int) -> np.ndarray:
        return graph.knn_query(query_vector, k=k, num_threads=1)[0][0].astype(np.int64)

    peer = PeerHybrid(retriever, fields, backend.encode_query, hnsw_top, fields.ids)
    from search.ranking import RankingRequest

    with threadpool_limits(limits=1, user_api="blas"):
        sample = queries[: min(100, len(queries))]
        ours_top = [[r.doc_id for r in pipeline.run(RankingRequest(query=q, request_id="x", size=K)).results] for q in sample]
        peer_top = [[d for d, _, _ in peer.search(q)] for q in sample]
        agreement = overlap_at_10(ours_top, peer_top)
        log(f"   top-10 overlap ours vs peer on {len(sample)} queries: {agreement:.3f}")
        stages: list[dict[str, float]] = []
        configs = [
            (f"{label} ours in-process c=1", lambda: measure(ranking_worker(pipeline, stages), queries, 1)),
            (f"{label} peer c=1", lambda: measure(lambda _: peer.search, queries, 1)),
        ]
        results = interleaved(configs, args.rounds)
        results["_ours_stage_medians_ms"] = stage_medians(stages)
        log(f"   ours, median ms per stage: {json.dumps({k: round(v, 3) for k, v in results['_ours_stage_medians_ms'].items()})}")
        few = queries[: min(100, len(queries))]
        results.update(components(label, [
            ("ours BM25 top-200 (retrieve_bm25)", lambda q: backend.retrieve_bm25(q, DEPTH)),
            ("ours HNSW top-200 (retrieve_dense)", lambda q: backend.retrieve_dense(backend.encode_query(q), DEPTH)),
            ("ours exact rescoring (bm25_scores+dense_scores)",
             lambda q: (backend.bm25_scores(q, rows := backend.retrieve_bm25(q, DEPTH).rows),
                        backend.dense_scores(backend.encode_query(q), rows))),
            ("peer bm25s tokenize + top-200", lambda q: retriever.retrieve(
                peer.tokenize([q], return_ids=False), k=peer.k, show_progress=False, backend_selection="numpy", n_threads=0)),
            ("peer hnswlib top-200", lambda q: hnsw_top(backend.encode_query(q), DEPTH)),
        ], few))
    results["_top10_overlap_vs_peer"] = agreement
    results["_label"] = label
    del peer, retriever, graph, fields
    gc.collect()

    if args.skip_http:
        log("   HTTP: skipped (--skip-http)")
    else:
        events = workdir / "events-synthetic-http.sqlite3"
        port = free_port()
        command = [sys.executable, str(Path(__file__).resolve()), "--serve-synthetic", str(port), "--docs", str(args.docs),
                   "--clusters", str(args.clusters), "--config", str(write_config(workdir, events))]
        if args.vectors:
            command += ["--vectors", str(args.vectors)]
        del backend, pipeline
        gc.collect()
        with Server(command, workdir, port) as server:
            results.update(interleaved(http_configs(f"{label} ours", server.url, queries), args.rounds))
        logged = logged_requests(events)
        log(f"   the service logged {logged:,} requests (fsync per request)")
        results["_http_logged_requests"] = logged
    return results


# ============================================================================ report


def cell(s: dict[str, Any] | None) -> str:
    if not s:
        return "-"
    return f"p50 {s['p50_ms']:.2f} / p99 {s['p99_ms']:.2f} ms, {s['qps']:,.1f} q/s"


def print_rows(results: dict[str, dict[str, Any]]) -> None:
    header = f"{'configuration':<58} {'p50 ms':>8} {'p99 ms':>8} {'q/s':>9}  {'q/s per round'}"
    log("\n" + header)
    log("-" * len(header))
    for name, s in results.items():
        if name.startswith("_"):
            continue
        log(f"{name:<58} {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f} {s['qps']:>9.1f}  {s['qps_rounds']}"
            + (f"  ERRORS {s['errors']}" if s["errors"] else ""))


def final_table(sections: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []

    def add(what: str, ours: dict | None, peer: dict | None = None, note: str = "") -> None:
        ratio = ours["qps"] / peer["qps"] if ours and peer else None
        rows.append({"what": what, "ours": ours, "peer": peer, "ratio": ratio, "note": note})

    s = sections.get("scifact")
    if s:
        add("SciFact hybrid, in-process, c=1", s.get("scifact ours in-process c=1"), s.get("scifact peer c=1"),
            "peer: bm25s numpy + numpy exact dense, same ONNX encoder")
        base = s.get("scifact ours in-process c=1")
        for c in (1, 16):
            h = s.get(f"scifact ours HTTP c={c}")
            if h:
                add(f"SciFact hybrid, HTTP c={c} (incl. fsync'd request log)", h, None,
                    f"vs in-process c=1: +{h['p50_ms'] - base['p50_ms']:.2f} ms p50" if c == 1 else "16 client threads")
    s = sections.get("synthetic")
    if s:
        label = s["_label"]
        add(f"{label} synthetic hybrid, in-process, c=1", s.get(f"{label} ours in-process c=1"), s.get(f"{label} peer c=1"),
            "peer: bm25s numpy + hnswlib on the same graph")
        base = s.get(f"{label} ours in-process c=1")
        for c in (1, 16):
            h = s.get(f"{label} ours HTTP c={c}")
            if h:
                add(f"{label} synthetic hybrid, HTTP c={c} (incl. fsync'd request log)", h, None,
                    f"vs in-process c=1: +{h['p50_ms'] - base['p50_ms']:.2f} ms p50" if c == 1 else "16 client threads")
    s = sections.get("threads")
    if s:  # here the "peer" column is the service's default setting (ONNX threads = all cores = 2, BLAS 1)
        for c in (1, 4):
            default = s.get(f"onnx=2 blas=1 c={c}")
            add(f"SciFact in-process c={c}: ONNX threads 1 (BLAS 1)", s.get(f"onnx=1 blas=1 c={c}"), default,
                "peer column = service default: ONNX threads 2 (all cores), BLAS 1")
            add(f"SciFact in-process c={c}: BLAS threads 2 (ONNX 2)", s.get(f"onnx=2 blas=2 c={c}"), default,
                "peer column = service default: ONNX threads 2 (all cores), BLAS 1")
    return rows


def print_final(rows: list[dict[str, Any]]) -> None:
    log("\n| what | ours | peer | ratio (ours q/s / peer q/s) | note |")
    log("|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        log(f"| {r['what']} | {cell(r['ours'])} | {cell(r['peer'])} | {ratio} | {r['note']} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="End-to-end latency of the query service (hybrid pipeline)")
    parser.add_argument("--home", help="engine home with the SciFact index (default $LTR_SEARCH_HOME, else ./.ltr-search)")
    parser.add_argument("--name", default="scifact", help="SciFact index name (default scifact)")
    parser.add_argument("--queries", type=int, default=300, help="SciFact test queries used (default all 300)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per configuration; medians reported (default 3)")
    parser.add_argument("--docs", type=int, default=1_000_000, help="synthetic corpus size (default 1,000,000)")
    parser.add_argument("--vectors", type=int, help="synthetic vectors (default: one per document)")
    parser.add_argument("--clusters", type=int, default=500, help="synthetic vector cluster centres (default 500)")
    parser.add_argument("--synthetic-queries", type=int, default=300, help="synthetic queries timed, ours and peer (default 300)")
    parser.add_argument("--skip-scifact", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--skip-threads", action="store_true")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--prepare-only", action="store_true", help="build the cached synthetic inputs and stop")
    parser.add_argument("--serve-synthetic", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve_synthetic:
        serve_synthetic(args)
        return
    if args.prepare_only:
        started = time.perf_counter()
        prepare_synthetic(args)
        log(f"synthetic inputs ready ({time.perf_counter() - started:.0f}s)")
        return

    from indexing.home import resolve_home

    home = resolve_home(args.home)
    import bm25s
    import onnxruntime

    log(f"python {platform.python_version()}, numpy {np.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"bm25s {bm25s.__version__}; {os.cpu_count()} cpus ({len(os.sched_getaffinity(0))} usable), "
        f"load average {os.getloadavg()[0]:.2f}; k={K}, candidates {DEPTH}+{DEPTH}, RRF k={RRF_K:g}, rounds {args.rounds}")
    sections: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench_service-", dir=RESULTS))
    try:
        if not args.skip_scifact:
            if scifact_test_queries() is None:
                log("\nSciFact: SKIPPED, dataset not found (set LTR_SEARCH_DATASETS)")
            else:
                started = time.perf_counter()
                sections["scifact"] = bench_scifact(args, home, workdir)
                seconds["scifact"] = time.perf_counter() - started
                print_rows(sections["scifact"])
                log(f"   SciFact part took {seconds['scifact']:.0f}s")
            if not args.skip_threads and scifact_test_queries() is not None:
                started = time.perf_counter()
                sections["threads"] = bench_threads(args, home, workdir)
                seconds["threads"] = time.perf_counter() - started
                print_rows(sections["threads"])
                log(f"   thread-settings part took {seconds['threads']:.0f}s")
        if not args.skip_synthetic:
            started = time.perf_counter()
            log("\n== synthetic: preparing cached inputs")
            paths = prepare_synthetic(args)
            seconds["synthetic_prepare"] = time.perf_counter() - started
            log(f"   inputs ready in {seconds['synthetic_prepare']:.0f}s")
            started = time.perf_counter()
            sections["synthetic"] = bench_synthetic(args, paths, workdir)
            seconds["synthetic"] = time.perf_counter() - started
            print_rows(sections["synthetic"])
            log(f"   synthetic part took {seconds['synthetic']:.0f}s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = final_table(sections)
    print_final(rows)
    out = RESULTS / f"bench_service-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"argv": sys.argv[1:], "seconds": seconds, "sections": sections, "final": rows,
                               "settings": {"k": K, "candidates": DEPTH, "rrf_k": RRF_K, "k1": K1, "b": B,
                                            "rounds": args.rounds}}, indent=2, default=str))
    log(f"results: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
