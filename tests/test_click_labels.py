"""Rows for the click-model method: only the documents logged pages showed are kept (unshown
candidates carry no click evidence), and the base stage is the first-stage score whose ranking
reproduces the logged pages (the logging policy's)."""
from __future__ import annotations

import numpy as np

from eval.click_models import keep_labelled, logging_base, logged_orders
from ltr.click_training import LoggedPage
from ltr.training import RankingRows
from search.event_store import ServedRequest, ServedResult


def rows() -> RankingRows:
    return RankingRows(
        query_ids=["a", "b"], doc_ids=["a1", "a2", "a3", "b1", "b2"],
        features=np.arange(10, dtype=np.float32).reshape(5, 2), labels=np.array([2, 0, 0, 1, 0], dtype=np.float32),
        group_sizes=np.array([3, 2]),
        first_stage={"logging": np.array([0.9, 0.5, 0.1, 0.2, 0.8]), "other": np.array([0.1, 0.5, 0.9, 0.8, 0.2])},
    )


def test_keep_labelled_keeps_the_graded_documents_of_each_query_and_drops_empty_groups() -> None:
    kept = keep_labelled(rows(), {"a": {"a1": 2, "a3": 0}, "c": {"c1": 1}})
    assert kept.query_ids == ["a"] and kept.doc_ids == ["a1", "a3"] and kept.group_sizes.tolist() == [2]
    assert kept.labels.tolist() == [2, 0] and kept.features.tolist() == [[0, 1], [4, 5]]
    assert kept.first_stage["logging"].tolist() == [0.9, 0.1]


def test_the_base_is_the_score_that_reproduces_the_logged_unexplored_pages() -> None:
    def page(request_id: str, query: str, docs: list[str], propensities: list[float]) -> LoggedPage:
        results = [ServedResult(d, i + 1, 1.0, p) for i, (d, p) in enumerate(zip(docs, propensities))]
        return LoggedPage(ServedRequest(request_id, 1.0, query, "hybrid-convex", "i", "g", None, None, None, 0, results),
                          frozenset())

    pages = [page("x", "a", ["a3", "a1", "a2"], [1.0, 0.95, 0.001]),  # explored: not the policy's own order
             page("y", "a", ["a1", "a2", "a3"], [1.0, 1.0, 1.0]), page("z", "b", ["b2", "b1"], [1.0, 1.0])]
    orders = logged_orders(pages)
    assert orders == {"a": ["a1", "a2", "a3"], "b": ["b2", "b1"]}
    key, agreement = logging_base(rows(), orders)
    assert key == "logging" and agreement["logging"] == 1.0 and agreement["other"] < 0.5


def test_weak_negatives_add_the_best_unshown_candidates_of_the_base_at_grade_0() -> None:
    only_logging = rows()
    only_logging.first_stage = {"logging": only_logging.first_stage["logging"]}
    kept = keep_labelled(only_logging, {"a": {"a1": 2}, "b": {"b1": 1}}, weak_negatives=1)
    assert kept.doc_ids == ["a1", "a2", "b1", "b2"]  # a2 (0.5) beats a3 (0.1); b2 is b's only unshown one
    assert kept.labels.tolist() == [2, 0, 1, 0] and kept.group_sizes.tolist() == [2, 2]
