"""The update journal is truncated at compaction (issue 18): what every kept generation holds is
dropped, what a rebuild from the source needs is kept as net operations, and a kill -9 at any
step leaves the old journal or the new one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from indexing.build import BuildSettings, build_index, compact_index, rebuild_index
from indexing.bundle import IndexStore
from indexing.corpus import CorpusSpec, Document
from indexing.delta import (DELETE, UPSERT, JournalTruncatedError, Update, apply_updates, journal_end, journal_path,
                            net_updates, read_updates)
from indexing.updates import live_id_set, pending_updates, write_updates
from search.embedded import EmbeddedIndex
from tests.conftest import ROOT, SMALL_DOCS, write_jsonl


def quiet(_: str) -> None:
    pass


ids = st.sampled_from([f"d{i}" for i in range(6)])
op = st.one_of(st.tuples(st.just(UPSERT), ids, st.integers(0, 3)), st.tuples(st.just(DELETE), ids))


@settings(max_examples=200, deadline=None)
@given(start=st.lists(ids, unique=True, max_size=5), ops=st.lists(op, max_size=14))
def test_net_updates_replay_to_the_same_corpus_in_the_same_order(start, ops):
    corpus = [Document(i, "", "start") for i in start]
    updates = [Update(UPSERT, o[1], Document(o[1], "", f"v{o[2]}")) if o[0] == UPSERT else Update(DELETE, o[1]) for o in ops]
    net = net_updates(updates)
    assert len({(u.op, u.doc_id) for u in net}) == len(net)  # at most one delete and one upsert per id
    assert list(apply_updates(corpus, net).items()) == list(apply_updates(corpus, updates).items())


def _build(home: Path, corpus: Path, keep: int) -> None:
    build_index(home, "t", BuildSettings(corpus=CorpusSpec(str(corpus)), dense=False, keep=keep), progress=False, log=quiet)


def _served(index: EmbeddedIndex) -> dict[str, str]:
    """id -> text of every document the index serves (stored fields of its live ids)."""
    live = live_id_set(IndexStore(index.home), IndexStore(index.home).open("t"))
    return {doc_id: index.document(doc_id)["text"] for doc_id in sorted(live)}


def _expected(documents: list[Document]) -> dict[str, str]:
    return {d.id: d.text for d in sorted(documents, key=lambda d: d.id)}


def _files(path: Path) -> dict[str, str]:
    return {name: info["sha256"] for name, info in json.loads((path / "manifest.json").read_text())["files"].items()}


def _journal_fixture(tmp_path: Path, small_corpus: Path):
    """An index of the small corpus (keep=0), its folder, its documents, the updates written so
    far (in order) and the function that writes more (to the journal and to that list)."""
    home = tmp_path / "home"
    _build(home, small_corpus, keep=0)
    base = [Document(r["_id"], r["title"], r["text"], {"author": r["author"]}) for r in SMALL_DOCS]
    updates: list[Update] = []

    def write(upserts: list[Document], deletes: list[str] = ()) -> None:
        write_updates(home, "t", upserts, list(deletes))
        updates.extend([Update(UPSERT, d.id, d) for d in upserts] + [Update(DELETE, i) for i in deletes])

    return home, IndexStore(home).index_dir("t"), base, updates, write


def test_compaction_truncates_the_journal_and_rebuilds_still_replay_it(tmp_path: Path, small_corpus: Path):
    home, index_dir, base, updates, write = _journal_fixture(tmp_path, small_corpus)

    write([Document(f"n{i}", "", f"draft {i} " + "padding " * 50) for i in range(40)], ["d1"])
    write([Document(f"n{i}", "", f"new document {i}") for i in range(40)])  # the same ids again: the drafts are dead
    compact_index(home, "t", log=quiet)  # the generation before (through 0) may still be served: nothing dropped
    assert journal_path(index_dir).stat().st_size == journal_end(index_dir)
    follower = EmbeddedIndex.open(home, "t")  # a process serving this generation across the next compaction
    write([Document(f"n{i}", "", f"rewritten {i}") for i in range(20)] + [Document("d1", "", "d1 is back")], ["n39"])
    compact_index(home, "t", log=quiet)
    end = journal_end(index_dir)
    size = journal_path(index_dir).stat().st_size
    assert size < end / 3  # the drafts (about 20 kB) are gone: the journal keeps the net effect of what it folds ...
    assert pending_updates(home, "t")["journal_file_bytes"] == size
    assert [u.doc_id for u in read_updates(index_dir, end)[0]] == []
    net, offset = read_updates(index_dir, 0)  # ... but a rebuild from the source still replays its net effect
    assert offset == end and list(apply_updates(base, net).items()) == list(apply_updates(base, updates).items())

    final = list(apply_updates(base, updates).values())
    assert _served(EmbeddedIndex.open(home, "t")) == _expected(final)
    assert _served(follower) == _expected(final)  # its generation's batches are still in the journal
    assert follower.document("n39") is None and "n39" not in follower.retrieve_bm25("new document 39", 50).doc_ids
    write([Document("z1", "", "zebra after truncation")])
    assert follower.retrieve_bm25("zebra", 3).doc_ids == ["z1"] and follower.document("z1")["text"] == "zebra after truncation"

    rebuilt = rebuild_index(home, "t", progress=False, log=quiet)  # source re-read + folded net operations + tail
    cold_home = tmp_path / "cold"
    corpus = write_jsonl(tmp_path / "final.jsonl", [{"_id": d.id, "title": d.title, "text": d.text, **d.metadata}
                                                     for d in apply_updates(base, updates).values()])
    _build(cold_home, corpus, keep=0)
    assert {k: v for k, v in _files(rebuilt.path).items() if k.startswith("bm25/")} == \
        {k: v for k, v in _files(IndexStore(cold_home).open("t").path).items() if k.startswith("bm25/")}

    write([Document("z2", "", "one more")], ["n0"])
    compact_index(home, "t", log=quiet)  # truncating a truncated journal folds its net operations again
    compact_index(home, "t", log=quiet)
    updates_now = apply_updates(base, updates)
    assert _served(EmbeddedIndex.open(home, "t")) == _expected(list(updates_now.values()))
    assert list(apply_updates(base, read_updates(index_dir, 0)[0]).items()) == list(updates_now.items())
    # the follower is now behind the journal's base (z2 and the delete of n0 were dropped unread):
    # it catches up from the folded net operations, never serving a stale row
    assert read_updates(index_dir, 0)[1] == journal_end(index_dir)
    assert _served(follower) == _expected(list(updates_now.values()))
    assert follower.document("n0") is None and follower.retrieve_bm25("one more", 3).doc_ids == ["z2"]
    with pytest.raises(JournalTruncatedError, match="reopen the index's active generation"):
        read_updates(index_dir, end)  # an offset that is neither kept nor the folded source


KILLED_TRUNCATION = """
import os, signal, sys
from pathlib import Path
import indexing.delta as delta
from indexing.build import compact_index
home, when = Path(sys.argv[1]), sys.argv[2]
real_replace, real_fsync = os.replace, os.fsync
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def replace(src, dst):
    if str(src).endswith('.truncating'):
        if when == 'before-rename':
            die()
        real_replace(src, dst)
        if when == 'after-rename':
            die()
    else:
        real_replace(src, dst)
def fsync(fd):
    if when == 'writing' and os.readlink(f'/proc/self/fd/{fd}').endswith('.truncating'):
        die()
    real_fsync(fd)
delta.os.replace, delta.os.fsync = replace, fsync
compact_index(home, 't', log=lambda m: None)
print('finished', flush=True)
"""


@pytest.mark.parametrize("when", ["writing", "before-rename", "after-rename"])
def test_kill_9_during_journal_truncation_leaves_the_old_journal_or_the_new(tmp_path: Path, small_corpus: Path,
                                                                             when: str):
    home = tmp_path / "home"
    _build(home, small_corpus, keep=0)
    base = [Document(r["_id"], r["title"], r["text"], {"author": r["author"]}) for r in SMALL_DOCS]
    first = [Document(f"k{i}", "", f"killed truncation {i}") for i in range(30)]
    write_updates(home, "t", first, ["d2"])
    compact_index(home, "t", log=quiet)
    write_updates(home, "t", [Document("k0", "", "rewritten k0")], ["k1"])
    updates = [Update(UPSERT, d.id, d) for d in first] + [Update(DELETE, "d2"),
                                                          Update(UPSERT, "k0", Document("k0", "", "rewritten k0")),
                                                          Update(DELETE, "k1")]
    expected = apply_updates(base, updates)
    index_dir = IndexStore(home).index_dir("t")
    end = journal_end(index_dir)
    process = subprocess.run([sys.executable, "-c", KILLED_TRUNCATION, str(home), when], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == -9 and "finished" not in process.stdout, process.stderr
    truncated = journal_path(index_dir).read_bytes().startswith(b'{"base"')  # the preamble of a truncated journal
    assert truncated == (when == "after-rename")  # the old journal, whole, or the new one
    assert journal_end(index_dir) == end  # offsets are the same either way
    assert _served(EmbeddedIndex.open(home, "t")) == _expected(list(expected.values()))
    assert list(apply_updates(base, read_updates(index_dir, 0)[0]).items()) == list(expected.items())
    write_updates(home, "t", [Document("k2", "", "after the crash")])
    compact_index(home, "t", log=quiet)
    expected["k2"] = Document("k2", "", "after the crash")
    assert _served(EmbeddedIndex.open(home, "t")) == _expected(list(expected.values()))
    rebuilt = rebuild_index(home, "t", progress=False, log=quiet)
    assert rebuilt.documents == len(expected)
    assert _served(EmbeddedIndex.open(home, "t")) == _expected(list(expected.values()))


def test_truncation_after_a_new_source_folds_from_that_source(tmp_path: Path, small_corpus: Path):
    home = tmp_path / "home"
    _build(home, small_corpus, keep=1)
    index_dir = IndexStore(home).index_dir("t")
    for round_ in range(3):  # keep=1: a truncation lags two compactions
        write_updates(home, "t", [Document(f"a{round_}", "", f"old source {round_}")])
        compact_index(home, "t", log=quiet)
    assert journal_path(index_dir).read_bytes().startswith(b'{"base"')
    other = write_jsonl(tmp_path / "other.jsonl", SMALL_DOCS[:2])
    rebuild_index(home, "t", progress=False, log=quiet, dataset=other)  # a new source at the journal's end
    source = IndexStore(home).open("t").manifest["updates"]["source"]
    expected = {d["_id"]: d["text"] for d in SMALL_DOCS[:2]}
    for round_ in range(4):
        write_updates(home, "t", [Document(f"b{round_}", "", f"new source {round_}")], ["d1"] if round_ == 0 else [])
        expected.pop("d1", None)
        expected[f"b{round_}"] = f"new source {round_}"
        compact_index(home, "t", log=quiet)
    layout = json.loads(journal_path(index_dir).read_bytes()[:128])
    assert layout["source"] == source and layout["base"] > source  # folded from the new source, not the old one
    assert _served(EmbeddedIndex.open(home, "t")) == dict(sorted(expected.items()))
    rebuilt = rebuild_index(home, "t", progress=False, log=quiet)  # re-reads other.jsonl + the folded operations
    assert rebuilt.documents == len(expected) and _served(EmbeddedIndex.open(home, "t")) == dict(sorted(expected.items()))


def test_rebuilds_truncate_the_journal_too(tmp_path: Path, small_corpus: Path):
    """`index rebuild` (same source) and a build from a new dataset drop what every kept generation
    holds, as a compaction does; the served documents and a later rebuild stay exact."""
    home, index_dir, base, updates, write = _journal_fixture(tmp_path, small_corpus)

    write([Document(f"n{i}", "", f"draft {i} " + "padding " * 50) for i in range(40)], ["d1"])
    write([Document(f"n{i}", "", f"final {i}") for i in range(40)])  # the drafts are dead
    rebuild_index(home, "t", progress=False, log=quiet)  # the generation before (through 0) may still serve
    assert journal_path(index_dir).stat().st_size == journal_end(index_dir)
    write([Document("y1", "", "between the rebuilds")])
    rebuild_index(home, "t", progress=False, log=quiet)
    end = journal_end(index_dir)
    assert journal_path(index_dir).stat().st_size < end / 3  # the 20 kB of drafts are gone
    final = list(apply_updates(base, updates).values())
    assert _served(EmbeddedIndex.open(home, "t")) == _expected(final)
    assert list(apply_updates(base, read_updates(index_dir, 0)[0]).items()) == list(apply_updates(base, updates).items())
    write([Document("z1", "", "after the rebuilds")], ["n0"])
    rebuilt = rebuild_index(home, "t", progress=False, log=quiet)  # source + folded net operations + the tail
    final = list(apply_updates(base, updates).values())
    assert rebuilt.documents == len(final) and _served(EmbeddedIndex.open(home, "t")) == _expected(final)

    other = write_jsonl(tmp_path / "other.jsonl", SMALL_DOCS[:2])
    for _ in range(2):  # a new source supersedes the journal: dropped once no kept generation reads it
        rebuild_index(home, "t", progress=False, log=quiet, dataset=other)
    assert journal_path(index_dir).stat().st_size < 200  # the preamble and an empty fold
    assert _served(EmbeddedIndex.open(home, "t")) == {d["_id"]: d["text"] for d in sorted(SMALL_DOCS[:2], key=lambda d: d["_id"])}
