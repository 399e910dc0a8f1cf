"""Event store schema version 1 -> 2 (the request flags `explored` and `interleaved`): a real
version-1 file, written with the version-1 schema, is migrated in place on open, keeps every row,
gets the flags inferred from its propensities, and a migration that fails half-way leaves the file
at version 1, untouched."""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

import search.event_store as event_store
from search.event_store import (
    APPLICATION_ID, SCHEMA_VERSION, Event, EventStore, EventStoreError, ServedRequest, ServedResult,
    explored_from_propensities,
)

# The version-1 schema as it shipped (frozen history: never edit).
V1_SCHEMA = (
    """CREATE TABLE requests (seq INTEGER PRIMARY KEY, request_id TEXT NOT NULL UNIQUE, timestamp REAL NOT NULL,
       query TEXT NOT NULL, pipeline TEXT NOT NULL, index_name TEXT NOT NULL, index_generation TEXT NOT NULL,
       model_version TEXT, user_id TEXT, session_id TEXT, page_offset INTEGER NOT NULL CHECK (page_offset >= 0),
       n_results INTEGER NOT NULL CHECK (n_results >= 0))""",
    "CREATE INDEX requests_by_time ON requests (timestamp, seq)",
    """CREATE TABLE request_results (request_seq INTEGER NOT NULL REFERENCES requests (seq),
       position INTEGER NOT NULL CHECK (position >= 1), doc_id TEXT NOT NULL, score REAL NOT NULL,
       propensity REAL NOT NULL CHECK (propensity > 0 AND propensity <= 1), features TEXT,
       PRIMARY KEY (request_seq, position)) WITHOUT ROWID""",
    """CREATE TABLE events (seq INTEGER PRIMARY KEY, event_id TEXT UNIQUE, request_seq INTEGER NOT NULL,
       position INTEGER NOT NULL, type TEXT NOT NULL CHECK (type IN ('impression', 'click', 'dwell')),
       doc_id TEXT NOT NULL, timestamp REAL NOT NULL,
       dwell_ms REAL CHECK ((type = 'dwell') = (dwell_ms IS NOT NULL)), received_at REAL NOT NULL,
       FOREIGN KEY (request_seq, position) REFERENCES request_results (request_seq, position))""",
    "CREATE INDEX events_by_time ON events (timestamp, seq)",
    "CREATE INDEX events_by_request ON events (request_seq, position)",
)
T0 = time.time() - 3600.0
STAY, MOVED = 0.9 + 0.1 * (1 - 1 / 7), 0.1 / (7 * 90)  # swap exploration, epsilon 0.1, 7 slots, 90 deep

PAGES = {  # request id -> (pipeline, propensities of positions 1..10)
    "plain": ("hybrid-convex", [1.0] * 10),
    "eligible": ("hybrid-convex", [1.0] * 3 + [STAY] * 7),  # could have been explored, was not
    "swapped": ("bm25", [1.0] * 3 + [STAY] * 3 + [MOVED] + [STAY] * 3),
    "model": ("ltr", [1.0] * 10),
}


def write_v1(path: Path) -> None:
    raw = sqlite3.connect(path)
    for statement in V1_SCHEMA:
        raw.execute(statement)
    raw.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    raw.execute("PRAGMA user_version = 1")
    for seq, (request_id, (pipeline, propensities)) in enumerate(PAGES.items(), start=1):
        raw.execute("INSERT INTO requests VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (seq, request_id, T0 + seq, "vitamin d", pipeline, "scifact", "g000001",
                     "m0001" if pipeline == "ltr" else None, None, None, 0, 10))
        raw.executemany("INSERT INTO request_results VALUES (?,?,?,?,?,?)",
                        [(seq, p + 1, f"d{p + 1}", 10.0 - p, q, None) for p, q in enumerate(propensities)])
    raw.execute("INSERT INTO events VALUES (1, 'e1', 3, 7, 'click', 'd7', ?, NULL, ?)", (T0 + 10, T0 + 10))
    raw.commit()
    raw.close()


def version(path: Path) -> int:
    raw = sqlite3.connect(path)
    try:
        return raw.execute("PRAGMA user_version").fetchone()[0]
    finally:
        raw.close()


def test_a_version_1_store_is_migrated_in_place_and_keeps_every_row(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    write_v1(path)
    assert SCHEMA_VERSION == 2
    with EventStore(path) as store:
        requests = {r.request_id: r for r in store.iter_requests()}
        assert list(requests) == list(PAGES)
        assert {k: r.explored for k, r in requests.items()} == {"plain": False, "eligible": False, "swapped": True,
                                                                  "model": False}
        # experiments only ran on ltr pages: the others were certainly not interleaved; old ltr pages: unknown
        assert {k: r.interleaved for k, r in requests.items()} == {"plain": False, "eligible": False,
                                                                     "swapped": False, "model": None}
        assert [r.propensity for r in requests["swapped"].results] == PAGES["swapped"][1]
        assert [(e.request_id, e.position) for e in store.iter_events()] == [("swapped", 7)]
        # the migrated store takes new rows with the flags, and events against old requests
        store.log_request(ServedRequest("new", T0 + 20, "q", "ltr", "scifact", "g000001", "m0002", None, None, 0,
                                        [ServedResult("d1", 1, 1.0)], explored=False, interleaved=True))
        store.append_events([Event("plain", "click", "d1", 1, T0 + 30)])
        assert store.get_request("new").interleaved is True
    assert version(path) == SCHEMA_VERSION
    with EventStore(path) as again:  # a second open finds version 2: nothing to do
        assert len(list(again.iter_requests())) == 5
        assert again.count_events()["click"] == 2


def test_a_migration_that_fails_half_way_leaves_version_1_untouched(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "events.sqlite3"
    write_v1(path)
    real = event_store._migrate_1_to_2

    def crash_after_altering(connection: sqlite3.Connection) -> None:
        real(connection)
        raise sqlite3.OperationalError("disk I/O error (simulated)")

    monkeypatch.setattr(event_store, "_migrate_1_to_2", crash_after_altering)
    with pytest.raises(EventStoreError, match="cannot migrate the event store to schema version 2"):
        EventStore(path)
    assert version(path) == 1
    raw = sqlite3.connect(path)
    columns = [row[1] for row in raw.execute("PRAGMA table_info(requests)")]
    raw.close()
    assert "explored" not in columns and "interleaved" not in columns
    monkeypatch.setattr(event_store, "_migrate_1_to_2", real)
    with EventStore(path) as store:  # the next open migrates it
        assert store.get_request("swapped").explored is True


def test_new_stores_are_created_at_the_current_version_with_the_flags(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite3"
    with EventStore(path) as store:
        store.log_request(ServedRequest("r", T0, "q", "bm25", "i", "g", None, None, None, 0,
                                        [ServedResult("d1", 1, 1.0, STAY), ServedResult("d2", 2, 0.5, MOVED)]))
        read = store.get_request("r")
        assert read.explored is None and read.was_explored  # not logged: inferred from the propensities
    assert version(path) == SCHEMA_VERSION


@pytest.mark.parametrize("propensities,explored", [
    ([1.0] * 10, False),
    ([1.0] * 3 + [STAY] * 7, False),
    ([1.0] * 3 + [STAY] * 6 + [MOVED], True),
    ([0.91] * 10, False),  # shuffle exploration eligible, not drawn (stay = 0.9 + 0.1 / 10)
    ([0.91] * 8 + [0.01] * 2, True),  # shuffled, two results moved
    ([0.01] * 10, True),  # shuffled, every result moved
])
def test_explored_is_inferred_from_the_propensities_of_both_exploration_modes(propensities, explored) -> None:
    assert explored_from_propensities(propensities) is explored
