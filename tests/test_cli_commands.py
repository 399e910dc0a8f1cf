"""The command line as a user meets it: one default index, index list/delete, models delete,
--version, pipes closed early, pipelines checked before anything runs, batch search, and the
small output faults of issue 14."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from search.app.cli.main import build_parser, main, selected_command
from tests.conftest import ROOT, SMALL_DOCS, write_jsonl


def build(home, corpus, name: str) -> None:
    assert main(["--home", str(home), "index", "build", "--dataset", str(corpus), "--name", name, "--no-dense",
                 "--quiet"]) == 0


@pytest.fixture
def judged(tmp_path):
    """A tiny BEIR dataset: the small corpus, three queries and their test qrels."""
    directory = tmp_path / "tiny"
    (directory / "qrels").mkdir(parents=True)
    write_jsonl(directory / "corpus.jsonl", SMALL_DOCS)
    write_jsonl(directory / "queries.jsonl", [{"_id": "q1", "text": "cats and mice"}, {"_id": "q2", "text": "quantum"},
                                              {"_id": "q3", "text": "dog training"}])
    (directory / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq3\td5\t1\n")
    return directory


# D1: the default index ------------------------------------------------------------------------

def test_the_only_index_of_a_home_is_used_without_name(tmp_path, small_corpus, capsys):
    home = tmp_path / "home"
    build(home, small_corpus, "mine")
    capsys.readouterr()
    assert main(["--home", str(home), "search", "cats", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["index"] == "mine"


def test_search_without_pipeline_falls_back_as_the_service_does(tmp_path, small_corpus, dense_index, capsys):
    """No --pipeline: the config's default (ltr, the promoted model), else hybrid, else bm25;
    each pipeline that cannot serve is named on stderr with the reason."""
    home = tmp_path / "home"
    build(home, small_corpus, "lexical")  # --no-dense: neither ltr nor hybrid can run
    capsys.readouterr()
    assert main(["--home", str(home), "search", "cats", "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["pipeline"] == "bm25"
    assert "ltr" in out.err and "hybrid" in out.err and "dense vectors" in out.err, out.err
    assert main(["--home", str(dense_index.home), "search", "cats", "--name", "fd", "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["pipeline"] == "hybrid"
    assert "no active model" in out.err and "searching with hybrid" in out.err, out.err


def test_several_indexes_without_name_list_them_and_say_name(tmp_path, small_corpus, capsys):
    home = tmp_path / "home"
    build(home, small_corpus, "one")
    build(home, small_corpus, "two")
    capsys.readouterr()
    assert main(["--home", str(home), "search", "cats"]) == 2
    err = capsys.readouterr().err
    assert "one, two" in err and "--name" in err and "build" not in err, err


# D2: a closed pipe -----------------------------------------------------------------------------

def test_a_pipe_closed_early_ends_quietly(tmp_path, small_corpus):
    home = tmp_path / "home"
    for name in ("a", "b", "c"):
        build(home, small_corpus, name)
    command = (f"{sys.executable} -m search.app.cli --home {home} index status | head -1")
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("index 'a'")
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


# D6: index list / delete, models delete, --version -----------------------------------------------

def test_index_list_shows_a_failed_build_as_empty(tmp_path, small_corpus, capsys):
    home = tmp_path / "home"
    build(home, small_corpus, "good")
    (home / "indexes" / "broken" / "generations").mkdir(parents=True)  # what a failed first build leaves
    capsys.readouterr()
    assert main(["--home", str(home), "index", "list", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["indexes"]}
    assert rows["good"]["documents"] == len(SMALL_DOCS) and rows["good"]["state"] == "ok"
    assert rows["good"]["active"] == "g000001"
    assert rows["broken"]["generations"] == 0 and rows["broken"]["state"].startswith("empty")
    assert main(["--home", str(home), "index", "list"]) == 0
    assert "empty" in capsys.readouterr().out


def test_index_delete_refuses_without_yes(tmp_path, small_corpus, capsys):
    home = tmp_path / "home"
    build(home, small_corpus, "keepme")
    assert main(["--home", str(home), "index", "delete", "--name", "keepme"]) == 2
    assert "--yes" in capsys.readouterr().err
    assert (home / "indexes" / "keepme").is_dir()


def test_index_delete_with_yes(tmp_path, small_corpus, capsys):
    from indexing.bundle import IndexStore

    if not hasattr(IndexStore, "delete_index"):
        pytest.skip("IndexStore.delete_index is not there yet (storage side of issue 14)")
    home = tmp_path / "home"
    build(home, small_corpus, "gone")
    assert main(["--home", str(home), "index", "delete", "--name", "gone", "--yes"]) == 0
    assert "gone" not in IndexStore(home).names()


def test_models_delete_refuses_an_unknown_version(tmp_path, capsys):
    assert main(["--home", str(tmp_path), "models", "delete", "m0042"]) == 2
    assert "m0042" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("ltr-search ")


# D10: pipelines checked before running -----------------------------------------------------------

def test_eval_refuses_dense_pipelines_on_a_no_dense_index_up_front(tmp_path, judged, capsys):
    home = tmp_path / "home"
    build(home, judged, "tiny")
    capsys.readouterr()
    runs = tmp_path / "runs"
    assert main(["--home", str(home), "eval", "--dataset", str(judged), "--pipeline", "bm25,hybrid", "--runs", str(runs),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "hybrid" in err and "--no-dense" in err and err.count("\n") == 1, err
    assert not list(runs.glob("*.run"))  # bm25 did not run first


def test_search_refuses_a_dense_pipeline_on_a_no_dense_index(tmp_path, small_corpus, capsys):
    home = tmp_path / "home"
    build(home, small_corpus, "small")
    assert main(["--home", str(home), "search", "cats", "--pipeline", "dense"]) == 2
    assert "dense vectors" in capsys.readouterr().err


# D12: small output faults ----------------------------------------------------------------------------

def test_status_verify_says_ok(tmp_path, small_corpus, capsys):
    home = tmp_path / "home"
    build(home, small_corpus, "small")
    capsys.readouterr()
    assert main(["--home", str(home), "index", "status", "--verify"]) == 0
    assert "verify: OK, 1 generation checked" in capsys.readouterr().out


def test_run_file_latency_is_na_not_nan(tmp_path, judged, capsys):
    home = tmp_path / "home"
    build(home, judged, "tiny")
    run_file = tmp_path / "other.run"
    run_file.write_text("q1 Q0 d1 1 2.0 x\nq2 Q0 d2 1 2.0 x\nq3 Q0 d3 1 1.0 x\n")
    assert main(["--home", str(home), "eval", "--dataset", str(judged), "--pipeline", "bm25", "--run-file",
                 str(run_file), "--runs", str(tmp_path / "runs"), "--quiet"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("other"))
    assert "n/a" in line and "nan" not in out


def test_training_that_hits_the_round_cap_says_so():
    from search.app.cli.models import stopping_note

    capped = SimpleNamespace(trees=100, history={"train ndcg@10": [0.5] * 100}, valid_score=0.7)
    assert "hit the cap of 100 rounds" in stopping_note(capped, 100, "5 held-out training queries")
    assert "early stopping" not in stopping_note(capped, 100, "x")
    stopped = SimpleNamespace(trees=40, history={"train ndcg@10": [0.5] * 240}, valid_score=0.7)
    assert "early stopping on 5 held-out" in stopping_note(stopped, 1000, "5 held-out training queries")


def test_one_line_is_singular():
    from search.app.cli.common import plural

    assert plural(1, "line") == "1 line" and plural(2, "line") == "2 lines" and plural(1, "query", "queries") == "1 query"


def test_long_fitted_records_are_cut_in_log_lines():
    from eval.experiment import describe_fitted

    fitted = [{"trees": 900, "importance": {f"feature_{i}": float(i) for i in range(500)}} for _ in range(5)]
    text = describe_fitted(fitted)
    assert len(text) < 500 and "<500 entries>" in text


def test_progress_bars_are_closed_before_an_error(capsys):
    from tqdm import tqdm

    from search.app.cli.main import clear_progress

    bar = tqdm(range(10), file=sys.stderr, leave=False)
    next(iter(bar))
    clear_progress()
    assert bar.disable or bar not in getattr(tqdm, "_instances", set())


# D13: batch search --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["trec", "jsonl"])
def test_batch_search_writes_a_run(tmp_path, judged, capsys, fmt):
    home = tmp_path / "home"
    build(home, judged, "tiny")
    out = tmp_path / f"bm25.{fmt}"
    assert main(["--home", str(home), "search", "--queries", str(judged / "queries.jsonl"), "--out", str(out),
                 "--format", fmt, "-k", "3", "--quiet"]) == 0
    lines = out.read_text().splitlines()
    if fmt == "trec":
        assert lines[0].split()[:4] == ["q1", "Q0", "d1", "1"] and lines[0].split()[5] == "bm25"
        assert {line.split()[0] for line in lines} == {"q1", "q2", "q3"}
    else:
        records = [json.loads(line) for line in lines]
        assert [r["query_id"] for r in records] == ["q1", "q2", "q3"] and records[1]["hits"][0]["id"] in ("d2", "d4")


def test_batch_search_reads_tsv_queries(tmp_path, judged, capsys):
    home = tmp_path / "home"
    build(home, judged, "tiny")
    queries = tmp_path / "queries.tsv"
    queries.write_text("a\tquantum entanglement\nb\tgarden mice\n")
    out = tmp_path / "run.trec"
    assert main(["--home", str(home), "search", "--queries", str(queries), "--out", str(out), "--quiet"]) == 0
    assert {line.split()[0] for line in out.read_text().splitlines()} == {"a", "b"}


def test_batch_search_needs_out(tmp_path, capsys):
    assert main(["--home", str(tmp_path), "search", "--queries", "q.tsv"]) == 2
    assert "--out" in capsys.readouterr().err


# serve --access-log ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,expected", [([], None), (["--access-log"], True), (["--no-access-log"], False)])
def test_serve_access_log_flag(flags, expected):
    args = build_parser(["serve"]).parse_args(["serve", *flags])
    assert args.access_log is expected


# the parser ---------------------------------------------------------------------------------------------------

def test_the_command_is_found_after_home():
    assert selected_command(["--home", "x", "index", "list"]) == "index"
    assert selected_command(["--help"]) is None and selected_command(["--home", "search"]) is None


def test_every_command_and_flag_parses_in_the_full_parser():
    parser = build_parser()
    for argv in (["index", "build", "--dataset", "d", "--keep", "2"], ["search", "q", "-k", "5"],
                 ["eval", "--dataset", "d", "--folds", "5", "--pipeline", "ltr"], ["serve", "--port", "9"],
                 ["train", "--dataset", "d"], ["models", "compare", "m1", "m2"], ["behaviour", "status"],
                 ["clicks", "fit", "--log", "x"], ["simulate", "--model", "pbm", "--qrels", "q", "--run", "r"]):
        parser.parse_args(argv)


# D7: queries with no indexable term -------------------------------------------------------------

@pytest.mark.parametrize("query", ["!!!", "the of and"])
def test_a_query_with_no_indexable_term_says_which_retriever_could_not_answer(tmp_path, small_corpus, capsys, query):
    home = tmp_path / "home"
    build(home, small_corpus, "mine")
    capsys.readouterr()
    assert main(["--home", str(home), "search", query, "--pipeline", "bm25", "--json"]) == 0
    page = json.loads(capsys.readouterr().out)
    assert page["hits"] == [] and page["retrievers"] == {"bm25": {"answered": False, "terms": 0}}
    assert page["notes"][-1] == "no retriever can answer: no results"
    assert main(["--home", str(home), "search", query, "--pipeline", "bm25"]) == 0
    assert "no indexable term" in capsys.readouterr().err
