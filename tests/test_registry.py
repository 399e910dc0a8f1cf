"""The model registry: round trips, checksum and parity checks, feature-set guard, promote/rollback."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import xgboost

from indexing.durable import file_record
from ltr.registry import PARITY_TOLERANCE, FeatureSetMismatchError, ModelCorruptError, ModelManifest, ModelNotFoundError, ModelParityError, ModelRegistry, RegistryError
from indexing.home import registry_dir

FEATURES = ["bm25_body", "bm25_title", "dense_cosine", "doc_length", "clicks"]
FEATURE_SET = {"name": "text", "version": 1, "features": FEATURES}
INDEX = {"name": "default", "generation": "g000003", "analyzer": {"stemmer": "english"}, "backend": "embedded"}


def make_data(seed: int, queries: int = 30, docs: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(queries * docs, len(FEATURES))).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = np.nan
    y = np.clip(np.nan_to_num(x[:, 0]) + rng.normal(scale=0.5, size=len(x)), 0, None).round().clip(0, 3)
    return x, y


def train(seed: int = 0, rounds: int = 8) -> xgboost.Booster:
    x, y = make_data(seed)
    dtrain = xgboost.DMatrix(x, label=y, missing=np.nan, feature_names=FEATURES)
    dtrain.set_group([8] * 30)
    params = {"objective": "rank:ndcg", "eta": 0.3, "max_depth": 3, "seed": seed, "nthread": 1}
    return xgboost.train(params, dtrain, num_boost_round=rounds)


@pytest.fixture(scope="module")
def booster() -> xgboost.Booster:
    return train()


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path)


def sample() -> np.ndarray:
    x, _ = make_data(99, queries=3)
    assert np.isnan(x).any(axis=1).sum() >= 3
    return x


def save(registry: ModelRegistry, booster: xgboost.Booster, **overrides) -> ModelManifest:
    fields = dict(
        feature_set=FEATURE_SET,
        index=INDEX,
        training={"dataset": "scifact", "split": "train", "queries": 30},
        params={"objective": "rank:ndcg", "eta": np.float64(0.3)},
        metrics={"valid nDCG@10": np.float32(0.5)},
        importance={name: float(i) for i, name in enumerate(FEATURES)},
        sample_features=sample(),
        best_iteration=None,
    )
    fields.update(overrides)
    return registry.save(booster, **fields)


def rewrite_manifest(registry: ModelRegistry, version: str, edit) -> None:
    path = registry_dir(registry.home) / version / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_save_and_load_round_trip(registry, booster):
    saved = save(registry, booster)
    assert saved.version == "m0001" and saved.trees == 8 and saved.xgboost_version == xgboost.__version__
    assert saved.feature_set == FEATURE_SET and saved.index == INDEX
    assert saved.metrics == {"valid nDCG@10": 0.5} and saved.params["eta"] == 0.3
    assert registry.manifest("m0001") == saved
    assert [m.version for m in registry.versions()] == ["m0001"]
    assert registry.active() is None  # saving does not activate

    loaded = registry.load("m0001")
    x, _ = make_data(7)
    assert np.isnan(x).any(axis=1).sum() > 50
    expected = booster.predict(xgboost.DMatrix(x, missing=np.nan, feature_names=FEATURES))
    scores = loaded.predict(x)
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, expected, rtol=0, atol=PARITY_TOLERANCE)
    nan_rows = np.isnan(x).any(axis=1)
    np.testing.assert_allclose(scores[nan_rows], expected[nan_rows], rtol=0, atol=PARITY_TOLERANCE)
    assert np.ptp(scores) > 0.1  # a real model, not a constant


def test_sample_nan_round_trips_as_null(registry, booster):
    saved = save(registry, booster)
    stored = json.loads((registry_dir(registry.home) / "m0001" / "manifest.json").read_text())
    rows = stored["sample"]["features"]
    assert any(v is None for row in rows for v in row)
    np.testing.assert_array_equal(saved.sample_array(), sample())  # NaN == NaN under assert_array_equal
    np.testing.assert_array_equal(stored["sample"]["predictions"], registry.load("m0001").predict(sample()))


def test_best_iteration_trims_the_saved_model(registry, booster):
    saved = save(registry, booster, best_iteration=3)
    assert saved.trees == 4 and saved.best_iteration == 3
    x, _ = make_data(5)
    data = xgboost.DMatrix(x, missing=np.nan, feature_names=FEATURES)
    scores = registry.load(saved.version).predict(x)
    np.testing.assert_allclose(scores, booster.predict(data, iteration_range=(0, 4)), atol=PARITY_TOLERANCE)
    assert np.abs(scores - booster.predict(data)).max() > 1e-3
    assert booster.num_boosted_rounds() == 8  # the caller's booster is untouched
    with pytest.raises(ValueError, match="best_iteration 8"):
        save(registry, booster, best_iteration=8)


def test_parity_fires_when_a_leaf_is_tampered(registry, booster):
    save(registry, booster)
    model_path = registry_dir(registry.home) / "m0001" / "model.json"
    model = json.loads(model_path.read_text())
    for tree in model["learner"]["gradient_booster"]["model"]["trees"]:
        leaves = [i for i, left in enumerate(tree["left_children"]) if left == -1]
        for i in leaves:
            tree["split_conditions"][i] += 0.01
    model_path.write_text(json.dumps(model))
    rewrite_manifest(registry, "m0001", lambda m: m["files"].update({"model.json": file_record(model_path)}))

    with pytest.raises(ModelParityError) as caught:
        registry.load("m0001")
    message = str(caught.value)
    assert "model m0001: sample row 0 predicts" in message and "when saved" in message
    assert "the model file or the xgboost version changed" in message


def test_parity_fires_when_a_recorded_prediction_changes(registry, booster):
    save(registry, booster)
    registry.load("m0001")

    def nudge(manifest):
        manifest["sample"]["predictions"][4] += 3 * PARITY_TOLERANCE

    rewrite_manifest(registry, "m0001", nudge)
    with pytest.raises(ModelParityError, match=r"sample row 4 predicts .* > 1e-06; 1 of 24 rows differ"):
        registry.load("m0001")


def test_checksum_mismatch_is_corrupt(registry, booster):
    save(registry, booster)
    model_path = registry_dir(registry.home) / "m0001" / "model.json"
    model_path.write_bytes(model_path.read_bytes().replace(b'"objective"', b'"objectivX"', 1))
    with pytest.raises(ModelCorruptError, match="model m0001: model.json has sha256 .* but the manifest records"):
        registry.load("m0001")
    model_path.write_bytes(model_path.read_bytes()[:100])
    with pytest.raises(ModelCorruptError, match="model.json has bytes 100"):
        registry.load("m0001")


def test_unreadable_model_is_corrupt_even_with_matching_checksum(registry, booster):
    save(registry, booster)
    model_path = registry_dir(registry.home) / "m0001" / "model.json"
    model_path.write_text("{not json")
    rewrite_manifest(registry, "m0001", lambda m: m["files"].update({"model.json": file_record(model_path)}))
    with pytest.raises(ModelCorruptError, match="model m0001: xgboost cannot read model.json"):
        registry.load("m0001")


def test_feature_set_mismatch_names_both_sets(registry, booster):
    save(registry, booster)
    registry.load("m0001", expected_feature_set=dict(FEATURE_SET))  # matching set loads

    newer = {"name": "text", "version": 2, "features": FEATURES + ["freshness"]}
    with pytest.raises(FeatureSetMismatchError) as caught:
        registry.load("m0001", expected_feature_set=newer)
    assert str(caught.value).startswith(
        "model m0001 was trained on feature set text v1 (5 features) but the service computes text v2 (6 features)"
    )
    assert "ltr-search train --feature-set text" in str(caught.value)

    reordered = {"name": "text", "version": 1, "features": FEATURES[::-1]}
    with pytest.raises(FeatureSetMismatchError, match="column 0 is 'clicks', not 'bm25_body'"):
        registry.load("m0001", expected_feature_set=reordered)
    with pytest.raises(FeatureSetMismatchError):
        registry.promote("m0001", expected_feature_set=newer)
    assert registry.active() is None


def test_save_refuses_a_booster_of_another_feature_set(registry, booster):
    other = {"name": "text", "version": 1, "features": [f"f{i}" for i in range(5)]}
    with pytest.raises(FeatureSetMismatchError, match="booster was trained on columns"):
        save(registry, booster, feature_set=other)
    with pytest.raises(ValueError, match="5 features"):
        save(registry, booster, feature_set={"name": "text", "version": 1, "features": FEATURES[:4]})
    assert registry.version_ids() == []


def test_contributions_sum_to_predictions(registry, booster):
    save(registry, booster)
    loaded = registry.load("m0001")
    x, _ = make_data(3)
    contributions = loaded.contributions(x)
    assert contributions.shape == (len(x), len(FEATURES) + 1)
    np.testing.assert_allclose(contributions.sum(axis=1), loaded.predict(x), atol=1e-5)
    assert np.abs(contributions[:, :-1]).sum() > 0
    with pytest.raises(ValueError, match="expects a 2-D array with 5 feature columns"):
        loaded.predict(x[:, :4])


def test_promote_and_rollback_keep_history(registry, booster):
    for seed in range(3):
        save(registry, train(seed, rounds=3))
    assert registry.active() is None
    registry.promote("m0001")
    registry.promote("m0002")
    registry.promote("m0002")  # re-promoting the active one changes nothing
    registry.promote("m0003")
    pointer_path = registry_dir(registry.home) / "active.json"
    pointer = json.loads(pointer_path.read_text())
    assert pointer == {"active": "m0003", "history": ["m0001", "m0002"]}
    assert registry.rollback_target() == "m0002"  # what the dashboard marks as "previous"
    assert registry.rollback() == "m0002"
    assert registry.active() == "m0002"
    assert registry.rollback() == "m0001"
    assert json.loads(pointer_path.read_text()) == {"active": "m0001", "history": []}
    assert registry.rollback_target() is None
    with pytest.raises(RegistryError, match="no previous model to roll back to \\(active: m0001"):
        registry.rollback()
    assert registry.active() == "m0001"


def test_rollback_without_history_and_bad_promotions(registry, booster):
    with pytest.raises(RegistryError, match="no previous model"):
        registry.rollback()
    with pytest.raises(ModelNotFoundError, match=r"no model m0007 in .*models \(versions here: none\)"):
        registry.promote("m0007")
    with pytest.raises(ModelNotFoundError, match="invalid model version"):
        registry.load("../etc")
    save(registry, booster)
    registry.promote("m0001")
    save(registry, booster)
    model_path = registry_dir(registry.home) / "m0002" / "model.json"
    model_path.write_bytes(model_path.read_bytes() + b" ")
    with pytest.raises(ModelCorruptError, match="m0002"):
        registry.promote("m0002")
    assert registry.active() == "m0001"


def test_rollback_refuses_a_previous_model_that_no_longer_loads(registry, booster):
    save(registry, booster)
    save(registry, booster)
    registry.promote("m0001")
    registry.promote("m0002")
    (registry_dir(registry.home) / "m0001" / "model.json").write_text("{}")
    with pytest.raises(ModelCorruptError, match="m0001"):
        registry.rollback()
    assert registry.active() == "m0002"


def test_numbering_continues_after_a_leftover_tmp_dir(registry, booster):
    save(registry, booster)
    save(registry, booster)
    leftover = registry_dir(registry.home) / ".m0003.tmp"
    leftover.mkdir()
    (leftover / "model.json").write_text("half a model")
    assert registry.version_ids() == ["m0001", "m0002"]
    assert [m.version for m in registry.versions()] == ["m0001", "m0002"]
    assert save(registry, booster).version == "m0003"
    assert not leftover.exists()
    assert registry.load("m0003").manifest.version == "m0003"
    assert sorted(p.name for p in registry_dir(registry.home).iterdir()) == [".lock", "m0001", "m0002", "m0003"]


def test_failed_save_leaves_nothing_visible(registry, booster, monkeypatch):
    save(registry, booster)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save(registry, booster)
    monkeypatch.undo()
    assert registry.version_ids() == ["m0001"]
    assert not list(registry_dir(registry.home).glob(".*.tmp"))


def test_unknown_or_missing_manifest_keys_are_refused(registry, booster):
    saved = save(registry, booster)
    with pytest.raises(ValueError, match=r"unknown ModelManifest keys: \['calibration'\]"):
        ModelManifest.from_dict({**saved.to_dict(), "calibration": {}})
    data = saved.to_dict()
    del data["trees"]
    with pytest.raises(ValueError, match=r"missing ModelManifest keys: \['trees'\]"):
        ModelManifest.from_dict(data)
    assert ModelManifest.from_dict(saved.to_dict()) == saved

    rewrite_manifest(registry, "m0001", lambda m: m.update(calibration={}))
    with pytest.raises(ModelCorruptError, match="model m0001: .*manifest.json .*unknown ModelManifest keys"):
        registry.load("m0001")


def test_nothing_in_the_registry_is_a_pickle(registry, booster):
    save(registry, booster, best_iteration=5)
    registry.promote("m0001")
    files = [p for p in registry_dir(registry.home).rglob("*") if p.is_file()]
    assert {p.name for p in files} == {".lock", "active.json", "model.json", "manifest.json"}
    assert not [p for p in files if p.suffix in (".pkl", ".pickle")]
    for path in files:
        assert not path.read_bytes().startswith(b"\x80"), f"{path} looks like a pickle"
    model = json.loads((registry_dir(registry.home) / "m0001" / "model.json").read_text())
    assert model["learner"]["feature_names"] == FEATURES
    assert len(model["learner"]["gradient_booster"]["model"]["trees"]) == 6


def test_concurrent_saves_get_distinct_versions(registry, booster):
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            save(registry, booster)
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert registry.version_ids() == ["m0001", "m0002", "m0003", "m0004"]
    for version in registry.version_ids():
        registry.load(version)


def test_a_challenge_interleaves_a_loadable_model_against_the_active_one(registry, booster):
    from ltr.registry import Challenge, ModelInUseError

    for seed in range(3):
        save(registry, train(seed, rounds=3))
    with pytest.raises(RegistryError, match="no active model to interleave a challenger against"):
        registry.start_challenge("m0002", 0.2, 100.0)
    registry.promote("m0001")
    with pytest.raises(RegistryError, match="m0001 is the active model"):
        registry.start_challenge("m0001", 0.2, 100.0)
    with pytest.raises(ModelNotFoundError):
        registry.start_challenge("m0009", 0.2, 100.0)
    for share in (0.0, 1.5, True):
        with pytest.raises(ValueError, match=r"share of requests must be in \(0, 1\]"):
            registry.start_challenge("m0002", share, 100.0)
    assert registry.challenge() is None and registry.end_challenge() is None
    challenge = registry.start_challenge("m0002", 0.25, 100.0)
    assert challenge == Challenge("m0002", "m0001", 0.25, 100.0) == registry.challenge()
    assert json.loads((registry_dir(registry.home) / "challenge.json").read_text()) == challenge.to_dict()
    with pytest.raises(ModelInUseError, match="m0002 is being interleaved against m0001"):
        registry.delete("m0002")
    assert registry.start_challenge("m0003", 1.0, 200.0).version == "m0003"  # replaces the running one
    model_path = registry_dir(registry.home) / "m0002" / "model.json"
    model_path.write_bytes(model_path.read_bytes() + b" ")
    with pytest.raises(ModelCorruptError, match="m0002"):  # a challenger must load cleanly, as a promoted model
        registry.start_challenge("m0002", 0.5, 300.0)
    assert registry.challenge().version == "m0003"
    assert registry.end_challenge().version == "m0003" and registry.challenge() is None
    (registry_dir(registry.home) / "challenge.json").write_text("{not json")
    with pytest.raises(ModelCorruptError, match="challenge.json is unreadable"):
        registry.challenge()


def test_the_dashboard_marks_the_challenger_next_to_the_active_model(registry, booster):
    from search.app.pages.dashboard import model_rows

    for seed in range(3):
        save(registry, train(seed, rounds=3))
    registry.promote("m0001")
    registry.promote("m0002")
    registry.start_challenge("m0003", 0.2, 0.0)
    rows, error = model_rows(registry.home)
    assert error is None
    assert [(r.version, r.status) for r in rows] == [
        ("m0002", "active"), ("m0003", "challenger: 20% of ltr requests vs m0002 since 1970-01-01 00:00 UTC"),
        ("m0001", "previous")]
    registry.end_challenge()
    assert [r.status for r in model_rows(registry.home)[0]] == ["active", "previous", ""]
