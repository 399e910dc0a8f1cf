"""Feature-group ablation (`ltr-search eval --ablation`): the plan of pipelines and the verdicts."""
from __future__ import annotations

import numpy as np
import pytest

from eval.ablation import ablation_lines, ablation_pipeline_names, feature_group_ablation
from search.app.cli.common import CliError
from search.app.cli.evaluate import ablation_plan


def test_the_plan_adds_one_pipeline_per_feature_group_of_each_learned_ranker():
    plan = ablation_plan(["hybrid", "ltr", "ltr:basic"])
    assert plan["ltr"] == {"text": "ltr:text-without-text", "dense": "ltr:text-without-dense",
                           "retrieval": "ltr:text-without-retrieval"}
    assert set(plan["ltr:basic"]) == {"text", "dense", "retrieval"}
    assert ablation_pipeline_names("ltr", "solo", ["text"]) == []  # without its only group nothing is left
    with pytest.raises(CliError, match="needs a learned pipeline"):
        ablation_plan(["bm25", "hybrid"])


def test_a_group_whose_removal_hurts_helps_and_one_that_changes_nothing_does_not():
    rng = np.random.default_rng(0)
    full = rng.uniform(0.3, 0.9, size=200)
    scores = {
        "ltr": {"nDCG@10": full},
        "ltr:text-without-dense": {"nDCG@10": full - 0.05 + rng.normal(scale=0.02, size=200)},  # dense helps
        "ltr:text-without-retrieval": {"nDCG@10": full + rng.normal(scale=0.02, size=200)},  # noise only
        "ltr:text-without-text": {"nDCG@10": full + 0.04 + rng.normal(scale=0.02, size=200)},  # text hurts here
    }
    plan = {"dense": "ltr:text-without-dense", "retrieval": "ltr:text-without-retrieval", "text": "ltr:text-without-text"}
    result = feature_group_ablation(scores, "ltr", plan, "nDCG@10", resamples=2000, seed=1)
    groups = result["groups"]
    assert groups["dense"]["verdict"] == "helps" and groups["dense"]["effect"] == pytest.approx(0.05, abs=0.01)
    assert groups["dense"]["ci95"][0] > 0
    assert groups["retrieval"]["verdict"] == "no significant effect"
    assert groups["text"]["verdict"] == "hurts" and groups["text"]["effect"] < 0
    assert result["full"] == pytest.approx(full.mean())
    table = "\n".join(ablation_lines("ltr", result))
    assert "dense" in table and "helps" in table and "hurts" in table
