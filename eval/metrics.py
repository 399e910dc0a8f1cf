"""Relevance metrics through pytrec_eval (trec_eval's own C code), named as ir_measures names them.

    nDCG@k  normalised DCG with the judged grades as gains (trec_eval `ndcg_cut.k`)
    P@k     precision at k, relevant = grade >= 1 (`P.k`)
    R@k     recall at k (`recall.k`)
    MAP@k   mean average precision over the top k (`map_cut.k`); `MAP`/`AP` uncut (`map`)
    RR@k    reciprocal rank of the first relevant document within the top k; `RR` uncut
            (`recip_rank` on the run cut at k in trec_eval's order)
    judged@k share of the top k that carry any judgment, `P.k` against every judged
            document counted relevant (so unjudged holes in a ranking are visible)

Every number comes from pytrec_eval; a query the run does not answer scores 0 on every
metric rather than dropping out of the mean (pytrec_eval alone would skip it and flatter the run).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Collection, Iterable, Mapping, Sequence

import numpy as np
import pytrec_eval

from eval.datasets import Qrels, Run, trec_order

DEFAULT_METRICS = (
    "nDCG@1", "nDCG@3", "nDCG@5", "nDCG@10", "nDCG@100",
    "P@1", "P@5", "P@10",
    "R@10", "R@100", "R@1000",
    "MAP@100", "RR@10", "judged@10",
)
HEADLINE_METRICS = ("nDCG@10", "R@100", "P@10", "MAP@100", "RR@10")

_FAMILIES = {"nDCG": "nDCG", "P": "P", "R": "R", "MAP": "MAP", "AP": "MAP", "RR": "RR", "judged": "judged"}
_NEEDS_CUTOFF = {"P", "R", "judged"}
_NAME = re.compile(r"^(?P<family>[A-Za-z]+)(?:@(?P<cutoff>\d+))?$")
_KNOWN = "nDCG@k, P@k, R@k, MAP@k, RR@k, judged@k (nDCG, MAP and RR also uncut), e.g. nDCG@10"


@dataclass(frozen=True)
class Metric:
    name: str  # as written by the user, e.g. "nDCG@10"
    family: str  # nDCG, P, R, MAP, RR, judged
    cutoff: int | None

    @property
    def trec_measure(self) -> str:
        """The trec_eval measure family computing it."""
        return {"nDCG": "ndcg_cut" if self.cutoff else "ndcg", "P": "P", "R": "recall",
                "MAP": "map_cut" if self.cutoff else "map", "RR": "recip_rank", "judged": "P"}[self.family]

    @property
    def trec_key(self) -> str:
        """The key of this value in pytrec_eval's per-query output."""
        if self.family == "RR" or (self.family in ("nDCG", "MAP") and not self.cutoff):
            return self.trec_measure
        return f"{self.trec_measure}_{self.cutoff}"


def parse_metric(name: str) -> Metric:
    match = _NAME.match(name.strip())
    family = _FAMILIES.get(match.group("family")) if match else None
    if family is None:
        raise ValueError(f"metric '{name}' does not exist; known metrics: {_KNOWN}")
    cutoff = int(match.group("cutoff")) if match.group("cutoff") else None
    if cutoff is None and family in _NEEDS_CUTOFF:
        raise ValueError(f"metric '{name}' needs a cutoff, e.g. {family}@10")
    if cutoff is not None and cutoff < 1:
        raise ValueError(f"metric '{name}': the cutoff must be at least 1")
    return Metric(name.strip(), family, cutoff)


def parse_metric_list(text: str | Iterable[str]) -> list[Metric]:
    names = [part.strip() for part in (text.split(",") if isinstance(text, str) else text) if part.strip()]
    if not names:
        raise ValueError("no metric named")
    metrics = [parse_metric(name) for name in names]
    seen: set[str] = set()
    for metric in metrics:
        if metric.name in seen:
            raise ValueError(f"metric '{metric.name}' listed twice")
        seen.add(metric.name)
    return metrics


@dataclass
class QueryScores:
    """Per-query metric values, aligned across metrics: `values[m][i]` is query `query_ids[i]`."""

    query_ids: list[str]
    values: dict[str, np.ndarray]

    def mean(self) -> dict[str, float]:
        return {name: float(column.mean()) for name, column in self.values.items()}

    def subset(self, query_ids: Sequence[str]) -> "QueryScores":
        position = {q: i for i, q in enumerate(self.query_ids)}
        rows = np.array([position[q] for q in query_ids], dtype=np.int64)
        return QueryScores(list(query_ids), {name: column[rows] for name, column in self.values.items()})


def cut_run(run: Mapping[str, Mapping[str, float]], depth: int) -> Run:
    """Each query's top `depth` documents in trec_eval's order."""
    return {q: dict(trec_order(ranked)[:depth]) for q, ranked in run.items()}


def evaluate_run(
    run: Mapping[str, Mapping[str, float]],
    qrels: Qrels,
    metrics: Sequence[Metric | str] = DEFAULT_METRICS,
    *,
    ignore_queries: Collection[str] = (),
) -> QueryScores:
    """Score `run` against every query of `qrels`.

    A run query that is neither judged nor in `ignore_queries` is an error (it usually means
    the run and the qrels come from different collections)."""
    parsed = [m if isinstance(m, Metric) else parse_metric(m) for m in metrics]
    unknown = [q for q in run if q not in qrels and q not in ignore_queries]
    if unknown:
        raise ValueError(
            f"the run names {len(unknown)} quer{'y' if len(unknown) == 1 else 'ies'} without judgments, "
            f"first '{unknown[0]}'; run and qrels must come from the same dataset and split"
        )
    query_ids = list(qrels)
    answered = {q: dict(run[q]) for q in query_ids if run.get(q)}
    values = {metric.name: np.zeros(len(query_ids)) for metric in parsed}

    plain = [m for m in parsed if m.family not in ("RR", "judged")]
    batches: list[tuple[list[Metric], Qrels, Mapping[str, Mapping[str, float]]]] = []
    if plain:
        batches.append((plain, qrels, answered))
    rr_by_cutoff: dict[int | None, list[Metric]] = defaultdict(list)
    for metric in parsed:
        if metric.family == "RR":
            rr_by_cutoff[metric.cutoff].append(metric)
    for cutoff, group in rr_by_cutoff.items():
        batches.append((group, qrels, cut_run(answered, cutoff) if cutoff else answered))
    judged = [m for m in parsed if m.family == "judged"]
    if judged:
        any_judgment = {q: {d: 1 for d in docs} for q, docs in qrels.items()}
        batches.append((judged, any_judgment, answered))

    for group, judgments, ranking in batches:
        if not ranking:
            continue
        measures = _measure_set(group)
        per_query = pytrec_eval.RelevanceEvaluator(judgments, measures).evaluate(ranking)
        for i, query_id in enumerate(query_ids):
            scores = per_query.get(query_id)
            if scores is None:
                continue  # unanswered: stays 0
            for metric in group:
                values[metric.name][i] = scores[metric.trec_key]
    return QueryScores(query_ids, values)


def _measure_set(metrics: Iterable[Metric]) -> set[str]:
    cutoffs: dict[str, set[int]] = defaultdict(set)
    uncut: set[str] = set()
    for metric in metrics:
        if metric.family == "RR" or metric.cutoff is None:
            uncut.add(metric.trec_measure)
        else:
            cutoffs[metric.trec_measure].add(metric.cutoff)
    return uncut | {f"{measure}.{','.join(map(str, sorted(ks)))}" for measure, ks in cutoffs.items()}
