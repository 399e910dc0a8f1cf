"""Compiled trees (the simd kernel by default, Treelite + TL2cgen on request): parity with
XGBoost, the base margin, refusal of a library that disagrees, the simd library preferred when
both exist, and loading never compiles."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from indexing.home import registry_dir
from ltr.compiled_trees import COMPILED_PARITY_TOLERANCE, COMPILERS, base_score, compile_model, compile_trained, library_name
from ltr.registry import BaseStage, ModelParityError, ModelRegistry, predict_scores
from search.hybrid import FusionSettings

from tests.test_registry import FEATURES, make_data, sample, save, train

pytest.importorskip("tl2cgen")
STAGE = BaseStage(FusionSettings(method="convex"), 4.0)


def staged_sample_base() -> np.ndarray:
    return np.random.default_rng(5).uniform(0, 4, len(sample()))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """m0001: a plain model, m0002: a staged one (base margin), m0003: plain, never compiled; the
    first two compiled once for the module with each compiler (gcc takes seconds), m0004 and m0005
    (copies of m0001 and m0002) with TL2cgen only."""
    home = tmp_path_factory.mktemp("compiled")
    registry = ModelRegistry(home)
    save(registry, train(seed=0, rounds=40))
    save(registry, train(seed=1, rounds=40), stage=STAGE, sample_base=staged_sample_base())
    save(registry, train(seed=2, rounds=5))
    save(registry, train(seed=0, rounds=40))
    save(registry, train(seed=1, rounds=40), stage=STAGE, sample_base=staged_sample_base())
    for version in ("m0001", "m0002"):
        compile_model(home, version)
        compile_model(home, version, "tl2cgen")
    for version in ("m0004", "m0005"):
        compile_model(home, version, "tl2cgen")
    return home


PLAIN = {"simd": "m0001", "tl2cgen": "m0004"}
STAGED = {"simd": "m0002", "tl2cgen": "m0005"}


def fresh_rows() -> np.ndarray:
    x, _ = make_data(1234, queries=50)  # 400 rows, 20% NaN: rows the sample never saw
    return x


@pytest.mark.parametrize("compiler", COMPILERS)
def test_compiled_plain_model_matches_xgboost(home: Path, compiler: str) -> None:
    loaded = ModelRegistry(home).load(PLAIN[compiler])
    assert loaded.compiled.path.name.startswith({"simd": "simd-trees-", "tl2cgen": "trees-"}[compiler])
    rows = fresh_rows()
    want = predict_scores(loaded.booster, FEATURES, rows)
    np.testing.assert_allclose(loaded.predict(rows), want, rtol=0, atol=COMPILED_PARITY_TOLERANCE)


@pytest.mark.parametrize("compiler", COMPILERS)
def test_compiled_staged_model_adds_the_base_margin_as_xgboost_does(home: Path, compiler: str) -> None:
    loaded = ModelRegistry(home).load(STAGED[compiler])
    assert loaded.compiled is not None and loaded.stage == STAGE
    assert base_score(loaded.booster) != 0.0  # the intercept XGBoost drops when given a margin
    rows = fresh_rows()
    base = np.random.default_rng(7).uniform(0, 4, len(rows))
    want = predict_scores(loaded.booster, FEATURES, rows, base)
    np.testing.assert_allclose(loaded.predict(rows, base), want, rtol=0, atol=COMPILED_PARITY_TOLERANCE)
    # Explanations stay on XGBoost and still add up to the (compiled) score.
    contributions = loaded.contributions(rows[:20], base[:20])
    np.testing.assert_allclose(contributions.sum(axis=1), loaded.predict(rows[:20], base[:20]), atol=1e-4)


def test_simd_scores_equal_xgboost_exactly(home: Path) -> None:
    """The simd kernel adds the trees in XGBoost's order from XGBoost's starting value."""
    for version, base in (("m0001", None), ("m0002", np.random.default_rng(8).uniform(0, 4, 400))):
        loaded = ModelRegistry(home).load(version)
        rows = fresh_rows()
        np.testing.assert_array_equal(loaded.predict(rows, base), predict_scores(loaded.booster, FEATURES, rows, base))


def test_the_simd_library_serves_when_both_exist(home: Path) -> None:
    directory = registry_dir(home) / "m0001"
    assert {path.name.split("-")[0] for path in directory.glob("*.so")} == {"simd", "trees"}
    assert ModelRegistry(home).load("m0001").compiled.path.name.startswith("simd-trees-")


def test_loading_never_compiles(home: Path) -> None:
    assert ModelRegistry(home).load("m0003").compiled is None
    assert not list((registry_dir(home) / "m0003").glob("*.so"))


def test_a_library_that_disagrees_is_refused(home: Path, tmp_path: Path) -> None:
    """Another model's library under this model's name: the sample parity check refuses it."""
    copy = tmp_path / "home"
    shutil.copytree(home, copy, symlinks=True)
    models = registry_dir(copy)
    for prefix in ("simd-trees", "trees"):
        target = next((models / "m0001").glob(f"{prefix}-*.so"))
        shutil.copyfile(next((models / "m0002").glob(f"{prefix}-*.so")), target)
        with pytest.raises(ModelParityError, match=rf"compiled trees {prefix}-\w+\.so differ from the model on sample row"):
            ModelRegistry(copy).load("m0001")
        target.unlink()  # then the other compiler's library is the one loaded


def test_a_library_this_machine_cannot_load_falls_back_to_xgboost(home: Path, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A home copied from another architecture: its library does not load here (an ELF for
    another machine, or a damaged file). The model serves on XGBoost, with a warning that says
    how to compile it again."""
    copy = tmp_path / "home"
    shutil.copytree(home, copy, symlinks=True)
    directory = registry_dir(copy) / "m0001"
    for library in directory.glob("*.so"):
        library.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(57) + b"built elsewhere")
    with caplog.at_level("WARNING", logger="ltr_search.registry"):
        loaded = ModelRegistry(copy).load("m0001")
    assert loaded.compiled is None
    rows = fresh_rows()
    np.testing.assert_array_equal(loaded.predict(rows), predict_scores(loaded.booster, FEATURES, rows))
    assert "cannot be loaded on this machine" in caplog.text and "ltr-search models compile m0001" in caplog.text
    assert "scoring with XGBoost instead" in caplog.text



def test_compiling_a_library_that_cannot_load_removes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ltr import compiled_trees

    registry = ModelRegistry(tmp_path)
    save(registry, train(seed=6, rounds=5))

    def unloadable(path, compiler, booster):
        raise OSError(f"{path}: wrong ELF class: ELFCLASS32")

    monkeypatch.setattr(compiled_trees, "load_library", unloadable)
    with pytest.raises(compiled_trees.CompiledLibraryUnloadable, match="cannot be loaded on this machine: .*ELFCLASS32"):
        compile_model(tmp_path, "m0001")
    assert not list((registry_dir(tmp_path) / "m0001").glob("*.so"))


def test_library_is_named_by_the_model_file_checksum(home: Path) -> None:
    manifest = ModelRegistry(home).manifest("m0001")
    for compiler in COMPILERS:
        name = library_name(manifest.files["model.json"]["sha256"], compiler)
        assert (registry_dir(home) / "m0001" / name).is_file()


def test_models_compile_from_the_command_line(tmp_path: Path) -> None:
    """`ltr-search models compile VERSION` writes the library; the model then loads with it."""
    from tests.conftest import run_cli

    registry = ModelRegistry(tmp_path)
    save(registry, train(seed=3, rounds=5))
    result = run_cli(tmp_path, "models", "compile", "m0001")
    assert "compiled trees in" in result.stdout and "(simd, " in result.stdout
    manifest = registry.manifest("m0001")
    assert (registry_dir(tmp_path) / "m0001" / library_name(manifest.files["model.json"]["sha256"])).is_file()
    assert registry.load("m0001").compiled is not None



def test_training_without_a_compiler_still_stores_a_serving_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """compile_trained never fails the training: it says why and the model serves on XGBoost."""
    registry = ModelRegistry(tmp_path)
    save(registry, train(seed=4, rounds=5))
    monkeypatch.setenv("CC", "false")
    line = compile_trained(tmp_path, "m0001")
    assert line.startswith("note: model m0001's trees were not compiled (cannot compile") and "models compile m0001" in line
    loaded = registry.load("m0001")
    assert loaded.compiled is None and not list((registry_dir(tmp_path) / "m0001").glob("*.so"))
    monkeypatch.delenv("CC")
    assert compile_trained(tmp_path, "m0001").startswith("model m0001: trees compiled (simd, ")
    assert registry.load("m0001").compiled is not None
