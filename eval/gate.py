"""The promotion gate: may a candidate model replace what is served?

A candidate is compared, on held-out judged queries that neither model was trained on, with
every reference that could serve instead of it:
  - the fusion baseline: convex fusion of BM25 and dense over the candidate's own candidate window
    (what the engine serves without any model; a model that loses to it must never ship), and
  - the active model, when there is one.
It is refused when it is significantly worse than either (paired t-test and randomisation test,
Holm-corrected over the references, both below alpha: the harness's own definition).

Without held-out queries the gate reads the evidence recorded at training time (the inner
cross-validation gain over the model's base stage, `training["inner_cv"]`), and refuses a model
whose gain is significantly negative there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from eval.datasets import EvalDataset
from eval.experiment import run_queries
from eval.metrics import evaluate_run
from eval.significance import DEFAULT_ALPHA, DEFAULT_SEED, Comparison, compare_to_baseline
from ltr.ranker import model_window, registry_pipeline
from ltr.registry import ModelManifest
from search.backend import SearchBackend
from search.hybrid import FusionSettings, HybridPipeline

GATE_METRIC = "nDCG@10"
GATE_DEPTH = 100  # nDCG@10 needs the top 10; 100 keeps the run file useful for inspection
FUSION_BASELINE = "fusion"


def baseline_fusion(manifest: ModelManifest) -> FusionSettings:
    """The fusion a model must beat: the base fusion its manifest records (staged models), else
    convex fusion (min-max, equal weights) over the model's own candidate window."""
    window = model_window(manifest)
    stage = manifest.base_stage  # a behaviour stage records its text model's first stage too
    if stage is not None:
        return FusionSettings.from_dict({**stage.fusion.to_dict(), "bm25_candidates": window.bm25_candidates,
                                         "dense_candidates": window.dense_candidates})
    return FusionSettings(method="convex", bm25_candidates=window.bm25_candidates,
                          dense_candidates=window.dense_candidates)


@dataclass
class GateResult:
    """The candidate against each reference on the same held-out queries."""

    candidate: str
    queries: int
    means: dict[str, float]  # reference or candidate -> mean GATE_METRIC
    comparisons: dict[str, Comparison]  # reference -> candidate minus reference
    alpha: float = DEFAULT_ALPHA
    notes: list[str] = field(default_factory=list)

    def worse_than(self) -> list[str]:
        """The references the candidate is significantly worse than."""
        return [name for name, c in self.comparisons.items() if c.significant(self.alpha) and c.mean_difference < 0]

    def describe(self) -> list[str]:
        lines = []
        for name, c in self.comparisons.items():
            verdict = ("significantly worse" if name in self.worse_than() else
                       "significantly better" if c.significant(self.alpha) and c.mean_difference > 0 else "no significant difference")
            lines.append(f"{self.candidate} vs {name}: {GATE_METRIC} {self.means[self.candidate]:.4f} vs {self.means[name]:.4f}, "
                         f"difference {c.mean_difference:+.4f} (95% CI {c.ci95[0]:+.4f}..{c.ci95[1]:+.4f}; Holm p: t-test "
                         f"{c.t_test_p_holm:.3g}, randomisation {c.randomisation_p_holm:.3g}): {verdict}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {"metric": GATE_METRIC, "queries": self.queries, "candidate": self.candidate, "means": self.means,
                "comparisons": {name: c.to_dict(self.alpha) for name, c in self.comparisons.items()},
                "worse_than": self.worse_than(), "notes": self.notes}


def check_held_out(dataset: EvalDataset, *manifests: ModelManifest) -> None:
    """The gate's queries must be ones no compared model was trained on."""
    for manifest in manifests:
        trained = manifest.training
        if trained.get("split") == dataset.split and trained.get("dataset") == str(dataset.path.resolve()):
            raise ValueError(f"model {manifest.version} was trained on {dataset.name}/{dataset.split}; "
                             "the gate needs queries neither model has seen (another split)")


def run_gate(backend: SearchBackend, home: Any, dataset: EvalDataset, candidate: ModelManifest,
             active: ModelManifest | None = None, *, progress: bool = False,
             warn: Callable[[str], None] | None = None) -> GateResult:
    """Candidate, fusion baseline and active model (if any) on the same held-out queries."""
    check_held_out(dataset, *(m for m in (candidate, active) if m is not None))
    fusion = baseline_fusion(candidate)
    rankers: dict[str, Callable[[str, int], Any]] = {}
    if active is not None:
        rankers[active.version] = registry_pipeline(backend, home, active.version, name=active.version, warn=warn).search
    rankers[FUSION_BASELINE] = HybridPipeline(backend, fusion, name=FUSION_BASELINE).search
    rankers[candidate.version] = registry_pipeline(backend, home, candidate.version, name=candidate.version, warn=warn).search
    values = {}
    for name, search in rankers.items():
        run, _ = run_queries(search, dataset.queries, GATE_DEPTH, label=name, progress=progress)
        values[name] = evaluate_run(run, dataset.qrels, [GATE_METRIC]).values
    # The candidate is the "baseline" of compare_to_baseline, so each reference's comparison is
    # reference minus candidate; flip it to candidate minus reference.
    table = compare_to_baseline(values, candidate.version, [GATE_METRIC], seed=DEFAULT_SEED)
    comparisons = {name: _flipped(table[name][GATE_METRIC]) for name in rankers if name != candidate.version}
    means = {name: float(np.mean(v[GATE_METRIC])) for name, v in values.items()}
    notes = [f"fusion baseline: {fusion.method} over BM25 top {fusion.bm25_candidates} + dense top {fusion.dense_candidates}"]
    return GateResult(candidate.version, len(dataset.queries), means, comparisons, notes=notes)


def training_evidence(candidate: ModelManifest) -> tuple[bool, str]:
    """(refuse, why) from the inner cross-validation recorded at training time, for a gate
    without held-out queries. No evidence recorded: not refused, and said so."""
    evidence = candidate.training.get("inner_cv")
    if not isinstance(evidence, Mapping) or "gain" not in evidence:
        return False, (f"{candidate.version} records no inner cross-validation evidence and no held-out split was "
                       "given: it was not compared with the fusion baseline (pass --dataset PATH --split SPLIT)")
    gain = float(evidence["gain"])
    low, high = (evidence.get("ci") or [float("nan"), float("nan")])[:2]
    described = f"inner-CV {GATE_METRIC} gain over its base stage {gain:+.4f} (95% CI {low:+.4f}..{high:+.4f})"
    if high < 0:
        return True, f"{candidate.version} is significantly worse than its base stage: {described}"
    return False, f"{candidate.version}: {described}"


def _flipped(c: Comparison) -> Comparison:
    return Comparison(-c.mean_difference, (-c.ci95[1], -c.ci95[0]), c.t_test_p, c.randomisation_p,
                      c.t_test_p_holm, c.randomisation_p_holm, wins=c.losses, losses=c.wins, ties=c.ties)
