"""HTTP throughput of `ltr-search serve --workers 1` against `--workers 2`, and `serve`'s time to ready.

    python bench/bench_workers.py                       # SciFact BM25 index (built once, cached), ~2 min
    python bench/bench_workers.py --ready-home HOME     # also time-to-ready on HOME's index 'scifact'
                                                        # (copied to a temporary home first)
    python bench/bench_workers.py --seconds 5 --rounds 1   # a quick look
    python bench/bench_workers.py --home HOME --pipeline hybrid --out bench/results/bench_workers_hybrid.json
                                                        # HOME's index 'scifact' (with vectors) instead

What is measured:
- throughput: a real `python -m search.app.cli serve --workers N --threads 1 --no-access-log` (or
  `--serve-threads T`; 0 leaves serve's default, cores / N) on
  127.0.0.1 over the index `scifact` (BM25 only, built with `index build --no-dense` into
  bench/results/workers-home), GET /search?q=...&size=10 with the 300 SciFact test queries in
  turn. Closed loop at saturation: `--client-processes` processes x `--threads` threads, each
  thread one keep-alive http.client connection sending its next request as soon as the last
  answered, for `--seconds` after a 2 s warm-up. Every request also writes the request log to
  the SQLite event store (WAL, synchronous=FULL). Rounds alternate the worker counts (1, 2, 2, 1,
  ...) so drift in machine load hits both; each figure is the median over rounds. The split of
  requests between the workers is read from the X-Worker response header.
- open loop: requests arrive at a fixed rate, 50% of that worker count's measured saturation
  throughput (`--load-share`), spread evenly over the client processes and sent by a pool of
  keep-alive connections; a request's latency runs from its scheduled arrival (so a slow answer
  that delays later requests counts against them too: no coordinated omission).
- time to ready: from spawning `serve` to the first 200 from /ready (with 2 workers: until both
  workers have answered 200), polling every 20 ms on fresh connections.
The client runs on the same cores as the server, so its CPU (http.client, JSON parsing) is in
these figures; on a 2-core machine 2 workers cannot double throughput while the client uses CPU.
Writes bench/results/bench_workers.json.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.synthetic_corpus import SCIFACT, scifact_test_queries  # noqa: E402

RESULTS = ROOT / "bench" / "results"
INDEX = "scifact"
WARMUP_S = 2.0
PIPELINE = [""]  # "&pipeline=NAME" with --pipeline (set in each client process too)


def log(message: str) -> None:
    print(message, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_bm25_home(home: Path) -> Path:
    if not (home / "indexes" / INDEX).is_dir():
        log(f"building the SciFact BM25 index in {home} (once)")
        subprocess.run([sys.executable, "-m", "search.app.cli", "--home", str(home), "index", "build", "--dataset",
                        str(SCIFACT), "--name", INDEX, "--no-dense", "--quiet"], cwd=ROOT, check=True)
    return home


def get(host: str, port: int, path: str, timeout: float = 5) -> tuple[int, str]:
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status, response.getheader("X-Worker") or ""
    finally:
        connection.close()


class Server:
    """`ltr-search serve` in a subprocess; `ready_s`: spawn to ready on every worker."""

    def __init__(self, home: Path, workers: int, config: Path, threads: int = 1):
        self.port = free_port()
        self.output = tempfile.TemporaryFile()
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "search.app.cli", "--home", str(home), "serve", "--name", INDEX, "--port",
             str(self.port), "--workers", str(workers), *(["--threads", str(threads)] if threads else []),
             "--config", str(config)],
            cwd=ROOT, stdout=self.output, stderr=subprocess.STDOUT)
        ready: set[str] = set()
        while len(ready) < workers:
            if self.process.poll() is not None or time.perf_counter() - started > 120:
                self.output.seek(0)
                printed = self.output.read().decode()[-3000:]
                self.stop()
                raise RuntimeError(f"serve did not become ready:\n{printed}")
            try:
                status, worker = get("127.0.0.1", self.port, "/ready", timeout=2)
                if status == 200:
                    ready.add(worker)
                    continue
            except OSError:
                pass
            time.sleep(0.02)
        self.ready_s = time.perf_counter() - started

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.output.close()


def client_process(port: int, queries: list[str], threads: int, offset: int, seconds: float, pipeline: str = "") -> dict:
    """`threads` keep-alive connections in closed loop; latencies (s) of requests that ended in
    the measured window, errors, and requests per worker."""
    PIPELINE[0] = pipeline
    start_at = time.perf_counter() + WARMUP_S
    stop_at = start_at + seconds
    lock = threading.Lock()
    latencies: list[float] = []
    per_worker: dict[str, int] = {}
    errors = [0]

    def loop(slot: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        i = offset + slot * 37
        mine: list[float] = []
        workers: dict[str, int] = {}
        failed = 0
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                break
            query = queries[i % len(queries)]
            i += 1
            try:
                connection.request("GET", f"/search?q={quote(query)}&size=10{PIPELINE[0]}")
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
                worker = response.getheader("X-Worker") or "?"
            except (OSError, http.client.HTTPException):
                ok, worker = False, "?"
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            ended = time.perf_counter()
            if start_at <= now and ended <= stop_at:
                if ok:
                    mine.append(ended - now)
                    workers[worker] = workers.get(worker, 0) + 1
                else:
                    failed += 1
        connection.close()
        with lock:
            latencies.extend(mine)
            errors[0] += failed
            for worker, count in workers.items():
                per_worker[worker] = per_worker.get(worker, 0) + count

    pool = [threading.Thread(target=loop, args=(slot,)) for slot in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return {"latencies": latencies, "errors": errors[0], "per_worker": per_worker}


def open_loop_process(port: int, queries: list[str], rate: float, seconds: float, offset: int, pipeline: str = "",
                      connections: int = 12) -> dict:
    """Requests scheduled every 1/rate s for `seconds` (after the warm-up), sent by `connections`
    keep-alive threads; latency = completion - scheduled arrival."""
    import queue

    PIPELINE[0] = pipeline
    start_at = time.perf_counter() + WARMUP_S
    total = int(rate * seconds)
    schedule: queue.Queue = queue.Queue()
    for k in range(total):
        schedule.put(start_at + k / rate)
    lock = threading.Lock()
    latencies: list[float] = []
    errors = [0]

    def loop(slot: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        i = offset + slot * 37
        while True:
            try:
                due = schedule.get_nowait()
            except queue.Empty:
                break
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            try:
                connection.request("GET", f"/search?q={quote(queries[i % len(queries)])}&size=10{PIPELINE[0]}")
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            i += 1
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - due)
                else:
                    errors[0] += 1
        connection.close()

    pool = [threading.Thread(target=loop, args=(slot,)) for slot in range(connections)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return {"latencies": latencies, "errors": errors[0]}


def open_loop(port: int, queries: list[str], rate: float, args) -> dict:
    processes = args.client_processes
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        parts = list(pool.map(open_loop_process, [port] * processes, [queries] * processes, [rate / processes] * processes,
                              [args.seconds] * processes, [p * 101 for p in range(processes)],
                              [pipeline_param(args)] * processes))
    latencies = [x for p in parts for x in p["latencies"]]
    return {"rate_qps": rate, "p50_ms": percentile(latencies, 50) * 1e3, "p99_ms": percentile(latencies, 99) * 1e3,
            "requests": len(latencies), "errors": sum(p["errors"] for p in parts)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


def pipeline_param(args) -> str:
    return f"&pipeline={args.pipeline}" if args.pipeline else ""


def saturate(port: int, queries: list[str], args) -> dict:
    with ProcessPoolExecutor(args.client_processes, mp_context=get_context("spawn")) as pool:
        parts = list(pool.map(client_process, [port] * args.client_processes, [queries] * args.client_processes,
                              [args.threads] * args.client_processes,
                              [p * 101 for p in range(args.client_processes)], [args.seconds] * args.client_processes,
                              [pipeline_param(args)] * args.client_processes))
    latencies = [x for p in parts for x in p["latencies"]]
    per_worker: dict[str, int] = {}
    for part in parts:
        for worker, count in part["per_worker"].items():
            per_worker[worker] = per_worker.get(worker, 0) + count
    return {"qps": len(latencies) / args.seconds, "p50_ms": percentile(latencies, 50) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3, "requests": len(latencies),
            "errors": sum(p["errors"] for p in parts), "per_worker_share": sorted(
                (round(c / max(1, len(latencies)), 3) for c in per_worker.values()), reverse=True)}


def bench_throughput(home: Path, queries: list[str], args, config: Path) -> dict:
    order = [w for r in range(args.rounds) for w in ((1, 2) if r % 2 == 0 else (2, 1))]
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for workers in order:
        server = Server(home, workers, config, args.serve_threads)
        try:
            run = saturate(server.port, queries, args)
            run["open_loop"] = open_loop(server.port, queries, run["qps"] * args.load_share, args)
        finally:
            server.stop()
        run["ready_s"] = server.ready_s
        runs[workers].append(run)
        o = run["open_loop"]
        log(f"  workers={workers}: {run['qps']:.1f} q/s, p50 {run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms, "
            f"errors {run['errors']}, split {run['per_worker_share']}, ready in {server.ready_s:.2f} s; "
            f"open loop at {o['rate_qps']:.0f} q/s: p50 {o['p50_ms']:.1f} ms, p99 {o['p99_ms']:.1f} ms")
    summary = {}
    for workers, rows in runs.items():
        summary[f"workers_{workers}"] = {
            "qps": statistics.median(r["qps"] for r in rows), "p50_ms": statistics.median(r["p50_ms"] for r in rows),
            "p99_ms": statistics.median(r["p99_ms"] for r in rows), "errors": sum(r["errors"] for r in rows),
            "ready_s": statistics.median(r["ready_s"] for r in rows),
            "open_loop_p50_ms": statistics.median(r["open_loop"]["p50_ms"] for r in rows),
            "open_loop_p99_ms": statistics.median(r["open_loop"]["p99_ms"] for r in rows), "rounds": rows,
        }
    summary["qps_ratio_2_over_1"] = summary["workers_2"]["qps"] / summary["workers_1"]["qps"]
    return summary


def bench_ready(source_home: Path, config: Path, repeats: int) -> dict:
    """Time to ready on a copy of `source_home`'s index (serving writes stores into its home)."""
    with tempfile.TemporaryDirectory(prefix="bench-workers-ready-") as scratch:
        home = Path(scratch) / "home"
        home.mkdir()
        for part in ("indexes", "encoders", "models"):
            if (source_home / part).exists():
                shutil.copytree(source_home / part, home / part, symlinks=False)
        out = {}
        for workers in (1, 2):
            times = []
            for _ in range(repeats):
                server = Server(home, workers, config)
                server.stop()
                times.append(server.ready_s)
            out[f"workers_{workers}"] = {"median_s": statistics.median(times), "runs_s": times}
            log(f"  time to ready, workers={workers}: median {statistics.median(times):.2f} s ({times})")
        manifest = next((home / "indexes" / INDEX / "generations").glob("*/manifest.json"))
        out["index"] = {"documents": json.loads(manifest.read_text())["counts"]["documents"],
                        "dense": bool(json.loads(manifest.read_text()).get("dense"))}
        return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=RESULTS / "workers-home", help="where the BM25 index is cached")
    parser.add_argument("--pipeline", help="pipeline to query (default: the service's default; bm25 on a --no-dense index)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per worker count (alternating)")
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8, help="connections per client process")
    parser.add_argument("--load-share", type=float, default=0.5, help="open-loop rate as a share of saturation")
    parser.add_argument("--serve-threads", type=int, default=1,
                        help="serve's --threads (ONNX Runtime intra-op threads per worker); 0: serve's default (cores / workers)")
    parser.add_argument("--ready-home", type=Path, help="a home with a SciFact index 'scifact' to time `serve` to ready on")
    parser.add_argument("--ready-repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_workers.json")
    args = parser.parse_args(argv)
    queries = [text for _, text in scifact_test_queries() or []]
    if not queries:
        raise SystemExit(f"SciFact not found at {SCIFACT}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as scratch:
        config = Path(scratch) / "service.toml"
        config.write_text("access_log = false\n[exploration]\nepsilon = 0.0\n")
        home = ensure_bm25_home(args.home)
        label = args.pipeline or "default pipeline"
        log(f"throughput, {label} over SciFact ({args.client_processes} x {args.threads} connections, {args.seconds} s, "
            f"{args.rounds} rounds; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})")
        result = {"machine": {"cores": os.cpu_count(), "load_1min_at_start": os.getloadavg()[0]},
                  "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "throughput": bench_throughput(home, queries, args, config)}
        if args.ready_home is not None:
            result["time_to_ready"] = bench_ready(args.ready_home, config, args.ready_repeats)
    result["machine"]["load_1min_at_end"] = os.getloadavg()[0]
    t = result["throughput"]
    log(f"\n| workers | saturation q/s | p50 ms | p99 ms | open loop at {args.load_share:.0%}: p50 ms | p99 ms | ready s |"
        "\n|---|---|---|---|---|---|---|")
    for w in (1, 2):
        row = t[f"workers_{w}"]
        log(f"| {w} | {row['qps']:.1f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['open_loop_p50_ms']:.1f} | "
            f"{row['open_loop_p99_ms']:.1f} | {row['ready_s']:.2f} |")
    log(f"2 workers / 1 worker throughput: {t['qps_ratio_2_over_1']:.2f}x")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
