"""Point-in-time behaviour features: a training row never sees an event received after its request."""
from __future__ import annotations

import time

import numpy as np

from ltr.behaviour import BehaviourStore
from search.event_store import Event, EventStore, ServedRequest, ServedResult
from ltr.features import feature_set
from ltr.point_in_time import point_in_time_rows, training_moments
from ltr.ranker import LtrPipeline
from ltr.training import candidate_window
from search.hybrid import FusionSettings

WINDOW = FusionSettings(bm25_candidates=3, dense_candidates=3)
QUERY = "dogs chase cats in the garden"
BEHAVIOUR = feature_set("text+behaviour")


def _serve(events: EventStore, request_id: str, docs: list[str], query: str = QUERY) -> float:
    served_at = time.time()
    events.log_request(ServedRequest(request_id, served_at, query, "ltr", "fd", "g", None, None, None, 0,
                                     [ServedResult(d, p, 1.0) for p, d in enumerate(docs, start=1)]))
    time.sleep(0.02)  # the click is received strictly after the page was served
    return served_at


def _column(rows, name: str) -> np.ndarray:
    return rows.features[:, BEHAVIOUR.names.index(name)]


def test_rows_see_only_events_received_before_their_request(dense_index, tmp_path):
    window = candidate_window(dense_index, QUERY, WINDOW)
    a, b = window.doc_ids[:2]
    events = EventStore(tmp_path / "events.sqlite3")
    _serve(events, "r1", [a, b])
    events.append_events([Event("r1", "click", a, 1, time.time())])
    time.sleep(0.02)
    _serve(events, "r2", [a, b])
    events.append_events([Event("r2", "click", b, 2, time.time())])

    moments = training_moments(events, {"q1": QUERY}, moments_per_query=5)
    assert [m.timestamp is None for m in moments] == [True, False, False]  # cold, then the two requests in time order
    rows = point_in_time_rows(dense_index, {"q1": QUERY}, {"q1": {a: 1}}, BEHAVIOUR,
                              lambda text: candidate_window(dense_index, text, WINDOW), events, None, moments_per_query=5)
    n = len(window)
    assert rows.query_ids == ["q1"] * 3 and rows.group_sizes.tolist() == [n, n, n]
    clicks = _column(rows, "qd_clicks").reshape(3, n)
    impressions = _column(rows, "qd_impressions").reshape(3, n)
    row_of = {d: i for i, d in enumerate(rows.doc_ids[:n])}
    assert clicks[0].sum() == 0 and impressions[0].sum() == 0  # cold
    assert clicks[1].sum() == 0 and impressions[1].sum() == 0  # at r1: its own click came later
    assert clicks[2][row_of[a]] == 1 and clicks[2][row_of[b]] == 0  # at r2: r1's click, not r2's
    assert impressions[2][row_of[a]] == 1
    assert rows.labels.reshape(3, n)[:, row_of[a]].tolist() == [1, 1, 1]
    # the live store, read now, has both clicks
    live = BehaviourStore(tmp_path / "behaviour.sqlite3")
    live.update(events)
    assert live.query_doc_stats(QUERY, [a, b])["clicks"].tolist() == [1, 1]


def test_text_windows_are_cached_and_behaviour_windows_read_the_live_store(dense_index, tmp_path):
    from ltr.training import TrainingSettings, build_rows
    from ltr.ranker import InMemoryModel
    from ltr.training import train_ranker

    queries = {"q1": QUERY, "q2": "quantum theory photons"}
    qrels = {"q1": {candidate_window(dense_index, QUERY, WINDOW).doc_ids[0]: 1},
             "q2": {candidate_window(dense_index, queries["q2"], WINDOW).doc_ids[0]: 1}}
    settings = TrainingSettings(max_rounds=5, valid_fraction=0.0)
    text = feature_set("text")
    model = InMemoryModel(train_ranker(build_rows(dense_index, queries, qrels, text, WINDOW), text.names, settings))
    pipeline = LtrPipeline(dense_index, model, text, WINDOW)
    first, second = pipeline.rank_window(QUERY), pipeline.rank_window(QUERY)
    assert "cached" not in first.timings_ms and second.timings_ms == {"cached": 0.0}
    assert second.scores.tobytes() == first.scores.tobytes() and [h.doc_id for h in second.hits] == [h.doc_id for h in first.hits]

    events = EventStore(tmp_path / "events.sqlite3")
    store = BehaviourStore(tmp_path / "behaviour.sqlite3")
    rows = build_rows(dense_index, queries, qrels, BEHAVIOUR, WINDOW)
    behaviour_model = InMemoryModel(train_ranker(rows, BEHAVIOUR.names, settings))
    learned = LtrPipeline(dense_index, behaviour_model, BEHAVIOUR, WINDOW, behaviour=store)
    before = learned.rank_window(QUERY)
    doc = before.hits[0].doc_id
    _serve(events, "r1", [doc])
    events.append_events([Event("r1", "click", doc, 1, time.time())])
    store.update(events)
    after = learned.rank_window(QUERY)
    column = BEHAVIOUR.names.index("qd_clicks")
    assert before.features[0, column] == 0 and after.features[0, column] == 1
    assert "cached" not in after.timings_ms
