"""Corpus readers: every bad line is reported with file, line and reason."""
from __future__ import annotations

from pathlib import Path

import pytest

from indexing.corpus import CorpusError, CorpusSpec, read_corpus, resolve_corpus_file
from tests.conftest import write_jsonl


def read(path: Path, **kwargs):
    return read_corpus(CorpusSpec(str(path)), **kwargs)


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        ('{"_id": "x", "text": "unterminated', "invalid JSON"),
        ('{"title": "no id", "text": "t"}', "missing id field '_id'"),
        ('{"_id": "d1", "text": "again"}', "duplicate id 'd1' (first seen on line 1)"),
        ('{"_id": "x", "text": 42}', "field 'text' must be a string, got number"),
        ('{"_id": "x", "title": ["a"], "text": "t"}', "field 'title' must be a string, got array"),
        ('{"_id": "x", "body": "no text field"}', "missing text field 'text'"),
        ('["not", "an", "object"]', "expected a JSON object, got list"),
        ('{"_id": "", "text": "empty id"}', "id field '_id' is empty"),
        ('{"_id": null, "text": "null id"}', "must be a string or integer, got null"),
    ],
)
def test_bad_line_names_file_line_and_reason(tmp_path, bad_line, reason):
    file = write_jsonl(tmp_path / "c.jsonl", [{"_id": "d1", "text": "ok"}, {"_id": "d2", "text": "ok"}, bad_line])
    with pytest.raises(CorpusError) as info:
        read(file)
    assert info.value.line == 3
    assert reason in info.value.reason
    assert str(info.value).startswith(f"{file}:3: ")


def test_skip_invalid_reads_the_rest_and_reports_every_skipped_line(tmp_path):
    lines = [
        {"_id": "a", "text": "alpha"},
        "{broken",
        {"_id": "b", "text": 3},
        {"_id": "c", "text": "gamma"},
        {"_id": "a", "text": "dup"},
    ]
    result = read(write_jsonl(tmp_path / "c.jsonl", lines), skip_invalid=True)
    assert [d.id for d in result.documents] == ["a", "c"]
    assert [(s.line, s.reason.split(":")[0]) for s in result.skipped] == [
        (2, "invalid JSON"),
        (3, "field 'text' must be a string, got number"),
        (5, "duplicate id 'a' (first seen on line 1)"),
    ]


def test_empty_corpus_is_an_error(tmp_path):
    with pytest.raises(CorpusError, match="empty corpus"):
        read(write_jsonl(tmp_path / "c.jsonl", []))
    with pytest.raises(CorpusError, match=r"empty corpus: no valid documents \(1 invalid line skipped\)"):
        read(write_jsonl(tmp_path / "d.jsonl", ["{oops"]), skip_invalid=True)


def test_invalid_utf8_is_reported(tmp_path):
    file = tmp_path / "c.jsonl"
    file.write_bytes(b'{"_id": "a", "text": "ok"}\n{"_id": "b", "text": "\xff\xfe"}\n')
    with pytest.raises(CorpusError, match=r"c.jsonl:2: invalid UTF-8"):
        read(file)


def test_metadata_is_kept_and_beir_metadata_flattened(tmp_path):
    file = write_jsonl(
        tmp_path / "c.jsonl",
        [{"_id": 7, "title": None, "text": "t", "author": "ann", "metadata": {"year": 2020}}],
    )
    [doc] = read(file).documents
    assert doc.id == "7" and doc.title == ""
    assert doc.metadata == {"author": "ann", "year": 2020}


def test_configurable_fields(tmp_path):
    file = write_jsonl(tmp_path / "c.jsonl", [{"docno": "x1", "headline": "H", "body": "B", "abstract": "A"}])
    spec = CorpusSpec(str(file), id_field="docno", title_field="headline", text_fields=("abstract", "body"))
    [doc] = read_corpus(spec).documents
    assert (doc.id, doc.title, doc.text) == ("x1", "H", "A\nB")


def test_blank_lines_are_not_records(tmp_path):
    file = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "text": "x"}, "", "   ", {"_id": "b", "text": "y"}])
    assert [d.id for d in read(file).documents] == ["a", "b"]


def test_beir_directory_resolution(tmp_path):
    (tmp_path / "one").mkdir()
    write_jsonl(tmp_path / "one" / "corpus_preprocessed.jsonl", [{"_id": "a", "text": "x"}])
    assert resolve_corpus_file(tmp_path / "one").name == "corpus_preprocessed.jsonl"
    (tmp_path / "two").mkdir()
    write_jsonl(tmp_path / "two" / "corpus_a.jsonl", [])
    write_jsonl(tmp_path / "two" / "corpus_b.jsonl", [])
    with pytest.raises(CorpusError, match="several corpus files"):
        resolve_corpus_file(tmp_path / "two")
    with pytest.raises(CorpusError, match="no such file"):
        resolve_corpus_file(tmp_path / "missing")


def test_fingerprint_changes_with_content(tmp_path):
    a = read(write_jsonl(tmp_path / "a.jsonl", [{"_id": "a", "text": "x"}]))
    b = read(write_jsonl(tmp_path / "b.jsonl", [{"_id": "a", "text": "y"}]))
    assert a.fingerprint != b.fingerprint and len(a.fingerprint) == 64
