"""The evaluation harness: readers, metrics against pytrec_eval, significance, folds and the CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval
from scipy import stats

from eval.datasets import EvalDataError, load_dataset, read_qrels, read_run, trec_order, write_run
from eval.experiment import ExperimentSettings, assign_folds, run_experiment
from eval.metrics import DEFAULT_METRICS, evaluate_run, parse_metric, parse_metric_list
from eval.significance import compare_to_baseline, holm, paired_randomisation_test, paired_t_test
from search.app.pipelines import pipeline_spec
from search.pipelines import PipelineSpec
from search.backend import Hit
from search.embedded import EmbeddedIndex
from tests.conftest import SMALL_DOCS, run_cli, write_jsonl

# ---------------------------------------------------------------- readers


def test_read_qrels_beir_and_trec(tmp_path: Path):
    beir = tmp_path / "test.tsv"
    beir.write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t0\nq2\td3\t1\n")
    trec = tmp_path / "qrels.txt"
    trec.write_text("q1 0 d1 2\nq1 0 d2 0\nq2 0 d3 1\n")
    assert read_qrels(beir) == read_qrels(trec) == {"q1": {"d1": 2, "d2": 0}, "q2": {"d3": 1}}


@pytest.mark.parametrize(
    "content, line, reason",
    [
        ("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\n", 3, "expected 3 columns"),
        ("q1\td1\t1\nq1\td2\t1\textra\t\t\n", 2, "expected 3 columns like the lines before, got 4"),
        ("q1 0 d1 1\nq1 d2 1\n", 2, "expected 4 columns like the lines before"),
        ("q1\td1\thigh\n", 1, "relevance grade 'high' is not an integer"),
        ("q1\td1\t1\nq1\td1\t2\n", 2, "judged twice"),
    ],
)
def test_read_qrels_errors_name_file_and_line(tmp_path: Path, content: str, line: int, reason: str):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(EvalDataError) as error:
        read_qrels(path)
    assert error.value.line == line and reason in str(error.value) and str(path) in str(error.value)


def test_read_run_errors(tmp_path: Path):
    path = tmp_path / "bad.run"
    path.write_text("q1 Q0 d1 1 3.5 tag\nq1 Q0 d2 2 tag\n")
    with pytest.raises(EvalDataError, match=r"bad.run:2: expected 6 columns"):
        read_run(path)
    path.write_text("q1 Q0 d1 1 nan tag\n")
    with pytest.raises(EvalDataError, match="not finite"):
        read_run(path)
    path.write_text("q1 Q0 d1 1 2 t\nq1 Q0 d1 2 1 t\n")
    with pytest.raises(EvalDataError, match="appears twice"):
        read_run(path)


def test_run_file_round_trip_scores_identically(tmp_path: Path):
    rng = np.random.default_rng(7)
    qrels, run = _random_qrels_and_run(rng, queries=30, docs=200)
    path = write_run(run, tmp_path / "x.run", tag="x")
    loaded = read_run(path)
    assert loaded == run  # full-precision scores survive
    # ranks in the file are trec_eval's order: score descending, ties by doc id descending
    for line_group in _group_lines(path):
        scores = [(float(p[4]), p[2]) for p in line_group]
        assert scores == sorted(scores, reverse=True)
        assert [int(p[3]) for p in line_group] == list(range(1, len(line_group) + 1))
    measures = {"ndcg_cut.10", "P.10", "recall.100", "map_cut.100", "recip_rank"}
    direct = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    from_file = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(loaded)
    assert direct == from_file


def test_trec_order_breaks_ties_like_trec_eval():
    qrels = {"a": {"d3": 1}}
    run = {"a": {"d1": 1.0, "d3": 1.0, "d2": 1.0}}
    assert [d for d, _ in trec_order(run["a"])] == ["d3", "d2", "d1"]
    assert pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run)["a"]["recip_rank"] == 1.0


def test_load_dataset_skips_and_counts(tmp_path: Path):
    root = tmp_path / "ds"
    (root / "qrels").mkdir(parents=True)
    write_jsonl(root / "queries.jsonl", [{"_id": "q1", "text": "a"}, {"_id": "q2", "text": "b"}])
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td1\t0\nq9\td2\t1\n")
    dataset = load_dataset(root, "test")
    assert list(dataset.queries) == ["q1"]
    reasons = {s.query_id: s.reason for s in dataset.skipped}
    assert reasons["q2"] == "no relevant document judged" and "absent from queries.jsonl" in reasons["q9"]
    with pytest.raises(EvalDataError, match=r"no qrels for split 'dev' \(available: test\)"):
        load_dataset(root, "dev")
    (root / "queries.jsonl").unlink()
    with pytest.raises(EvalDataError, match="no queries.jsonl"):
        load_dataset(root, "test")


# ---------------------------------------------------------------- metrics


def test_metric_names_are_checked():
    assert parse_metric("nDCG@10").trec_key == "ndcg_cut_10"
    assert parse_metric("R@100").trec_key == "recall_100"
    assert parse_metric("AP").trec_key == "map"
    with pytest.raises(ValueError, match="metric 'nDGC@10' does not exist"):
        parse_metric("nDGC@10")
    with pytest.raises(ValueError, match="needs a cutoff"):
        parse_metric("P")
    with pytest.raises(ValueError, match="listed twice"):
        parse_metric_list("P@10,P@10")


def test_metrics_equal_pytrec_eval_on_random_runs():
    rng = np.random.default_rng(3)
    qrels, run = _random_qrels_and_run(rng, queries=50, docs=300, graded=True)
    ours = evaluate_run(run, qrels, ["nDCG@10", "nDCG@100", "P@5", "R@100", "MAP@100", "RR", "nDCG", "AP"])
    reference = pytrec_eval.RelevanceEvaluator(
        qrels, {"ndcg_cut.10,100", "P.5", "recall.100", "map_cut.100", "recip_rank", "ndcg", "map"}
    ).evaluate(run)
    keys = {"nDCG@10": "ndcg_cut_10", "nDCG@100": "ndcg_cut_100", "P@5": "P_5", "R@100": "recall_100",
            "MAP@100": "map_cut_100", "RR": "recip_rank", "nDCG": "ndcg", "AP": "map"}
    for metric, key in keys.items():
        expected = np.array([reference[q][key] for q in ours.query_ids])
        np.testing.assert_allclose(ours.values[metric], expected, rtol=0, atol=1e-9)


def test_cut_metrics_equal_a_plain_reference():
    """RR@k and judged@k are the two metrics assembled here (a cut run, a rewritten qrels)."""
    rng = np.random.default_rng(11)
    qrels, run = _random_qrels_and_run(rng, queries=60, docs=80, graded=True)
    ours = evaluate_run(run, qrels, ["RR@10", "judged@10", "judged@3"])
    for i, query_id in enumerate(ours.query_ids):
        ranked = [d for d, _ in trec_order(run[query_id])]
        judged = qrels[query_id]
        first = next((r for r, d in enumerate(ranked[:10], start=1) if judged.get(d, 0) > 0), None)
        assert math.isclose(ours.values["RR@10"][i], 1 / first if first else 0.0, abs_tol=1e-12)
        assert math.isclose(ours.values["judged@10"][i], sum(d in judged for d in ranked[:10]) / 10, abs_tol=1e-12)
        assert math.isclose(ours.values["judged@3"][i], sum(d in judged for d in ranked[:3]) / 3, abs_tol=1e-12)


def test_hand_computed_graded_example():
    qrels = {"q": {"a": 2, "b": 1, "c": 0}}
    run = {"q": {"c": 3.0, "a": 2.0, "x": 1.0, "b": 0.5}}
    scores = evaluate_run(run, qrels, ["nDCG@3", "P@2", "R@3", "RR@1", "RR@10", "judged@4"]).mean()
    dcg = 2 / math.log2(3)
    ideal = 2 + 1 / math.log2(3)
    assert math.isclose(scores["nDCG@3"], dcg / ideal, abs_tol=1e-12)
    assert scores["P@2"] == 0.5 and scores["R@3"] == 0.5
    assert scores["RR@1"] == 0.0 and scores["RR@10"] == 0.5
    assert scores["judged@4"] == 0.75


def test_unanswered_queries_count_as_zero_and_unknown_queries_fail():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    scores = evaluate_run({"q1": {"a": 1.0}}, qrels, ["nDCG@10", "RR@10"])
    assert scores.mean() == {"nDCG@10": 0.5, "RR@10": 0.5}
    with pytest.raises(ValueError, match="without judgments, first 'q3'"):
        evaluate_run({"q1": {"a": 1.0}, "q3": {"a": 1.0}}, qrels, ["P@1"])
    assert evaluate_run({"q3": {"a": 1.0}}, qrels, ["P@1"], ignore_queries={"q3"}).mean() == {"P@1": 0.0}


# ---------------------------------------------------------------- significance


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    adjusted = holm([0.2, float("nan"), 0.9])
    assert adjusted[0] == pytest.approx(0.4) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.9)


def test_paired_tests_agree_with_scipy_and_each_other():
    rng = np.random.default_rng(5)
    baseline = rng.uniform(0, 1, 300)
    better = np.clip(baseline + rng.normal(0.03, 0.1, 300), 0, 1)
    p, (low, high) = paired_t_test(better, baseline)
    assert p == pytest.approx(stats.ttest_rel(better, baseline).pvalue)
    assert low < (better - baseline).mean() < high
    randomised = paired_randomisation_test(better, baseline, resamples=20_000)
    assert p < 0.01 and randomised < 0.01
    noise = np.clip(baseline + rng.normal(0, 0.1, 300), 0, 1)
    p_noise = paired_t_test(noise, baseline)[0]
    assert abs(paired_randomisation_test(noise, baseline, resamples=20_000) - p_noise) < 0.05
    assert paired_randomisation_test(baseline, baseline) == 1.0 and paired_t_test(baseline, baseline)[0] == 1.0


def test_compare_to_baseline_counts_wins_and_corrects_per_metric():
    base = {"m": np.array([0.1, 0.5, 0.5, 0.9])}
    table = compare_to_baseline(
        {"base": base, "a": {"m": np.array([0.2, 0.5, 0.4, 0.9])}, "b": {"m": np.array([0.3, 0.6, 0.6, 1.0])}},
        "base", ["m"], resamples=2000,
    )
    assert (table["a"]["m"].wins, table["a"]["m"].losses, table["a"]["m"].ties) == (1, 1, 2)
    assert table["b"]["m"].mean_difference == pytest.approx(0.125)
    for name in ("a", "b"):
        assert table[name]["m"].t_test_p_holm >= table[name]["m"].t_test_p


# ---------------------------------------------------------------- folds and learned pipelines


def test_assign_folds_is_seeded_and_balanced():
    ids = [f"q{i}" for i in range(103)]
    folds = assign_folds(ids, 5, seed=1)
    assert folds == assign_folds(ids, 5, seed=1) and folds != assign_folds(ids, 5, seed=2)
    sizes = np.bincount(list(folds.values()))
    assert sizes.max() - sizes.min() <= 1
    with pytest.raises(ValueError, match="more than the 3 evaluable queries"):
        assign_folds(ids[:3], 5, seed=1)


class _MemorisingPipeline:
    """A learned pipeline for the test: it ranks first every document it saw judged relevant
    in training, and records the queries it was fitted on."""

    name = "memorise"
    fitted_on: list[set[str]] = []

    def __init__(self, index: EmbeddedIndex):
        self.index = index
        self.boost: set[str] = set()

    def fit(self, queries, qrels):
        type(self).fitted_on.append(set(queries))
        self.boost = {d for q in queries for d, g in qrels[q].items() if g > 0}
        return self

    def search(self, query: str, k: int) -> list[Hit]:
        hits = self.index.retrieve_bm25(query, k).hits()
        ordered = sorted(hits, key=lambda h: (h.doc_id not in self.boost, h.rank))
        return [Hit(h.doc_id, float(len(ordered) - i), i + 1) for i, h in enumerate(ordered)]


@pytest.fixture
def memorising_pipeline(monkeypatch):
    _MemorisingPipeline.fitted_on = []
    return _MemorisingPipeline


def _catalog(name: str):
    if name == "memorise":
        return PipelineSpec("memorise", _MemorisingPipeline, True, "test only")
    return pipeline_spec(name)


def test_cross_validation_never_fits_on_evaluated_queries(small_dataset: Path, home: Path, memorising_pipeline, tmp_path: Path):
    run_cli(home, "index", "build", "--dataset", str(small_dataset), "--name", "small", "--no-dense", "--quiet")
    index = EmbeddedIndex.open(home, "small")
    dataset = load_dataset(small_dataset, "test")
    settings = ExperimentSettings(["bm25", "memorise"], folds=3, seed=4, resamples=200)
    result = run_experiment(index, dataset, settings, tmp_path / "runs", catalog=_catalog)
    folds = json.loads(result.folds_file.read_text())["folds"]
    assert len(memorising_pipeline.fitted_on) == 3
    for fold, fitted in enumerate(memorising_pipeline.fitted_on):
        held_out = {q for q, f in folds.items() if f == fold}
        assert fitted and not fitted & held_out and fitted | held_out == set(dataset.queries)
    assert result.to_json()["pipelines"]["memorise"]["trained_on"].startswith("3-fold")
    # every memorised boost is a relevant doc of another query, so CV must not be perfect here
    assert result.pipelines["memorise"].scores.mean()["nDCG@10"] < 1.0
    # without folds or a training split a learned pipeline refuses to run
    with pytest.raises(ValueError, match="is learned"):
        run_experiment(index, dataset, ExperimentSettings(["memorise"], resamples=200), tmp_path / "r2", catalog=_catalog)


# ---------------------------------------------------------------- the CLI


SMALL_QUERIES = [
    {"_id": "q1", "text": "cats chasing mice"},
    {"_id": "q2", "text": "quantum entanglement"},
    {"_id": "q3", "text": "dog training"},
    {"_id": "q4", "text": "garden plants"},
    {"_id": "q5", "text": "paris café"},
    {"_id": "q6", "text": "superposition qubits"},
    {"_id": "q7", "text": "unjudged query"},
]
SMALL_QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td3\t1\nq2\td4\t1\nq2\td2\t1\nq3\td5\t1\nq4\td3\t1\nq5\td6\t2\nq6\td2\t1\nq7\td1\t0\n"


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "smallds"
    (root / "qrels").mkdir(parents=True)
    write_jsonl(root / "corpus.jsonl", SMALL_DOCS)
    write_jsonl(root / "queries.jsonl", SMALL_QUERIES)
    (root / "qrels" / "test.tsv").write_text(SMALL_QRELS)
    return root


def test_cli_eval_writes_json_report_and_runs(small_dataset: Path, home: Path, tmp_path: Path):
    run_cli(home, "index", "build", "--dataset", str(small_dataset), "--no-dense", "--quiet")  # index "default"
    out = tmp_path / "out"
    result = run_cli(
        home, "eval", "--dataset", str(small_dataset), "--pipeline", "bm25", "--name", "default",
        "--json", str(out / "r.json"), "--report", str(out / "r.md"), "--runs", str(out / "runs"), "--quiet",
    )
    assert "bm25" in result.stdout
    payload = json.loads((out / "r.json").read_text())
    assert payload["dataset"] == "smallds" and payload["split"] == "test"
    assert payload["queries"] == 6 and payload["skipped_queries"] == 1
    entry = payload["pipelines"]["bm25"]
    assert set(DEFAULT_METRICS) == set(entry["metrics"]) and set(entry["latency_ms"]) >= {"p50", "p95"}
    assert Path(entry["run_file"]).is_file() and "significance" in payload
    # the run file, scored again from disk through its own path, gives the same numbers
    rescored = run_cli(
        home, "eval", "--dataset", str(small_dataset), "--pipeline", "", "--run-file", entry["run_file"],
        "--name", "default", "--json", "-", "--runs", str(out / "runs2"),
    )
    again = json.loads(rescored.stdout)["pipelines"]["bm25"]["metrics"]
    assert again == entry["metrics"]
    report = (out / "r.md").read_text()
    assert "| bm25 |" in report and (out / "r-metrics.png").stat().st_size > 1000


def test_cli_eval_compares_two_pipelines_with_significance(small_dataset: Path, home: Path, tmp_path: Path):
    run_cli(home, "index", "build", "--dataset", str(small_dataset), "--name", "smallds", "--no-dense", "--quiet")
    baseline_run = tmp_path / "shuffled.run"
    # a deliberately poor external run to compare against
    baseline_run.write_text("".join(f"{q['_id']} Q0 d6 1 1.0 poor\n" for q in SMALL_QUERIES))
    payload = json.loads(run_cli(
        home, "eval", "--dataset", str(small_dataset), "--pipeline", "bm25", "--run-file", str(baseline_run),
        "--baseline", "shuffled", "--json", "-", "--report", str(tmp_path / "rep" / "x.md"), "--resamples", "500",
    ).stdout)
    comparison = payload["significance"]["comparisons"]["bm25"]["nDCG@10"]
    assert comparison["mean_difference"] > 0 and comparison["wins"] >= 4
    assert set(comparison) >= {"ci95", "t_test_p", "t_test_p_holm", "randomisation_p", "randomisation_p_holm", "significant"}
    assert payload["pipelines"]["shuffled"]["latency_ms"] is None
    assert (tmp_path / "rep" / "x-per-query-ndcg-10.png").is_file()


def test_cli_eval_with_one_judged_query_reports_no_test_instead_of_crashing(small_dataset: Path, home: Path,
                                                                          tmp_path: Path):
    first = SMALL_QRELS.strip().splitlines()[1]  # the header, then one judgment of one query
    (small_dataset / "qrels" / "test.tsv").write_text(SMALL_QRELS.strip().splitlines()[0] + "\n" + first + "\n")
    run_cli(home, "index", "build", "--dataset", str(small_dataset), "--name", "smallds", "--no-dense", "--quiet")
    poor = tmp_path / "poor.run"
    poor.write_text("q1 Q0 nope 1 1.0 poor\n")
    payload = json.loads(run_cli(home, "eval", "--dataset", str(small_dataset), "--pipeline", "bm25", "--run-file", str(poor),
                                 "--baseline", "poor", "--json", "-").stdout)
    assert payload["queries"] == 1
    comparison = payload["significance"]["comparisons"]["bm25"]["nDCG@10"]
    assert comparison["significant"] is False and comparison["wins"] == 1  # one query decides nothing


@pytest.mark.parametrize(
    "args, message",
    [
        (["--metrics", "nDGC@10"], "metric 'nDGC@10' does not exist"),
        (["--pipeline", "bm25,nope"], "unknown pipeline 'nope'"),
        (["--split", "dev"], "no qrels for split 'dev'"),
        (["--folds", "1"], "--folds must be at least 2"),
        (["--baseline", "dense"], "baseline 'dense' is not one of the evaluated pipelines"),
    ],
)
def test_cli_eval_bad_input_is_one_clear_line(small_dataset: Path, home: Path, args: list[str], message: str):
    run_cli(home, "index", "build", "--dataset", str(small_dataset), "--name", "smallds", "--no-dense", "--quiet")
    result = run_cli(home, "eval", "--dataset", str(small_dataset), "--pipeline", "bm25", *args, check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_cli_eval_rejects_a_run_naming_an_unknown_query(small_dataset: Path, home: Path, tmp_path: Path):
    run_cli(home, "index", "build", "--dataset", str(small_dataset), "--name", "smallds", "--no-dense", "--quiet")
    run_file = tmp_path / "other.run"
    run_file.write_text("q1 Q0 d1 1 2.0 x\nzz9 Q0 d1 1 2.0 x\n")
    result = run_cli(home, "eval", "--dataset", str(small_dataset), "--pipeline", "", "--run-file", str(run_file), check=False)
    assert result.returncode == 2 and "first 'zz9'" in result.stderr


def test_cli_eval_without_queries_or_index(tmp_path: Path, home: Path, small_dataset: Path):
    empty = tmp_path / "noqueries"
    (empty / "qrels").mkdir(parents=True)
    result = run_cli(home, "eval", "--dataset", str(empty), check=False)
    assert result.returncode == 2 and "no queries.jsonl" in result.stderr
    result = run_cli(home, "eval", "--dataset", str(small_dataset), check=False)
    assert result.returncode == 2 and "no indexes in" in result.stderr and "index build" in result.stderr


# ---------------------------------------------------------------- real data


@pytest.mark.slow
def test_scifact_bm25_run_file_rescores_identically(scifact_dir: Path, home: Path, tmp_path: Path):
    run_cli(home, "index", "build", "--dataset", str(scifact_dir), "--name", "scifact", "--no-dense", "--quiet")
    payload = json.loads(run_cli(
        home, "eval", "--dataset", str(scifact_dir), "--pipeline", "bm25", "--json", "-", "--runs", str(tmp_path / "runs"), "--quiet",
    ).stdout)
    metrics = payload["pipelines"]["bm25"]["metrics"]
    assert payload["queries"] == 300 and payload["skipped_queries"] == 0
    assert 0.66 < metrics["nDCG@10"] < 0.70 and metrics["R@100"] > 0.9  # BEIR reports 0.665 for Anserini BM25
    qrels = read_qrels(scifact_dir / "qrels" / "test.tsv")
    run = read_run(payload["pipelines"]["bm25"]["run_file"])
    reference = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    assert np.mean([v["ndcg_cut_10"] for v in reference.values()]) == pytest.approx(metrics["nDCG@10"], abs=1e-12)
    assert np.mean([v["recall_100"] for v in reference.values()]) == pytest.approx(metrics["R@100"], abs=1e-12)


# ---------------------------------------------------------------- helpers


def _random_qrels_and_run(rng: np.random.Generator, queries: int, docs: int, graded: bool = False):
    qrels, run = {}, {}
    for q in range(queries):
        judged = rng.choice(docs, size=int(rng.integers(3, 15)), replace=False)
        grades = rng.integers(0, 3 if graded else 2, size=len(judged))
        grades[0] = max(grades[0], 1)
        qrels[f"q{q}"] = {f"d{d}": int(g) for d, g in zip(judged, grades)}
        retrieved = rng.choice(docs, size=int(rng.integers(20, docs)), replace=False)
        scores = np.round(rng.normal(size=len(retrieved)), 2)  # rounded: ties happen
        run[f"q{q}"] = {f"d{d}": float(s) for d, s in zip(retrieved, scores)}
    return qrels, run


def _group_lines(path: Path):
    groups: dict[str, list[list[str]]] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        groups.setdefault(parts[0], []).append(parts)
    return groups.values()
