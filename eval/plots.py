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
    """Grouped bars: one group per metric, one bar per pipeline, 95% CI whiskers."""
    pipelines = list(means)
    width = 0.8 / max(1, len(pipelines))
    x = np.arange(len(metrics))
    figure, axes = plt.subplots(figsize=(max(6, 1.4 * len(metrics) * max(1, len(pipelines)) / 2), 4))
    for i, name in enumerate(pipelines):
        values = np.array([means[name][m] for m in metrics])
        low = np.array([intervals[name][m][0] for m in metrics])
        high = np.array([intervals[name][m][1] for m in metrics])
        errors = np.vstack([values - low, high - values])
        axes.bar(x + (i - (len(pipelines) - 1) / 2) * width, values, width, yerr=errors, capsize=3, label=name)
    axes.set_xticks(x, metrics)
    axes.set_ylim(0, 1)
    axes.set_ylabel("mean over queries (95% CI)")
    axes.legend(loc="upper right", fontsize="small")
    axes.grid(axis="y", alpha=0.3)
    return _save(figure, path)


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
