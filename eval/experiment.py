"""The experiment runner behind `ltr-search eval`: run named pipelines over a split's queries,
write their TREC runs, score them, and compare them with a baseline.

Learned pipelines are fitted on training queries only: another split (`train_split`), or, with
`folds=K`, the other K-1 folds of the evaluated split (k-fold cross-validation with a fixed
seed; the assignment is written out so the experiment can be repeated exactly).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from eval.datasets import EvalDataset, Run, write_run
from eval.metrics import DEFAULT_METRICS, HEADLINE_METRICS, Metric, QueryScores, evaluate_run, parse_metric
from eval.significance import DEFAULT_ALPHA, DEFAULT_RESAMPLES, DEFAULT_SEED, Comparison, compare_to_baseline, mean_confidence_interval
from indexing.progress import progress_bar
from search.backend import SearchBackend
from search.pipelines import LearnedPipeline, PipelineSpec

DEFAULT_DEPTH = 1000


@dataclass
class ExperimentSettings:
    pipelines: list[str]
    metrics: list[Metric] = field(default_factory=lambda: [parse_metric(m) for m in DEFAULT_METRICS])
    depth: int = DEFAULT_DEPTH
    baseline: str | None = None  # default: the first pipeline
    folds: int | None = None
    seed: int = DEFAULT_SEED
    resamples: int = DEFAULT_RESAMPLES
    alpha: float = DEFAULT_ALPHA

    def __post_init__(self) -> None:
        if not self.pipelines:
            raise ValueError("no pipeline to evaluate")
        if self.baseline is None:
            self.baseline = self.pipelines[0]
        if self.baseline not in self.pipelines:
            raise ValueError(f"baseline '{self.baseline}' is not one of the evaluated pipelines ({', '.join(self.pipelines)})")
        if not 1 <= self.depth <= 10_000:
            raise ValueError(f"depth must be between 1 and 10000, got {self.depth}")
        if self.folds is not None and self.folds < 2:
            raise ValueError(f"--folds must be at least 2, got {self.folds}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")


@dataclass
class PipelineResult:
    name: str
    learned: bool
    trained_on: str | None
    run: Run
    scores: QueryScores
    latencies_ms: np.ndarray
    run_file: Path
    fitted: list[dict[str, Any]] = field(default_factory=list)  # what each fit chose (one per fold)


@dataclass
class ExperimentResult:
    dataset: EvalDataset
    settings: ExperimentSettings
    index_name: str
    index_generation: str
    pipelines: dict[str, PipelineResult]
    significance: dict[str, dict[str, Comparison]]
    judged_missing_from_index: int
    folds_file: Path | None = None

    def to_json(self) -> dict[str, Any]:
        """The documented shape that scripts and dashboards read."""
        metric_names = [m.name for m in self.settings.metrics]
        pipelines: dict[str, Any] = {}
        for name, result in self.pipelines.items():
            latencies = result.latencies_ms
            measured = not np.isnan(latencies).all()
            pipelines[name] = {
                "metrics": result.scores.mean(),
                "ci95": {m: list(mean_confidence_interval(result.scores.values[m])) for m in metric_names},
                "latency_ms": {
                    "p50": float(np.percentile(latencies, 50)),
                    "p95": float(np.percentile(latencies, 95)),
                    "mean": float(latencies.mean()),
                } if measured else None,  # an external run file: not timed here
                "run_file": str(result.run_file),
                "learned": result.learned,
                "trained_on": result.trained_on,
                "fitted": result.fitted,
            }
        return {
            "dataset": self.dataset.name,
            "dataset_path": str(self.dataset.path),
            "split": self.dataset.split,
            "index": {"name": self.index_name, "generation": self.index_generation},
            "queries": len(self.dataset.queries),
            "skipped_queries": len(self.dataset.skipped),
            "skipped": [{"query_id": s.query_id, "reason": s.reason} for s in self.dataset.skipped],
            "judged_documents_missing_from_index": self.judged_missing_from_index,
            "depth": self.settings.depth,
            "folds": None if self.settings.folds is None else {
                "k": self.settings.folds, "seed": self.settings.seed, "file": str(self.folds_file),
            },
            "pipelines": pipelines,
            "significance": {
                "baseline": self.settings.baseline,
                "alpha": self.settings.alpha,
                "tests": ["paired t-test", f"paired randomisation test ({self.settings.resamples} sign flips)"],
                "correction": "Holm, per metric across the pipelines compared with the baseline",
                "significant_means": "both Holm-corrected p-values below alpha",
                "comparisons": {
                    name: {metric: c.to_dict(self.settings.alpha) for metric, c in by_metric.items()}
                    for name, by_metric in self.significance.items()
                },
            },
        }


def assign_folds(query_ids: Sequence[str], k: int, seed: int) -> dict[str, int]:
    """Query id -> fold in [0, k): a seeded shuffle dealt round-robin, so folds differ by at most one query."""
    if k > len(query_ids):
        raise ValueError(f"--folds {k} is more than the {len(query_ids)} evaluable queries")
    order = np.random.default_rng(seed).permutation(len(query_ids))
    return {query_ids[i]: fold % k for fold, i in enumerate(order.tolist())}


def run_queries(
    search: Callable[[str, int], Sequence[Any]], queries: dict[str, str], depth: int, *, label: str = "", progress: bool = False
) -> tuple[Run, np.ndarray]:
    """Each query once, timed alone; a warm-up query first so lazy initialisation is not measured."""
    if queries:
        search(next(iter(queries.values())), depth)
    run: Run = {}
    latencies = np.empty(len(queries))
    items = progress_bar(queries.items(), desc=label, unit="q", enabled=progress, leave=False)
    for i, (query_id, text) in enumerate(items):
        started = time.perf_counter()
        hits = search(text, depth)
        latencies[i] = (time.perf_counter() - started) * 1000
        run[query_id] = {hit.doc_id: hit.score for hit in hits}
    return run, latencies


def run_experiment(
    index: SearchBackend,
    dataset: EvalDataset,
    settings: ExperimentSettings,
    runs_dir: Path,
    *,
    catalog: Callable[[str], PipelineSpec],
    train: EvalDataset | None = None,
    external_runs: dict[str, Run] | None = None,
    progress: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> ExperimentResult:
    if train is not None and train.split == dataset.split and train.path == dataset.path:
        raise ValueError(f"the training split must differ from the evaluated split ('{dataset.split}')")
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    query_ids = list(dataset.queries)
    folds: dict[str, int] | None = None
    folds_file = None
    if settings.folds:
        folds = assign_folds(query_ids, settings.folds, settings.seed)
        folds_file = runs_dir / "folds.json"
        folds_file.write_text(json.dumps({"k": settings.folds, "seed": settings.seed, "split": dataset.split, "folds": folds}, indent=1))

    results: dict[str, PipelineResult] = {}
    external_runs = external_runs or {}
    ignored = {s.query_id for s in dataset.skipped}
    for name in settings.pipelines:
        if name in external_runs:  # a run file produced elsewhere, scored like our own
            run = external_runs[name]
            scores = evaluate_run(run, dataset.qrels, settings.metrics, ignore_queries=ignored)
            run_file = write_run({q: run[q] for q in dataset.queries if q in run}, runs_dir / f"{name}.run", tag=name)
            results[name] = PipelineResult(name, False, None, run, scores, np.full(1, np.nan), run_file)
            continue
        spec = catalog(name)
        trained_on = None
        fitted: list[dict[str, Any]] = []
        if spec.learned and folds is not None:
            run, latencies, fitted = _cross_validate(index, spec, dataset, folds, settings, progress)
            trained_on = f"{settings.folds}-fold cross-validation on {dataset.split} (seed {settings.seed})"
        else:
            pipeline = spec.factory(index)
            if spec.learned:
                if train is None:
                    raise ValueError(
                        f"pipeline '{name}' is learned: give a training split (--train-split) or --folds K; "
                        "it is never fitted on the queries it is evaluated on"
                    )
                assert isinstance(pipeline, LearnedPipeline)
                log(f"{name}: fitting on {len(train.queries)} {train.split} queries")
                pipeline.fit(train.queries, train.qrels)
                fitted.append(_fitted_parameters(pipeline))
                trained_on = f"{train.split} split ({len(train.queries)} queries)"
            run, latencies = run_queries(pipeline.search, dataset.queries, settings.depth, label=name, progress=progress)
        scores = evaluate_run(run, dataset.qrels, settings.metrics)
        run_file = write_run(run, runs_dir / f"{name}.run", tag=name)
        results[name] = PipelineResult(name, spec.learned, trained_on, run, scores, latencies, run_file, fitted)
        if fitted:
            log(f"{name}: fitted {describe_fitted(fitted)}")
        headline = ", ".join(f"{m} {scores.mean()[m]:.4f}" for m in HEADLINE_METRICS if m in scores.values)
        log(f"{name}: {headline}; p50 {np.percentile(latencies, 50):.1f} ms")

    metric_names = [m.name for m in settings.metrics]
    significance = compare_to_baseline(
        {name: r.scores.values for name, r in results.items()}, settings.baseline, metric_names,
        resamples=settings.resamples, seed=settings.seed,
    )
    judged = {doc for docs in dataset.qrels.values() for doc in docs}
    missing = sum(1 for doc in index.documents(sorted(judged)) if doc is None)
    return ExperimentResult(
        dataset, settings, index.name, index.generation_id, results, significance, missing, folds_file
    )


def _cross_validate(
    index: SearchBackend, spec: PipelineSpec, dataset: EvalDataset, folds: dict[str, int], settings: ExperimentSettings,
    progress: bool,
) -> tuple[Run, np.ndarray, list[dict[str, Any]]]:
    """Fit a fresh pipeline on K-1 folds, run it on the held-out fold; every query is answered
    by a model that never saw it."""
    run: Run = {}
    latencies = np.empty(len(dataset.queries))
    position = {q: i for i, q in enumerate(dataset.queries)}
    fitted = []
    for fold in range(settings.folds or 0):
        held_out = {q: t for q, t in dataset.queries.items() if folds[q] == fold}
        training = {q: t for q, t in dataset.queries.items() if folds[q] != fold}
        pipeline = spec.factory(index)
        assert isinstance(pipeline, LearnedPipeline)
        pipeline.fit(training, {q: dataset.qrels[q] for q in training})
        fitted.append(_fitted_parameters(pipeline))
        fold_run, fold_latencies = run_queries(
            pipeline.search, held_out, settings.depth, label=f"{spec.name} fold {fold + 1}/{settings.folds}", progress=progress
        )
        run.update(fold_run)
        for query_id, latency in zip(held_out, fold_latencies):
            latencies[position[query_id]] = latency
    return {q: run[q] for q in dataset.queries}, latencies, fitted


MAX_LOG_CHARS = 400  # one log line; the full record is in the results JSON


def describe_fitted(fitted: list[dict[str, Any]], limit: int = MAX_LOG_CHARS) -> str:
    """What the fits chose, short enough for one log line: scalars as they are, lists and
    tables by their size, the whole cut at `limit` characters (the JSON keeps everything)."""
    def brief(value: Any) -> Any:
        if isinstance(value, (dict, list, tuple)) and len(value) > 4:
            return f"<{len(value)} {'entries' if isinstance(value, dict) else 'items'}>"
        return value

    folds = [{key: brief(value) for key, value in record.items()} for record in fitted]
    text = str(folds[0] if len(folds) == 1 else folds)
    if len(text) > limit:
        text = text[:limit] + f" ... ({len(text) - limit:,} more characters; see the results JSON)"
    return text


def _fitted_parameters(pipeline: Any) -> dict[str, Any]:
    describe = getattr(pipeline, "fitted_parameters", None)
    return describe() if callable(describe) else {}
