"""Click logs for fitting click models: one row per shown document (JSONL or the Yandex table), and
a columnar form for fitting. Not the query service's `/events` schema, which names served requests.

`ClickEvent` is one shown document on one result page (SERP). Click models need whole pages, so
`ClickLog` groups events by session into fixed-width numpy matrices (sessions x positions) with
a mask for positions that showed nothing; column `r` is always position `r + 1`, so positions
keep their meaning even when a page had gaps or fewer results.

Readers: the Yandex WSCD 2012 sample (`clicks.tsv.gz`, one row per shown document) and JSONL
event files. Every bad line is an error naming the file, the line (1-based) and, for JSONL, the
field, before anything is returned.
"""
from __future__ import annotations

import gzip
import json
import math
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from indexing.corpus import json_type_name

YANDEX_FILE = "clicks.tsv.gz"
YANDEX_COLUMNS = ("split", "session_idx", "query_key", "position", "doc_id", "clicked", "first_click_order", "n_clicks")
EVENT_FIELDS = ("query", "doc_id", "position", "impression", "click", "timestamp", "session_id")
MAX_POSITIONS = 1000  # a page deeper than this is a data error, not a page


class ClickLogError(ValueError):
    """A click log that cannot be read: names the file, the line (1-based) and the reason."""

    def __init__(self, path: Path | str | None, line: int | None, reason: str):
        self.path = None if path is None else str(path)
        self.line = line
        self.reason = reason
        if self.path is None:
            where = f"event {line}" if line is not None else "click log"
        else:
            where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True, slots=True)
class ClickEvent:
    """One document shown on one result page, and whether it was clicked.

    `impression` is False for a document that was on the page but reported as never rendered
    (below the fold, say): it is kept for bookkeeping, but models treat its position as empty.
    A click without an impression is an error.
    """

    query: str
    doc_id: str
    position: int  # 1-based rank on the page
    impression: bool
    click: bool
    timestamp: float  # unix seconds
    session_id: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(eq=False)
class ClickLog:
    """Sessions as matrices: row `s` is one result page, column `r` is position `r + 1`.

    `docs` holds -1 where a page had no document; `mask` is True where a document was shown
    (an impression), and only those cells count for fitting and evaluation. Query and document
    strings live once in the vocabularies `query_ids` and `doc_ids`.
    """

    query_ids: list[str]
    doc_ids: list[str]
    queries: np.ndarray  # int64 (n_sessions,): index into query_ids
    docs: np.ndarray  # int64 (n_sessions, n_positions): index into doc_ids, -1 for none
    clicks: np.ndarray  # bool (n_sessions, n_positions)
    mask: np.ndarray  # bool (n_sessions, n_positions): shown
    session_ids: list[str]
    timestamps: np.ndarray = field(default=None)  # float64 (n_sessions, n_positions); 0 when unknown

    def __post_init__(self) -> None:
        self.queries = np.asarray(self.queries, dtype=np.int64)
        self.docs = np.asarray(self.docs, dtype=np.int64)
        self.clicks = np.asarray(self.clicks, dtype=bool)
        self.mask = np.asarray(self.mask, dtype=bool)
        if self.timestamps is None:
            self.timestamps = np.zeros(self.docs.shape, dtype=np.float64)
        self.timestamps = np.asarray(self.timestamps, dtype=np.float64)
        if self.docs.ndim != 2:
            raise ValueError(f"docs must be a 2-d array (sessions x positions), got shape {self.docs.shape}")
        n, r = self.docs.shape
        for name in ("clicks", "mask", "timestamps"):
            if getattr(self, name).shape != (n, r):
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected {(n, r)}")
        if self.queries.shape != (n,):
            raise ValueError(f"queries has shape {self.queries.shape}, expected {(n,)}")
        if len(self.session_ids) != n:
            raise ValueError(f"{len(self.session_ids)} session ids for {n} sessions")
        if n and (self.queries.min() < 0 or self.queries.max() >= len(self.query_ids)):
            raise ValueError("query index out of range of query_ids")
        if self.docs.size and self.docs.max() >= len(self.doc_ids):
            raise ValueError("doc index out of range of doc_ids")
        if np.any(self.mask & (self.docs < 0)):
            raise ValueError("a shown position has no document")
        if np.any(self.clicks & ~self.mask):
            raise ValueError("a click on a position that was not shown")

    @property
    def n_sessions(self) -> int:
        return int(self.docs.shape[0])

    @property
    def n_positions(self) -> int:
        return int(self.docs.shape[1])

    @property
    def n_clicks(self) -> int:
        return int(self.clicks.sum())

    @cached_property
    def pair_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Distinct shown (query, doc) pairs: `(pair_query, pair_doc, cell_pair)`.

        `cell_pair[s, r]` is the pair shown in that cell, -1 where nothing was shown. Models
        fit one parameter per pair, so this is computed once per log.
        """
        codes = self.queries[:, None] * max(len(self.doc_ids), 1) + self.docs
        unique, inverse = np.unique(codes[self.mask], return_inverse=True)
        cell_pair = np.full(self.docs.shape, -1, dtype=np.int64)
        cell_pair[self.mask] = inverse.ravel()
        n_docs = max(len(self.doc_ids), 1)
        return unique // n_docs, unique % n_docs, cell_pair

    def pair_keys(self) -> list[tuple[str, str]]:
        """The (query, doc) strings of `pair_index`, in its order."""
        pair_query, pair_doc, _ = self.pair_index
        return [(self.query_ids[q], self.doc_ids[d]) for q, d in zip(pair_query.tolist(), pair_doc.tolist())]

    def subset(self, sessions: np.ndarray | Sequence[int]) -> "ClickLog":
        """The given sessions (indices or a boolean mask), sharing the vocabularies."""
        index = np.arange(self.n_sessions)[np.asarray(sessions)]
        return ClickLog(
            query_ids=self.query_ids,
            doc_ids=self.doc_ids,
            queries=self.queries[index],
            docs=self.docs[index],
            clicks=self.clicks[index],
            mask=self.mask[index],
            session_ids=[self.session_ids[i] for i in index.tolist()],
            timestamps=self.timestamps[index],
        )

    def split_by_time(self, test_fraction: float) -> tuple["ClickLog", "ClickLog"]:
        """(train, test): the latest `test_fraction` of sessions by start time are the test set.

        A time split, not a random one, because that is how a click model is used: fitted on
        yesterday's log and asked about tomorrow's.
        """
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test fraction must be in (0, 1), got {test_fraction}")
        starts = np.where(self.mask, self.timestamps, np.inf).min(axis=1)
        order = np.argsort(starts, kind="stable")
        n_test = int(round(self.n_sessions * test_fraction))
        if n_test == 0 or n_test == self.n_sessions:
            raise ValueError(f"cannot split {self.n_sessions} sessions with test fraction {test_fraction}")
        return self.subset(np.sort(order[:-n_test])), self.subset(np.sort(order[-n_test:]))

    @classmethod
    def from_events(cls, events: Iterable[ClickEvent], n_positions: int | None = None) -> "ClickLog":
        """Group events by `session_id` (in order of first appearance) and place them by position.

        Errors name the event's 0-based index in the sequence; `read_events_jsonl` names lines.
        """
        return _events_to_log(list(events), n_positions, lambda i: (None, i))

    def to_events(self) -> list[ClickEvent]:
        """One event per document on each page (shown or not), sessions in order, by position."""
        events: list[ClickEvent] = []
        docs = self.docs.tolist()
        clicks = self.clicks.tolist()
        mask = self.mask.tolist()
        stamps = self.timestamps.tolist()
        for s, query_index in enumerate(self.queries.tolist()):
            query = self.query_ids[query_index]
            session = self.session_ids[s]
            for r, doc in enumerate(docs[s]):
                if doc < 0:
                    continue
                events.append(ClickEvent(query, self.doc_ids[doc], r + 1, mask[s][r], clicks[s][r], stamps[s][r], session))
        return events


# ---------------------------------------------------------------------------------------------
# Events -> ClickLog


def _events_to_log(
    events: list[ClickEvent],
    n_positions: int | None,
    where: Callable[[int], tuple[str | None, int]],
) -> ClickLog:
    """Shared by `from_events` and the JSONL reader; `where(i)` locates event i for errors."""

    def fail(i: int, reason: str) -> ClickLogError:
        path, line = where(i)
        return ClickLogError(path, line, reason)

    if not events:
        path, _ = where(0)
        raise ClickLogError(path, None, "no click events")
    query_index: dict[str, int] = {}
    doc_index: dict[str, int] = {}
    session_index: dict[str, int] = {}
    session_query: list[int] = []
    session_first: list[int] = []
    rows: list[int] = []
    seen: dict[tuple[int, int], int] = {}
    for i, event in enumerate(events):
        if event.position < 1 or event.position > MAX_POSITIONS:
            raise fail(i, f"position must be between 1 and {MAX_POSITIONS}, got {event.position}")
        if event.click and not event.impression:
            raise fail(i, "click on a document without an impression")
        q = query_index.setdefault(event.query, len(query_index))
        s = session_index.get(event.session_id)
        if s is None:
            s = session_index[event.session_id] = len(session_index)
            session_query.append(q)
            session_first.append(i)
        elif session_query[s] != q:
            first = session_first[s]
            raise fail(i, f"session '{event.session_id}' has query '{event.query}' but its first event ({_describe(where(first))}) has query '{events[first].query}'")
        key = (s, event.position)
        if key in seen:
            raise fail(i, f"session '{event.session_id}' has two documents at position {event.position} (first: {_describe(where(seen[key]))})")
        seen[key] = i
        doc_index.setdefault(event.doc_id, len(doc_index))
        rows.append(s)

    deepest = max(event.position for event in events)
    if n_positions is None:
        n_positions = deepest
    elif deepest > n_positions:
        raise ValueError(f"an event has position {deepest}, beyond n_positions={n_positions}")
    n_sessions = len(session_index)
    docs = np.full((n_sessions, n_positions), -1, dtype=np.int64)
    clicks = np.zeros((n_sessions, n_positions), dtype=bool)
    mask = np.zeros((n_sessions, n_positions), dtype=bool)
    stamps = np.zeros((n_sessions, n_positions), dtype=np.float64)
    row = np.asarray(rows, dtype=np.int64)
    col = np.fromiter((e.position - 1 for e in events), dtype=np.int64, count=len(events))
    docs[row, col] = np.fromiter((doc_index[e.doc_id] for e in events), dtype=np.int64, count=len(events))
    clicks[row, col] = np.fromiter((e.click for e in events), dtype=bool, count=len(events))
    mask[row, col] = np.fromiter((e.impression for e in events), dtype=bool, count=len(events))
    stamps[row, col] = np.fromiter((e.timestamp for e in events), dtype=np.float64, count=len(events))
    return ClickLog(
        query_ids=list(query_index),
        doc_ids=list(doc_index),
        queries=np.asarray(session_query, dtype=np.int64),
        docs=docs,
        clicks=clicks,
        mask=mask,
        session_ids=list(session_index),
        timestamps=stamps,
    )


def _describe(location: tuple[str | None, int]) -> str:
    path, index = location
    return f"event {index}" if path is None else f"line {index}"


# ---------------------------------------------------------------------------------------------
# JSONL events


def write_events_jsonl(events: Iterable[ClickEvent], path: Path | str) -> int:
    """One JSON object per line, fields in schema order; returns the number written."""
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for event in events:
            handle.write(json.dumps(event.to_dict(), ensure_ascii=False) + "\n")
            count += 1
    return count


def parse_event(record: Any) -> ClickEvent:
    """Validate one decoded JSON value; raises ValueError naming the field. Unknown fields are
    errors too: a misspelt `clicked` must not silently read as no click."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {json_type_name(record)}")
    for name in EVENT_FIELDS:
        if name not in record:
            raise ValueError(f"field '{name}': missing")
    extra = sorted(set(record) - set(EVENT_FIELDS))
    if extra:
        raise ValueError(f"field '{extra[0]}': unknown field (expected {', '.join(EVENT_FIELDS)})")
    for name in ("query", "doc_id", "session_id"):
        value = record[name]
        if not isinstance(value, str):
            raise ValueError(f"field '{name}': must be a string, got {json_type_name(value)}")
        if not value:
            raise ValueError(f"field '{name}': is empty")
    position = record["position"]
    if isinstance(position, bool) or not isinstance(position, int):
        raise ValueError(f"field 'position': must be an integer, got {json_type_name(position)}")
    if not 1 <= position <= MAX_POSITIONS:
        raise ValueError(f"field 'position': must be between 1 and {MAX_POSITIONS}, got {position}")
    for name in ("impression", "click"):
        if not isinstance(record[name], bool):
            raise ValueError(f"field '{name}': must be true or false, got {json_type_name(record[name])}")
    stamp = record["timestamp"]
    if isinstance(stamp, bool) or not isinstance(stamp, (int, float)) or not math.isfinite(stamp):
        raise ValueError(f"field 'timestamp': must be a finite number of unix seconds, got {json_type_name(stamp)}")
    if record["click"] and not record["impression"]:
        raise ValueError("field 'click': true without an impression")
    return ClickEvent(
        query=record["query"],
        doc_id=record["doc_id"],
        position=position,
        impression=record["impression"],
        click=record["click"],
        timestamp=float(stamp),
        session_id=record["session_id"],
    )


def read_events_jsonl(path: Path | str) -> list[ClickEvent]:
    """All events of a JSONL file; the first bad line raises `ClickLogError` (file:line: field)."""
    path = Path(path)
    events, _ = _read_events_with_lines(path)
    return events


def read_click_log_jsonl(path: Path | str, n_positions: int | None = None) -> ClickLog:
    """A JSONL event file as a ClickLog; session conflicts name the offending line."""
    path = Path(path)
    events, lines = _read_events_with_lines(path)
    return _events_to_log(events, n_positions, lambda i: (str(path), lines[i] if i < len(lines) else None))


def _read_events_with_lines(path: Path) -> tuple[list[ClickEvent], list[int]]:
    if not path.is_file():
        raise ClickLogError(path, None, "no such file")
    events: list[ClickEvent] = []
    lines: list[int] = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ClickLogError(path, number, f"invalid UTF-8 at byte {exc.start}") from None
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ClickLogError(path, number, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
            try:
                events.append(parse_event(record))
            except ValueError as exc:
                raise ClickLogError(path, number, str(exc)) from None
            lines.append(number)
    if not events:
        raise ClickLogError(path, None, "no click events")
    return events, lines


# ---------------------------------------------------------------------------------------------
# Yandex WSCD 2012 sample


def resolve_yandex_file(path: Path | str) -> Path:
    """The dataset folder resolves to its `clicks.tsv.gz`; a file is taken as is."""
    path = Path(path)
    if path.is_dir():
        path = path / YANDEX_FILE
    if not path.is_file():
        raise ClickLogError(path, None, "no such file (expected the Yandex sample folder or its clicks.tsv.gz)")
    return path


def read_yandex_clicks(path: Path | str, split: str) -> ClickLog:
    """One split ('train' or 'test') of the Yandex WSCD 2012 sample as a ClickLog."""
    return read_yandex_splits(path, [split])[split]


def read_yandex_splits(path: Path | str, splits: Sequence[str]) -> dict[str, ClickLog]:
    """Several splits in one pass over the file (it holds all of them).

    Every line is validated, whichever split it belongs to: eight tab-separated columns,
    integers where integers belong, `clicked` 0/1 and consistent with `n_clicks` and
    `first_click_order`, a session's rows contiguous with one query and distinct positions.
    Session ids are `<split>-<session_idx>`; the sample has no times, so timestamps are 0.
    """
    file = resolve_yandex_file(path)
    wanted = list(dict.fromkeys(splits))
    if not wanted:
        raise ValueError("no split requested")
    opener = gzip.open if file.name.endswith(".gz") else open
    builders = {name: _SplitBuilder() for name in wanted}
    present: dict[str, int] = {}
    finished: dict[tuple[str, int], int] = {}
    current_key: tuple[str, int] | None = None
    current_start = 0
    current_query = ""
    current_positions: set[int] = set()
    try:
        with opener(file, "rt", encoding="utf-8", newline="") as handle:
            header = handle.readline().rstrip("\r\n")
            if tuple(header.split("\t")) != YANDEX_COLUMNS:
                raise ClickLogError(file, 1, f"header must be {' '.join(YANDEX_COLUMNS)} (tab-separated), got {header[:120]!r}")
            for number, line in enumerate(handle, start=2):
                line = line.rstrip("\r\n")
                if not line:
                    continue
                parts = line.split("\t")
                if len(parts) != len(YANDEX_COLUMNS):
                    raise ClickLogError(file, number, f"expected {len(YANDEX_COLUMNS)} tab-separated columns, got {len(parts)}")
                split, session_text, query, position_text, doc, clicked_text, order_text, n_clicks_text = parts
                if not split:
                    raise ClickLogError(file, number, "column 'split' is empty")
                session_idx = _int_column(file, number, "session_idx", session_text, 1)
                position = _int_column(file, number, "position", position_text, 1, MAX_POSITIONS)
                clicked = _int_column(file, number, "clicked", clicked_text, 0, 1)
                order = _int_column(file, number, "first_click_order", order_text, 0)
                n_clicks = _int_column(file, number, "n_clicks", n_clicks_text, 0)
                if not query:
                    raise ClickLogError(file, number, "column 'query_key' is empty")
                if not doc:
                    raise ClickLogError(file, number, "column 'doc_id' is empty")
                if (n_clicks > 0) != bool(clicked) or (order > 0) != bool(clicked):
                    raise ClickLogError(file, number, f"clicked={clicked} disagrees with n_clicks={n_clicks} / first_click_order={order}")
                present.setdefault(split, number)
                key = (split, session_idx)
                if key != current_key:
                    if current_key is not None:
                        finished[current_key] = current_start
                    if key in finished:
                        raise ClickLogError(file, number, f"session {session_idx} of split '{split}' continues after other sessions (it started on line {finished[key]})")
                    current_key, current_start, current_query = key, number, query
                    current_positions = set()
                    if split in builders:
                        builders[split].start_session(f"{split}-{session_idx}", query)
                elif query != current_query:
                    raise ClickLogError(file, number, f"session {session_idx} of split '{split}' has query '{query}' but started with '{current_query}' on line {current_start}")
                if position in current_positions:
                    raise ClickLogError(file, number, f"session {session_idx} of split '{split}' has position {position} twice")
                current_positions.add(position)
                if split in builders:
                    builders[split].add(position, doc, bool(clicked))
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ClickLogError(file, None, f"cannot read: {exc}") from None
    missing = [name for name in wanted if name not in present]
    if missing:
        known = ", ".join(f"'{name}'" for name in present) or "none"
        raise ClickLogError(file, None, f"unknown split '{missing[0]}' (the file has {known})")
    return {name: builders[name].build() for name in wanted}


class _SplitBuilder:
    """Collects the rows of one split as flat lists; `build` lays them out as matrices."""

    def __init__(self) -> None:
        self.query_index: dict[str, int] = {}
        self.doc_index: dict[str, int] = {}
        self.session_ids: list[str] = []
        self.session_queries: list[int] = []
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.docs: list[int] = []
        self.clicks: list[bool] = []

    def start_session(self, session_id: str, query: str) -> None:
        self.session_ids.append(session_id)
        self.session_queries.append(self.query_index.setdefault(query, len(self.query_index)))

    def add(self, position: int, doc: str, clicked: bool) -> None:
        self.rows.append(len(self.session_ids) - 1)
        self.cols.append(position - 1)
        self.docs.append(self.doc_index.setdefault(doc, len(self.doc_index)))
        self.clicks.append(clicked)

    def build(self) -> ClickLog:
        n_positions = max(self.cols) + 1
        shape = (len(self.session_ids), n_positions)
        docs = np.full(shape, -1, dtype=np.int64)
        clicks = np.zeros(shape, dtype=bool)
        mask = np.zeros(shape, dtype=bool)
        rows, cols = np.asarray(self.rows), np.asarray(self.cols)
        docs[rows, cols] = self.docs
        clicks[rows, cols] = self.clicks
        mask[rows, cols] = True
        return ClickLog(
            query_ids=list(self.query_index),
            doc_ids=list(self.doc_index),
            queries=np.asarray(self.session_queries, dtype=np.int64),
            docs=docs,
            clicks=clicks,
            mask=mask,
            session_ids=self.session_ids,
        )


def _int_column(file: Path, line: int, name: str, text: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ClickLogError(file, line, f"column '{name}' must be an integer, got {text[:40]!r}") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ClickLogError(file, line, f"column '{name}' must be {bound}, got {value}")
    return value


def read_click_log(path: Path | str, split: str | None = None) -> ClickLog:
    """A Yandex-style `.tsv(.gz)` table (or its folder) with a split, or a JSONL event file."""
    path = Path(path)
    if path.is_dir() or path.name.endswith((".tsv", ".tsv.gz")):
        if split is None:
            raise ValueError(f"{path}: a click table needs a split (e.g. 'train')")
        return read_yandex_clicks(path, split)
    if split is not None:
        raise ValueError(f"{path}: a JSONL event file has no splits (got split '{split}')")
    return read_click_log_jsonl(path)
