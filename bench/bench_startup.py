"""Start-up of the CLI and of the query service, measured on real processes.

    .venv/bin/python bench/bench_startup.py --home /tmp/h17/home [--name scifact] [--runs 5] \
        --out bench/results/bench_startup.json

- `ltr-search --help`: wall time of the whole process (goal <= 0.3 s);
- `ltr-search serve` on 127.0.0.1 and a free port: from spawning the process to the first
  GET /ready answering 200 (goal <= 2 s on SciFact), then to the first answered `ltr` search
  (`/search?q=...`, what a client waits for after /ready), each polled every 10 ms; and the CPU
  time the serve process had used when /ready first answered (all threads; robust to load);
- floors, in the same run: `python -c pass` (the interpreter alone) and `python -c "import fastapi,
  uvicorn"` (the web stack alone), what any Python service pays;
- with `--peer-tree DIR`, the same commands run from another source tree (e.g. the commit before,
  `git archive COMMIT | tar -x -C DIR`) on the same venv, as the peer the ratios compare with.

Both trees run as `python -m search.app.cli` with PYTHONPATH at the tree. Before the runs each
tree's packages are byte-compiled (`compileall`), as an installed package is (pip compiles at
install; an editable install writes its .pyc on first import): a process started under
PYTHONDONTWRITEBYTECODE=1 (as on this machine) would otherwise compile every module changed since
its last .pyc from source at every start, and the figures would measure edits, not start-up.
`--bytecode as-is` measures the trees as they are. Runs alternate between
all measured commands, so machine load hits them alike; the load average is recorded. The home must hold the index, with an active model for `ltr` (else /search answers
with the fallback pipeline, which the report notes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POLL_S = 0.01
PACKAGES = ("indexing", "search", "ltr", "eval")  # the engine's packages in a source tree


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_process(argv: list[str], tree: Path = ROOT) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tree, env=tree_env(tree))
    return time.perf_counter() - started


def byte_compile(tree: Path) -> None:
    """Write the .pyc of every module of the tree's packages (what an installed package has)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    packages = [str(tree / name) for name in PACKAGES if (tree / name).is_dir()]
    subprocess.run([str(BIN / "python"), "-m", "compileall", "-q", *packages], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def tree_env(tree: Path) -> dict[str, str]:
    """Run from `tree` (`python -m` puts the working directory first on the path)."""
    return {**os.environ, "PYTHONPATH": str(tree)}


def cli(*args: str) -> list[str]:
    return [str(BIN / "python"), "-m", "search.app.cli", *args]


def get(url: str) -> tuple[int, dict[str, Any] | None]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, ConnectionError, OSError):
        return 0, None


def serve_once(tree: Path, home: Path, name: str | None, query: str, timeout_s: float) -> dict[str, Any]:
    port = free_port()
    argv = cli("--home", str(home), "serve", "--port", str(port), "--no-access-log")
    if name:
        argv += ["--name", name]
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tree, env=tree_env(tree))
    base = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    try:
        while "ready_s" not in out:
            if process.poll() is not None:
                raise RuntimeError(f"serve exited with {process.returncode}: {process.stderr.read().decode()[-2000:]}")
            if time.perf_counter() - started > timeout_s:
                raise RuntimeError(f"serve not ready after {timeout_s} s")
            status, _ = get(f"{base}/ready")
            if status == 200:
                out["ready_s"] = time.perf_counter() - started
                out["ready_cpu_s"] = process_cpu_seconds(process.pid)
            else:
                time.sleep(POLL_S)
        while "first_search_s" not in out:
            status, body = get(f"{base}/search?q={urllib.request.quote(query)}&size=10")
            if status == 200 and body is not None:
                out["first_search_s"] = time.perf_counter() - started
                out["pipeline"] = body.get("pipeline")
            elif time.perf_counter() - started > timeout_s:
                raise RuntimeError(f"no search answered after {timeout_s} s (last status {status})")
            else:
                time.sleep(POLL_S)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return out


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far, all its threads (Linux /proc): what
    its start-up costs whatever else the machine runs, unlike the wall time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": round(ordered[len(ordered) // 2], 3), "min": round(ordered[0], 3), "max": round(ordered[-1], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--name", default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--query", default="vitamin D deficiency and bone density")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--peer-tree", type=Path, default=None, help="another source tree to run the same commands from")
    parser.add_argument("--bytecode", choices=("compile", "as-is"), default="compile",
                        help="byte-compile each tree's packages before the runs (default), or measure them as they are")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    python = str(BIN / "python")
    trees = {"ours": ROOT, **({"peer": args.peer_tree.resolve()} if args.peer_tree else {})}
    if args.bytecode == "compile":
        for tree in trees.values():
            byte_compile(tree)
    samples: dict[str, list[float]] = {"python -c pass": [], "import fastapi, uvicorn": []}
    pipelines = set()
    for run in range(args.runs):
        samples["python -c pass"].append(timed_process([python, "-c", "pass"]))
        samples["import fastapi, uvicorn"].append(timed_process([python, "-c", "import fastapi, uvicorn"]))
        order = list(trees.items()) if run % 2 == 0 else list(reversed(trees.items()))
        for label, tree in order:
            samples.setdefault(f"{label}: ltr-search --help", []).append(timed_process(cli("--help"), tree))
            served = serve_once(tree, args.home, args.name, args.query, args.timeout)
            samples.setdefault(f"{label}: serve ready", []).append(served["ready_s"])
            samples.setdefault(f"{label}: serve CPU until ready", []).append(served["ready_cpu_s"])
            samples.setdefault(f"{label}: serve first search", []).append(served["first_search_s"])
            pipelines.add(served.get("pipeline"))
            log(f"run {run + 1} {label}: --help {samples[f'{label}: ltr-search --help'][-1]:.3f} s, ready {served['ready_s']:.3f} s, "
                f"first search {served['first_search_s']:.3f} s ({served.get('pipeline')})")
    results = {name: summary(values) for name, values in samples.items()}
    ratios = {}
    if "peer" in trees:
        for what in ("ltr-search --help", "serve ready", "serve CPU until ready", "serve first search"):
            ratios[what] = round(results[f"ours: {what}"]["median"] / results[f"peer: {what}"]["median"], 3)
    report = {
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "peer_tree": str(args.peer_tree) if args.peer_tree else None, "home": str(args.home), "runs": args.runs,
        "bytecode": args.bytecode,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_average": os.getloadavg()[0],
        "unit": "seconds, process spawn to answer (medians)", "first_search_pipelines": sorted(map(str, pipelines)),
        "goals": {"ltr-search --help": 0.3, "serve ready": 2.0},
        "results": results, "ratio_ours_to_peer": ratios,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
