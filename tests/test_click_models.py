"""Click logs, click models, metrics, simulation and the click CLI.

Parameter recovery runs on simulated logs small enough to fit in well under a second; the real
Yandex WSCD 2012 sample is read from the shared datasets (skipped when absent).
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest

from search.app.cli.clicks import ClickCommandError, add_click_commands, plot_perplexity_by_position, run_click_command
from eval.click_log import (
    ClickEvent,
    ClickLog,
    ClickLogError,
    read_click_log_jsonl,
    read_events_jsonl,
    read_yandex_clicks,
    read_yandex_splits,
    write_events_jsonl,
)
from eval.click_models import (
    EPS,
    CascadeModel,
    CtrByPositionModel,
    DynamicBayesianNetworkModel,
    PairTable,
    PositionBasedModel,
    SimplifiedDBNModel,
    UserBehaviour,
    evaluate,
    log_likelihood,
    perplexity,
    perplexity_by_position,
    simulate_click_log,
    simulate_clicks,
)
from tests.conftest import dataset_path

N_QUERIES, N_DOCS = 20, 10
TRUE_EXAMINATION = 1.0 / np.arange(1, N_DOCS + 1)  # UserBehaviour's default, eta = 1


@pytest.fixture(scope="module")
def collection():
    """20 queries x 10 documents with grades 0..2 drawn once (fixed seed)."""
    rng = np.random.default_rng(7)
    rankings = {f"q{i}": [f"d{i}_{j}" for j in range(N_DOCS)] for i in range(N_QUERIES)}
    grades = {q: {d: int(rng.integers(0, 3)) for d in docs} for q, docs in rankings.items()}
    return rankings, grades


def true_probability(grades, which: str) -> dict[tuple[str, str], float]:
    behaviour = UserBehaviour()
    return {(q, d): float(behaviour.probabilities(np.array([g]), 2, which)[0]) for q, docs in grades.items() for d, g in docs.items()}


# ---------------------------------------------------------------------------------------------
# Parameter recovery on simulated users


def test_pbm_recovers_the_examination_curve(collection):
    """20,000 randomised pages: each position is shown 20,000 times, so the click rate at a
    position has a standard error of about 0.003 and the fitted curve (relative to position 1)
    is typically within 0.01 of the truth (0.006-0.014 over seeds 0-4). 0.03 is > 2x the
    worst seen and still far below the gaps between neighbouring positions at the top."""
    rankings, grades = collection
    log = simulate_click_log("pbm", rankings, grades, sessions_per_query=1000, shuffle=True, seed=1)
    model = PositionBasedModel().fit(log)
    assert model.examination[0] == pytest.approx(1.0)
    np.testing.assert_allclose(model.examination, TRUE_EXAMINATION, atol=0.03)
    truth = true_probability(grades, "click")
    errors = np.array([abs(model.attractiveness.get(*key) - p) for key, p in truth.items()])
    assert errors.mean() < 0.03
    assert model.train_log_likelihood == sorted(model.train_log_likelihood)  # EM never goes down


def test_cascade_recovers_attractiveness(collection):
    rankings, grades = collection
    log = simulate_click_log("cascade", rankings, grades, sessions_per_query=1000, shuffle=True, seed=2)
    assert log.clicks.sum(axis=1).max() == 1
    model = CascadeModel().fit(log)
    truth = true_probability(grades, "click")
    errors = np.array([abs(model.attractiveness.get(*key) - p) for key, p in truth.items()])
    assert errors.mean() < 0.03


def test_dbn_recovers_continuation_attractiveness_and_satisfaction(collection):
    rankings, grades = collection
    log = simulate_click_log(UserBehaviour("dbn", continuation=0.8), rankings, grades, sessions_per_query=1000, shuffle=True, seed=3)
    model = DynamicBayesianNetworkModel().fit(log)
    assert model.continuation == pytest.approx(0.8, abs=0.03)
    attraction = true_probability(grades, "click")
    errors = np.array([abs(model.attractiveness.get(*key) - p) for key, p in attraction.items()])
    assert errors.mean() < 0.03
    # satisfaction is only seen after clicks: weigh each pair's error by its clicks
    satisfaction = true_probability(grades, "stop")
    pair_clicks = {key: 0 for key in satisfaction}
    for s, r in zip(*np.nonzero(log.clicks)):
        pair_clicks[(log.query_ids[log.queries[s]], log.doc_ids[log.docs[s, r]])] += 1
    weights = np.array([pair_clicks[key] for key in satisfaction], dtype=float)
    errors = np.array([abs(model.satisfaction.get(*key) - p) for key, p in satisfaction.items()])
    assert (errors * weights).sum() / weights.sum() < 0.08
    diffs = np.diff(model.train_log_likelihood)
    assert diffs.min() > -1e-9  # EM never goes down


# ---------------------------------------------------------------------------------------------
# Probabilities and metrics


def fitted_models(log: ClickLog):
    return [
        CtrByPositionModel().fit(log),
        PositionBasedModel(max_iter=30).fit(log),
        CascadeModel().fit(log),
        DynamicBayesianNetworkModel(max_iter=30).fit(log),
        SimplifiedDBNModel().fit(log),
    ]


@pytest.fixture(scope="module")
def dbn_log(collection):
    rankings, grades = collection
    return simulate_click_log("dbn", rankings, grades, sessions_per_query=100, shuffle=True, seed=4)


def test_conditional_and_marginal_coincide_where_they_must(dbn_log):
    for model in fitted_models(dbn_log):
        conditional = model.click_probabilities(dbn_log)
        marginal = model.marginal_click_probabilities(dbn_log)
        assert conditional.shape == marginal.shape == dbn_log.docs.shape
        assert np.all((conditional >= EPS) & (conditional <= 1 - EPS))
        # nothing is observed before position 1
        np.testing.assert_allclose(conditional[:, 0], marginal[:, 0], err_msg=model.name)
        if model.name in ("ctr", "pbm"):  # independent clicks: the same everywhere
            np.testing.assert_allclose(conditional, marginal, err_msg=model.name)
        else:
            assert not np.allclose(conditional, marginal), model.name


def test_cascade_gives_clicks_after_the_first_the_floor_probability(dbn_log):
    model = CascadeModel().fit(dbn_log)
    conditional = model.click_probabilities(dbn_log)
    first = np.where(dbn_log.clicks.any(axis=1), dbn_log.clicks.argmax(axis=1), dbn_log.n_positions)
    after = np.arange(dbn_log.n_positions)[None, :] > first[:, None]
    assert after.any()
    assert np.all(conditional[after] == EPS)
    assert np.isfinite(log_likelihood(model, dbn_log))


def dbn_click_vector_probability(alpha, sigma, gamma, clicks) -> float:
    """P(C = clicks) for one page by recursion over 'still examining', written independently."""
    def rest(r: int, examining: bool) -> float:
        if r == len(clicks):
            return 1.0
        if not examining:
            return 0.0 if clicks[r] else rest(r + 1, False)
        if clicks[r]:
            go_on = (1 - sigma[r]) * gamma
            return alpha[r] * (go_on * rest(r + 1, True) + (1 - go_on) * rest(r + 1, False))
        return (1 - alpha[r]) * (gamma * rest(r + 1, True) + (1 - gamma) * rest(r + 1, False))

    return rest(0, True)


def test_dbn_probabilities_match_brute_force_enumeration():
    alpha = [0.7, 0.2, 0.5, 0.35]
    sigma = [0.6, 0.3, 0.8, 0.1]
    gamma = 0.75
    keys = [("q", f"d{r}") for r in range(4)]
    model = DynamicBayesianNetworkModel.from_parameters(gamma, PairTable(keys, alpha), PairTable(keys, sigma))
    vectors = [np.array(v, dtype=bool) for v in itertools.product([0, 1], repeat=4)]
    events = [
        ClickEvent("q", f"d{r}", r + 1, True, bool(v[r]), 0.0, f"s{i}") for i, v in enumerate(vectors) for r in range(4)
    ]
    log = ClickLog.from_events(events)
    probability = {tuple(v): dbn_click_vector_probability(alpha, sigma, gamma, v) for v in vectors}
    assert sum(probability.values()) == pytest.approx(1.0)
    conditional = model.click_probabilities(log)
    marginal = model.marginal_click_probabilities(log)
    for s, v in enumerate(vectors):
        assert np.log(np.where(v, conditional[s], 1 - conditional[s])).sum() == pytest.approx(np.log(probability[tuple(v)]))
        for r in range(4):
            prefix = [p for key, p in probability.items() if key[:r] == tuple(v[:r])]
            clicked = [p for key, p in probability.items() if key[:r] == tuple(v[:r]) and key[r]]
            assert conditional[s, r] == pytest.approx(sum(clicked) / sum(prefix))
            assert marginal[s, r] == pytest.approx(sum(p for key, p in probability.items() if key[r]))


def test_dbn_with_certain_satisfaction_and_no_abandonment_is_the_cascade(dbn_log):
    cascade = CascadeModel().fit(dbn_log)
    keys = cascade.attractiveness.keys
    dbn = DynamicBayesianNetworkModel.from_parameters(1.0, cascade.attractiveness, PairTable(keys, np.ones(len(keys))))
    single = dbn_log.subset(dbn_log.clicks.sum(axis=1) <= 1)
    np.testing.assert_allclose(dbn.marginal_click_probabilities(single), cascade.marginal_click_probabilities(single), rtol=1e-4)  # sigma is clipped to 1 - 1e-6
    np.testing.assert_allclose(dbn.click_probabilities(single), cascade.click_probabilities(single), rtol=1e-4, atol=1e-9)


def test_the_true_model_has_lower_perplexity_than_the_ctr_baseline(collection):
    rankings, grades = collection
    behaviour = UserBehaviour("pbm")
    log = simulate_click_log(behaviour, rankings, grades, sessions_per_query=200, shuffle=True, seed=5)
    truth = true_probability(grades, "click")
    perfect = PositionBasedModel.from_parameters(TRUE_EXAMINATION, PairTable(list(truth), list(truth.values())))
    baseline = CtrByPositionModel().fit(log)
    per_position = perplexity_by_position(perfect, log)
    assert perplexity(perfect, log) < perplexity(baseline, log)
    assert np.all(per_position <= perplexity_by_position(baseline, log) + 1e-9)
    assert np.all((per_position > 1) & (per_position < 2))
    assert log_likelihood(perfect, log) > log_likelihood(baseline, log)


def test_unseen_pairs_get_the_training_mean(dbn_log):
    model = PositionBasedModel(max_iter=20).fit(dbn_log)
    assert model.prior_attractiveness == pytest.approx(model.attractiveness.values.mean())
    events = [ClickEvent("new query", "new doc", 1, True, False, 0.0, "x")]
    p = model.click_probabilities(ClickLog.from_events(events, n_positions=dbn_log.n_positions))
    assert p[0, 0] == pytest.approx(model.prior_attractiveness * model.examination[0])


# ---------------------------------------------------------------------------------------------
# Simulation and events


def test_simulation_is_seeded_with_unique_sessions_and_increasing_timestamps():
    rankings = {"a": ["x", "y", "z"], "b": ["u", "v", "w", "x", "y"], "c": ["only"]}
    grades = {"a": {"x": 2, "z": 1}, "b": {"v": 1}, "c": {"only": 1}}
    for model in ("pbm", "cascade", "dbn"):
        events = simulate_clicks(model, rankings, grades, sessions_per_query=30, seed=11, shuffle=True)
        assert events == simulate_clicks(model, rankings, grades, sessions_per_query=30, seed=11, shuffle=True)
        assert events != simulate_clicks(model, rankings, grades, sessions_per_query=30, seed=12, shuffle=True)
        stamps = [e.timestamp for e in events]
        assert all(a < b for a, b in zip(stamps, stamps[1:]))
        sessions = {}
        for e in events:
            sessions.setdefault(e.session_id, []).append(e)
        assert len(sessions) == 3 * 30
        for page in sessions.values():
            assert len({e.query for e in page}) == 1
            assert sorted(e.doc_id for e in page) == sorted(rankings[page[0].query])
            assert [e.position for e in page] == list(range(1, len(page) + 1))


def test_simulation_options_shape_the_clicks():
    rankings = {f"q{i}": [f"d{j}" for j in range(5)] for i in range(10)}
    grades = {q: {"d0": 1} for q in rankings}
    perfect = UserBehaviour("pbm", examination=[1.0] * 5, click_probs={0: 0.0, 1: 1.0})
    log = simulate_click_log(perfect, rankings, grades, sessions_per_query=50, seed=0)
    assert log.clicks[:, 0].all() and not log.clicks[:, 1:].any()
    noisy = UserBehaviour("pbm", examination=[1.0] * 5, click_probs={0: 0.0, 1: 1.0}, noise=0.2)
    log = simulate_click_log(noisy, rankings, grades, sessions_per_query=200, seed=0)
    assert log.clicks[:, 1:].mean() == pytest.approx(0.2, abs=0.03)
    assert log.clicks[:, 0].mean() == pytest.approx(0.8, abs=0.03)
    with pytest.raises(ValueError, match="no click probability for relevance grade 1"):
        simulate_click_log(UserBehaviour("pbm", click_probs={0: 0.1}), rankings, grades)
    with pytest.raises(ValueError, match="examination curve has 2 values"):
        simulate_click_log(UserBehaviour("pbm", examination=[1.0, 0.5]), rankings, grades)


def test_events_round_trip_through_jsonl_and_click_log(tmp_path):
    rankings = {"a": ["x", "y", "z"], "b": ["u", "v"]}
    events = simulate_clicks("dbn", rankings, {"a": {"x": 1}, "b": {"v": 2}}, sessions_per_query=5, seed=3)
    events.append(ClickEvent("a", "hidden", 5, False, False, 1.8e9, "extra"))  # not rendered, position gap
    path = tmp_path / "events.jsonl"
    assert write_events_jsonl(events, path) == len(events)
    assert read_events_jsonl(path) == events
    log = read_click_log_jsonl(path)
    assert log.n_sessions == 11 and log.n_positions == 5
    assert not log.mask[-1].any() and log.docs[-1, 4] >= 0
    assert log.to_events() == events
    assert ClickLog.from_events(events).to_events() == events


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD_EVENT = {"query": "q", "doc_id": "d", "position": 1, "impression": True, "click": False, "timestamp": 1.0, "session_id": "s"}


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("{not json", "invalid JSON"),
        ('["a"]', "expected a JSON object, got array"),
        ({k: v for k, v in GOOD_EVENT.items() if k != "click"}, "field 'click': missing"),
        ({**GOOD_EVENT, "position": "2"}, "field 'position': must be an integer, got string"),
        ({**GOOD_EVENT, "position": True}, "field 'position': must be an integer, got boolean"),
        ({**GOOD_EVENT, "position": 0}, "field 'position': must be between 1 and"),
        ({**GOOD_EVENT, "click": 1}, "field 'click': must be true or false, got number"),
        ({**GOOD_EVENT, "query": ""}, "field 'query': is empty"),
        ({**GOOD_EVENT, "timestamp": "now"}, "field 'timestamp': must be a finite number"),
        ({**GOOD_EVENT, "clicked": True}, "field 'clicked': unknown field"),
        ({**GOOD_EVENT, "impression": False, "click": True}, "field 'click': true without an impression"),
        ({**GOOD_EVENT, "position": 2, "query": "other"}, "session 's' has query 'other' but its first event (line 1) has query 'q'"),
        ({**GOOD_EVENT, "doc_id": "e"}, "session 's' has two documents at position 1 (first: line 1)"),
    ],
)
def test_bad_jsonl_line_names_file_line_and_field(tmp_path, bad, reason):
    path = write_lines(tmp_path / "events.jsonl", [json.dumps(GOOD_EVENT), "", bad if isinstance(bad, str) else json.dumps(bad)])
    with pytest.raises(ClickLogError) as info:
        read_click_log_jsonl(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert reason in info.value.reason


# ---------------------------------------------------------------------------------------------
# Yandex table reader (small files written here)

HEADER = "split\tsession_idx\tquery_key\tposition\tdoc_id\tclicked\tfirst_click_order\tn_clicks"
GOOD_ROWS = [
    "train\t1\tq1\t1\td1\t1\t1\t2",
    "train\t1\tq1\t2\td2\t0\t0\t0",
    "train\t2\tq2\t1\td2\t0\t0\t0",
    "train\t2\tq2\t2\td3\t1\t1\t1",
    "test\t1\tq1\t1\td1\t0\t0\t0",
    "test\t1\tq1\t2\td4\t0\t0\t0",
]


def write_table(path: Path, rows: list[str], header: str = HEADER) -> Path:
    data = "".join(line + "\n" for line in [header, *rows]).encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def test_yandex_table_reads_splits_into_matrices(tmp_path):
    path = write_table(tmp_path / "clicks.tsv.gz", GOOD_ROWS)
    logs = read_yandex_splits(tmp_path, ["train", "test"])
    train = logs["train"]
    assert train.session_ids == ["train-1", "train-2"]
    assert train.query_ids == ["q1", "q2"] and train.doc_ids == ["d1", "d2", "d3"]
    assert train.docs.tolist() == [[0, 1], [1, 2]]
    assert train.clicks.tolist() == [[True, False], [False, True]]
    assert read_yandex_clicks(path, "test").doc_ids == ["d1", "d4"]


@pytest.mark.parametrize(
    "line, reason",
    [
        ("train\t3\tq1\t1\td1\t0\t0", "expected 8 tab-separated columns, got 7"),
        ("train\t3\tq1\tfirst\td1\t0\t0\t0", "column 'position' must be an integer, got 'first'"),
        ("train\t3\tq1\t0\td1\t0\t0\t0", "column 'position' must be between 1 and"),
        ("train\t3\tq1\t1\td1\t2\t1\t1", "column 'clicked' must be between 0 and 1, got 2"),
        ("train\t3\tq1\t1\td1\t1\t0\t1", "clicked=1 disagrees with n_clicks=1 / first_click_order=0"),
        ("train\t3\t\t1\td1\t0\t0\t0", "column 'query_key' is empty"),
        ("test\t1\tq2\t3\td1\t0\t0\t0", "session 1 of split 'test' has query 'q2' but started with 'q1' on line 6"),
        ("test\t1\tq1\t2\td9\t0\t0\t0", "session 1 of split 'test' has position 2 twice"),
        ("train\t1\tq1\t3\td9\t0\t0\t0", "session 1 of split 'train' continues after other sessions (it started on line 2)"),
    ],
)
def test_bad_yandex_line_names_file_and_line(tmp_path, line, reason):
    path = write_table(tmp_path / "clicks.tsv", [*GOOD_ROWS, line])
    with pytest.raises(ClickLogError) as info:
        read_yandex_clicks(path, "train")
    assert str(info.value).startswith(f"{path}:8: ")
    assert reason in info.value.reason


def test_yandex_unknown_split_and_bad_header(tmp_path):
    path = write_table(tmp_path / "clicks.tsv.gz", GOOD_ROWS)
    with pytest.raises(ClickLogError, match=r"unknown split 'dev' \(the file has 'train', 'test'\)"):
        read_yandex_clicks(path, "dev")
    bad = write_table(tmp_path / "other.tsv", GOOD_ROWS, header="split\tsession\tquery")
    with pytest.raises(ClickLogError, match=rf"^{bad}:1: header must be"):
        read_yandex_clicks(bad, "train")
    with pytest.raises(ClickLogError, match="no such file"):
        read_yandex_clicks(tmp_path / "missing", "train")


# ---------------------------------------------------------------------------------------------
# CLI glue


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ltr-search")
    add_click_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_simulate_then_fit_through_the_cli(tmp_path, capsys):
    qrels = write_lines(tmp_path / "qrels.tsv", ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{i}_{j}\t{j % 3}" for i in range(8) for j in range(6)])
    run = write_lines(tmp_path / "run.txt", [f"q{i} Q0 d{i}_{j} {j + 1} {10 - j}.5 bm25" for i in range(9) for j in range(8)])
    out = tmp_path / "events.jsonl"
    assert run_click_command(parse("simulate", "--qrels", str(qrels), "--run", str(run), "--model", "dbn", "--sessions-per-query", "40", "--seed", "1", "--out", str(out), "--shuffle")) == 0
    summary = capsys.readouterr().out
    assert "8 queries x 40 sessions = 320 sessions" in summary and "1 run queries without judgments were skipped" in summary
    assert len(read_events_jsonl(out)) == 320 * 8
    report, json_out = tmp_path / "report" / "clicks.md", tmp_path / "clicks.json"
    args = parse("clicks", "fit", "--log", str(out), "--models", "ctr,pbm,cascade,dbn,sdbn", "--json", str(json_out), "--report", str(report), "--quiet")
    assert run_click_command(args) == 0
    printed = capsys.readouterr().out
    assert "winner by perplexity" in printed and "p@8" in printed
    result = json.loads(json_out.read_text())
    assert [r["model"] for r in result["results"]] == ["ctr", "pbm", "cascade", "dbn", "sdbn"]
    assert result["train"]["sessions"] == 240 and result["test"]["sessions"] == 80
    assert "![perplexity by position](clicks-perplexity.png)" in report.read_text()
    assert (report.parent / "clicks-perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "qrels_lines, run_lines, message",
    [
        (["q\td\t1"], ["q Q0 d 1 2.0"], "run.txt:1: expected 6 columns"),
        (["q\td\t1"], ["q Q0 d one 2.0 t"], "run.txt:1: rank 'one' is not an integer"),
        (["q\td\t1"], ["q Q0 d 1 2.0 t", "q Q0 d 2 1.0 t"], "run.txt:2: document 'd' appears twice for query 'q'"),
        (["query-id\tcorpus-id\tscore", "q\td\thigh"], ["q Q0 d 1 2.0 t"], "qrels.tsv:2: relevance grade 'high' is not an integer"),
        (["q\td"], ["q Q0 d 1 2.0 t"], "qrels.tsv:1: expected 3 columns"),
        (["other\td\t1"], ["q Q0 d 1 2.0 t"], "none of its 1 queries has relevance judgments"),
    ],
)
def test_simulate_input_errors_are_one_line(tmp_path, qrels_lines, run_lines, message):
    qrels = write_lines(tmp_path / "qrels.tsv", qrels_lines)
    run = write_lines(tmp_path / "run.txt", run_lines)
    with pytest.raises(ValueError, match=re.escape(message)) as info:  # ClickCommandError or EvalDataError
        run_click_command(parse("simulate", "--qrels", str(qrels), "--run", str(run), "--model", "pbm", "--out", str(tmp_path / "e.jsonl")))
    assert "\n" not in str(info.value)


def test_fit_option_errors(tmp_path):
    events = write_lines(tmp_path / "e.jsonl", [json.dumps(GOOD_EVENT)])
    with pytest.raises(ClickCommandError, match="unknown click model 'ubm'"):
        run_click_command(parse("clicks", "fit", "--log", str(events), "--models", "pbm,ubm"))
    with pytest.raises(ClickCommandError, match="a JSONL log is split by time"):
        run_click_command(parse("clicks", "fit", "--log", str(events), "--train-split", "train"))
    with pytest.raises(ClickCommandError, match="no such file"):
        run_click_command(parse("clicks", "fit", "--log", str(tmp_path / "none.jsonl")))


def test_plot_writes_a_png(tmp_path):
    path = plot_perplexity_by_position({"a": [1.8, 1.5, 1.3], "b": [1.7, 1.4]}, tmp_path / "p.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------
# The real Yandex WSCD 2012 sample


@pytest.fixture(scope="module")
def yandex():
    logs = read_yandex_splits(dataset_path("yandex-wscd2012-clicks-sample"), ["train", "test"])
    return logs["train"], logs["test"]


def test_yandex_sample_matches_its_documented_statistics(yandex):
    train, test = yandex
    assert (train.n_sessions, test.n_sessions) == (35_064, 21_413)
    assert (len(train.query_ids), len(train.doc_ids)) == (20, 995)
    assert train.mask.all() and train.n_positions == 10
    sessions_with_click = train.clicks.sum(axis=0).tolist()
    assert sessions_with_click == [8999, 8715, 5958, 5385, 3710, 2552, 2409, 1638, 1768, 1569]  # SOURCE.md


def test_all_models_on_yandex_train_then_test(yandex):
    train, test = yandex
    models = {
        "ctr": CtrByPositionModel().fit(train),
        "pbm": PositionBasedModel(max_iter=50).fit(train),
        "cascade": CascadeModel().fit(train),
        "dbn": DynamicBayesianNetworkModel(max_iter=40).fit(train),
    }
    scores = {name: evaluate(model, test) for name, model in models.items()}
    for name, s in scores.items():
        assert 1.0 < s.perplexity < 2.0, name
        assert np.isfinite(s.log_likelihood) and s.log_likelihood < 0, name
    for name in ("pbm", "cascade", "dbn"):
        assert all(1.0 < p < 2.0 for p in scores[name].perplexity_by_position), name
    # the structural models beat the position-CTR baseline on perplexity
    assert scores["pbm"].perplexity < scores["ctr"].perplexity
    assert scores["dbn"].perplexity < scores["ctr"].perplexity
    # cascade cannot explain the many multi-click sessions: the worst log-likelihood by far
    assert scores["cascade"].log_likelihood < min(s.log_likelihood for n, s in scores.items() if n != "cascade")
    assert scores["dbn"].log_likelihood > scores["pbm"].log_likelihood > scores["ctr"].log_likelihood
    exam = models["pbm"].examination
    assert exam[0] == pytest.approx(1.0) and exam.max() == exam[0]
    assert np.corrcoef(np.arange(10), exam)[0, 1] < -0.9 and exam[-1] < 0.5 * exam[0]
    assert 0.5 < models["dbn"].continuation < 1.0
