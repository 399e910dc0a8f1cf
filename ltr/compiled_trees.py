"""Compiled trees: a registry model's XGBoost trees as native code (Treelite + TL2cgen, gcc).

Why: scoring a window is a few hundred rows through a few hundred trees, and XGBoost's
`inplace_predict` walks them generically. TL2cgen turns the trees into C with quantised
thresholds (integer comparisons) and branch annotations from the stored sample rows (the likely
branch first), compiled by gcc into a shared library. Measured against XGBoost inplace_predict,
ONNX Runtime's TreeEnsemble (onnxmltools) and this, back to back on the same 400-row window
(bench/bench_serving.py, `trees` section): see the README.

Only the trees are compiled. A staged model's base margin (`BaseStage.margin`) is added in
numpy, exactly as XGBoost adds `base_margin`: when a base margin is given XGBoost does not add
its `base_score`, while Treelite's output always includes it, so it is taken off first.

The library is cached next to the model (`HOME/models/mXXXX/trees-<sha12>.so`, named by the
model file's sha256), written atomically, and made only on request (`compile_model`): compiling
costs tens of seconds of gcc, which neither training nor loading should pay unasked. Loading a
model with a cached library checks it against the stored sample rows like the XGBoost JSON
(`check_compiled_parity`, within `COMPILED_PARITY_TOLERANCE`) and refuses a library that
disagrees; explanations (`contributions`) stay on XGBoost.
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
LIBRARY_PREFIX = "trees-"
LIBRARY_SUFFIX = ".so"


class CompiledTreesError(RuntimeError):
    """The trees could not be compiled, or a compiled library disagrees with the model."""


def library_name(model_sha256: str) -> str:
    return f"{LIBRARY_PREFIX}{model_sha256[:12]}{LIBRARY_SUFFIX}"


def base_score(booster: Any) -> float:
    """The intercept XGBoost adds when no base margin is given (saved config, '[5E-1]' or '0.5')."""
    text = json.loads(booster.save_config())["learner"]["learner_model_param"]["base_score"]
    numbers = re.findall(r"[-+0-9.eE]+", str(text))
    if len(numbers) != 1:
        raise CompiledTreesError(f"cannot read one base_score from the model's config: {text!r}")
    return float(numbers[0])


@dataclass
class CompiledTrees:
    """A loaded compiled library: float32 rows -> float64 scores (trees + base margin)."""

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


def compile_trees(model_file: Path, sample: np.ndarray, out: Path) -> Path:
    """Compile the XGBoost JSON `model_file` into the shared library `out` (atomic rename).

    `sample` (float32 rows) annotates branches with how often each is taken."""
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


def parity_gap(compiled: CompiledTrees, booster_scores: np.ndarray, sample: np.ndarray,
               sample_base: np.ndarray | None) -> tuple[float, int]:
    """(largest |compiled - expected|, first row over tolerance or -1) on the sample rows."""
    got = compiled.predict(sample, sample_base)
    diff = np.abs(got - np.asarray(booster_scores, dtype=np.float64))
    bad = np.flatnonzero(~(diff <= COMPILED_PARITY_TOLERANCE))  # NaN counts as a difference
    return float(np.nanmax(diff)) if len(diff) else 0.0, int(bad[0]) if bad.size else -1


def compile_model(home: Path, version: str) -> Path:
    """Compile registry model `version` next to its files and return the library's path.

    The model is loaded (and verified) first; the library is then loaded back through the
    registry, whose parity check refuses it - and this removes it - if it disagrees."""
    from ltr.registry import MODEL_FILE, ModelParityError, ModelRegistry  # registry imports this module lazily

    registry = ModelRegistry(home)
    loaded = registry.load(version)
    if loaded.manifest.model_base is not None:
        raise CompiledTreesError(f"model {version} is staged on model {loaded.manifest.model_base.version}: "
                                 "only models whose score is their trees plus a fusion base are compiled")
    directory = registry._version_dir(version)
    out = directory / library_name(loaded.manifest.files[MODEL_FILE]["sha256"])
    with registry._lock("compile trees"):
        compile_trees(directory / MODEL_FILE, loaded.manifest.sample_array(), out)
    try:
        if registry.load(version).compiled is None:
            raise CompiledTreesError(f"model {version}: the compiled library {out.name} was not picked up")
    except (ModelParityError, CompiledTreesError):
        out.unlink(missing_ok=True)
        raise
    return out
