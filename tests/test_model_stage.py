"""Behaviour models staged on a frozen text model (`ltr.registry.ModelBase`): the behaviour trees
read only behaviour columns and add to the text model's score, exactly 0 for a document with no
history, so a cold query ranks bit for bit as the text model. The registry loads the base first
(parity through both stages) and refuses a model whose base is gone."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ltr.ranker import stage_contributions
from ltr.registry import BaseStage, MissingBaseModelError, ModelInUseError, ModelRegistry
from ltr.training import (InMemoryModel, RankingRows, TrainingSettings, fit_model_stage, fusion_key, group_ndcg,
                          train_ranker)
from search.hybrid import FusionSettings

CONVEX = FusionSettings(method="convex")
TEXT = ("text_signal", "text_noise")
BEHAVIOUR = ("qd_clicks", "qd_ctr")
ALL = TEXT + BEHAVIOUR
TEXT_SET = {"name": "toy-text", "version": 1, "features": list(TEXT)}
ALL_SET = {"name": "toy-text+behaviour", "version": 1, "features": list(ALL)}
INDEX = {"name": "toy", "generation": "g000001", "analyzer": "standard", "backend": "embedded"}
FAST = TrainingSettings(max_rounds=60, early_stopping_rounds=20, cv_patience=20, threads=1)
COLD = np.array([0.0, np.nan], dtype=np.float32)  # no clicks, rate unknown


def behaviour_rows(queries: int, seed: int = 0, docs: int = 20, history: float = 1.0) -> RankingRows:
    """Relevance from a latent score; the first stage and the text signal see part of it; clicks
    (on a `history` share of documents, the others cold) see what both miss."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(queries, docs))
    first = latent + rng.normal(scale=1.5, size=latent.shape)
    labels = (latent > 1.0).astype(np.float32)
    text_signal = latent + rng.normal(scale=1.5, size=latent.shape)
    clicked = rng.random(latent.shape) < history
    ctr = np.where(clicked, 1 / (1 + np.exp(-2 * latent)) + rng.normal(scale=0.05, size=latent.shape), np.nan)
    clicks = np.where(clicked, np.round(10 * np.nan_to_num(ctr)), 0.0)
    features = np.stack([text_signal, rng.normal(size=latent.shape), clicks, ctr], axis=-1).astype(np.float32)
    minmax = (first - first.min(axis=1, keepdims=True)) / np.ptp(first, axis=1, keepdims=True)
    return RankingRows(
        query_ids=[f"q{i}" for i in range(queries)], doc_ids=[f"d{i}-{j}" for i in range(queries) for j in range(docs)],
        features=features.reshape(-1, len(ALL)), labels=labels.reshape(-1), group_sizes=np.full(queries, docs, dtype=np.int64),
        first_stage={fusion_key(CONVEX): minmax.reshape(-1).astype(np.float32)},
    )


def text_model(rows: RankingRows, stage: BaseStage) -> InMemoryModel:
    return InMemoryModel(train_ranker(rows.columns(np.arange(len(TEXT))), TEXT, FAST, stage=stage, rounds=15))


def staged(rows: RankingRows, base: InMemoryModel):
    return fit_model_stage(rows, ALL, BEHAVIOUR, base, TEXT_SET, COLD, FAST)


def test_the_behaviour_stage_adds_what_clicks_know_and_nothing_for_cold_rows():
    rows = behaviour_rows(120)
    stage = BaseStage(CONVEX, 4.0)
    base = text_model(rows, stage)
    trained = staged(rows, base)
    model = InMemoryModel(trained)
    assert trained.trees > 0 and trained.inner_cv.ci[0] > 0  # clicks carry signal the text model lacks
    assert model.stage == stage  # the caller computes the text model's first stage, as for the text model
    margin = rows.base(stage)
    with_clicks = group_ndcg(rows, model.predict(rows.features, margin)).mean()
    text_only = group_ndcg(rows, base.predict(rows.features[:, :2], margin)).mean()
    assert with_clicks > text_only + 0.05

    cold = rows.features.copy()
    cold[:, 2:] = COLD  # the same windows, no history at all
    np.testing.assert_array_equal(model.predict(cold, margin), base.predict(cold[:, :2], margin))  # bit for bit


def test_a_cold_query_ranks_exactly_as_the_text_model_even_with_warm_documents_elsewhere():
    rows = behaviour_rows(80, history=0.5)  # half the documents have history, half are cold
    stage = BaseStage(CONVEX, 4.0)
    base = text_model(rows, stage)
    model = InMemoryModel(staged(rows, base))
    features, margin = rows.features, rows.base(stage)
    is_cold = np.isnan(features[:, 3]) & (features[:, 2] == 0)
    assert 0 < is_cold.sum() < len(is_cold)
    scores, text = model.predict(features, margin), base.predict(features[:, :2], margin)
    np.testing.assert_array_equal(scores[is_cold], text[is_cold])
    assert not np.array_equal(scores[~is_cold], text[~is_cold])


def test_explain_splits_the_score_between_the_stages():
    rows = behaviour_rows(60)
    stage = BaseStage(CONVEX, 4.0)
    model = InMemoryModel(staged(rows, text_model(rows, stage)))
    margin = rows.base(stage)
    contributions = model.contributions(rows.features, margin)
    assert contributions.shape == (len(rows.labels), len(ALL) + 2)  # features, bias, first-stage margin
    np.testing.assert_allclose(contributions.sum(axis=1), model.predict(rows.features, margin), atol=1e-4)
    np.testing.assert_allclose(contributions[:, -1], margin.astype(np.float32))
    cold = np.isnan(rows.features[:, 3]) & (rows.features[:, 2] == 0)
    assert not contributions[cold][:, 2:4].any()  # behaviour columns say nothing for a cold row
    stages = stage_contributions(("bm25_all", "dense_cosine", "qd_clicks", "qd_ctr"), contributions[0])
    assert stages["behaviour"] == pytest.approx(contributions[0, 2:4].sum())
    assert stages["fusion"] == pytest.approx(margin[0], rel=1e-6)
    assert sum(stages.values()) == pytest.approx(model.predict(rows.features[:1], margin[:1])[0], abs=1e-4)


def _save_chain(tmp_path):
    rows = behaviour_rows(60)
    stage = BaseStage(CONVEX, 4.0)
    registry = ModelRegistry(tmp_path)
    text_rows = rows.columns(np.arange(len(TEXT)))
    text_trained = train_ranker(text_rows, TEXT, FAST, stage=stage, rounds=15)
    margin = rows.base(stage)
    text_manifest = registry.save(text_trained.booster, feature_set=TEXT_SET, index=INDEX, training={}, params={},
                                  metrics={}, importance={}, sample_features=text_rows.features[:16], best_iteration=14,
                                  stage=stage, sample_base=margin[:16])
    base = registry.load(text_manifest.version)
    trained = staged(rows, base)
    link = trained.link.__class__(text_manifest.version, TEXT_SET, BEHAVIOUR, tuple(COLD.tolist()))
    manifest = registry.save(trained.booster, feature_set=ALL_SET, index=INDEX, training={}, params={}, metrics={},
                             importance={}, sample_features=rows.features[:32],
                             best_iteration=trained.best_iteration if trained.trees else None, stage=stage,
                             sample_base=margin[:32], base_model=link)
    return registry, rows, margin, text_manifest, manifest


def test_the_registry_checks_parity_through_both_stages(tmp_path):
    registry, rows, margin, text_manifest, manifest = _save_chain(tmp_path)
    loaded = registry.load(manifest.version)
    assert loaded.base_model is not None and loaded.base_model.version == text_manifest.version
    np.testing.assert_array_equal(loaded.predict(rows.features[:32], margin[:32]), manifest.sample["predictions"])
    path = registry.root / text_manifest.version / "model.json"
    assert path.is_file()
    # Tamper with the text model's stored sample: loading the behaviour model fails in its base.
    text_path = registry.root / text_manifest.version / "manifest.json"
    data = json.loads(text_path.read_text())
    data["sample"]["predictions"] = [p + 1.0 for p in data["sample"]["predictions"]]
    text_path.write_text(json.dumps(data))
    with pytest.raises(Exception, match=f"model {text_manifest.version}: sample row 0 predicts"):
        registry.load(manifest.version)


def test_a_model_whose_base_is_gone_is_refused_and_the_active_models_base_cannot_go(tmp_path):
    registry, rows, margin, text_manifest, manifest = _save_chain(tmp_path)
    registry.promote(manifest.version)
    with pytest.raises(ModelInUseError, match=f"base of the active model {manifest.version}"):
        registry.delete(text_manifest.version)
    other = registry.save(registry.load(text_manifest.version).booster, feature_set=TEXT_SET, index=INDEX, training={},
                          params={}, metrics={}, importance={}, sample_features=rows.features[:16, :2], best_iteration=None,
                          stage=BaseStage(CONVEX, 4.0), sample_base=margin[:16])
    registry.promote(other.version)  # with another model active, the base may go
    registry.delete(text_manifest.version)
    with pytest.raises(MissingBaseModelError, match=f"staged on model {text_manifest.version}, which is not in"):
        registry.load(manifest.version)


def test_the_behaviour_stage_learns_on_cross_fitted_text_scores():
    """A text model scores its own training queries near perfectly; the behaviour stage's margin
    is each query's score from a text model that did not train on it (as serving sees new
    queries), so it is lower in-sample, and equal to the base where the base has no trees."""
    from ltr.training import cross_fitted_margin

    rows = behaviour_rows(60)
    stage = BaseStage(CONVEX, 4.0)
    text_rows = rows.columns(np.arange(len(TEXT)))
    overfit = InMemoryModel(train_ranker(text_rows, TEXT, FAST, stage=stage, rounds=60))
    margin = rows.base(stage)
    in_sample = overfit.predict(rows.features[:, :2], margin)
    crossed = cross_fitted_margin(rows, ALL, text_rows, TEXT, overfit, FAST)
    assert group_ndcg(rows, crossed).mean() < group_ndcg(rows, in_sample).mean() - 0.05
    assert crossed.shape == in_sample.shape and not np.array_equal(crossed, in_sample)
    base_only = InMemoryModel(train_ranker(text_rows, TEXT, FAST, stage=stage, rounds=0))
    np.testing.assert_array_equal(cross_fitted_margin(rows, ALL, text_rows, TEXT, base_only, FAST),
                                  base_only.predict(rows.features[:, :2], margin))
