"""`ltr-search retrain --interleave`, end to end through the CLI as a scheduler runs it: a challenger
is interleaved against the active model, simulated users search and click through the in-process
service each "day", and one `retrain --interleave SHARE` per day reads the interleaved requests
with the always-valid test until it promotes the challenger, ends the trial, or runs out of days.

    python bench/bench_retrain_interleave.py --base-home H --better m0001 --worse m0002 \\
        [--dataset ../shared/datasets/scifact --split test] [--seeds 5] [--sessions-per-day 300] \\
        [--share 0.5] [--max-days 20] [--out bench/results/bench_retrain_interleave.json]

Both directions are run: the worse model challenging the better one (the right outcome: refused,
exit 3) and the better challenging the worse (promoted, exit 0). Users: the issue-16 PBM users
(`simulate --click-model pbm --eta 1 --click-probs 0:0.05,1:0.95,2:0.95 --noise 0.1`, no
exploration) on the split's queries; each run starts from a copy of H's models (its index and
encoder are shared, read-only) with no events. Per run: the outcome, the days, the interleaved
requests read at the decision, and the always-valid and fixed-sample p of every day (how often a
fixed-sample reading would have decided earlier, or the wrong way).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("LTR_SEARCH_DATASETS", ROOT.parent / "shared" / "datasets"))
CLI = str(ROOT / ".venv" / "bin" / "ltr-search")
OUTCOMES = {0: "promoted", 3: "refused", 6: "interleaving"}


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, env={**os.environ, "LTR_SEARCH_HOME": str(home)},
                          cwd=ROOT)


def trial_home(base: Path, target: Path, active: str) -> Path:
    """`base`'s index and encoder (symlinked) and a copy of its models with `active` active; no
    events, aggregates, experiments or retrain state."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for part in ("indexes", "encoders"):
        (target / part).symlink_to((base / part).resolve(), target_is_directory=True)
    shutil.copytree(base / "models", target / "models",
                    ignore=shutil.ignore_patterns("challenge.json", "active.json", ".lock"))
    (target / "models" / "active.json").write_text(json.dumps({"active": active, "history": []}))
    return target


def run_trial(args: argparse.Namespace, active: str, challenger: str, seed: int, work: Path) -> dict[str, Any]:
    home = trial_home(Path(args.base_home), work / f"{challenger}-vs-{active}-s{seed}", active)
    started = cli(home, "models", "challenge", challenger, "--share", str(args.share))
    if started.returncode != 0:
        raise RuntimeError(started.stderr)
    days: list[dict[str, Any]] = []
    code = 6
    for day in range(1, args.max_days + 1):
        simulated = cli(home, "simulate", "--dataset", str(args.dataset), "--split", args.split, "--sessions",
                        str(args.sessions_per_day), "--click-model", "pbm", "--pipeline", "ltr", "--exploration", "0",
                        "--eta", "1", "--click-probs", "0:0.05,1:0.95,2:0.95", "--noise", "0.1",
                        "--seed", str(seed * 1000 + day), "--name", args.name, "--quiet")
        if simulated.returncode != 0:
            raise RuntimeError(simulated.stderr)
        report_path = home / f"day-{day}.json"
        retrained = cli(home, "retrain", "--name", args.name, "--interleave", str(args.share), "--json", str(report_path),
                        "--quiet")
        code = retrained.returncode
        if code not in OUTCOMES:
            raise RuntimeError(f"retrain exit {code}: {retrained.stderr}")
        trial = json.loads(report_path.read_text()).get("interleaving", {})
        days.append({"day": day, "exit": code, "requests": trial.get("requests"), "mean_credit": trial.get("mean_credit"),
                     "always_valid_p": trial.get("always_valid_p_value"), "fixed_sample_p": trial.get("p_value")})
        if code != 6:
            break
    fixed = [d for d in days if d["fixed_sample_p"] is not None and d["fixed_sample_p"] < 0.05]
    return {"seed": seed, "outcome": OUTCOMES[code], "days": len(days), "requests_at_decision": days[-1]["requests"],
            "first_day_fixed_sample_p_below_0.05": fixed[0]["day"] if fixed else None, "per_day": days}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-home", required=True, help="a home with the dataset's index and both models")
    parser.add_argument("--better", required=True, help="the model with the higher nDCG@10 (e.g. m0001)")
    parser.add_argument("--worse", required=True)
    parser.add_argument("--dataset", type=Path, default=DATASETS / "scifact")
    parser.add_argument("--split", default="test")
    parser.add_argument("--name", default="scifact", help="index name")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sessions-per-day", type=int, default=300)
    parser.add_argument("--share", type=float, default=0.5)
    parser.add_argument("--max-days", type=int, default=20)
    parser.add_argument("--work", default="/tmp/bench_retrain_interleave")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bench_retrain_interleave.json")
    args = parser.parse_args()
    began = time.perf_counter()
    work = Path(args.work)
    report: dict[str, Any] = {"command": " ".join(sys.argv[1:]), "users": "issue-16 PBM users, no exploration",
                              "share": args.share, "sessions_per_day": args.sessions_per_day, "directions": {}}
    for active, challenger, right in ((args.better, args.worse, "refused"), (args.worse, args.better, "promoted")):
        runs = [run_trial(args, active, challenger, seed, work) for seed in range(1, args.seeds + 1)]
        decided = [r for r in runs if r["outcome"] != "interleaving"]
        report["directions"][f"{challenger} challenges {active}"] = {
            "right_outcome": right, "runs": runs,
            "right": sum(r["outcome"] == right for r in runs), "wrong": sum(r["outcome"] not in (right, "interleaving") for r in runs),
            "undecided": len(runs) - len(decided),
            "median_days": statistics.median(r["days"] for r in decided) if decided else None,
            "median_requests_at_decision": statistics.median(r["requests_at_decision"] for r in decided) if decided else None,
            "fixed_sample_p_below_0.05_on_an_earlier_day": sum(
                1 for r in decided if r["first_day_fixed_sample_p_below_0.05"] is not None
                and r["first_day_fixed_sample_p_below_0.05"] < r["days"]),
        }
        summary = {k: v for k, v in report["directions"][f"{challenger} challenges {active}"].items() if k != "runs"}
        print(f"{challenger} challenges {active}: {json.dumps(summary)}", flush=True)
    report["wall_s"] = round(time.perf_counter() - began, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"json: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
