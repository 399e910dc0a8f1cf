"""Markdown reports of an experiment, with PNG plots written next to the report."""
from __future__ import annotations

from pathlib import Path

from eval.experiment import ExperimentResult
from eval.metrics import HEADLINE_METRICS
from eval.plots import plot_metrics_with_ci, plot_per_query_differences
from eval.significance import mean_confidence_interval

SIGNIFICANT_BETTER = "▲"
SIGNIFICANT_WORSE = "▼"


def write_report(result: ExperimentResult, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.with_suffix("")
    settings = result.settings
    baseline = settings.baseline
    metrics = [m.name for m in settings.metrics]
    headline = [m for m in HEADLINE_METRICS if m in metrics] or metrics[:5]
    means = {name: r.scores.mean() for name, r in result.pipelines.items()}
    intervals = {
        name: {m: mean_confidence_interval(r.scores.values[m]) for m in metrics} for name, r in result.pipelines.items()
    }

    lines = [
        f"# Evaluation: {result.dataset.name} / {result.dataset.split}",
        "",
        f"- Index `{result.index_name}` generation `{result.index_generation}`; ranking depth {settings.depth}.",
        f"- {len(result.dataset.queries)} judged queries evaluated; {len(result.dataset.skipped)} skipped"
        + (f" ({_skip_reasons(result)})" if result.dataset.skipped else "") + ".",
        f"- Judged documents missing from the index: {result.judged_missing_from_index}.",
    ]
    if settings.folds:
        lines.append(f"- Learned pipelines: {settings.folds}-fold cross-validation, seed {settings.seed}, folds in `{result.folds_file}`.")
    lines += [
        f"- Significance against `{baseline}`: paired t-test and paired randomisation test ({settings.resamples} sign flips), "
        f"Holm-corrected per metric; {SIGNIFICANT_BETTER}/{SIGNIFICANT_WORSE} = better/worse with both corrected p < {settings.alpha}.",
        "",
        "## Metrics",
        "",
        "| pipeline | " + " | ".join(metrics) + " | p50 ms | p95 ms |",
        "|---" * (len(metrics) + 3) + "|",
    ]
    summary = result.to_json()["pipelines"]
    for name in result.pipelines:
        cells = [f"{means[name][m]:.4f}{_mark(result, name, m)}" for m in metrics]
        latency = summary[name]["latency_ms"] or {"p50": float("nan"), "p95": float("nan")}
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {latency['p50']:.1f} | {latency['p95']:.1f} |")

    lines += ["", f"## Against `{baseline}`", ""]
    if result.significance:
        lines += [
            "| pipeline | metric | mean diff | 95% CI | t-test p (Holm) | randomisation p (Holm) | wins / losses / ties |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, by_metric in result.significance.items():
            for m in headline:
                c = by_metric[m]
                lines.append(
                    f"| {name} | {m} | {c.mean_difference:+.4f} | [{c.ci95[0]:+.4f}, {c.ci95[1]:+.4f}] | "
                    f"{c.t_test_p:.3g} ({c.t_test_p_holm:.3g}) | {c.randomisation_p:.3g} ({c.randomisation_p_holm:.3g}) | "
                    f"{c.wins} / {c.losses} / {c.ties} |"
                )
    else:
        lines.append("Only one pipeline was evaluated; nothing to compare.")

    plots = [("Metrics with 95% confidence intervals", plot_metrics_with_ci(means, intervals, headline, Path(f"{stem}-metrics.png")))]
    if result.significance:
        first = headline[0]
        differences = {
            name: r.scores.values[first] - result.pipelines[baseline].scores.values[first]
            for name, r in result.pipelines.items() if name != baseline
        }
        plots.append((
            f"Per-query {first} difference against {baseline}",
            plot_per_query_differences(differences, first, baseline, Path(f"{stem}-per-query-{_slug(first)}.png")),
        ))
    lines += ["", "## Plots", ""]
    for title, image in plots:
        lines += [f"### {title}", "", f"![{title}]({image.name})", ""]
    lines += ["## Run files", ""]
    lines += [f"- `{name}`: `{r.run_file}`" + (f" (trained on {r.trained_on})" if r.trained_on else "") for name, r in result.pipelines.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _mark(result: ExperimentResult, name: str, metric: str) -> str:
    comparison = result.significance.get(name, {}).get(metric)
    if comparison is None or not comparison.significant(result.settings.alpha):
        return ""
    return SIGNIFICANT_BETTER if comparison.mean_difference > 0 else SIGNIFICANT_WORSE


def _skip_reasons(result: ExperimentResult) -> str:
    counts: dict[str, int] = {}
    for skipped in result.dataset.skipped:
        counts[skipped.reason] = counts.get(skipped.reason, 0) + 1
    return "; ".join(f"{n}: {reason}" for reason, n in counts.items())


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-").lower()
