"""SIMD trees: a registry model's XGBoost trees as constant tables in a small C kernel (gcc).

Why: TL2cgen's if-else code walks one row through one tree at a time, and its branches are
taken at random on real windows; with several hundred trees a 400-row window took 4-6 ms.
Here every tree is padded to a complete binary tree of its ensemble's depth, so a row's path is
arithmetic (node k -> 2k+1 or 2k+2) and 16 rows (AVX-512) or 8 (AVX2) descend together in one
vector, the nodes of a tree's upper levels coming from registers by permutes. The kernel source
is `simd_trees.c`; `trees_source` prepends the model's tables. Chosen by measurement, back to
back with TL2cgen and XGBoost on the same windows (`bench/bench_trees.py`): see the README.

The kernel adds trees in float32 in XGBoost's order, starting from the caller's base margin
(or XGBoost's base_score), so its scores equal XGBoost's; the registry's parity check still
guards every load.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

KERNEL_SOURCE = Path(__file__).with_name("simd_trees.c")
MAX_DEPTH = 12  # complete trees of depth 12 hold 4,095 nodes each; deeper ensembles are refused
SIMD_LEVELS = {2: "avx512", 1: "avx2", 0: "scalar"}
DEFAULT_LEFT_BIT = np.int64(1) << 31  # FEAT's bit 31: a missing value goes left
LANE_SCALE = 16  # FEAT holds feature * 16: the kernel adds a lane to it (AVX2 halves it first)


class SimdTreesError(RuntimeError):
    """The trees cannot be laid out or compiled, or the library does not load."""


@dataclass(frozen=True)
class TreeTables:
    """Complete-tree tables of an ensemble (T trees of depth D, level order; see simd_trees.c)."""

    depth: int
    num_feature: int
    feature: np.ndarray  # (T, stride) int64: feature * LANE_SCALE, DEFAULT_LEFT_BIT where missing goes left
    threshold: np.ndarray  # (T, stride) float32: go left when x < threshold (inf on padding nodes)
    leaf: np.ndarray  # (T, 2**depth) float32

    @property
    def trees(self) -> int:
        return len(self.leaf)


def _table_stride(depth: int) -> int:
    """Entries stored per tree: one past the complete tree's 2**depth - 1 nodes, and at least 64
    so the kernel's 16-wide loads of a level's nodes never leave the tree."""
    return max(2 ** depth, 64)


def tree_tables(model_file: Path) -> TreeTables:
    """Read an XGBoost JSON model (`Booster.save_model`) into complete-tree tables."""
    model = json.loads(Path(model_file).read_text())
    booster = model["learner"]["gradient_booster"]
    if booster.get("name") != "gbtree":
        raise SimdTreesError(f"{model_file}: only gbtree boosters compile, got {booster.get('name')!r}")
    trees = booster["model"]["trees"]
    num_feature = int(model["learner"]["learner_model_param"]["num_feature"])
    if not trees:
        raise SimdTreesError(f"{model_file}: the model has no trees")
    if any(tree.get("categories_nodes") for tree in trees):
        raise SimdTreesError(f"{model_file}: categorical splits do not compile")
    depths = [_depth(tree) for tree in trees]
    depth = max(1, max(depths))
    if depth > MAX_DEPTH:
        raise SimdTreesError(f"{model_file}: trees {depth} deep; at most {MAX_DEPTH} compile")
    stride, internal = _table_stride(depth), 2 ** depth - 1
    feature = np.zeros((len(trees), stride), dtype=np.int64)
    threshold = np.full((len(trees), stride), np.inf, dtype=np.float32)
    leaf = np.zeros((len(trees), 2 ** depth), dtype=np.float32)
    for t, tree in enumerate(trees):
        left, right = tree["left_children"], tree["right_children"]
        split, condition, default_left = tree["split_indices"], tree["split_conditions"], tree["default_left"]
        stack = [(0, 0, 0)]  # (XGBoost node, complete-tree position, level)
        while stack:
            node, position, level = stack.pop()
            if left[node] == -1:  # a leaf: every complete-tree leaf below `position` gets its value
                first = position
                for _ in range(depth - level):
                    first = 2 * first + 1  # padding nodes (feature 0, threshold inf) always go left
                span = 2 ** (depth - level)
                leaf[t, first - internal:first - internal + span] = np.float32(condition[node])
                _mark_default_left(feature[t], position, depth - level)
                continue
            if not 0 <= split[node] < num_feature:
                raise SimdTreesError(f"{model_file}: tree {t} splits on feature {split[node]} of {num_feature}")
            feature[t, position] = split[node] * LANE_SCALE | (DEFAULT_LEFT_BIT if default_left[node] else 0)
            threshold[t, position] = np.float32(condition[node])
            stack += [(left[node], 2 * position + 1, level + 1), (right[node], 2 * position + 2, level + 1)]
    return TreeTables(depth, num_feature, feature, threshold, leaf)


def _mark_default_left(feature: np.ndarray, position: int, levels: int) -> None:
    """Padding nodes under a leaf send missing values left too (x < inf is false for NaN)."""
    frontier = [position]
    for _ in range(levels):
        for node in frontier:
            feature[node] = DEFAULT_LEFT_BIT
        frontier = [child for node in frontier for child in (2 * node + 1, 2 * node + 2)]


def _depth(tree: dict[str, Any]) -> int:
    left, right = tree["left_children"], tree["right_children"]
    depth, frontier = 0, [0]
    while True:
        frontier = [child for node in frontier if left[node] != -1 for child in (left[node], right[node])]
        if not frontier:
            return depth
        depth += 1


def _c_floats(values: np.ndarray) -> str:
    """Exact float32 literals (hexadecimal), infinities as INFINITY."""
    return ",".join("INFINITY" if np.isposinf(v) else "-INFINITY" if np.isneginf(v) else f"{float(v).hex()}f"
                    for v in values.reshape(-1))


def trees_source(tables: TreeTables) -> str:
    """The C source of one model: its tables, then the kernel."""
    signed = np.where(tables.feature >= DEFAULT_LEFT_BIT, tables.feature - (1 << 32), tables.feature).astype(np.int32)
    stride = tables.feature.shape[1]
    head = [
        "#include <math.h>",
        f"#define T {tables.trees}", f"#define D {tables.depth}", f"#define NF {tables.num_feature}",
        f"#define NI {2 ** tables.depth - 1}", f"#define NL {2 ** tables.depth}", f"#define S {stride}",
        # 32 entries of padding after the last tree: the kernel's 16-wide loads may read past its nodes
        f"static const int FEAT16[{signed.size + 32}] = {{{','.join(map(str, signed.reshape(-1)))}}};",
        f"static const float THR[{tables.threshold.size + 32}] = {{{_c_floats(tables.threshold)}}};",
        f"static const float LEAF[{tables.leaf.size}] = {{{_c_floats(tables.leaf)}}};",
    ]
    return "\n".join(head) + "\n" + KERNEL_SOURCE.read_text()


def compiler() -> str:
    """The C compiler: $CC, else gcc, else cc."""
    for candidate in (os.environ.get("CC"), "gcc", "cc"):
        if candidate and shutil.which(candidate):
            return candidate
    raise SimdTreesError("no C compiler found (set CC, or install gcc)")


def compile_simd_trees(model_file: Path, out: Path) -> Path:
    """Compile the XGBoost JSON `model_file` into the shared library `out` (atomic rename)."""
    tables = tree_tables(model_file)
    with tempfile.TemporaryDirectory(prefix=".compile-", dir=out.parent) as work:
        source, library = Path(work) / "trees.c", Path(work) / out.name
        source.write_text(trees_source(tables))
        command = [compiler(), "-O3", "-std=gnu11", "-shared", "-fPIC", "-o", str(library), str(source)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SimdTreesError(f"cannot compile {model_file}: {' '.join(command[:2])} ... exited "
                                 f"{done.returncode}: {done.stderr.strip()[-2000:]}")
        os.replace(library, out)
    return out


class SimdTrees:
    """A loaded library: float32 rows -> float64 scores, each the trees' sum started from the
    row's base margin, or from `intercept` (XGBoost's base_score) when no base is given, as
    XGBoost does."""

    def __init__(self, path: Path, intercept: float = 0.0, level: int | None = None):
        try:
            library = ctypes.CDLL(str(path))
            predict = library.trees_predict
        except (OSError, AttributeError) as exc:
            raise SimdTreesError(f"{path}: not a SIMD trees library: {exc}") from exc
        predict.restype = ctypes.c_int
        predict.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        self.path, self.intercept = Path(path), float(intercept)
        self._library, self._predict = library, predict
        self.num_feature = int(library.trees_num_feature())
        supported = int(library.trees_simd_level())
        if level is not None and not 0 <= level <= supported:
            raise SimdTreesError(f"SIMD level {level} ({SIMD_LEVELS.get(level, '?')}) is not available here; "
                                 f"this CPU supports up to {supported} ({SIMD_LEVELS[supported]})")
        self.level = supported if level is None else level

    def predict(self, features: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
        rows = np.ascontiguousarray(features, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.num_feature:
            raise ValueError(f"the compiled trees expect {self.num_feature} feature columns, got shape {np.shape(features)}")
        out = np.empty(len(rows), dtype=np.float64)
        if not len(rows):
            return out
        if base is None:
            start = np.full(len(rows), self.intercept, dtype=np.float32)
        else:
            start = np.ascontiguousarray(base, dtype=np.float32)
            if start.shape != (len(rows),):
                raise ValueError(f"base margin has shape {start.shape}, expected ({len(rows)},)")
        if self._predict(rows.ctypes.data, len(rows), start.ctypes.data, self.level, out.ctypes.data) != 0:
            raise MemoryError(f"{self.path.name}: cannot allocate the scoring buffer for {len(rows)} rows")
        return out
