"""POST /events: impressions, clicks and dwell, validated against the request log and stored.

A store that refuses writes (read-only, disk full, locked past every retry) answers 503 with the
reason and Retry-After: nothing was stored, the client may resend the batch (event ids dedupe it).
"""
from __future__ import annotations

import logging
import time

from fastapi import APIRouter

from search.app.deps import AggregatesDep, EventStoreDep, MetricsDep
from search.app.errors import STORE_ERRORS, ApiError
from search.app.schemas import EventBatch, EventsAccepted
from search.event_store import Event, ValidationError

logger = logging.getLogger("ltr_search.service")
router = APIRouter(tags=["events"])


@router.post("/events", response_model=EventsAccepted)
def post_events(batch: EventBatch, store: EventStoreDep, aggregates: AggregatesDep, metrics: MetricsDep) -> EventsAccepted:
    now = time.time()
    events = [
        Event(request_id=e.request_id, type=e.type, doc_id=e.doc_id, position=e.position,
              timestamp=now if e.timestamp is None else e.timestamp, dwell_ms=e.dwell_ms, event_id=e.event_id)
        for e in batch.events
    ]
    try:
        result = store.append_events(events)
    except ValidationError as exc:
        details = [{"field": p.split(": ", 1)[0], "reason": p.split(": ", 1)[-1]} for p in exc.problems]
        raise ApiError(422, "invalid_events", f"{len(exc.problems)} problem(s); nothing was stored", details) from None
    except STORE_ERRORS as exc:
        logger.error("event store refused a batch of %d events: %s", len(events), exc)
        metrics.store_failed("events", exc)
        raise ApiError(503, "store_unavailable", f"the event store cannot take writes ({exc}); nothing was stored, "
                       "retry later", headers={"Retry-After": "5"}) from None
    metrics.store_ok("events")
    for event in events:
        metrics.events.labels(event.type).inc()
    try:  # the events are stored (the source of truth); aggregates follow them, never the reverse
        aggregates.update(store)
    except Exception:
        logger.exception("behaviour aggregates not updated; they catch up on the next batch")
        metrics.behaviour_failures.inc()
    return EventsAccepted(stored=result.stored, duplicates=result.duplicates)
