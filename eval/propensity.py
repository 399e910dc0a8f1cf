"""Position-bias propensities for an index's behaviour store, fitted on its request log.

Examination per position comes from pages that exploration shuffled when there are enough of
them (no model needed), else from a position-based click model (PBM) fitted by EM. The store
keeps the result as data; behaviour features and click training read it from there."""
from __future__ import annotations

import time

import numpy as np

from eval.click_log import ClickEvent, ClickLog
from eval.click_models import PositionBasedModel
from ltr.behaviour import MIN_RANDOMISED_PAGES, BehaviourStore, PropensityFit, normalise_query
from search.event_store import EventStore


def fit_propensities(store: BehaviourStore, event_store: EventStore, max_position: int = 10) -> PropensityFit:
    """Fit PBM examination per position on the request log: each served request is a session
    of its results at positions <= max_position (all taken as shown), clicked or not. Scaled
    so position 1 = 1.0 and stored with the fit time."""
    clicked: set[tuple[str, int]] = {(e.request_id, e.position) for e in event_store.iter_events(types=["click"])}
    events: list[ClickEvent] = []
    sessions = n_clicks = explored = 0
    for request in event_store.iter_requests():
        shown = [r for r in request.results if r.position <= max_position]
        if not shown:
            continue
        sessions += 1
        query = normalise_query(request.query)
        for r in shown:
            click = (request.request_id, r.position) in clicked
            n_clicks += click
            explored += r.propensity < 1.0
            events.append(ClickEvent(query, r.doc_id, r.position, True, click, request.timestamp, request.request_id))
    if not events:
        raise ValueError("cannot fit propensities: the request log has no served results")
    randomised = _randomised_click_rates(event_store, clicked, max_position)
    if randomised is not None and randomised[1] >= MIN_RANDOMISED_PAGES:
        rates, pages = randomised
        gamma, method = rates / rates[0], "randomised"
    else:
        model = PositionBasedModel().fit(ClickLog.from_events(events, n_positions=max_position))
        gamma, method, pages = model.examination / model.examination[0], "pbm-em", 0 if randomised is None else randomised[1]
    values = [float(min(max(g, 1e-6), 1.0)) for g in gamma]
    fitted_at = time.time()
    store.set_propensities(values, fitted_at)
    return PropensityFit(values, fitted_at, sessions, n_clicks, explored, method, pages)


def _randomised_click_rates(event_store: EventStore, clicked: set[tuple[str, int]],
                            max_position: int) -> tuple[np.ndarray, int] | None:
    """Click-through rate per position over the pages exploration shuffled (RandTop-n).

    On a shuffled page every document is equally likely at every position, so the expected click
    rate at position k is examination(k) times the mean attractiveness of the page's documents:
    the rates are proportional to the examination curve, with no model to fit (Wang et al. 2016).
    A shuffled page is one whose results at positions 1..n all have a propensity below 1 and at
    least one moved (propensity <= 1/n): `search.rules.shuffle_page` logs exactly that. Only full
    pages of `max_position` results from offset 0 count. None when there is no such page or no
    click at position 1."""
    clicks = np.zeros(max_position)
    pages = 0
    for request in event_store.iter_requests():
        shown = sorted((r for r in request.results if r.position <= max_position), key=lambda r: r.position)
        if request.page_offset != 0 or len(shown) != max_position:
            continue
        propensity = np.array([r.propensity for r in shown])
        if not ((propensity < 1.0).all() and propensity.min() <= 1.0 / max_position + 1e-12):
            continue
        pages += 1
        for r in shown:
            clicks[r.position - 1] += (request.request_id, r.position) in clicked
    if not pages or clicks[0] == 0:
        return None
    return clicks / pages, pages
