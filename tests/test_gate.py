"""The promotion gate knows the baseline: a model significantly worse than plain fusion on held-out
queries is refused even when no model is active; without held-out queries the inner-CV evidence
recorded at training time decides."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eval.datasets import load_dataset
from eval.gate import FUSION_BASELINE, baseline_fusion, training_evidence
from ltr.features import feature_set
from ltr.ranker import index_description
from ltr.registry import ModelRegistry
from ltr.training import TrainingSettings, build_rows, train_ranker
from search.embedded import EmbeddedIndex
from search.hybrid import FusionSettings
from tests.conftest import run_cli
from tests.test_ltr import WINDOW, indexed_topics


def _save(home: Path, dataset: Path, inverted: bool, training: dict | None = None) -> str:
    """A text model on the train split; with `inverted` labels it prefers every wrong document."""
    index = EmbeddedIndex.open(home, "topics")
    data = load_dataset(dataset, "train")
    features = feature_set("text")
    rows = build_rows(index, data.queries, data.qrels, features, WINDOW)
    if inverted:
        rows.labels = np.where(rows.labels > 0, 0.0, 1.0).astype(np.float32)
    model = train_ranker(rows, features.names, TrainingSettings(max_rounds=30), None)
    record = {"dataset": str(dataset.resolve()), "split": "train", "window": WINDOW.to_dict(), **(training or {})}
    return ModelRegistry(home).save(
        model.booster, feature_set=features.describe(), index=index_description(index), training=record, params={},
        metrics={}, importance=model.importance(), sample_features=rows.features[:8], best_iteration=model.best_iteration,
    ).version


@pytest.fixture(scope="module")
def topics(tmp_path_factory, shared_encoder_home: Path):
    home, dataset = indexed_topics(tmp_path_factory.mktemp("gate"), shared_encoder_home)
    return {"home": home, "dataset": dataset}


def test_a_first_model_worse_than_fusion_is_refused(topics):
    home, dataset = topics["home"], topics["dataset"]
    bad = _save(home, dataset, inverted=True)
    refused = run_cli(home, "models", "promote", bad, "--dataset", str(dataset), "--split", "test", "--quiet", check=False)
    assert refused.returncode == 2, refused.stderr
    assert f"{bad} is significantly worse than the fusion baseline" in refused.stderr
    assert ModelRegistry(home).active() is None
    good = _save(home, dataset, inverted=False)
    promoted = run_cli(home, "models", "promote", good, "--dataset", str(dataset), "--split", "test", "--quiet", "--json")
    outcome = json.loads(promoted.stdout)
    assert outcome["active"] == good and outcome["previous"] is None
    assert list(outcome["gate"]["comparisons"]) == [FUSION_BASELINE] and not outcome["gate"]["worse_than"]
    assert ModelRegistry(home).active() == good


def test_without_a_split_the_inner_cv_evidence_decides(topics):
    home, dataset = topics["home"], topics["dataset"]
    registry = ModelRegistry(home)
    losing = _save(home, dataset, inverted=False, training={"inner_cv": {"gain": -0.05, "ci": [-0.08, -0.02]}})
    assert training_evidence(registry.manifest(losing))[0]
    holding = _save(home, dataset, inverted=False, training={"inner_cv": {"gain": 0.01, "ci": [-0.01, 0.03]}})
    assert not training_evidence(registry.manifest(holding))[0]
    silent = _save(home, dataset, inverted=False)
    refuse, why = training_evidence(registry.manifest(silent))
    assert not refuse and "no inner cross-validation evidence" in why


def test_the_fusion_baseline_is_convex_over_the_model_window(topics):
    home, dataset = topics["home"], topics["dataset"]
    manifest = ModelRegistry(home).manifest(_save(home, dataset, inverted=False))
    assert baseline_fusion(manifest) == FusionSettings(method="convex", bm25_candidates=8, dense_candidates=8)


def test_a_staged_models_baseline_is_the_fusion_it_was_staged_on(topics):
    """A base chosen on the tuned grid (here z-score, dense weight 0.3) is the fusion the gate
    compares with, over the model's window."""
    from ltr.registry import BaseStage

    home, dataset = topics["home"], topics["dataset"]
    index = EmbeddedIndex.open(home, "topics")
    data = load_dataset(dataset, "train")
    features = feature_set("text")
    rows = build_rows(index, data.queries, data.qrels, features, WINDOW)
    stage = BaseStage(FusionSettings(method="convex", normalisation="z-score", dense_weight=0.3), 4.0)
    model = train_ranker(rows, features.names, TrainingSettings(max_rounds=10), stage=stage, rounds=5)
    version = ModelRegistry(home).save(
        model.booster, feature_set=features.describe(), index=index_description(index),
        training={"dataset": str(dataset.resolve()), "split": "train", "window": WINDOW.to_dict()}, params={}, metrics={},
        importance={}, sample_features=rows.features[:8], best_iteration=4, stage=stage, sample_base=rows.base(stage)[:8],
    ).version
    assert baseline_fusion(ModelRegistry(home).manifest(version)) == FusionSettings(
        method="convex", normalisation="z-score", dense_weight=0.3, bm25_candidates=8, dense_candidates=8)
