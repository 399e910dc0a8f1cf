"""Feature-group ablation: which groups of a learned ranker's features help on this dataset.

`ltr-search eval --ablation` adds, for every learned `ltr[:SET]` pipeline, one pipeline per
feature group without that group (`ltr:SET-without-GROUP`, trained the same way), then compares
each with the full set query by query: removing a group that helps makes the ranker
significantly worse. Holm-corrected across the groups of one set, as the eval table is."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from eval.significance import DEFAULT_ALPHA, compare_to_baseline

ABLATION_MARK = "-without-"


def ablation_pipeline_names(pipeline: str, feature_set: str, groups: Sequence[str]) -> list[str]:
    """The ablations of one learned pipeline: `ltr:SET-without-GROUP` for each of its groups
    (none for a set with one group: without it nothing is left)."""
    if len(groups) < 2:
        return []
    family = pipeline.split(":", 1)[0]
    return [f"{family}:{feature_set}{ABLATION_MARK}{group}" for group in groups]


def feature_group_ablation(per_pipeline: Mapping[str, Mapping[str, np.ndarray]], full: str,
                           ablations: Mapping[str, str], metric: str, *, resamples: int, seed: int,
                           alpha: float = DEFAULT_ALPHA) -> dict[str, Any]:
    """Per group (`ablations`: group -> pipeline name without it): the metric without the group,
    the per-query difference full minus without (positive: the group helps), its 95% CI, Holm
    p-values and a verdict."""
    family = {full: per_pipeline[full], **{name: per_pipeline[name] for name in ablations.values()}}
    table = compare_to_baseline(family, full, [metric], resamples=resamples, seed=seed)
    groups: dict[str, Any] = {}
    for group, name in ablations.items():
        c = table[name][metric]
        significant = c.significant(alpha)
        effect = -c.mean_difference  # the comparison is without - full
        verdict = ("helps" if effect > 0 else "hurts") if significant else "no significant effect"
        groups[group] = {
            "pipeline": name, "without": float(np.mean(per_pipeline[name][metric])),
            "effect": effect, "ci95": [-c.ci95[1], -c.ci95[0]],
            "t_test_p_holm": c.t_test_p_holm, "randomisation_p_holm": c.randomisation_p_holm,
            "significant": significant, "verdict": verdict,
        }
    return {"metric": metric, "full": float(np.mean(per_pipeline[full][metric])), "groups": groups}


def ablation_lines(name: str, ablation: Mapping[str, Any]) -> list[str]:
    """The ablation table `ltr-search eval` prints."""
    metric = ablation["metric"]
    lines = [f"feature groups of {name} ({metric} {ablation['full']:.4f} with all; effect = with minus without, "
             "Holm-corrected across its groups):",
             f"  {'group':<12}{'without':>10}{'effect':>10}  {'95% CI':<20}verdict"]
    for group, row in ablation["groups"].items():
        ci = f"{row['ci95'][0]:+.4f}..{row['ci95'][1]:+.4f}"
        lines.append(f"  {group:<12}{row['without']:>10.4f}{row['effect']:>+10.4f}  {ci:<20}{row['verdict']}")
    return lines
