"""Team-draft interleaving (Radlinski, Kurup & Joachims, "How does clickthrough data reflect
retrieval quality?", CIKM 2008): one page mixes two rankers' results, and each click is credited
to the team (ranker) that contributed the clicked document.

Like captains picking players: in each round a fair coin decides which team picks first, then
each team in turn adds its highest-ranked document not already on the page. Written as the paper
does, one pick at a time: the team with fewer picks picks next, and a coin breaks the tie. Each
team's documents keep the relative order of its own ranking, the team sizes differ by at most one
at every prefix of the page, and neither ranker is favoured in expectation.
"""
from __future__ import annotations

from typing import Hashable, Sequence, TypeVar

import numpy as np

TEAM_A, TEAM_B = "A", "B"
D = TypeVar("D", bound=Hashable)


def team_draft(ranking_a: Sequence[D], ranking_b: Sequence[D], k: int,
               rng: np.random.Generator) -> tuple[list[D], list[str]]:
    """The interleaved list of at most `k` documents and, aligned with it, the team ("A" or "B")
    that contributed each one.

    A document both rankings hold appears once, credited to the team that picked it first. When
    one team's ranking has nothing left that is not already on the page, the other team picks
    (rankings over different sets); the page ends at `k` documents or when both are exhausted.
    Deterministic given the generator's state: the same seed gives the same page.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    docs: list[D] = []
    teams: list[str] = []
    seen: set[D] = set()
    cursors = {TEAM_A: 0, TEAM_B: 0}
    rankings = {TEAM_A: ranking_a, TEAM_B: ranking_b}
    picks = {TEAM_A: 0, TEAM_B: 0}

    def next_doc(team: str) -> D | None:
        ranking, i = rankings[team], cursors[team]
        while i < len(ranking) and ranking[i] in seen:
            i += 1
        cursors[team] = i
        return ranking[i] if i < len(ranking) else None

    while len(docs) < k:
        if picks[TEAM_A] != picks[TEAM_B]:
            team = TEAM_A if picks[TEAM_A] < picks[TEAM_B] else TEAM_B
        else:
            team = TEAM_A if rng.random() < 0.5 else TEAM_B  # the coin of this round
        doc = next_doc(team)
        if doc is None:  # this team has nothing new: the other one picks
            team = TEAM_B if team == TEAM_A else TEAM_A
            doc = next_doc(team)
            if doc is None:
                break
        docs.append(doc)
        teams.append(team)
        seen.add(doc)
        picks[team] += 1
    return docs, teams
