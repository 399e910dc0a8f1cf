"""Staged models: trees learn on top of the fusion's score (XGBoost base_margin), the inner CV
chooses the trees and the base's scale inside the training queries, and the registry keeps the
stage with the model (parity on trees + base, refusal without a base)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ltr.ranker import InMemoryModel, LtrPipeline, window_base
from ltr.registry import BaseStage, MissingBaseError, ModelCorruptError, ModelRegistry
from ltr.training import (RankingRows, TrainingSettings, fusion_key, group_ndcg, inner_cross_validation, inner_cv_folds,
                          train_ranker)
from search.hybrid import FusionSettings, fused_scores

CONVEX = FusionSettings(method="convex")
NAMES = ("signal", "noise_a", "noise_b")
FEATURE_SET = {"name": "synthetic", "version": 1, "features": list(NAMES)}
INDEX = {"name": "toy", "generation": "g000001", "analyzer": "standard", "backend": "embedded"}
FAST = TrainingSettings(max_rounds=60, early_stopping_rounds=20, cv_patience=20, base_scales=(1.0, 4.0), threads=1)


def synthetic_rows(queries: int, signal: float, seed: int = 0, docs: int = 20) -> RankingRows:
    """Each query's relevance comes from a latent score; the first stage sees it with noise and
    the `signal` feature sees what the first stage misses (weight `signal`; 0: pure noise)."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(queries, docs))
    first = latent + rng.normal(size=latent.shape)
    hidden = latent - first  # what the first stage got wrong
    labels = (latent > 1.0).astype(np.float32)
    features = np.stack([signal * hidden + rng.normal(scale=0.3, size=latent.shape),
                         rng.normal(size=latent.shape), rng.normal(size=latent.shape)], axis=-1)
    minmax = (first - first.min(axis=1, keepdims=True)) / np.ptp(first, axis=1, keepdims=True)
    rrf = 1.0 - np.argsort(np.argsort(-first, axis=1), axis=1) / docs  # any other fusion, worse than convex here
    return RankingRows(
        query_ids=[f"q{i}" for i in range(queries) for _ in range(docs)][::docs],
        doc_ids=[f"d{i}-{j}" for i in range(queries) for j in range(docs)],
        features=features.reshape(-1, len(NAMES)).astype(np.float32), labels=labels.reshape(-1),
        group_sizes=np.full(queries, docs, dtype=np.int64),
        first_stage={fusion_key(CONVEX): minmax.reshape(-1), fusion_key(FusionSettings()): rrf.reshape(-1) * 0.9},
    )


def test_a_staged_model_with_zero_trees_ranks_exactly_as_its_fusion():
    rows = synthetic_rows(40, signal=1.0)
    stage = BaseStage(CONVEX, 4.0)
    trained = train_ranker(rows, NAMES, FAST, stage=stage, rounds=0)
    assert trained.trees == 0
    scores = InMemoryModel(trained).predict(rows.features, rows.base(stage))
    np.testing.assert_array_equal(scores, rows.base(stage).astype(np.float32))
    np.testing.assert_array_equal(group_ndcg(rows, scores), group_ndcg(rows, rows.first_stage[fusion_key(CONVEX)]))


def test_a_staged_model_refuses_to_score_without_its_base():
    rows = synthetic_rows(20, signal=1.0)
    trained = train_ranker(rows, NAMES, FAST, stage=BaseStage(CONVEX, 1.0), rounds=5)
    with pytest.raises(MissingBaseError, match="staged on convex x 1"):
        InMemoryModel(trained).predict(rows.features)


def test_explain_gives_the_base_its_own_column_and_rows_sum_to_the_score():
    rows = synthetic_rows(30, signal=1.0)
    stage = BaseStage(CONVEX, 4.0)
    model = InMemoryModel(train_ranker(rows, NAMES, FAST, stage=stage, rounds=10))
    base = rows.base(stage)
    contributions = model.contributions(rows.features, base)
    assert contributions.shape == (len(rows.labels), len(NAMES) + 2)  # features, bias, base
    np.testing.assert_allclose(contributions[:, -1], base.astype(np.float32))
    np.testing.assert_allclose(contributions.sum(axis=1), model.predict(rows.features, base), atol=1e-4)


def test_inner_cv_keeps_trees_that_beat_the_base_and_is_reproducible():
    rows = synthetic_rows(120, signal=1.0)
    first = inner_cross_validation(rows, NAMES, FAST, CONVEX)
    again = inner_cross_validation(rows, NAMES, FAST, CONVEX)
    assert first.rounds > 0 and first.gain > 0 and first.ci[0] > 0
    assert first.stage.fusion.method == "convex"  # the better fusion on the training rows
    assert first.folds == 5 == inner_cv_folds(119) and inner_cv_folds(1000) == 3
    assert (again.rounds, again.stage, again.gain, again.ci) == (first.rounds, first.stage, first.gain, first.ci)
    record = first.to_dict()
    assert {"gain", "ci", "folds", "rounds"} <= set(record)
    json.dumps(record)


def test_inner_cv_keeps_the_base_alone_when_the_trees_do_not_help():
    rows = synthetic_rows(60, signal=0.0)  # the features know nothing the first stage does not
    chosen = inner_cross_validation(rows, NAMES, FAST, CONVEX)
    assert chosen.rounds == 0 and chosen.ci[0] <= 0 and chosen.best_rounds >= 0


def _save(registry: ModelRegistry, rows: RankingRows, stage: BaseStage | None, rounds: int):
    trained = train_ranker(rows, NAMES, FAST, stage=stage, rounds=rounds)
    base = rows.base(stage)
    return registry.save(trained.booster, feature_set=FEATURE_SET, index=INDEX, training={}, params={}, metrics={},
                         importance={}, sample_features=rows.features[:32],
                         best_iteration=rounds - 1 if rounds else None, stage=stage,
                         sample_base=None if base is None else base[:32])


def test_registry_checks_parity_through_the_base_and_refuses_a_model_without_it(tmp_path):
    rows = synthetic_rows(30, signal=1.0)
    stage = BaseStage(CONVEX, 4.0)
    registry = ModelRegistry(tmp_path)
    saved = _save(registry, rows, stage, 12)
    loaded = registry.load(saved.version)
    assert loaded.stage == stage and saved.stage == stage.to_dict()
    np.testing.assert_array_equal(loaded.predict(rows.features[:32], rows.base(stage)[:32]), saved.sample["predictions"])
    base_only = registry.load(_save(registry, rows, stage, 0).version)
    assert base_only.manifest.trees == 0

    manifest_path = registry.root / saved.version / "manifest.json"
    original = json.loads(manifest_path.read_text())
    for broken, message in [
        ({**original, "stage": {**original["stage"], "kind": "text-model"}}, "unknown base 'text-model'"),
        ({**original, "sample": {k: v for k, v in original["sample"].items() if k != "base"}}, "stores its base"),
        ({**original, "stage": None}, "keys"),  # the trees alone would be served: refused, not base 0
    ]:
        manifest_path.write_text(json.dumps(broken))
        with pytest.raises(ModelCorruptError, match=message):
            registry.load(saved.version)
    tampered = {**original, "sample": {**original["sample"], "base": [b + 0.5 for b in original["sample"]["base"]]}}
    manifest_path.write_text(json.dumps(tampered))
    with pytest.raises(Exception, match="predicts"):
        registry.load(saved.version)


def test_an_old_manifest_without_a_stage_loads_and_scores_as_before(tmp_path):
    rows = synthetic_rows(30, signal=1.0)
    registry = ModelRegistry(tmp_path)
    saved = _save(registry, rows, None, 8)
    manifest_path = registry.root / saved.version / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data.pop("stage")  # as written before stages existed
    manifest_path.write_text(json.dumps(data))
    loaded = registry.load(saved.version)
    assert loaded.stage is None
    np.testing.assert_array_equal(loaded.predict(rows.features[:32]), saved.sample["predictions"])


def test_serving_adds_the_base_the_training_rows_were_built_with(dense_index):
    """One function computes the base at training and serving: `BaseStage.margin` of the window."""
    from ltr.features import feature_set
    from ltr.training import build_rows, candidate_window

    window_settings = FusionSettings(bm25_candidates=4, dense_candidates=4)
    text = feature_set("text")
    query = "dogs chase cats in the garden"
    rows = build_rows(dense_index, {"q": query}, {}, text, window_settings)
    stage = BaseStage(CONVEX, 4.0)
    window = candidate_window(dense_index, query, window_settings)
    # Training rows keep first-stage scores as float32, the precision XGBoost takes a base margin in.
    np.testing.assert_array_equal(rows.base(stage).astype(np.float32), stage.margin(window).astype(np.float32))
    np.testing.assert_array_equal(stage.margin(window), 4.0 * fused_scores(window, CONVEX))
    model = InMemoryModel(train_ranker(synthetic_rows(10, 1.0), NAMES, FAST, stage=stage, rounds=0))
    np.testing.assert_array_equal(window_base(model, window), stage.margin(window))
