"""Team-draft interleaving (Radlinski, Kurup & Joachims, "How does clickthrough data reflect
retrieval quality?", CIKM 2008): one page mixes two rankers' results, and each click is credited
to the team (ranker) that contributed the clicked document.

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

from typing import Hashable, Sequence, TypeVar

import numpy as np

TEAM_A, TEAM_B = "A", "B"
TEAM_SHARED = "="  # the rankings' common prefix: on the page whatever the coins, credited to neither team
TEAMS = (TEAM_A, TEAM_B, TEAM_SHARED)
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
