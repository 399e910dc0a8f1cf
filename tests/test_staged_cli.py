"""`ltr-search train` stages its model on the fusion and says what the inner CV chose; a model
whose trees do not beat the base is saved as the base alone and served exactly as it."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ltr.ranker import registry_pipeline
from ltr.registry import ModelRegistry
from search.app.routers.search import _with_bias
from search.embedded import EmbeddedIndex
from search.ranking import named_row
from tests.conftest import home_sharing_encoder, run_cli
from tests.test_ltr import _collection


def test_train_reports_the_inner_cv_and_saves_the_base_alone_when_trees_do_not_help(tmp_path: Path, shared_encoder_home):
    home = home_sharing_encoder(tmp_path / "home", shared_encoder_home)
    dataset = _collection(tmp_path / "topics")
    run_cli(home, "index", "build", "--dataset", str(dataset), "--name", "topics", "--quiet")
    config = tmp_path / "service.toml"
    config.write_text("[fusion.topics]\nbm25_candidates = 8\ndense_candidates = 8\n")
    args = ("train", "--dataset", str(dataset), "--split", "train", "--config", str(config), "--quiet",
            "--max-rounds", "40", "--base-scales", "1", "4")
    result = run_cli(home, *args)
    out = result.stdout
    assert "base fusion by nDCG@10 on the training queries" in out and "inner CV (5 folds over 24 training queries" in out
    assert "95% CI" in out and "saving the base stage only" in out and "model m0001 (text): 0 trees on base" in out
    manifest = ModelRegistry(home).manifest("m0001")
    cv = manifest.training["inner_cv"]
    assert cv["rounds"] == 0 and cv["folds"] == 5 and len(cv["ci"]) == 2 and cv["ci"][0] <= 0
    assert manifest.trees == 0 and manifest.stage == cv["stage"] and len(manifest.sample["base"]) == len(manifest.sample["features"])
    assert run_cli(home, *args).stdout.split("\n")[:3] == out.split("\n")[:3]  # seeded: the same choice again

    index = EmbeddedIndex.open(home, "topics")
    served = registry_pipeline(index, home, "m0001")
    window = served.rank_window("comet dust tail")
    np.testing.assert_array_equal(window.scores, window.base.astype(np.float32))  # the model IS the fusion
    contributions = served.contributions(window.features, window.base)
    np.testing.assert_allclose(contributions.sum(axis=1), window.scores, atol=1e-5)
    explained = named_row(_with_bias(served.feature_names), contributions[0])
    assert explained["base"] == contributions[0, -1] and "bias" in explained
