"""PNG plots for evaluation reports (matplotlib, headless Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402


def plot_metrics_with_ci(
    means: Mapping[str, Mapping[str, float]],
    intervals: Mapping[str, Mapping[str, Sequence[float]]],
    metrics: Sequence[str],
    path: Path,
) -> Path:
    return _save(metrics_figure(means, intervals, metrics), path)


def metrics_figure(
    means: Mapping[str, Mapping[str, float]],
    intervals: Mapping[str, Mapping[str, Sequence[float]]],
    metrics: Sequence[str],
) -> "plt.Figure":
    """One panel per metric, each on its own scale (P@10 of 0.09 is unreadable on a 0-1 axis
    shared with R@100 of 0.96): horizontal bars, one per pipeline, with 95% CI whiskers and the
    value written beside each bar; pipelines are named on the axis, so no legend covers a bar."""
    pipelines = list(means)
    columns = min(3, max(1, len(metrics)))
    rows = -(-len(metrics) // columns)
    height = max(1.6, 0.42 * len(pipelines) + 0.9)
    figure, grid = plt.subplots(rows, columns, figsize=(4.2 * columns, height * rows), squeeze=False)
    y = np.arange(len(pipelines))[::-1]  # the first pipeline on top
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for panel, metric in zip(grid.flat, metrics):
        values = np.array([means[name][metric] for name in pipelines])
        low = np.array([intervals[name][metric][0] for name in pipelines])
        high = np.array([intervals[name][metric][1] for name in pipelines])
        errors = np.clip(np.vstack([values - low, high - values]), 0, None)
        panel.barh(y, values, xerr=errors, capsize=3, color=[colours[i % len(colours)] for i in range(len(pipelines))])
        top = float(np.nanmax(high)) if len(high) else 1.0
        panel.set_xlim(0, top * 1.3 if top > 0 else 1.0)
        for row, value, whisker in zip(y, values, high):
            panel.text(whisker + top * 0.02, row, f"{value:.3f}", va="center", fontsize="small")
        panel.set_yticks(y, pipelines, fontsize="small")
        panel.set_title(metric)
        panel.grid(axis="x", alpha=0.3)
    for panel in list(grid.flat)[len(metrics):]:
        panel.set_visible(False)
    figure.supxlabel("mean over queries, 95% CI", fontsize="small")
    return figure


def plot_per_query_differences(differences: Mapping[str, np.ndarray], metric: str, baseline: str, path: Path) -> Path:
    """Each pipeline's per-query difference against the baseline, sorted: the area above zero is
    the queries it wins, below zero the ones it loses."""
    figure, axes = plt.subplots(figsize=(7, 4))
    for name, difference in differences.items():
        ordered = np.sort(np.asarray(difference))[::-1]
        axes.plot(np.arange(1, len(ordered) + 1), ordered, label=f"{name} (mean {ordered.mean():+.4f})")
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_xlabel("queries, sorted by difference")
    axes.set_ylabel(f"{metric} difference vs {baseline}")
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def _save(figure: "plt.Figure", path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
