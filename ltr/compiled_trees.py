"""Compiled trees: a registry model's XGBoost trees as native code, gcc-compiled next to it.

Why: scoring a window is a few hundred rows through a few hundred trees, and XGBoost's
`inplace_predict` walks them generically. Two compilers:
- "simd" (the default, `ltr.simd_trees`): the trees as complete-tree tables in a SIMD kernel,
  16 rows (AVX-512) or 8 (AVX2) descending together; scores equal XGBoost's;
- "tl2cgen" (Treelite + TL2cgen): the trees as if-else C with quantised thresholds and branch
  annotations from the stored sample rows.
Measured against each other, XGBoost inplace_predict and ONNX Runtime's TreeEnsemble on the same
real windows (`bench/bench_trees.py`): see the README.

Only the trees are compiled. A staged model's base margin (`BaseStage.margin`) is where the
sum starts, as XGBoost's `base_margin`: when a base margin is given XGBoost does not add its
`base_score`. The simd kernel starts from the margin (or from base_score); Treelite's output
always includes base_score, so it is taken off first and the margin added in numpy.

The library is cached next to the model (`HOME/models/mXXXX/simd-trees-<sha12>.so`, or
`trees-<sha12>.so` from TL2cgen, named by the model file's sha256) and written atomically.
Training compiles the model it stores (`compile_trained`: about 2 s of gcc with the simd
kernel, never a failed training); `compile_model` compiles any stored model; loading never
compiles. When both libraries sit next to a model the simd one serves. Loading a model with a
library checks it against the stored sample rows like the XGBoost JSON (`verified_library`,
within `COMPILED_PARITY_TOLERANCE`) and refuses a library that disagrees; explanations
(`contributions`) stay on XGBoost.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# float32 accumulation over hundreds of trees differs from XGBoost's order by ~1e-6.
COMPILED_PARITY_TOLERANCE = 1e-5
LIBRARY_SUFFIX = ".so"
# compiler -> library name prefix, in the order the registry prefers them
LIBRARY_PREFIXES = {"simd": "simd-trees-", "tl2cgen": "trees-"}
COMPILERS = tuple(LIBRARY_PREFIXES)
DEFAULT_COMPILER = "simd"


class CompiledTreesError(RuntimeError):
    """The trees could not be compiled, or a compiled library disagrees with the model."""


class CompiledLibraryUnloadable(CompiledTreesError):
    """A compiled library this machine cannot load (built for another architecture, or a damaged
    file). Unlike a library that loads and disagrees, it says nothing about the model: the
    registry serves the model on XGBoost instead, with a warning."""


def library_name(model_sha256: str, compiler: str = DEFAULT_COMPILER) -> str:
    if compiler not in LIBRARY_PREFIXES:
        raise ValueError(f"compiler must be one of {', '.join(COMPILERS)}, got {compiler!r}")
    return f"{LIBRARY_PREFIXES[compiler]}{model_sha256[:12]}{LIBRARY_SUFFIX}"


def load_library(path: Path, compiler: str, booster: Any) -> Any:
    """A compiled library of `compiler` for `booster`: `predict(rows, base=None)` -> float64 scores."""
    if compiler == "simd":
        from ltr.simd_trees import SimdTrees

        return SimdTrees(path, intercept=base_score(booster))
    return CompiledTrees.load(path, booster)


def base_score(booster: Any) -> float:
    """The intercept XGBoost adds when no base margin is given (saved config, '[5E-1]' or '0.5')."""
    text = json.loads(booster.save_config())["learner"]["learner_model_param"]["base_score"]
    numbers = re.findall(r"[-+0-9.eE]+", str(text))
    if len(numbers) != 1:
        raise CompiledTreesError(f"cannot read one base_score from the model's config: {text!r}")
    return float(numbers[0])


@dataclass
class CompiledTrees:
    """A loaded TL2cgen library: float32 rows -> float64 scores (trees + base margin)."""

    path: Path
    predictor: Any  # tl2cgen.Predictor
    n_features: int
    intercept: float  # XGBoost's base_score, which Treelite's output includes

    @classmethod
    def load(cls, path: Path, booster: Any) -> "CompiledTrees":
        import tl2cgen  # only models with a compiled library load the native runtime

        predictor = tl2cgen.Predictor(str(path), nthread=1)  # one thread: see registry.single_threaded
        return cls(Path(path), predictor, int(predictor.num_feature), base_score(booster))

    def predict(self, features: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
        import tl2cgen  # already loaded by `load`

        rows = np.ascontiguousarray(features, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.n_features:
            raise ValueError(f"the compiled trees expect {self.n_features} feature columns, got shape {rows.shape}")
        if not len(rows):
            return np.empty(0)
        raw = np.asarray(self.predictor.predict(tl2cgen.DMatrix(rows, dtype="float32")), dtype=np.float64).reshape(-1)
        if base is None:
            return raw
        return raw - self.intercept + np.asarray(base, dtype=np.float32).astype(np.float64)


def compile_trees(model_file: Path, sample: np.ndarray, out: Path, compiler: str = DEFAULT_COMPILER) -> Path:
    """Compile the XGBoost JSON `model_file` into the shared library `out` (atomic rename).

    `sample` (float32 rows) annotates TL2cgen's branches with how often each is taken."""
    if compiler == "simd":
        from ltr.simd_trees import SimdTreesError, compile_simd_trees

        try:
            return compile_simd_trees(model_file, out)
        except SimdTreesError as exc:
            raise CompiledTreesError(str(exc)) from exc
    if compiler != "tl2cgen":
        raise ValueError(f"compiler must be one of {', '.join(COMPILERS)}, got {compiler!r}")
    import tl2cgen  # compile step only: the serving path loads the library, never gcc
    import treelite  # compile step only

    try:
        model = treelite.frontend.load_xgboost_model(str(model_file), format_choice="json")
        with tempfile.TemporaryDirectory(prefix=".compile-", dir=out.parent) as work:
            annotation = Path(work) / "branches.json"
            tl2cgen.annotate_branch(model, tl2cgen.DMatrix(np.ascontiguousarray(sample, dtype=np.float32),
                                                           dtype="float32"), path=str(annotation), nthread=1)
            tmp = Path(work) / out.name
            tl2cgen.export_lib(model, toolchain="gcc", libpath=str(tmp), nthread=os.cpu_count() or 1,
                               params={"quantize": 1, "annotate_in": str(annotation),
                                       "parallel_comp": max(2, os.cpu_count() or 1)})
            os.replace(tmp, out)
    except Exception as exc:  # treelite, tl2cgen and gcc raise their own types
        raise CompiledTreesError(f"cannot compile {model_file}: {exc}") from exc
    return out


def parity_gap(compiled: Any, booster_scores: np.ndarray, sample: np.ndarray,
               sample_base: np.ndarray | None) -> tuple[float, int]:
    """(largest |compiled - expected|, first row over tolerance or -1) on the sample rows."""
    got = compiled.predict(sample, sample_base)
    diff = np.abs(got - np.asarray(booster_scores, dtype=np.float64))
    bad = np.flatnonzero(~(diff <= COMPILED_PARITY_TOLERANCE))  # NaN counts as a difference
    return float(np.nanmax(diff)) if len(diff) else 0.0, int(bad[0]) if bad.size else -1


def compile_model(home: Path, version: str, compiler: str = DEFAULT_COMPILER) -> Path:
    """Compile registry model `version` next to its files and return the library's path.

    The model is loaded (and verified) first; the library is then checked as loading checks it
    (`verified_library`), which refuses it - and this removes it - if it disagrees."""
    return _compile_verified(home, version, compiler)[0]


def _compile_verified(home: Path, version: str, compiler: str) -> tuple[Path, Any]:
    """`compile_model`, also returning the library it checked."""
    from ltr.registry import MODEL_FILE, ModelParityError, ModelRegistry  # registry imports this module lazily

    registry = ModelRegistry(home)
    loaded = registry.load(version)
    if loaded.manifest.model_base is not None:
        raise CompiledTreesError(f"model {version} is staged on model {loaded.manifest.model_base.version}: "
                                 "only models whose score is their trees plus a fusion base are compiled")
    directory = registry._version_dir(version)
    out = directory / library_name(loaded.manifest.files[MODEL_FILE]["sha256"], compiler)
    with registry._lock("compile trees"):
        compile_trees(directory / MODEL_FILE, loaded.manifest.sample_array(), out, compiler)
    try:
        return out, verified_library(out, compiler, loaded)
    except (ModelParityError, CompiledLibraryUnloadable):
        out.unlink(missing_ok=True)
        raise


def compile_trained(home: Path, version: str) -> str:
    """Compile a model just stored by training with the default compiler: a second or two of gcc
    for scores equal to XGBoost's at a fraction of its time. Returns the line training prints;
    never fails the training (no compiler: the model serves on XGBoost, and says so)."""
    import time

    from ltr.registry import ModelParityError, ModelRegistry  # registry imports this module lazily
    from ltr.simd_trees import SIMD_LEVELS

    manifest = ModelRegistry(home).manifest(version)
    if manifest.model_base is not None or manifest.trees == 0:
        return ""  # a behaviour stage (its base model's trees compile) or no trees: nothing to compile
    started = time.perf_counter()
    try:
        path, compiled = _compile_verified(home, version, DEFAULT_COMPILER)
    except (CompiledTreesError, ModelParityError) as exc:
        return (f"note: model {version}'s trees were not compiled ({exc}); it serves on XGBoost, several times "
                f"slower; `ltr-search models compile {version}` retries")
    return (f"model {version}: trees compiled ({DEFAULT_COMPILER}, {SIMD_LEVELS[compiled.level]} on this CPU) in "
            f"{time.perf_counter() - started:.1f} s to {path.name}; served instead of XGBoost, scores equal")


def verified_library(path: Path, compiler: str, loaded: Any) -> Any:
    """The library at `path` for the registry model `loaded`, once it scores the model's stored
    sample like the model (within COMPILED_PARITY_TOLERANCE); else ModelParityError."""
    from ltr.registry import ModelParityError  # registry imports this module lazily

    manifest = loaded.manifest
    try:
        compiled = load_library(path, compiler, loaded.booster)
    except Exception as exc:  # ctypes: OSError (wrong ELF class, invalid header); tl2cgen its own types
        raise CompiledLibraryUnloadable(f"model {manifest.version}: compiled trees {path.name} cannot be loaded "
                                        f"on this machine: {exc}") from exc
    try:
        gap, row = parity_gap(compiled, np.asarray(manifest.sample["predictions"], dtype=np.float64),
                              manifest.sample_array(), manifest.sample_base())
    except Exception as exc:  # tl2cgen and ctypes raise their own types for a broken library
        raise ModelParityError(f"model {manifest.version}: compiled trees {path.name} cannot score: {exc}; "
                               "delete the file or compile it again") from exc
    if row >= 0:
        raise ModelParityError(
            f"model {manifest.version}: compiled trees {path.name} differ from the model on sample row {row} "
            f"(|diff| up to {gap:.2g} > {COMPILED_PARITY_TOLERANCE:g}); delete the file or compile it again")
    return compiled
