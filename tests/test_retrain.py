"""`ltr-search train --from-events` on traffic a NON-model pipeline served (bm25), and
`ltr-search retrain`: exit codes (promoted, nothing new, busy, error), the lock, and kill -9 at
any point leaving the active model and the events intact. Real subprocesses, a real BM25 index of
the topics collection, clicks from the real in-process simulator."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ltr.registry import ModelRegistry
from ltr.experiments import ExperimentLog, InterleavedRequest, TeamPick
from search.app.cli.retrain import (
    EXIT_BUSY, EXIT_ERROR, EXIT_INTERLEAVING, EXIT_NOTHING_NEW, EXIT_PROMOTED, EXIT_REFUSED,
)
from search.event_store import Event, EventStore, ServedRequest, ServedResult
from tests.conftest import home_sharing_encoder, run_cli
from tests.test_ltr import _collection

ROOT = Path(__file__).resolve().parents[1]
FAST = ("--max-rounds", "30", "--cv-folds", "2", "--quiet")


@pytest.fixture(scope="module")
def logged(tmp_path_factory, shared_encoder_home):
    """The topics collection indexed; 10 simulated sessions per training query served by bm25 (a
    pipeline that logs no features) with 10% exploration."""
    root = tmp_path_factory.mktemp("retrain")
    dataset = _collection(root / "topics")
    home = home_sharing_encoder(root / "home", shared_encoder_home)
    run_cli(home, "index", "build", "--dataset", str(dataset), "--name", "topics", "--quiet")
    run_cli(home, "simulate", "--dataset", str(dataset), "--split", "train", "--sessions", "240", "--click-model", "pbm",
            "--pipeline", "bm25", "--exploration", "0.1", "--name", "topics", "--depth", "5", "--quiet")
    return {"home": home, "dataset": dataset}


def retrain(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.app.cli", "--home", str(home), "retrain", "--name", "topics",
                           *FAST, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_train_from_events_learns_from_pages_a_non_model_pipeline_served(logged):
    home = logged["home"]
    with EventStore(home / "events" / "topics.sqlite3") as events:
        requests = list(events.iter_requests())
    assert {r.pipeline for r in requests} == {"bm25"} and all(res.features is None for r in requests for res in r.results)
    assert all(r.explored is not None and r.interleaved is False for r in requests)  # the explicit flags
    shutil.rmtree(home / "behaviour")  # a home with events and no aggregates yet: training builds them
    result = run_cli(home, "train", "--from-events", "--name", "topics", *FAST)
    assert (home / "behaviour" / "topics.sqlite3").is_file()
    assert "no judgments read" in result.stdout and "off-policy estimate on" in result.stdout
    assert "bm25 x240" in result.stderr
    manifest = ModelRegistry(home).manifest("m0001")
    training = manifest.training
    assert training["source"] == "events" and training["method"] == "click-model"
    assert training["pages"]["pipelines"] == {"bm25": 240} and training["clicked_pages"] > 0
    assert training["off_policy"]["pages"] > 0 and len(training["off_policy"]["ci"]) == 2
    # point in time through the one feature path: the model was trained on the default click feature set
    # (text plus other queries' clicks per document) extracted from the windows of the logged queries, and loads with its parity sample
    assert manifest.feature_set["name"] == "text+doc-clicks" and ModelRegistry(home).load("m0001").version == "m0001"
    # model:latest is the newest registry model in eval
    evaluated = run_cli(home, "eval", "--dataset", str(logged["dataset"]), "--split", "test", "--name", "topics",
                        "--pipeline", "bm25,model:latest", "--json", str(home / "eval.json"))
    assert evaluated.returncode == 0
    assert "model:latest" in json.loads((home / "eval.json").read_text())["pipelines"]


def test_pairwise_flags_still_select_the_pairwise_method(logged):
    result = run_cli(logged["home"], "train", "--from-events", "--name", "topics", "--method", "click-model",
                     "--debias", "ips", check=False)
    assert result.returncode == 2 and "--debias apply to --method pairs" in result.stderr


def test_retrain_exit_codes_and_the_lock(logged, tmp_path):
    home = logged["home"]
    registry = ModelRegistry(home)
    before = set(registry.version_ids())
    first = retrain(home, "--report", str(tmp_path / "reports"), "--json", str(tmp_path / "run.json"))
    assert first.returncode in (EXIT_PROMOTED, EXIT_REFUSED), first.stderr
    report = json.loads((tmp_path / "run.json").read_text())
    assert report["outcome"] == {EXIT_PROMOTED: "promoted", EXIT_REFUSED: "refused"}[first.returncode]
    assert set(registry.version_ids()) - before == {report["candidate"]}
    if first.returncode == EXIT_PROMOTED:
        assert registry.active() == report["candidate"]
    markdown = list((tmp_path / "reports").glob("retrain-topics-*.md"))
    assert len(markdown) == 1 and "Outcome:" in markdown[0].read_text()

    again = retrain(home)  # no clicked page since: nothing trained
    assert again.returncode == EXIT_NOTHING_NEW and "nothing new" in again.stdout
    assert set(registry.version_ids()) - before == {report["candidate"]}

    lock_path = home / "retrain" / "topics.lock"
    with open(lock_path, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = retrain(home)
    assert busy.returncode == EXIT_BUSY and "holds" in busy.stderr

    broken = retrain(home, "--events", str(tmp_path / "missing.sqlite3"))
    assert broken.returncode == EXIT_ERROR and "no event store" in broken.stderr


def test_retrain_with_judgments_trains_both_candidates_and_promotes_the_better_by_the_gate(logged, tmp_path):
    home, dataset = logged["home"], logged["dataset"]
    registry = ModelRegistry(home)
    state = home / "retrain" / "topics.json"
    state.unlink(missing_ok=True)  # every logged page counts as new
    refused = retrain(home, "--train-dataset", str(dataset))
    assert refused.returncode == EXIT_ERROR and "--dataset PATH --split SPLIT" in refused.stderr
    before = set(registry.version_ids())
    run = retrain(home, "--train-dataset", str(dataset), "--dataset", str(dataset), "--split", "test",
                  "--json", str(tmp_path / "run.json"), "--force")
    assert run.returncode == EXIT_PROMOTED, run.stderr
    report = json.loads((tmp_path / "run.json").read_text())
    candidates = report["candidates"]
    assert set(candidates) == set(registry.version_ids()) - before and len(candidates) == 2
    assert sorted(c["trained_on"].split()[0] for c in candidates.values()) == ["clicks", "judgments"]
    means = {v: c["gate"]["means"][v] for v, c in candidates.items()}
    eligible = [v for v, c in candidates.items() if not c["gate"]["worse_than"]] or [report["click_candidate"]]
    assert report["candidate"] == max(eligible, key=means.get) == registry.active()
    state.unlink()
    trained_on_test = retrain(home, "--train-dataset", str(dataset), "--train-split", "test", "--dataset", str(dataset),
                              "--split", "test")
    assert trained_on_test.returncode == EXIT_ERROR and "neither model has seen" in trained_on_test.stderr


def test_kill_9_during_retrain_leaves_the_active_model_and_events_intact(logged):
    home = logged["home"]
    registry = ModelRegistry(home)
    active = registry.active()
    events_path = home / "events" / "topics.sqlite3"
    with EventStore(events_path) as events:
        counts = events.count_events()
    state = home / "retrain" / "topics.json"
    state_before = state.read_text() if state.exists() else None
    for delay in (0.5, 2.0, 4.0):  # start-up, aggregates, training: wherever it is, kill it
        if state.exists():
            state.unlink()  # make it train again
        process = subprocess.Popen([sys.executable, "-m", "search.app.cli", "--home", str(home), "retrain", "--name",
                                    "topics", *FAST], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        finished = process.poll() is not None  # on an idle machine a run may complete within the delay
        os.kill(process.pid, signal.SIGKILL) if not finished else None
        process.wait()
        current = registry.active()
        if not finished:
            # killed mid-run: the active model is the old one or a newly promoted one, never a torn
            # one (promotion is the last, atomic step), and it loads with its checksum and parity
            assert current == active or current in registry.version_ids()
        assert current is None or registry.load(current).version == current
        active = current
        with EventStore(events_path) as events:
            assert events.count_events() == counts
    # the kernel dropped the dead run's lock: the next run is not "busy"
    if state.exists():
        state.unlink()
    assert retrain(home, "--force").returncode in (EXIT_PROMOTED, EXIT_REFUSED)
    if state_before is not None:
        assert state.exists()


def test_too_little_click_evidence_trains_nothing_and_says_why(tmp_path, shared_encoder_home):
    """A log too thin to learn from (a few sessions, most queries never clicked): `train
    --from-events` fails with the reason, `retrain` reports "nothing new" (exit 4) with it, no
    model is stored, and the next run looks at the same pages again."""
    dataset = _collection(tmp_path / "topics")
    home = home_sharing_encoder(tmp_path / "home", shared_encoder_home)
    run_cli(home, "index", "build", "--dataset", str(dataset), "--name", "topics", "--quiet")
    run_cli(home, "simulate", "--dataset", str(dataset), "--split", "train", "--sessions", "6", "--click-model", "pbm",
            "--pipeline", "bm25", "--exploration", "0.1", "--name", "topics", "--depth", "5", "--quiet")
    trained = run_cli(home, "train", "--from-events", "--name", "topics", *FAST, check=False)
    assert trained.returncode == 2 and "too little click evidence" in trained.stderr
    assert "at least 10 are needed" in trained.stderr
    registry = ModelRegistry(home)
    assert registry.version_ids() == []
    run = retrain(home, "--report", str(tmp_path / "reports"), "--json", str(tmp_path / "run.json"))
    assert run.returncode == EXIT_NOTHING_NEW, run.stderr
    report = json.loads((tmp_path / "run.json").read_text())
    assert report["outcome"] == "nothing new" and "too little click evidence" in report["reason"]
    assert "nothing trained: too little click evidence" in next((tmp_path / "reports").glob("*.md")).read_text()
    assert registry.version_ids() == [] and not (home / "retrain" / "topics.json").exists()


def _interleaved_traffic(home: Path, a: str, b: str, clicks_for: str, requests: int = 40) -> None:
    """What a service interleaving `a` (team A) with `b` logs: pages with a document credited to
    each, and a click on `clicks_for`'s document in three requests of four (none in the fourth)."""
    now = time.time()
    with ExperimentLog(home / "experiments" / "topics.sqlite3") as log, EventStore(home / "events" / "topics.sqlite3") as store:
        for i in range(requests):
            request_id = f"trial-{a}-{b}-{now:.0f}-{i}"
            picks = (TeamPick(1, "d-a", "A", 0.5), TeamPick(2, "d-b", "B", -0.5))
            log.log_interleaved(InterleavedRequest(request_id, now + i * 0.01, a, b, 0, picks))
            store.log_request(ServedRequest(request_id, now + i * 0.01, "trial query", "ltr", "topics", "g-trial", a, None,
                                            None, 0, [ServedResult(p.doc_id, p.position, 1.0) for p in picks],
                                            explored=False, interleaved=True))
            if i % 4:
                position = 1 if clicks_for == a else 2
                store.append_events([Event(request_id, "click", picks[position - 1].doc_id, position, now + i * 0.01 + 1)])


def test_retrain_interleaves_a_candidate_before_promoting_it(logged, tmp_path):
    """--interleave: a candidate that passes the gate becomes the registry's challenge (exit 6, the
    service interleaves it from its next reload); later runs read the interleaved requests with the
    always-valid test: still undecided -> 6 again; the active model preferred -> refused (3); no
    preference after --interleave-days -> refused; a promotion since the start -> the trial is void
    and the run trains anew; the challenger preferred -> promoted (0). Every end removes the challenge."""
    home = logged["home"]
    registry = ModelRegistry(home)
    state = home / "retrain" / "topics.json"
    if registry.active() is None:  # run alone: a first model, promoted at once (nothing to interleave against)
        state.unlink(missing_ok=True)
        first_run = retrain(home, "--interleave", "0.5", "--force")
        assert first_run.returncode == EXIT_PROMOTED and registry.challenge() is None, first_run.stderr

    def start_trial() -> tuple[str, str]:
        state.unlink(missing_ok=True)  # every logged page counts as new
        run = retrain(home, "--interleave", "0.5", "--force", "--json", str(tmp_path / "start.json"))
        assert run.returncode == EXIT_INTERLEAVING, run.stderr
        report = json.loads((tmp_path / "start.json").read_text())
        challenge = registry.challenge()
        assert report["outcome"] == "interleaving" and report["challenge"] == challenge.to_dict()
        assert challenge.version == report["candidate"] and challenge.against == registry.active() and challenge.share == 0.5
        return challenge.against, challenge.version

    active, challenger = start_trial()
    waiting = retrain(home, "--interleave", "0.5", "--json", str(tmp_path / "wait.json"))
    assert waiting.returncode == EXIT_INTERLEAVING, waiting.stderr
    report = json.loads((tmp_path / "wait.json").read_text())
    assert report["interleaving"]["requests"] == 0 and report["interleaving"]["preferred"] is None
    assert "from its next reload (POST /admin/reload)" in report["interleaving"]["note"]
    assert registry.challenge().version == challenger and registry.active() == active
    _interleaved_traffic(home, active, challenger, clicks_for=active)
    refused = retrain(home, "--interleave", "0.5", "--report", str(tmp_path / "reports"))
    assert refused.returncode == EXIT_REFUSED, refused.stderr
    assert registry.challenge() is None and registry.active() == active
    markdown = sorted((tmp_path / "reports").glob("retrain-topics-*.md"))[-1].read_text()
    assert f"interleaving `{active}` (A) vs `{challenger}` (B)" in markdown and "always-valid p" in markdown
    assert f"users preferred the active model {active}" in markdown
    plot = sorted((tmp_path / "reports").glob("retrain-topics-*-interleaving.png"))[-1]
    assert f"![the interleaving trial's p-values, request by request]({plot.name})" in markdown and plot.stat().st_size > 0

    active, challenger = start_trial()
    expired = retrain(home, "--interleave", "0.5", "--interleave-days", "0", "--json", str(tmp_path / "expired.json"))
    assert expired.returncode == EXIT_REFUSED, expired.stderr
    assert "no preference after" in json.loads((tmp_path / "expired.json").read_text())["refused"]
    assert registry.challenge() is None and registry.active() == active

    active, first = start_trial()
    run_cli(home, "models", "promote", first, "--force")  # an operator promotes the challenger by hand
    state.unlink()
    void = retrain(home, "--interleave", "0.5", "--force", "--json", str(tmp_path / "void.json"))
    assert void.returncode == EXIT_INTERLEAVING, void.stderr  # the void trial ended; a new candidate is interleaved
    report = json.loads((tmp_path / "void.json").read_text())
    assert report["challenge_void"]["version"] == first and report["challenge"]["against"] == first
    active, challenger = registry.active(), registry.challenge().version
    _interleaved_traffic(home, active, challenger, clicks_for=challenger)
    promoted = retrain(home, "--interleave", "0.5", "--json", str(tmp_path / "promoted.json"))
    assert promoted.returncode == EXIT_PROMOTED, promoted.stderr
    report = json.loads((tmp_path / "promoted.json").read_text())
    assert report["interleaving"]["preferred"] == challenger and report["interleaving"]["always_valid_p_value"] < 0.05
    assert registry.active() == challenger and registry.challenge() is None
    bad = retrain(home, "--interleave", "1.5")
    assert bad.returncode == EXIT_ERROR and "--interleave must be a share of requests in [0, 1]" in bad.stderr
