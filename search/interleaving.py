"""Interleaving: one page mixes two rankers' results, and each click is credited to one of them.
Two methods; optimized interleaving is the service's default because it decides with the fewest
sessions (bench/bench_interleaving.py, simulated users: on two SciFact pairs of rankers 1/2 and
1/4 of team draft's sessions, and 11-19x fewer than an A/B test on clicks@10; fewer than team
draft on three NFCorpus pairs too).

Optimized interleaving (Radlinski & Craswell, "Optimized interleaving for online retrieval
evaluation", WSDM 2013): the top 10 of the page is drawn from every list whose each document is
the highest-ranked one of A or of B not yet shown, with probabilities that make the expected
credit zero at every rank (a user who clicks without regard to the documents prefers neither)
and show the rankings' disagreements as high as possible. A click on document d credits A with
1/rank_A(d) - 1/rank_B(d), so a document both rank alike earns nothing and one only A puts on
top earns nearly 1. Sessions are compared by their summed credit with a t-test (the credit is
fair in the mean, not in its sign).

Team-draft interleaving (Radlinski, Kurup & Joachims, "How does clickthrough data reflect
retrieval quality?", CIKM 2008): each click is credited to the team (ranker) that contributed
the clicked document; sessions are compared by which team got more clicks (a sign test).

Like captains picking players: in each round a fair coin decides which team picks first, then
each team in turn adds its highest-ranked document not already on the page. Written as the paper
does, one pick at a time: the team with fewer picks picks next, and a coin breaks the tie. Each
team's documents keep the relative order of its own ranking, the team sizes differ by at most one
at every prefix of the drafted part of the page, and neither ranker is favoured in expectation.

The common prefix is shared, not drafted. Where both rankings put the same documents at the same
ranks from rank 1 down (until their first disagreement), those documents open every interleaved
page in that order whatever the coins, yet plain team draft hands each to a random team: clicks
on them say nothing about which ranker is better and only add noise to the credit. They are
labelled TEAM_SHARED ("=") and credited to neither team; the draft (and its coins and pick
counts) starts after them, so the rest is exactly a team draft of the two rankings with the prefix
removed and stays unbiased. Chapelle, Joachims, Radlinski & Yue ("Large-scale validation and
analysis of interleaved search evaluation", ACM TOIS 2012) discuss this credit for results both
rankers share. On simulated SciFact users it halves the sessions team draft needs to prefer the
better ranker: 50%-power sample sizes 1,167 -> 517 and 9,599 -> 4,108 for two pairs of rankers
(bench/bench_interleaving.py, bench/results/bench_interleaving.json).
"""
from __future__ import annotations

import functools
from typing import Hashable, Sequence, TypeVar

import numpy as np

TEAM_A, TEAM_B = "A", "B"
TEAM_SHARED = "="  # the rankings' common prefix: on the page whatever the coins, credited to neither team
TEAMS = (TEAM_A, TEAM_B, TEAM_SHARED)
TEAM_CREDIT = {TEAM_A: 1.0, TEAM_B: -1.0, TEAM_SHARED: 0.0}  # a team-draft click's credit for A over B
OPTIMIZED, TEAM_DRAFT = "optimized", "team-draft"
INTERLEAVING_METHODS = (OPTIMIZED, TEAM_DRAFT)  # the first is the default
D = TypeVar("D", bound=Hashable)


def shared_prefix(ranking_a: Sequence[D], ranking_b: Sequence[D]) -> int:
    """How many leading ranks hold the same document in both rankings (a repeated document ends it)."""
    n, seen = 0, set()
    for doc_a, doc_b in zip(ranking_a, ranking_b):
        if doc_a != doc_b or doc_a in seen:
            break
        seen.add(doc_a)
        n += 1
    return n


def team_draft(ranking_a: Sequence[D], ranking_b: Sequence[D], k: int,
               rng: np.random.Generator) -> tuple[list[D], list[str]]:
    """The interleaved list of at most `k` documents and, aligned with it, the team that put each
    one there: "=" for the rankings' common prefix (first, in its order, no coin), then "A" or "B".

    After the prefix, a document both rankings hold appears once, credited to the team that picked
    it first. When one team's ranking has nothing left that is not already on the page, the other
    team picks (rankings over different sets); the page ends at `k` documents or when both are
    exhausted. Identical rankings give an all-"=" page and draw no coin. Deterministic given the
    generator's state: the same seed gives the same page.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    shared = min(shared_prefix(ranking_a, ranking_b), int(k))
    docs: list[D] = list(ranking_a[:shared])
    teams: list[str] = [TEAM_SHARED] * shared
    seen: set[D] = set(docs)
    cursors = {TEAM_A: shared, TEAM_B: shared}
    rankings = {TEAM_A: ranking_a, TEAM_B: ranking_b}
    picks = {TEAM_A: 0, TEAM_B: 0}  # the draft's own count: the shared prefix is nobody's pick

    def next_doc(team: str) -> D | None:
        ranking, i = rankings[team], cursors[team]
        while i < len(ranking) and ranking[i] in seen:
            i += 1
        cursors[team] = i
        return ranking[i] if i < len(ranking) else None

    while len(docs) < k and (next_doc(TEAM_A) is not None or next_doc(TEAM_B) is not None):
        if picks[TEAM_A] != picks[TEAM_B]:
            team = TEAM_A if picks[TEAM_A] < picks[TEAM_B] else TEAM_B
        else:
            team = TEAM_A if rng.random() < 0.5 else TEAM_B  # the coin of this round
        doc = next_doc(team)
        if doc is None:  # this team has nothing new: the other one picks
            team = TEAM_B if team == TEAM_A else TEAM_A
            doc = next_doc(team)
        assert doc is not None  # the loop condition: one of the two has a document left
        docs.append(doc)
        teams.append(team)
        seen.add(doc)
        picks[team] += 1
    return docs, teams


# ---------------------------------------------------------------------------------------------
# Optimized interleaving

OPTIMIZED_DEPTH = 10  # ranks whose clicks carry credit in optimized interleaving: one page of results
OPTIMIZED_CACHE = 1024  # distributions kept: a repeated query's page distribution is not solved again
_LP_TOLERANCE = 1e-9  # probabilities below this are the LP solver's round-off, not lists to show


def inverse_rank_credit(ranking_a: Sequence[D], ranking_b: Sequence[D]) -> dict[D, float]:
    """The credit a click on each document gives A over B: 1/rank in A minus 1/rank in B, ranks
    1-based, a document missing from a ranking at the rank just past its end. A document both
    rank alike earns nothing; one that only A ranks at the top earns nearly 1."""
    rank_a = {doc: r for r, doc in reversed(list(enumerate(ranking_a, 1)))}
    rank_b = {doc: r for r, doc in reversed(list(enumerate(ranking_b, 1)))}
    missing_a, missing_b = len(ranking_a) + 1, len(ranking_b) + 1
    return {doc: 1.0 / rank_a.get(doc, missing_a) - 1.0 / rank_b.get(doc, missing_b)
            for doc in (*rank_a, *(d for d in rank_b if d not in rank_a))}


def candidate_pages(ranking_a: Sequence[D], ranking_b: Sequence[D], depth: int) -> list[tuple[D, ...]]:
    """Every list of `depth` documents (fewer when both rankings run out) whose every document is
    the highest-ranked one of A or of B not yet on the list: the pages optimized interleaving may
    show. At most 2**depth; their common prefix opens all of them."""
    pages: list[tuple[D, ...]] = []

    def extend(page: tuple[D, ...], seen: frozenset, i: int, j: int) -> None:
        while i < len(ranking_a) and ranking_a[i] in seen:
            i += 1
        while j < len(ranking_b) and ranking_b[j] in seen:
            j += 1
        nexts = [ranking_a[i]] if i < len(ranking_a) else []
        if j < len(ranking_b) and ranking_b[j] not in nexts:
            nexts.append(ranking_b[j])
        if len(page) == depth or not nexts:
            pages.append(page)
            return
        for doc in nexts:
            extend((*page, doc), seen | {doc}, i, j)

    extend((), frozenset(), 0, 0)
    return pages


def optimized_distribution(pages: Sequence[Sequence[D]], credit: dict[D, float]) -> np.ndarray | None:
    """Probabilities over `pages` (Radlinski & Craswell, "Optimized interleaving for online
    retrieval evaluation", WSDM 2013): the expected credit at every rank is zero, so a user who
    clicks without regard to the documents (any position bias, any click rate) prefers neither
    ranker in expectation; among such distributions, the one that shows the rankings'
    disagreements highest (most expected |credit| for a user who examines rank r with
    probability 1/r). None when no distribution is fair (then interleave by team draft)."""
    from scipy.optimize import linprog  # a few hundred ms to import: only interleaved requests need it

    depth = max((len(p) for p in pages), default=0)
    credits = np.zeros((len(pages), depth))
    for row, page in enumerate(pages):
        credits[row, : len(page)] = [credit[doc] for doc in page]
    if not credits.any():  # identical rankings: one page, nothing to credit
        return np.full(len(pages), 1.0 / len(pages))
    informative = (np.abs(credits) / np.arange(1, depth + 1)).sum(axis=1)
    result = linprog(-informative, A_eq=np.vstack([credits.T, np.ones(len(pages))]),
                     b_eq=np.r_[np.zeros(depth), 1.0], bounds=(0, None), method="highs")
    if result.status != 0:
        return None
    probabilities = np.where(result.x > _LP_TOLERANCE, result.x, 0.0)
    return probabilities / probabilities.sum()


def optimized_interleave(ranking_a: Sequence[D], ranking_b: Sequence[D], k: int, rng: np.random.Generator,
                         depth: int = OPTIMIZED_DEPTH) -> tuple[list[D], list[float]]:
    """An optimized interleaving of at most `k` documents and, aligned with it, the credit a click
    on each gives A over B (negative: B): `inverse_rank_credit` on the top `depth` ranks, which
    are drawn from `optimized_distribution`; below them the page goes on in A's order, then B's,
    with credit 0 (deeper clicks decide nothing). Falls back to `team_draft` (credit +1 for A's
    picks, -1 for B's, 0 for the shared prefix) when no fair distribution exists. Deterministic
    given the generator's state."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    top = min(int(k), depth)
    credit = inverse_rank_credit(ranking_a, ranking_b)
    # Only the rankings' top `top` documents can reach the pages, so they and their credits key the cache.
    heads = tuple(dict.fromkeys((*ranking_a[:top], *ranking_b[:top])))
    pages, probabilities = _fair_pages(tuple(ranking_a[:top]), tuple(ranking_b[:top]), top,
                                       tuple(credit[d] for d in heads))
    if probabilities is None:
        docs, teams = team_draft(ranking_a, ranking_b, k, rng)
        return docs, [TEAM_CREDIT[team] for team in teams]
    page = list(pages[int(rng.choice(len(pages), p=probabilities))])  # type: ignore[arg-type]
    on_page = set(page)
    rest = [d for d in dict.fromkeys((*ranking_a, *ranking_b)) if d not in on_page][: max(int(k) - len(page), 0)]
    return page + rest, [credit[d] for d in page] + [0.0] * len(rest)


@functools.lru_cache(maxsize=OPTIMIZED_CACHE)
def _fair_pages(top_a: tuple, top_b: tuple, depth: int, credits: tuple[float, ...]) -> tuple[list[tuple], np.ndarray | None]:
    """`candidate_pages` and their `optimized_distribution` (about 10 ms for 500 pages), per key."""
    pages = candidate_pages(top_a, top_b, depth)
    credit = dict(zip(dict.fromkeys((*top_a, *top_b)), credits))
    probabilities = optimized_distribution(pages, credit)
    if probabilities is not None:
        probabilities.setflags(write=False)  # shared by every request with this key
    return pages, probabilities
