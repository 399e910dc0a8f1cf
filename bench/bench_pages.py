"""Server time of the pages (issue 19: under 200 ms on SciFact): GET /, /doc/ID, /judge,
/judge/q/ID, /compare and /dashboard, against the JSON API's GET /search for the same query and
pipeline (the peer, measured back to back in the same loop).

    .venv/bin/python bench/bench_pages.py --home .ltr-search --name scifact \
        --dataset /work/shared/datasets/scifact --out bench/results/bench_pages.json

The app runs in-process (FastAPI's TestClient: no network, no uvicorn), so a request's wall time
is the server's time. The source home is only read: indexes, models and encoders are linked
into a scratch home that receives the events, judgments and the eval report the pages show
(an `ltr-search eval` of bm25 and hybrid on the split, depth 100, run first). Each of
--queries test queries is asked once per page per round, `--rounds` rounds after one warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-admin-token-0123456789"


def scratch_home(source: Path) -> Path:
    home = Path(tempfile.mkdtemp(prefix="bench-pages-"))
    for part in ("indexes", "models", "encoders"):
        if (source / part).exists():
            (home / part).symlink_to((source / part).resolve(), target_is_directory=True)
    return home


def percentiles(values: list[float]) -> dict[str, float]:
    array = np.asarray(values)
    return {"p50": float(np.percentile(array, 50)), "p95": float(np.percentile(array, 95)),
            "mean": float(array.mean()), "n": len(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", default=".ltr-search")
    parser.add_argument("--name", default="scifact")
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared" / "datasets" / "scifact"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_pages.json"))
    args = parser.parse_args()

    os.environ["LTR_SEARCH_ADMIN_TOKEN"] = TOKEN
    from fastapi.testclient import TestClient

    from eval.datasets import load_dataset
    from search.app.config import load_service_config
    from search.app.service import create_app, limit_native_threads

    limit_native_threads()
    home = scratch_home(Path(args.home).resolve())
    reports = home / "reports"
    eval_started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "search.app.cli", "--home", str(home), "eval", "--dataset", args.dataset,
                    "--split", args.split, "--name", args.name, "--pipeline", "bm25,hybrid", "--depth", "100", "--quiet",
                    "--resamples", "1000", "--json", str(reports / "bench.json"), "--report", str(reports / "bench.md")],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    print(f"eval report written in {time.perf_counter() - eval_started:.0f} s", file=sys.stderr)
    queries = list(load_dataset(args.dataset, args.split).queries.values())[: args.queries]
    config = load_service_config(home, None, {"index": args.name, "access_log": False})
    timings: dict[str, list[float]] = {}
    with TestClient(create_app(config)) as client:
        snapshot = client.app.state.serving.snapshot
        pipeline = snapshot.default_pipeline
        other = "hybrid" if pipeline != "hybrid" else "bm25"
        form = client.get("/login").text
        nonce = re.search(r'name="login_csrf" value="([^"]+)"', form).group(1)
        client.post("/login", data={"token": TOKEN, "name": "bench", "next": "/judge", "login_csrf": nonce})
        csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/judge").text).group(1)
        client.post("/judge/queries", data={"csrf": csrf, "source": "text", "queries": "\n".join(queries),
                                            "pipelines": [pipeline, other], "depth": "10"})
        judge_links = re.findall(r'href="/judge/q/([^"]+)"', client.get("/judge").text)

        def timed(name: str, path: str, **params: str) -> str:
            started = time.perf_counter()
            response = client.get(path, params=params)
            elapsed = (time.perf_counter() - started) * 1000
            if response.status_code != 200:
                raise SystemExit(f"{name}: HTTP {response.status_code} for {path} {params}: {response.text[:300]}")
            timings.setdefault(name, []).append(elapsed)
            return response.text

        for round_ in range(args.rounds + 1):
            if round_ == 1:
                timings.clear()  # round 0 warms caches (facets, analysers, the eval differences)
            for i, query in enumerate(queries):
                timed("api GET /search (explain, peer)", "/search", q=query, pipeline=pipeline, explain="true")
                html = timed("GET / (search page)", "/", q=query, pipeline=pipeline)
                doc = re.search(r'data-doc-id="([^"]+)"', html)
                if doc:
                    timed("GET /doc/ID", f"/doc/{doc.group(1)}", q=query)
                timed("GET /judge", "/judge")
                timed("GET /judge/q/ID", f"/judge/q/{judge_links[i % len(judge_links)]}")
                timed("GET /compare", "/compare", q=query, a=other, b=pipeline)
                timed("GET /dashboard", "/dashboard")
    peer = percentiles(timings["api GET /search (explain, peer)"])["p50"]
    pages = {name: {**percentiles(values), "ratio_p50_to_api": percentiles(values)["p50"] / peer}
             for name, values in timings.items()}
    summary = {
        "bench": "bench_pages", "index": args.name, "pipeline": pipeline, "compared_with": other,
        "queries": len(queries), "rounds": args.rounds, "model": snapshot.model_version,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip(),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_1min": os.getloadavg()[0]},
        "pages_ms": pages,
    }
    print(f"{'page':<34}{'p50 ms':>9}{'p95 ms':>9}{'x API':>8}   ({pipeline}, {len(queries)} queries x {args.rounds})")
    for name, row in pages.items():
        print(f"{name:<34}{row['p50']:>9.1f}{row['p95']:>9.1f}{row['ratio_p50_to_api']:>8.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
