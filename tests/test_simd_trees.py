"""The SIMD trees kernel (ltr.simd_trees): scores equal to XGBoost's, bit for bit, on every
path this CPU has (AVX-512, AVX2, scalar), for shallow and deep trees, missing values sent
both ways, windows that do not fill a SIMD block, and a base margin."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xgboost

from ltr.compiled_trees import base_score
from ltr.simd_trees import SIMD_LEVELS, SimdTrees, SimdTreesError, compile_simd_trees, tree_tables

FEATURES = 7


def rows(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    x[rng.random(x.shape) < 0.15] = np.nan
    x[:, 6] = rng.integers(0, 3, n)  # ties on thresholds: x == threshold goes right
    return x


def train(depth: int, rounds: int, seed: int = 0) -> xgboost.Booster:
    x = rows(seed, 600)
    rng = np.random.default_rng(seed + 1)
    y = np.clip(np.nan_to_num(x[:, 0]) + 0.5 * np.nan_to_num(x[:, 6]) + rng.normal(scale=0.5, size=len(x)), 0, 3).round()
    train_matrix = xgboost.DMatrix(x, label=y, missing=np.nan)
    train_matrix.set_group([20] * 30)
    params = {"objective": "rank:ndcg", "eta": 0.3, "max_depth": depth, "min_child_weight": 0.1, "seed": seed, "nthread": 1}
    return xgboost.train(params, train_matrix, num_boost_round=rounds)


def compiled(booster: xgboost.Booster, directory: Path) -> Path:
    model = directory / "model.json"
    booster.save_model(str(model))
    return compile_simd_trees(model, directory / "trees.so")


def levels(library: Path) -> list[int]:
    return list(range(SimdTrees(library).level + 1))


@pytest.mark.parametrize("depth", [1, 3, 6, 8])
def test_scores_equal_xgboost_on_every_simd_path(depth: int, tmp_path: Path) -> None:
    booster = train(depth, rounds=30)
    library = compiled(booster, tmp_path)
    assert tree_tables(tmp_path / "model.json").depth <= depth
    x = rows(42, 397)  # 397: the last block is partly padding
    margin = np.random.default_rng(3).normal(size=len(x)).astype(np.float32)
    for level in levels(library):
        scorer = SimdTrees(library, intercept=base_score(booster), level=level)
        np.testing.assert_array_equal(scorer.predict(x), booster.inplace_predict(x, missing=np.nan).astype(np.float64),
                                      err_msg=SIMD_LEVELS[level])
        np.testing.assert_array_equal(scorer.predict(x, margin),
                                      booster.inplace_predict(x, missing=np.nan, base_margin=margin).astype(np.float64),
                                      err_msg=SIMD_LEVELS[level])
        assert scorer.predict(x[:1]).shape == (1,) and scorer.predict(x[:0]).shape == (0,)
        want = booster.inplace_predict(x, missing=np.nan).astype(np.float64)
        for n in range(1, 16 * 7, 5):  # every group count of both SIMD widths, partial blocks too
            np.testing.assert_array_equal(scorer.predict(x[:n]), want[:n], err_msg=f"{SIMD_LEVELS[level]}, {n} rows")


def test_missing_values_follow_each_node_default(tmp_path: Path) -> None:
    """Rows entirely missing, and rows missing only the split features, take the default branches."""
    booster = train(4, rounds=20, seed=5)
    library = compiled(booster, tmp_path)
    x = rows(9, 64)
    x[:16] = np.nan
    x[16:32, :3] = np.nan
    for level in levels(library):
        scorer = SimdTrees(library, intercept=base_score(booster), level=level)
        np.testing.assert_array_equal(scorer.predict(x), booster.inplace_predict(x, missing=np.nan).astype(np.float64))


def test_bad_input_is_refused(tmp_path: Path) -> None:
    library = compiled(train(3, rounds=5), tmp_path)
    scorer = SimdTrees(library)
    with pytest.raises(ValueError, match="expect 7 feature columns"):
        scorer.predict(np.zeros((4, 6), dtype=np.float32))
    with pytest.raises(ValueError, match="base margin has shape"):
        scorer.predict(np.zeros((4, 7), dtype=np.float32), np.zeros(3))
    with pytest.raises(SimdTreesError, match="not available here"):
        SimdTrees(library, level=3)
    (tmp_path / "other.so").write_bytes(b"not a library")
    with pytest.raises(SimdTreesError, match="not a SIMD trees library"):
        SimdTrees(tmp_path / "other.so")


def test_a_compiler_error_names_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    booster = train(3, rounds=5)
    booster.save_model(str(tmp_path / "model.json"))
    monkeypatch.setenv("CC", "false")
    with pytest.raises(SimdTreesError, match=r"cannot compile .*model\.json: false .* exited 1"):
        compile_simd_trees(tmp_path / "model.json", tmp_path / "trees.so")
    assert not (tmp_path / "trees.so").exists()
