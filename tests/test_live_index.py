"""Upserts and deletes between rebuilds (issue 18): the journal, the delta segment, compaction.

Parity: after compaction an index equals a cold build of the same final corpus (BM25 and stored
files byte for byte, vectors and scores to 1e-6), checked over random operation sequences."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from indexing.build import BuildSettings, build_index, compact_index, rebuild_index
from indexing.bundle import IndexStore
from indexing.corpus import CorpusSpec, Document
from indexing.delta import DELETE, UPSERT, Update, append_updates, journal_end, journal_path, read_updates
from indexing.updates import UnknownDocumentError, final_corpus, live_id_set, pending_updates, write_updates
from search.embedded import EmbeddedIndex
from tests.conftest import ROOT, SMALL_DOCS, home_sharing_encoder, run_cli, write_jsonl

WORDS = ("cat dog mouse garden quantum photon qubit entangle water mint plant train treat patience cafe paris "
         "brulee night owl hunt river bank money tree leaf").split()
QUERIES = ("cat garden", "quantum photon", "dog train treat", "owl night hunt", "river bank money", "leaf")


def quiet(_: str) -> None:
    pass


def _record(doc: Document) -> dict:
    return {"_id": doc.id, "title": doc.title, "text": doc.text, **doc.metadata}


def _documents(records: list[dict]) -> list[Document]:
    return [Document(r["_id"], r["title"], r["text"], {k: v for k, v in r.items() if k not in ("_id", "title", "text")})
            for r in records]


def _files(path: Path) -> dict[str, str]:
    manifest = json.loads((path / "manifest.json").read_text())
    return {name: info["sha256"] for name, info in manifest["files"].items()}


def _cold_build(home: Path, tmp: Path, documents: list[Document], dense: bool) -> EmbeddedIndex:
    corpus = write_jsonl(tmp / "final.jsonl", [_record(d) for d in documents])
    build_index(home, "cold", BuildSettings(corpus=CorpusSpec(str(corpus)), dense=dense),
                progress=False, log=quiet)
    return EmbeddedIndex.open(home, "cold")


def _assert_same_rankings(live: EmbeddedIndex, cold: EmbeddedIndex, dense: bool) -> None:
    for query in QUERIES:
        a, b = live.retrieve_bm25(query, 20), cold.retrieve_bm25(query, 20)
        assert a.doc_ids == b.doc_ids, query
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
        if dense:
            vector = cold.encode_query(query)
            a, b = live.retrieve_dense(vector, 20), cold.retrieve_dense(vector, 20)
            assert a.doc_ids == b.doc_ids, query
            np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)


def _assert_serves_exactly(index: EmbeddedIndex, documents: list[Document]) -> None:
    """The live index holds these documents, with these fields, and nothing else is ever returned."""
    expected = {d.id: d for d in documents}
    served = set()
    for query in (*QUERIES, " ".join(WORDS)):
        served.update(index.retrieve_bm25(query, 1000).doc_ids)
    assert served <= set(expected)
    for doc in documents:
        stored = index.document(doc.id)
        assert stored == {"id": doc.id, "title": doc.title, "text": doc.text, "metadata": doc.metadata}
        assert index.doc_ids(index.rows_of([doc.id])) == [doc.id]


text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join)
operation = st.one_of(
    st.tuples(st.just("upsert"), st.integers(0, 14), text, st.sampled_from(["", "Title cat", "Owl"])),
    st.tuples(st.just("delete"), st.integers(0, 14)),
    st.tuples(st.just("compact")),
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.lists(text, min_size=2, max_size=8), operations=st.lists(operation, min_size=1, max_size=14),
       batch=st.integers(1, 4))
def test_compaction_equals_a_cold_build_after_random_updates(tmp_path_factory, start, operations, batch):
    tmp = tmp_path_factory.mktemp("parity")
    home = tmp / "home"
    base = [Document(f"d{i}", "", t, {"n": i}) for i, t in enumerate(start)]
    corpus = write_jsonl(tmp / "corpus.jsonl", [_record(d) for d in base])
    build_index(home, "t", BuildSettings(corpus=CorpusSpec(str(corpus)), dense=False), progress=False, log=quiet)
    index = EmbeddedIndex.open(home, "t")
    expected = {d.id: d for d in base}
    pending: list[Update] = []

    def flush() -> None:
        if pending:  # the pending operations as one batch, in order (upserts and deletes interleaved)
            append_updates(IndexStore(home).index_dir("t"), tmp / ".lock", list(pending))
            pending.clear()

    for op in operations:
        if op[0] == "compact":
            flush()
            compact_index(home, "t", log=quiet)
            continue
        doc_id = f"d{op[1]}"
        if op[0] == "upsert":
            doc = Document(doc_id, op[3], op[2], {"n": op[1]})
            pending.append(Update(UPSERT, doc_id, doc))
            expected[doc_id] = doc
        elif doc_id in expected and len(expected) > 1:  # a cold build needs one document
            pending.append(Update(DELETE, doc_id))
            expected.pop(doc_id)
        if len(pending) >= batch:
            flush()
    flush()
    final = list(expected.values())
    _assert_serves_exactly(index, final)  # before compaction, through the delta segment
    summary = compact_index(home, "t", log=quiet)
    cold = _cold_build(home, tmp, final, dense=False)
    compacted = EmbeddedIndex.open(home, "t")
    assert compacted.live_status()["delta_rows"] == 0 and len(compacted) == len(final)
    assert _files(summary.path) == _files(cold.generation.path)  # BM25 postings and stored fields byte for byte
    _assert_same_rankings(compacted, cold, dense=False)


def test_dense_delta_and_compaction_parity(tmp_path: Path, shared_encoder_home: Path):
    home = home_sharing_encoder(tmp_path / "home", shared_encoder_home)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", SMALL_DOCS)
    build_index(home, "t", BuildSettings(corpus=CorpusSpec(str(corpus))),  # the default (int8) encoder
                progress=False, log=quiet)
    index = EmbeddedIndex.open(home, "t")
    owls = Document("d7", "Owls", "Owls hunt mice at night in the garden.", {"author": "eve"})
    cats = Document("d1", "Cats", "Cats sleep all day.", {"author": "ann"})
    receipt = write_updates(home, "t", [owls, cats], ["d2"])
    assert receipt.encoded == 2 and receipt.upserted == 2 and receipt.deleted == 1
    assert write_updates(home, "t", [cats]).encoded == 0  # unchanged text: its vector comes from the cache

    vector = index.encode_query("owls hunting at night")
    dense = index.retrieve_dense(vector, 10)
    assert dense.doc_ids[0] == "d7" and "d2" not in dense.doc_ids and len(dense.doc_ids) == 6
    assert dense.doc_ids.count("d1") == 1  # the replaced version is gone, the new one served once
    rows = index.rows_of(["d7", "d1", "d3"])
    np.testing.assert_allclose(index.dense_scores(vector, rows)[0], dense.scores[0], atol=1e-6)
    stats = index.candidate_stats("owls garden", rows)
    assert stats.bm25["all"][0] > 0 and stats.term_freqs["title"][0, 0] == 1  # "owl" is in d7's title

    final = final_corpus(_documents(SMALL_DOCS), [Update(UPSERT, "d7", owls), Update(UPSERT, "d1", cats),
                                                  Update(DELETE, "d2")])
    summary = compact_index(home, "t", log=quiet)
    assert summary.vectors_encoded == 0  # every vector came from the generation or the journal
    cold = _cold_build(home, tmp_path, final, dense=True)
    files, cold_files = _files(summary.path), _files(cold.generation.path)
    assert {k: v for k, v in files.items() if not k.startswith("vectors/")} == \
        {k: v for k, v in cold_files.items() if not k.startswith("vectors/")}
    np.testing.assert_allclose(np.load(summary.path / "vectors" / "embeddings.npy"),
                               np.load(cold.generation.path / "vectors" / "embeddings.npy"), atol=1e-6)
    _assert_same_rankings(EmbeddedIndex.open(home, "t"), cold, dense=True)


def test_deleted_documents_are_never_served_and_unknown_deletes_are_refused(tmp_path: Path, small_corpus: Path):
    home = tmp_path / "home"
    build_index(home, "t", BuildSettings(corpus=CorpusSpec(str(small_corpus)), dense=False), progress=False, log=quiet)
    index = EmbeddedIndex.open(home, "t")
    assert "d1" in index.retrieve_bm25("cats", 10).doc_ids
    write_updates(home, "t", deletes=["d1"])
    assert "d1" not in index.retrieve_bm25("cats", 10).doc_ids
    assert index.document("d1") is None and index.documents(["d1", "d3"])[0] is None
    with pytest.raises(KeyError, match="d1"):
        index.rows_of(["d1"])
    with pytest.raises(UnknownDocumentError, match="no document 'd1'"):
        write_updates(home, "t", deletes=["d1"])
    with pytest.raises(UnknownDocumentError, match="nope"):
        write_updates(home, "t", [Document("d9", "", "cats")], ["nope"])  # the whole batch is refused
    assert "d9" not in live_id_set(IndexStore(home), IndexStore(home).open("t"))
    write_updates(home, "t", [Document("d1", "", "cats are back")])  # a deleted id may come back
    assert index.retrieve_bm25("cats back", 10).doc_ids[0] == "d1"
    # a plain rebuild re-reads the source and folds the journal in: still no old d1
    rebuild_index(home, "t", progress=False, log=quiet)
    rebuilt = EmbeddedIndex.open(home, "t")
    assert rebuilt.document("d1")["text"] == "cats are back" and pending_updates(home, "t")["operations"] == 0


def test_another_process_write_is_searchable_within_a_second(tmp_path: Path, small_corpus: Path):
    home = tmp_path / "home"
    build_index(home, "t", BuildSettings(corpus=CorpusSpec(str(small_corpus)), dense=False), progress=False, log=quiet)
    served = EmbeddedIndex.open(home, "t")
    served.retrieve_bm25("zebra", 5)
    script = ("from pathlib import Path; from indexing.updates import write_updates; from indexing.corpus import Document; "
              f"write_updates(Path({str(home)!r}), 't', [Document('z1', 'Zebra', 'a zebra crossing')]); print('ack', flush=True)")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ack"
    acknowledged = time.perf_counter()
    while served.retrieve_bm25("zebra", 5).doc_ids != ["z1"]:
        assert time.perf_counter() - acknowledged < 1.0
        time.sleep(0.01)
    process.wait(30)


def test_torn_journal_tail_is_ignored_then_cut_off(tmp_path: Path, small_corpus: Path):
    home = tmp_path / "home"
    build_index(home, "t", BuildSettings(corpus=CorpusSpec(str(small_corpus)), dense=False), progress=False, log=quiet)
    write_updates(home, "t", [Document("a1", "", "alpha")])
    index_dir = IndexStore(home).index_dir("t")
    end = journal_end(index_dir)
    with open(journal_path(index_dir), "ab") as handle:
        handle.write(b'{"ops":[{"op":"upsert","doc":{"id":"torn"')  # a crash in the middle of a batch
    assert journal_end(index_dir) == end
    assert [u.doc_id for u in read_updates(index_dir, 0)[0]] == ["a1"]
    index = EmbeddedIndex.open(home, "t")
    assert index.document("torn") is None and index.document("a1")["text"] == "alpha"
    write_updates(home, "t", [Document("b1", "", "beta")])
    assert [u.doc_id for u in read_updates(index_dir, 0)[0]] == ["a1", "b1"]
    assert index.document("b1")["text"] == "beta"


KILLED_WRITER = """
import sys
from pathlib import Path
from indexing.corpus import Document
from indexing.updates import write_updates
home = Path(sys.argv[1])
for i in range(100000):
    write_updates(home, 't', [Document(f'k{i}-{j}', '', f'killed writer batch {i} doc {j}') for j in range(20)])
    print(i, flush=True)
"""


def test_kill_9_during_upsert_batches_loses_nothing_acknowledged(tmp_path: Path, small_corpus: Path):
    home = tmp_path / "home"
    build_index(home, "t", BuildSettings(corpus=CorpusSpec(str(small_corpus)), dense=False), progress=False, log=quiet)
    acked: list[int] = []
    for round_ in range(3):
        process = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(home)], cwd=ROOT, stdout=subprocess.PIPE,
                                   text=True)
        for _ in range(5 + 7 * round_):
            acked.append(int(process.stdout.readline()))
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
        index = EmbeddedIndex.open(home, "t")
        for batch in acked[-5:]:  # the batch ids restart per process: check this round's acknowledged ones
            assert all(index.document(f"k{batch}-{j}") is not None for j in range(20))
        live = live_id_set(IndexStore(home), IndexStore(home).open("t"))
        batches = {doc_id.split("-")[0] for doc_id in live if doc_id.startswith("k")}
        for name in batches:  # every batch in the journal is whole: batches apply all or nothing
            assert sum(1 for doc_id in live if doc_id.startswith(name + "-")) == 20
    compact_index(home, "t", log=quiet)
    assert EmbeddedIndex.open(home, "t").document(f"k{acked[-1]}-19") is not None


KILLED_COMPACTION = """
import sys
from pathlib import Path
from indexing.build import compact_index
compact_index(Path(sys.argv[1]), 't', log=lambda m: None)
print('done', flush=True)
"""


def test_kill_9_during_compaction_leaves_a_consistent_index(tmp_path: Path, small_corpus: Path):
    home = tmp_path / "home"
    build_index(home, "t", BuildSettings(corpus=CorpusSpec(str(small_corpus)), dense=False), progress=False, log=quiet)
    documents = [Document(f"c{i}", "", " ".join(WORDS[i % 20:(i % 20) + 5]) + f" number{i}") for i in range(3000)]
    write_updates(home, "t", documents[:1500], ["d1"])
    write_updates(home, "t", documents[1500:])
    expected = {d.id for d in final_corpus(_documents(SMALL_DOCS), [Update(DELETE, "d1")])} | {d.id for d in documents}
    store = IndexStore(home)
    for delay in (0.3, 0.8, 1.5, 2.5):
        process = subprocess.Popen([sys.executable, "-c", KILLED_COMPACTION, str(home)], cwd=ROOT)
        time.sleep(delay)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
        store.open("t", verify=True)  # the active generation is whole, whatever the moment of the kill
        assert live_id_set(store, store.open("t")) == expected
        index = EmbeddedIndex.open(home, "t")
        assert index.document("d1") is None and index.document("c2999") is not None
    summary = compact_index(home, "t", log=quiet)
    assert summary.documents == len(expected) and pending_updates(home, "t")["operations"] == 0


def test_cli_upsert_delete_compact_and_status(tmp_path: Path, small_corpus: Path):
    home = tmp_path / "home"
    run_cli(home, "index", "build", "--dataset", str(small_corpus), "--name", "t", "--no-dense", "--quiet")
    upserts = write_jsonl(tmp_path / "up.jsonl", [{"_id": "n1", "title": "New", "text": "a new document", "author": "x"},
                                                  {"_id": "d2", "title": "Quantum", "text": "rewritten"}])
    receipt = json.loads(run_cli(home, "index", "upsert", "--file", str(upserts)).stdout)
    assert receipt["upserted"] == 2 and receipt["durable"] is True
    assert json.loads(run_cli(home, "index", "delete-docs", "--ids", "d1,d3").stdout)["deleted"] == 2
    missing = run_cli(home, "index", "delete-docs", "--ids", "d4,nope", check=False)
    assert missing.returncode == 2 and "no document 'nope' in index 't'" in missing.stderr
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"_id": "x1", "text": "ok"}, {"_id": "x2"}])
    refused = run_cli(home, "index", "upsert", "--file", str(bad), check=False)
    assert refused.returncode == 2 and "bad.jsonl:2" in refused.stderr
    status = json.loads(run_cli(home, "index", "status", "--json").stdout)["indexes"]["t"]["live"]
    assert status["delta"]["upserts"] == 2 and status["delta"]["deletes"] == 2 and status["last_compaction"] is None
    assert "delta: 2 upserts, 2 deletes pending" in run_cli(home, "index", "status").stdout
    from indexing.home import event_store_path
    from search.event_store import EventStore  # the drift report reads the service's event store

    event_store_path(home, "t").parent.mkdir(parents=True, exist_ok=True)
    EventStore(event_store_path(home, "t")).close()
    drift = json.loads(run_cli(home, "behaviour", "status", "--name", "t", "--json").stdout)["drift"]
    assert drift["index_changes"] == {"generation": "g000001", "upserts": 2, "deletes": 2, "model_generation": None}
    assert "2 documents upserted and 2 deleted" in run_cli(home, "behaviour", "status", "--name", "t").stdout
    run_cli(home, "index", "compact")
    status = json.loads(run_cli(home, "index", "status", "--json").stdout)["indexes"]["t"]
    assert status["live"]["delta"]["operations"] == 0
    assert status["live"]["last_compaction"]["from"] == "g000001"
    assert status["generations"][-1]["documents"] == 5
    index = EmbeddedIndex.open(home, "t")
    assert index.document("d2")["text"] == "rewritten" and index.document("d1") is None


def test_rebuild_with_a_new_dataset_supersedes_the_journal(tmp_path: Path, small_corpus: Path):
    home = tmp_path / "home"
    build_index(home, "t", BuildSettings(corpus=CorpusSpec(str(small_corpus)), dense=False), progress=False, log=quiet)
    write_updates(home, "t", [Document("n1", "", "pending update")])
    other = write_jsonl(tmp_path / "other.jsonl", SMALL_DOCS[:3])
    summary = rebuild_index(home, "t", progress=False, log=quiet, dataset=other)
    assert summary.documents == 3 and EmbeddedIndex.open(home, "t").document("n1") is None
    manifest = IndexStore(home).open("t").manifest
    assert manifest["build"]["corpus"]["path"] == str(other.resolve())
    assert manifest["updates"]["source"] == manifest["updates"]["through"] == journal_end(IndexStore(home).index_dir("t"))


def test_append_refuses_nothing_it_cannot_store_and_reads_its_own_batches(tmp_path: Path):
    index_dir = tmp_path / "t"
    index_dir.mkdir()
    lock = tmp_path / ".t.updates.lock"
    vector = np.arange(4, dtype=np.float32)
    end = append_updates(index_dir, lock, [Update(UPSERT, "a", Document("a", "T", "x", {"k": [1]}), vector),
                                           Update(DELETE, "b")])
    assert end == journal_end(index_dir)
    updates, offset = read_updates(index_dir, 0)
    assert offset == end and [u.op for u in updates] == [UPSERT, DELETE]
    np.testing.assert_array_equal(updates[0].vector, vector)
    assert updates[0].doc == Document("a", "T", "x", {"k": [1]})


def test_merge_top_k_orders_like_one_top_k_over_both():
    from search.embedded import merge_top_k

    rng = np.random.default_rng(5)
    scores = rng.integers(1, 6, size=40).astype(np.float32)  # many ties
    rows = np.arange(40)
    a, b = rows < 25, rows >= 25
    merged_rows, merged_scores = merge_top_k(rows[a][::-1], scores[a][::-1], rows[b], scores[b], 10)
    order = np.lexsort((rows, -scores))[:10]
    assert merged_rows.tolist() == rows[order].tolist()
    np.testing.assert_array_equal(merged_scores, scores[order])
