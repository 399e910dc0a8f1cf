"""Evaluation data on disk: BEIR datasets (queries + qrels) and TREC qrels/run files.

Readers are strict: a malformed row stops with the file, the line and the reason, because a
silently dropped judgment changes every metric computed from it. Runs are written in the TREC
format (`qid Q0 docid rank score tag`) so trec_eval and pytrec_eval score them identically.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]

QUERIES_FILE = "queries.jsonl"
QRELS_DIR = "qrels"


class EvalDataError(ValueError):
    """A problem in evaluation input, located as precisely as possible."""

    def __init__(self, path: Path | str, line: int | None, reason: str):
        self.path, self.line, self.reason = Path(path), line, reason
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {reason}")


@dataclass
class SkippedQuery:
    query_id: str
    reason: str


@dataclass
class EvalDataset:
    """The judged queries of one split, ready to run: text and graded judgments per query."""

    path: Path
    split: str
    queries: dict[str, str]  # query id -> text, only the evaluable ones, in qrels order
    qrels: Qrels  # judgments of those queries
    skipped: list[SkippedQuery] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    yield number, raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as exc:
                    raise EvalDataError(path, number, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except FileNotFoundError:
        raise EvalDataError(path, None, "file not found") from None
    except IsADirectoryError:
        raise EvalDataError(path, None, "is a directory, expected a file") from None


def read_queries(path: Path | str, id_field: str = "_id", text_field: str = "text") -> dict[str, str]:
    """BEIR `queries.jsonl`: one JSON object per line with an id and a text."""
    path = Path(path)
    queries: dict[str, str] = {}
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalDataError(path, number, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise EvalDataError(path, number, f"expected a JSON object, got {type(record).__name__}")
        query_id, text = record.get(id_field), record.get(text_field)
        if not isinstance(query_id, (str, int)) or str(query_id) == "":
            raise EvalDataError(path, number, f"field '{id_field}' is missing or empty")
        if not isinstance(text, str):
            raise EvalDataError(path, number, f"field '{text_field}' is missing or not a string")
        query_id = str(query_id)
        if query_id in queries:
            raise EvalDataError(path, number, f"duplicate query id '{query_id}'")
        queries[query_id] = text
    if not queries:
        raise EvalDataError(path, None, "no queries")
    return queries


def read_qrels(path: Path | str) -> Qrels:
    """Graded judgments from a BEIR TSV (`query-id corpus-id score`, optional header) or a TREC
    qrels file (`qid iteration docid grade`, whitespace separated); the column count decides."""
    path = Path(path)
    qrels: Qrels = {}
    columns: int | None = None
    for number, line in _lines(path):
        if not line.strip():
            continue
        line = line.rstrip()
        parts = line.split("\t") if "\t" in line else line.split()
        if number == 1 and parts[:2] == ["query-id", "corpus-id"]:
            columns = len(parts)
            continue
        if len(parts) not in (3, 4):
            raise EvalDataError(
                path, number, f"expected 3 columns (query-id corpus-id score) or 4 (TREC: qid iter docid grade), got {len(parts)}"
            )
        if columns is None:
            columns = len(parts)
        elif len(parts) != columns:
            raise EvalDataError(path, number, f"expected {columns} columns like the lines before, got {len(parts)}")
        query_id, doc_id, grade_text = (parts[0], parts[1], parts[2]) if columns == 3 else (parts[0], parts[2], parts[3])
        try:
            grade = int(grade_text)
        except ValueError:
            raise EvalDataError(path, number, f"relevance grade '{grade_text}' is not an integer") from None
        judged = qrels.setdefault(query_id, {})
        if doc_id in judged and judged[doc_id] != grade:
            raise EvalDataError(path, number, f"document '{doc_id}' judged twice for query '{query_id}' with different grades")
        judged[doc_id] = grade
    if not qrels:
        raise EvalDataError(path, None, "no judgments")
    return qrels


def read_run(path: Path | str) -> Run:
    """A TREC run file: `qid Q0 docid rank score tag` per line."""
    path = Path(path)
    run: Run = {}
    for number, line in _lines(path):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 6:
            raise EvalDataError(path, number, f"expected 6 columns (qid Q0 docid rank score tag), got {len(parts)}")
        query_id, _, doc_id, rank_text, score_text, _ = parts
        if not rank_text.lstrip("-").isdigit():
            raise EvalDataError(path, number, f"rank '{rank_text}' is not an integer")
        try:
            score = float(score_text)
        except ValueError:
            raise EvalDataError(path, number, f"score '{score_text}' is not a number") from None
        if not math.isfinite(score):
            raise EvalDataError(path, number, f"score '{score_text}' is not finite")
        ranked = run.setdefault(query_id, {})
        if doc_id in ranked:
            raise EvalDataError(path, number, f"document '{doc_id}' appears twice for query '{query_id}'")
        ranked[doc_id] = score
    return run


def write_run(run: Mapping[str, Mapping[str, float]], path: Path | str, tag: str) -> Path:
    """Write a TREC run, documents in descending score order.

    trec_eval ignores the rank column and orders by score, ties by document id descending; the
    file is written in that same order (`trec_order`) with full-precision scores (`repr`), so the
    ranks in it are the ones every metric sees."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not tag or any(ch.isspace() for ch in tag):
        raise ValueError(f"run tag {tag!r} must be a non-empty word")
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        for query_id, ranked in run.items():
            for rank, (doc_id, score) in enumerate(trec_order(ranked), start=1):
                handle.write(f"{query_id} Q0 {doc_id} {rank} {float(score)!r} {tag}\n")
    temporary.replace(path)
    return path


def trec_order(ranked: Mapping[str, float]) -> list[tuple[str, float]]:
    """(doc id, score) pairs in the order trec_eval ranks them: score descending, then doc id
    descending (its `comp_sim_docno`)."""
    return sorted(ranked.items(), key=lambda item: (item[1], item[0]), reverse=True)


def available_splits(dataset: Path) -> list[str]:
    return sorted(p.stem for p in (dataset / QRELS_DIR).glob("*.tsv"))


def load_dataset(path: Path | str, split: str) -> EvalDataset:
    """A BEIR directory's judged queries for `split`.

    Queries judged in the split but missing from queries.jsonl, and queries with no judgment
    above zero (every metric is undefined or zero for them), are skipped and listed."""
    dataset = Path(path)
    if not dataset.is_dir():
        raise EvalDataError(dataset, None, "dataset directory not found")
    queries_file = dataset / QUERIES_FILE
    if not queries_file.is_file():
        raise EvalDataError(dataset, None, f"no {QUERIES_FILE}: a BEIR dataset needs its queries to be evaluated")
    qrels_file = dataset / QRELS_DIR / f"{split}.tsv"
    if not qrels_file.is_file():
        splits = available_splits(dataset)
        raise EvalDataError(
            qrels_file, None, f"no qrels for split '{split}' (available: {', '.join(splits) or 'none'})"
        )
    texts = read_queries(queries_file)
    all_qrels = read_qrels(qrels_file)
    queries: dict[str, str] = {}
    qrels: Qrels = {}
    skipped: list[SkippedQuery] = []
    for query_id, judged in all_qrels.items():
        if query_id not in texts:
            skipped.append(SkippedQuery(query_id, f"judged in {qrels_file.name} but absent from {QUERIES_FILE}"))
        elif not any(grade > 0 for grade in judged.values()):
            skipped.append(SkippedQuery(query_id, "no relevant document judged"))
        else:
            queries[query_id] = texts[query_id]
            qrels[query_id] = judged
    if not queries:
        raise EvalDataError(qrels_file, None, "no query of this split has both a text and a relevant judgment")
    return EvalDataset(dataset, split, queries, qrels, skipped)
