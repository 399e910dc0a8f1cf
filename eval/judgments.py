"""Relevance judgments made in the workbench (/judge): queries, their pools, and graded
judgments 0-3 by named judges, in one SQLite file per index (HOME/judgments/INDEX.sqlite3,
opened through indexing/sqlite.py). Exported as TREC or BEIR qrels that `eval.datasets` reads,
so `ltr-search eval` and `train` use them directly; Cohen's kappa says how far judges agree.

A pool is the union of several pipelines' top k, stored in a random order fixed per query
(seeded by the query id), so a judge sees neither which pipeline found a document nor its rank.
A skip is stored as a judgment without a grade: the document is done for that judge and
exported by no one.
"""
from __future__ import annotations

import hashlib
import json
import random
import statistics
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from eval.datasets import QRELS_DIR, QUERIES_FILE, Qrels
from indexing.sqlite import SqliteDatabase, SqliteSchema, SqliteStoreError

APPLICATION_ID = 0x4C54524A  # "LTRJ": marks the file as a judgment store
SCHEMA_VERSION = 1
GRADES = (0, 1, 2, 3)
GRADE_LABELS = {0: "not relevant", 1: "related", 2: "relevant", 3: "perfect"}
MAX_JUDGE_CHARS = 64


class JudgmentStoreError(SqliteStoreError):
    """The judgment store cannot be opened or used."""


class JudgmentError(ValueError):
    """A judgment or query refused (unknown query, document not in the pool, bad grade)."""


_SCHEMA = (
    """CREATE TABLE queries (
        query_id TEXT PRIMARY KEY, text TEXT NOT NULL UNIQUE COLLATE NOCASE, source TEXT NOT NULL, added_at REAL NOT NULL)""",
    """CREATE TABLE pool (
        query_id TEXT NOT NULL REFERENCES queries(query_id), doc_id TEXT NOT NULL, position INTEGER NOT NULL,
        pipelines TEXT NOT NULL, PRIMARY KEY (query_id, doc_id))""",
    """CREATE TABLE judgments (
        query_id TEXT NOT NULL, doc_id TEXT NOT NULL, judge TEXT NOT NULL,
        grade INTEGER CHECK (grade IS NULL OR grade BETWEEN 0 AND 3), judged_at REAL NOT NULL,
        PRIMARY KEY (query_id, doc_id, judge), FOREIGN KEY (query_id, doc_id) REFERENCES pool(query_id, doc_id))""",
)
_FILE = SqliteSchema("judgment store", APPLICATION_ID, SCHEMA_VERSION, _SCHEMA, error=JudgmentStoreError,
                     synchronous="FULL", foreign_keys=True)


@dataclass(frozen=True)
class JudgedQuery:
    query_id: str
    text: str
    source: str
    pool: int  # documents to judge
    done: int  # judged or skipped by the judge asked about
    judges: int  # distinct judges with at least one grade on it


@dataclass(frozen=True)
class Judgment:
    query_id: str
    doc_id: str
    judge: str
    grade: int | None  # None: skipped
    judged_at: float


@dataclass(frozen=True)
class Agreement:
    judge_a: str
    judge_b: str
    pairs: int  # (query, document) pairs both graded
    kappa: float | None  # Cohen's kappa, None under 2 pairs
    weighted_kappa: float | None  # quadratic weights: a 2 against a 3 disagrees less than a 0 against a 3


def query_id_for(text: str) -> str:
    """A stable id for a query typed or taken from the request log: the same text, the same id."""
    return "q" + hashlib.sha1(" ".join(text.split()).lower().encode()).hexdigest()[:10]


def pool_order(query_id: str, doc_ids: Iterable[str]) -> list[str]:
    """The documents in a random order fixed by the query id (no pipeline's ranking shows)."""
    unique = sorted(set(doc_ids))
    random.Random(query_id).shuffle(unique)
    return unique


class JudgmentStore:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = SqliteDatabase(self.path, _FILE)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "JudgmentStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- queries and pools ----------------------------------------------------------------

    def add_query(self, text: str, source: str, query_id: str | None = None) -> str:
        """The query's id; a text already present keeps its id (adding twice changes nothing)."""
        text = " ".join(text.split())
        if not text:
            raise JudgmentError("a query needs some text")
        with self._db.write() as connection:
            row = connection.execute("SELECT query_id FROM queries WHERE text = ? COLLATE NOCASE", (text,)).fetchone()
            if row is not None:
                return row[0]
            query_id = query_id or query_id_for(text)
            if connection.execute("SELECT 1 FROM queries WHERE query_id = ?", (query_id,)).fetchone():
                raise JudgmentError(f"query id '{query_id}' is already used by another text")
            connection.execute("INSERT INTO queries VALUES (?,?,?,?)", (query_id, text, source, time.time()))
        return query_id

    def add_pool(self, query_id: str, found: dict[str, Sequence[str]]) -> int:
        """Pool the documents each pipeline found (pipeline -> doc ids); new documents go after
        the ones already pooled, in the query's fixed random order. Returns the pool size."""
        by_doc: dict[str, list[str]] = {}
        for pipeline, doc_ids in found.items():
            for doc_id in doc_ids:
                by_doc.setdefault(doc_id, []).append(pipeline)
        with self._db.write() as connection:
            self._require_query(connection, query_id)
            known = {doc_id: pipelines for doc_id, pipelines in connection.execute(
                "SELECT doc_id, pipelines FROM pool WHERE query_id = ?", (query_id,))}
            start = len(known)
            for doc_id in pool_order(query_id, by_doc):
                if doc_id in known:
                    merged = sorted(set(json.loads(known[doc_id])) | set(by_doc[doc_id]))
                    connection.execute("UPDATE pool SET pipelines = ? WHERE query_id = ? AND doc_id = ?",
                                       (json.dumps(merged), query_id, doc_id))
                else:
                    connection.execute("INSERT INTO pool VALUES (?,?,?,?)",
                                       (query_id, doc_id, start, json.dumps(sorted(by_doc[doc_id]))))
                    start += 1
            return start

    def queries(self, judge: str | None = None) -> list[JudgedQuery]:
        """Every query with its pool size and how much of it `judge` has done, in the order added."""
        with self._db.read() as connection:
            rows = connection.execute(
                """SELECT q.query_id, q.text, q.source,
                          (SELECT COUNT(*) FROM pool p WHERE p.query_id = q.query_id),
                          (SELECT COUNT(*) FROM judgments j WHERE j.query_id = q.query_id AND j.judge = ?),
                          (SELECT COUNT(DISTINCT judge) FROM judgments j WHERE j.query_id = q.query_id
                                                                          AND j.grade IS NOT NULL)
                   FROM queries q ORDER BY q.added_at, q.rowid""", (judge or "",)).fetchall()
        return [JudgedQuery(*row) for row in rows]

    def query(self, query_id: str) -> JudgedQuery | None:
        return next((q for q in self.queries() if q.query_id == query_id), None)

    def pool(self, query_id: str) -> list[str]:
        """The pool's documents in display order."""
        with self._db.read() as connection:
            return [r[0] for r in connection.execute(
                "SELECT doc_id FROM pool WHERE query_id = ? ORDER BY position", (query_id,))]

    # ---- judgments ------------------------------------------------------------------------

    def judge(self, query_id: str, doc_id: str, judge: str, grade: int | None, at: float | None = None) -> None:
        """Record (or change) one judge's grade; None skips the document."""
        if grade is not None and (isinstance(grade, bool) or grade not in GRADES):
            raise JudgmentError(f"grade must be one of {', '.join(map(str, GRADES))} (or a skip), got {grade!r}")
        if not judge or len(judge) > MAX_JUDGE_CHARS:
            raise JudgmentError(f"a judge needs a name of 1 to {MAX_JUDGE_CHARS} characters")
        with self._db.write() as connection:
            self._require_query(connection, query_id)
            if not connection.execute("SELECT 1 FROM pool WHERE query_id = ? AND doc_id = ?", (query_id, doc_id)).fetchone():
                raise JudgmentError(f"document '{doc_id[:200]}' is not in the pool of query '{query_id}'")
            connection.execute(
                "INSERT INTO judgments VALUES (?,?,?,?,?) ON CONFLICT (query_id, doc_id, judge) "
                "DO UPDATE SET grade = excluded.grade, judged_at = excluded.judged_at",
                (query_id, doc_id, judge, grade, time.time() if at is None else at))

    def judgments(self, query_id: str | None = None, judge: str | None = None) -> list[Judgment]:
        sql, params = "SELECT query_id, doc_id, judge, grade, judged_at FROM judgments", []
        clauses = []
        if query_id is not None:
            clauses.append("query_id = ?")
            params.append(query_id)
        if judge is not None:
            clauses.append("judge = ?")
            params.append(judge)
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        with self._db.read() as connection:
            return [Judgment(*row) for row in connection.execute(sql + " ORDER BY judged_at, rowid", params)]

    def judges(self) -> list[str]:
        with self._db.read() as connection:
            return [r[0] for r in connection.execute(
                "SELECT DISTINCT judge FROM judgments WHERE grade IS NOT NULL ORDER BY judge")]

    def qrels(self, judge: str | None = None) -> Qrels:
        """Graded judgments per query: one judge's, or with several judges the lower median grade
        of each pair (a tie between 1 and 2 exports 1: the conservative side). Skips never count."""
        grades: dict[tuple[str, str], list[int]] = {}
        for j in self.judgments(judge=judge):
            if j.grade is not None:
                grades.setdefault((j.query_id, j.doc_id), []).append(j.grade)
        qrels: Qrels = {}
        for (query_id, doc_id), values in grades.items():
            qrels.setdefault(query_id, {})[doc_id] = int(statistics.median_low(values))
        return qrels

    def texts(self) -> dict[str, str]:
        with self._db.read() as connection:
            return dict(connection.execute("SELECT query_id, text FROM queries ORDER BY added_at, rowid").fetchall())

    def agreement(self) -> list[Agreement]:
        """Cohen's kappa for every two judges, over the pairs both graded."""
        by_judge: dict[str, dict[tuple[str, str], int]] = {}
        for j in self.judgments():
            if j.grade is not None:
                by_judge.setdefault(j.judge, {})[(j.query_id, j.doc_id)] = j.grade
        out = []
        for a, b in combinations(sorted(by_judge), 2):
            shared = sorted(set(by_judge[a]) & set(by_judge[b]))
            x = [by_judge[a][k] for k in shared]
            y = [by_judge[b][k] for k in shared]
            out.append(Agreement(a, b, len(shared), cohen_kappa(x, y) if len(shared) >= 2 else None,
                                 cohen_kappa(x, y, weights="quadratic") if len(shared) >= 2 else None))
        return out

    @staticmethod
    def _require_query(connection, query_id: str) -> None:
        if not connection.execute("SELECT 1 FROM queries WHERE query_id = ?", (query_id,)).fetchone():
            raise JudgmentError(f"no query '{query_id[:200]}' in the judgment store")


def cohen_kappa(a: Sequence[int], b: Sequence[int], categories: Sequence[int] = GRADES,
                weights: str | None = None) -> float:
    """Cohen's kappa of two raters over the same items: (observed - chance agreement) / (1 - chance).
    `weights="quadratic"`: disagreement weighted by the squared grade distance. 1.0 when both
    raters give every item the same single grade (no disagreement is possible, none happened)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"kappa needs two equally long, non-empty rating lists (got {len(a)} and {len(b)})")
    index = {c: i for i, c in enumerate(categories)}
    k = len(categories)
    observed = np.zeros((k, k))
    for x, y in zip(a, b):
        observed[index[x], index[y]] += 1
    observed /= observed.sum()
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0))
    grid = np.subtract.outer(np.arange(k), np.arange(k))
    disagreement = (grid != 0).astype(float) if weights is None else (grid ** 2).astype(float)
    if weights not in (None, "quadratic"):
        raise ValueError(f"weights must be None or 'quadratic', got {weights!r}")
    chance = float((disagreement * expected).sum())
    if chance == 0.0:
        return 1.0
    return 1.0 - float((disagreement * observed).sum()) / chance


# ---- export -------------------------------------------------------------------------------

EXPORT_FORMATS = ("beir", "trec")


def qrels_text(qrels: Qrels, fmt: str) -> str:
    """BEIR TSV (`query-id corpus-id score`, with its header) or TREC (`qid 0 docid grade`)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got '{fmt}'")
    lines = ["query-id\tcorpus-id\tscore"] if fmt == "beir" else []
    for query_id, judged in qrels.items():
        for doc_id, grade in sorted(judged.items()):
            lines.append(f"{query_id}\t{doc_id}\t{grade}" if fmt == "beir" else f"{query_id} 0 {doc_id} {grade}")
    return "\n".join(lines) + "\n"


def queries_text(texts: dict[str, str], query_ids: Iterable[str]) -> str:
    """BEIR queries.jsonl lines for these queries."""
    return "".join(json.dumps({"_id": q, "text": texts[q]}, ensure_ascii=False) + "\n" for q in query_ids)


def export_dataset(store: JudgmentStore, directory: Path | str, split: str = "judged", fmt: str = "beir",
                   judge: str | None = None) -> tuple[Path, int, int]:
    """A dataset directory `ltr-search eval --dataset DIR --split SPLIT` reads: queries.jsonl and
    qrels/SPLIT.tsv (BEIR TSV, or TREC lines: `eval.datasets.read_qrels` reads both). Returns the
    qrels file, the queries and the judgments written."""
    if not split or "/" in split or split.startswith("."):
        raise ValueError(f"split must be a plain name such as 'judged', got '{split}'")
    qrels = store.qrels(judge)
    if not qrels:
        raise JudgmentError("no graded judgments to export" + (f" by judge '{judge}'" if judge else ""))
    body = qrels_text(qrels, fmt)  # checks the format before anything is written
    directory = Path(directory)
    (directory / QRELS_DIR).mkdir(parents=True, exist_ok=True)
    texts = store.texts()
    (directory / QUERIES_FILE).write_text(queries_text(texts, qrels), encoding="utf-8")
    target = directory / QRELS_DIR / f"{split}.tsv"
    target.write_text(body, encoding="utf-8")
    return target, len(qrels), sum(len(j) for j in qrels.values())
