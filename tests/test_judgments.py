"""The judgment store (eval/judgments.py): pools, grades, skips, qrels, Cohen's kappa, and the
export that `ltr-search eval` reads (a real SQLite file, a real CLI subprocess)."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from eval.datasets import load_dataset, read_qrels
from eval.judgments import (
    JudgmentError, JudgmentStore, JudgmentStoreError, cohen_kappa, export_dataset, pool_order, query_id_for,
)
from indexing.home import judgments_path
from tests.conftest import run_cli
from tests.test_pages import build_page_index


@pytest.fixture
def store(tmp_path: Path):
    with JudgmentStore(tmp_path / "judgments.sqlite3") as opened:
        yield opened


def test_cohen_kappa_known_values():
    assert cohen_kappa([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx(0.5)  # observed .75, chance .5
    assert cohen_kappa([0, 1, 2, 3], [0, 1, 2, 3]) == 1.0
    assert cohen_kappa([0, 3], [3, 0], weights="quadratic") == pytest.approx(-1.0)
    assert cohen_kappa([2, 2, 2], [2, 2, 2]) == 1.0  # one grade everywhere: no disagreement possible
    # weighted: a 2 against a 3 disagrees less than a 0 against a 3
    near, far = cohen_kappa([0, 1, 2, 3], [0, 1, 3, 3], weights="quadratic"), cohen_kappa([0, 1, 2, 3], [3, 1, 2, 3], weights="quadratic")
    assert near > far
    with pytest.raises(ValueError, match="equally long"):
        cohen_kappa([1], [1, 2])


def test_pool_is_a_fixed_shuffle_of_the_union(store):
    query_id = store.add_query("  Cats   and dogs ", "text")
    assert query_id == query_id_for("cats and dogs") and store.add_query("cats and dogs", "log") == query_id
    assert store.add_pool(query_id, {"bm25": ["d1", "d2", "d3"], "dense": ["d3", "d4"]}) == 4
    assert store.pool(query_id) == pool_order(query_id, ["d1", "d2", "d3", "d4"])
    assert store.add_pool(query_id, {"hybrid": ["d5", "d1"]}) == 5  # new documents go after the pooled ones
    assert store.pool(query_id)[:4] == pool_order(query_id, ["d1", "d2", "d3", "d4"]) and store.pool(query_id)[4] == "d5"


def test_grades_skips_qrels_and_agreement(store):
    q = store.add_query("cats", "text", query_id="q1")
    store.add_pool(q, {"bm25": ["d1", "d2", "d3", "d4"]})
    for doc, a, b in (("d1", 3, 3), ("d2", 0, 1), ("d3", 2, 2), ("d4", None, 0)):
        store.judge(q, doc, "ann", a)
        store.judge(q, doc, "bob", b)
    store.judge(q, "d2", "ann", 1)  # a changed mind replaces the grade
    assert store.qrels("ann") == {"q1": {"d1": 3, "d2": 1, "d3": 2}}  # the skip is not a judgment
    assert store.qrels() == {"q1": {"d1": 3, "d2": 1, "d3": 2, "d4": 0}}
    store.judge(q, "d1", "cy", 2)
    assert store.qrels()["q1"]["d1"] == 3  # lower median of 3, 3, 2
    [ann_bob, ann_cy, bob_cy] = store.agreement()
    assert (ann_bob.judge_a, ann_bob.judge_b, ann_bob.pairs, ann_bob.kappa) == ("ann", "bob", 3, 1.0)
    assert ann_cy.pairs == 1 and ann_cy.kappa is None
    progress = store.queries("ann")[0]
    assert (progress.pool, progress.done, progress.judges) == (4, 4, 3)


def test_refused_judgments(store, tmp_path):
    q = store.add_query("cats", "text")
    store.add_pool(q, {"bm25": ["d1"]})
    with pytest.raises(JudgmentError, match="grade must be one of 0, 1, 2, 3"):
        store.judge(q, "d1", "ann", 4)
    with pytest.raises(JudgmentError, match="not in the pool"):
        store.judge(q, "d9", "ann", 1)
    with pytest.raises(JudgmentError, match="no query 'nope'"):
        store.judge("nope", "d1", "ann", 1)
    foreign = tmp_path / "other.sqlite3"
    sqlite3.connect(foreign).execute("CREATE TABLE x (y)").connection.commit()
    with pytest.raises(JudgmentStoreError, match="not a judgment store"):
        JudgmentStore(foreign)


@pytest.mark.parametrize("fmt", ["beir", "trec"])
def test_export_reads_back_as_a_dataset(store, tmp_path, fmt):
    q = store.add_query("cats", "text", query_id="q1")
    store.add_pool(q, {"bm25": ["d1", "d2"]})
    store.judge(q, "d1", "ann", 2)
    store.judge(q, "d2", "ann", 0)
    qrels_file, queries, judged = export_dataset(store, tmp_path / "out", "judged", fmt)
    assert (queries, judged) == (1, 2)
    assert read_qrels(qrels_file) == {"q1": {"d1": 2, "d2": 0}}
    dataset = load_dataset(tmp_path / "out", "judged")
    assert dataset.queries == {"q1": "cats"} and dataset.qrels == {"q1": {"d1": 2, "d2": 0}}


def test_cli_export_then_eval_reads_it(tmp_path):
    home = build_page_index(tmp_path / "built")
    with JudgmentStore(judgments_path(home, "pages")) as store:
        for text, relevant in (("cats", ["d1", "d7"]), ("quantum entanglement", ["d2"])):
            q = store.add_query(text, "text")
            store.add_pool(q, {"bm25": relevant + ["d6"]})
            for doc in relevant:
                store.judge(q, doc, "ann", 3)
            store.judge(q, "d6", "ann", 0)
    out = tmp_path / "export"
    result = run_cli(home, "judgments", "export", "--out", str(out), "--format", "trec")
    assert "wrote 2 queries and 5 judgments (trec)" in result.stderr
    evaluated = run_cli(home, "eval", "--dataset", str(out), "--split", "judged", "--pipeline", "bm25", "--quiet",
                        "--name", "pages")
    assert "judged: 2 queries, 0 skipped" in evaluated.stdout
    status = run_cli(home, "judgments", "status", "--json")
    assert '"query_id"' in status.stdout
    missing = run_cli(tmp_path / "empty-home", "judgments", "export", "--out", str(out), "--name", "x", check=False)
    assert missing.returncode == 2 and "no judgments for index 'x'" in missing.stderr
