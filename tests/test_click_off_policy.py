"""The judgment-free safety net of click training: the self-normalised IPS estimate against the
logging policy (a ranking that buries the clicked documents is significantly worse, the logging
ranking itself is not different), and `models promote` refusing a click-trained model whose
estimate is significantly worse unless --force."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from eval.click_models import ClickLabelSettings, click_model_labels
from ltr.click_training import LoggedPage, off_policy_estimate, off_policy_refusal
from search.event_store import ServedRequest, ServedResult
from tests.conftest import run_cli
from tests.test_retrain import logged  # noqa: F401  (the fixture: topics index with bm25 traffic)

T0 = time.time() - 3600
GAMMA = [1.0 / r for r in range(1, 11)]


def pages(n: int = 400, seed: int = 0, explore: float = 0.0) -> list[LoggedPage]:
    """PBM users on a logging ranking where d0..d9 are shown in order and d0, d1 are relevant;
    `explore`: share of pages shown in a random order (what makes examination identifiable)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        query = f"q{k % 20}"
        order = rng.permutation(10) if rng.random() < explore else np.arange(10)
        results = [ServedResult(f"{query}-d{i}", p + 1, 10.0 - p) for p, i in enumerate(order.tolist())]
        attractive = np.where(order < 2, 0.9, 0.05)
        clicked = frozenset(int(p) + 1 for p in np.flatnonzero(rng.random(10) < attractive * np.array(GAMMA)))
        out.append(LoggedPage(ServedRequest(f"r{k}", T0 + k, query, "bm25", "i", "g", None, None, None, 0, results),
                              clicked))
    return out


def test_burying_the_clicked_documents_is_significantly_worse_and_the_logging_ranking_is_not_different() -> None:
    logged = pages()
    same = {f"q{q}": [f"q{q}-d{i}" for i in range(10)] for q in range(20)}
    reversed_ = {key: docs[::-1] for key, docs in same.items()}
    worse = off_policy_estimate(logged, reversed_, GAMMA)
    assert worse.significantly_worse and worse.difference < -0.3 and worse.ci[1] < 0
    equal = off_policy_estimate(logged, same, GAMMA)
    assert equal.difference == pytest.approx(0.0) and not equal.significantly_worse
    assert equal.pages == sum(1 for p in logged if p.clicked) and equal.queries == 20
    # against the logging policy's own ranking (its unexplored pages): explored clicks no longer
    # count for the logging policy alone, so reproducing its ranking differs by exactly 0
    explored = pages(explore=0.3)
    baseline = off_policy_estimate(explored, same, GAMMA, baseline=same)
    assert baseline.difference == 0.0 and baseline.ci == (0.0, 0.0)
    assert off_policy_estimate(explored, reversed_, GAMMA, baseline=same).significantly_worse
    # a query the ranker does not rank contributes nothing; no rankable page at all is an error
    with pytest.raises(ValueError, match="nothing to estimate on"):
        off_policy_estimate(logged, {"unknown": ["x"]}, GAMMA)


def test_click_model_labels_grade_the_attractive_documents_above_the_rest() -> None:
    labels = click_model_labels(pages(800, explore=0.3), ClickLabelSettings())
    grades = labels.labels["q0"]
    assert grades["q0-d0"] == 2 and grades["q0-d1"] >= 1
    assert max(grades[f"q0-d{i}"] for i in range(2, 10)) == 0
    assert labels.examination[0] == 1.0 and labels.sessions == 800
    assert labels.examination[4] == pytest.approx(GAMMA[4], abs=0.08)  # the users' 1/rank, recovered


def test_the_refusal_reads_the_manifest_estimate() -> None:
    worse = {"source": "events", "off_policy": {"model": 0.3, "logging": 0.6, "difference": -0.3, "ci": [-0.4, -0.2],
                                                "pages": 100}}
    assert "significantly worse than the logging policy" in off_policy_refusal(worse)
    assert off_policy_refusal({**worse, "off_policy": {**worse["off_policy"], "ci": [-0.4, 0.01]}}) is None
    assert off_policy_refusal({"source": "qrels"}) is None  # judged models have their own gate


def test_models_promote_refuses_a_click_model_significantly_worse_unless_forced(logged) -> None:
    """A real click-trained model (topics collection, bm25 traffic) whose recorded estimate is set
    to what a model that lost to its logging policy records (the manifest is data)."""
    home = logged["home"]
    run_cli(home, "train", "--from-events", "--name", "topics", "--max-rounds", "20", "--cv-folds", "2", "--quiet")
    version = sorted(p.name for p in (home / "models").iterdir() if p.name.startswith("m"))[-1]
    manifest_path = home / "models" / version / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["training"]["off_policy"].update(model=0.30, logging=0.60, difference=-0.30, ci=[-0.40, -0.20])
    manifest_path.write_text(json.dumps(manifest))
    refused = run_cli(home, "models", "promote", version, check=False)
    assert refused.returncode != 0 and "significantly worse than the logging policy" in refused.stderr
    assert "--force" in refused.stderr
    forced = run_cli(home, "models", "promote", version, "--force")
    assert f"active model: {version}" in forced.stdout and "--force" in forced.stderr
