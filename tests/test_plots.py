"""Eval report plots: one panel per metric on its own scale, no legend over the bars."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from eval.plots import metrics_figure, plot_metrics_with_ci

METRICS = ["nDCG@10", "R@100", "P@10", "MAP@100"]
MEANS = {"bm25": {"nDCG@10": 0.68, "R@100": 0.92, "P@10": 0.088, "MAP@100": 0.63},
         "hybrid": {"nDCG@10": 0.72, "R@100": 0.96, "P@10": 0.096, "MAP@100": 0.67}}
INTERVALS = {name: {m: (v - 0.01, v + 0.01) for m, v in values.items()} for name, values in MEANS.items()}


def test_each_metric_has_its_own_panel_and_scale():
    figure = metrics_figure(MEANS, INTERVALS, METRICS)
    panels = [axes for axes in figure.axes if axes.get_visible()]
    assert [axes.get_title() for axes in panels] == METRICS
    precision = panels[METRICS.index("P@10")]
    assert 0.106 <= precision.get_xlim()[1] < 0.2  # readable: not squeezed onto a 0-1 axis
    assert all(axes.get_legend() is None for axes in panels)
    ticks = dict(zip(panels[0].get_yticks(), (label.get_text() for label in panels[0].get_yticklabels())))
    assert ticks[max(ticks)] == "bm25"  # pipelines top to bottom in the order given
    plt.close(figure)


def test_the_plot_is_written(tmp_path: Path):
    path = plot_metrics_with_ci(MEANS, INTERVALS, METRICS, tmp_path / "metrics.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
