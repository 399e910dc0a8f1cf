"""How many sessions interleaving (optimized, the service's default, and team draft) needs to
prefer the better of two rankers, next to an A/B test on clicks with the same simulated users
(issue 16, part 3).

    .venv/bin/python bench/bench_interleaving.py \
        --run model:m0001=H/runs/scifact-test/model:m0001.run --run hybrid-convex=H/runs/scifact-test/hybrid-convex.run \
        --run hybrid=H/runs/scifact-test/hybrid.run --pair model:m0001,hybrid-convex --pair hybrid-convex,hybrid \
        [--seeds 100] [--max-sessions 1048576]

The run files are `ltr-search eval --dataset scifact --split test --pipeline P` outputs
(HOME/runs/scifact-test/P.run). Simulation only, nothing is trained: each ranker's top 20 per
test query is read once; "better" is the ranker with the higher nDCG@10 on the qrels.

Users. Each session draws a test query uniformly at random and one PBM user (examination 1/rank,
eta 1; attraction by grade 0:0.05, 1:0.95, 2:0.95, noise 0.1: the issue's users; the same
`UserBehaviour` probabilities as `ltr-search simulate`) on a page of 10. Session k of a seed uses
the same query and the same uniform draws per position in both experiments (common random
numbers: the same users), so the two differ only in the page each user sees.

Interleaving. The page is the team draft (search/interleaving.py, the function the service runs)
of the two rankings: their common prefix (the same document at the same rank from rank 1 down)
first, labelled "=" and credited to neither team, then the draft of the rest; with 10 results
that is at most 5 rounds, so one of 2**5 coin patterns, drawn uniformly per session (every page
is precomputed through `team_draft` with those coins; a page with a prefix uses fewer coins). A
session is a win for the ranker whose team got more clicks (ties, no clicks and clicks only on
"=" results included, are left out), as `ltr-search models compare` credits them. Before the
shared prefix (plain team draft, a random team for those results too) interleaving needed 2-3x
fewer sessions than A/B here; the JSON keeps those figures under "before_shared_prefix". Test: two-sided binomial sign test of wins
against losses (p = 1/2 under no preference), what `models compare` reports.

Optimized interleaving. Per query, every candidate page of the top 10 and its probability, from
the service's own functions (`candidate_pages`, `inverse_rank_credit`, `optimized_distribution`);
each session draws its page from a stream of its own (so the users' draws stay those of the other
experiments) and sums the credit of its clicks (1/rank in A - 1/rank in B). Test: two-sided
one-sample t-test of the per-session credit (0 without clicks) against 0, what `models compare`
reports for optimized pages. The credit's sign is not fair (only its mean is), so no sign test.

A/B. Each session is assigned to A or B by a fair coin and shown that ranker's top 10.
clicks@10: clicks per session, Welch's two-sided t-test. CTR: share of sessions with at least one
click, two-sided two-proportion z-test (pooled).

Sequential reading. Each experiment is checked at a grid of session counts (50 * 2**(i/2):
50, 71, 100, 141, 200, ...); "sessions needed" is the first count where p < 0.05 with the better
ranker ahead (a seed that never gets there by --max-sessions counts as more than that). Peeking at
every grid point inflates the false-positive rate above 5%, and equally for both experiments;
the fixed-sample alternative is reported too: the smallest grid count at which at least half the
seeds are significant in the right direction (power >= 0.5 without peeking). Seeds that were
significant for the WORSE ranker at some grid point first are counted.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval.click_models import UserBehaviour  # noqa: E402
from eval.datasets import load_dataset, read_run, trec_order  # noqa: E402
from eval.metrics import evaluate_run  # noqa: E402
from ltr.sequential_test import SEQUENTIAL_EFFECT, always_valid_p_values, mixture_log_likelihood_ratio  # noqa: E402
from search.interleaving import (  # noqa: E402
    TEAM_A, TEAM_B, TEAM_SHARED, candidate_pages, inverse_rank_credit, optimized_distribution, team_draft,
)

DATASET = ROOT.parent / "shared" / "datasets" / "scifact"
RESULTS = ROOT / "bench" / "results"
DEPTH = 10
ROUNDS = DEPTH // 2  # team-draft rounds on a page of DEPTH: one coin each
ALPHA = 0.05
USERS = UserBehaviour("pbm", eta=1.0, click_probs={0: 0.05, 1: 0.95, 2: 0.95}, noise=0.1)
# Users blind to relevance (every document attracts alike): neither ranker is better for them, so
# every "significant" result is a false one (--null).
BLIND_USERS = UserBehaviour("pbm", eta=1.0, click_probs={0: 0.5, 1: 0.5, 2: 0.5}, noise=0.0)
SEQUENTIAL_EFFECTS = (SEQUENTIAL_EFFECT, 0.03, 0.3)  # the service's default first
SEQUENTIAL_MIN_ARM = 10  # A/B: observations per arm before its plug-in variance is trusted
CHUNK = 1 << 16
CREDIT = {TEAM_A: 1, TEAM_B: -1, TEAM_SHARED: 0}  # a click's sign in A's clicks minus B's: "=" counts for neither


class _Coins:
    """A scripted generator for `team_draft`: the draft's round r (after any shared prefix) has A
    pick first when bit r is 0."""

    def __init__(self, pattern: int):
        self.pattern, self.used = pattern, 0

    def random(self) -> float:
        bit = (self.pattern >> self.used) & 1
        self.used += 1
        return 0.9 if bit else 0.1  # team_draft: A picks first when random() < 0.5


@dataclass
class PairPages:
    """What users of one pair can see, per query: the 2**ROUNDS interleaved pages (click
    probability per position and team per position) and each ranker's own page."""

    name_a: str
    name_b: str
    interleaved_p: np.ndarray  # (queries, patterns, DEPTH) click probability, 0 past the page
    interleaved_team: np.ndarray  # (queries, patterns, DEPTH) +1 A, -1 B, 0 shared ("=": no credit) or past the page
    a_p: np.ndarray  # (queries, DEPTH)
    b_p: np.ndarray  # (queries, DEPTH)
    # Optimized interleaving: every query's candidate pages, stacked in query order; a session of
    # query i draws its row by i + u (u uniform) in optimized_cum (i + cumulative probability).
    optimized_p: np.ndarray | None = None  # (pages, DEPTH) click probability, 0 past the page
    optimized_credit: np.ndarray | None = None  # (pages, DEPTH) credit of a click for A over B
    optimized_cum: np.ndarray | None = None  # (pages,)
    optimized_query: np.ndarray | None = None  # (pages,) the query of each row


def click_probabilities(grades: np.ndarray, max_grade: int, users: UserBehaviour = USERS) -> np.ndarray:
    """PBM: P(click at position r) = examination(r) * attraction(grade), the issue's users."""
    attraction = users.probabilities(grades, max_grade, "click")
    return users.examination_curve(grades.shape[-1]) * attraction


def pair_pages(name_a: str, name_b: str, rankings: dict[str, dict[str, list[str]]], qrels: dict[str, dict[str, int]],
               queries: Sequence[str], max_grade: int, users: UserBehaviour = USERS) -> PairPages:
    n, patterns = len(queries), 1 << ROUNDS
    grades = np.zeros((n, patterns, DEPTH), dtype=np.int64)
    teams = np.zeros((n, patterns, DEPTH), dtype=np.int8)
    shown = np.zeros((n, patterns, DEPTH), dtype=bool)
    own = {name: np.zeros((n, DEPTH), dtype=np.int64) for name in (name_a, name_b)}
    own_shown = {name: np.zeros((n, DEPTH), dtype=bool) for name in (name_a, name_b)}
    for i, query in enumerate(queries):
        judged = qrels.get(query, {})
        a, b = rankings[name_a].get(query, []), rankings[name_b].get(query, [])
        for name, ranking in ((name_a, a), (name_b, b)):
            top = ranking[:DEPTH]
            own[name][i, : len(top)] = [judged.get(d, 0) for d in top]
            own_shown[name][i, : len(top)] = True
        for pattern in range(patterns):
            coins = _Coins(pattern)
            docs, team = team_draft(a, b, DEPTH, coins)  # type: ignore[arg-type]
            if coins.used > ROUNDS:
                raise AssertionError(f"query {query}: team draft used {coins.used} coins for {DEPTH} results")
            grades[i, pattern, : len(docs)] = [judged.get(d, 0) for d in docs]
            teams[i, pattern, : len(docs)] = [CREDIT[t] for t in team]
            shown[i, pattern, : len(docs)] = True
    optimized = [optimized_pages(rankings[name_a].get(q, []), rankings[name_b].get(q, []), qrels.get(q, {}), max_grade,
                                 users) for q in queries]
    return PairPages(
        name_a, name_b,
        np.where(shown, click_probabilities(grades, max_grade, users), 0.0), teams,
        np.where(own_shown[name_a], click_probabilities(own[name_a], max_grade, users), 0.0),
        np.where(own_shown[name_b], click_probabilities(own[name_b], max_grade, users), 0.0),
        np.concatenate([p for p, _, _ in optimized]), np.concatenate([c for _, c, _ in optimized]),
        np.concatenate([i + np.cumsum(w) for i, (_, _, w) in enumerate(optimized)]),
        np.concatenate([np.full(len(w), i) for i, (_, _, w) in enumerate(optimized)]),
    )


def optimized_pages(ranking_a: list[str], ranking_b: list[str], judged: dict[str, int],
                    max_grade: int, users: UserBehaviour = USERS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One query's optimized-interleaving pages, as `optimized_interleave` (the service's function)
    draws them: click probabilities, credits and the probability of each page."""
    pages = candidate_pages(ranking_a, ranking_b, DEPTH)
    credit = inverse_rank_credit(ranking_a, ranking_b)
    weights = optimized_distribution(pages, credit)
    if weights is None:
        raise AssertionError(f"no fair optimized interleaving for {ranking_a[:DEPTH]} / {ranking_b[:DEPTH]}")
    grades = np.zeros((len(pages), DEPTH), dtype=np.int64)
    credits = np.zeros((len(pages), DEPTH))
    shown = np.zeros((len(pages), DEPTH), dtype=bool)
    for row, page in enumerate(pages):
        grades[row, : len(page)] = [judged.get(d, 0) for d in page]
        credits[row, : len(page)] = [credit[d] for d in page]
        shown[row, : len(page)] = True
    return np.where(shown, click_probabilities(grades, max_grade, users), 0.0), credits, weights


def simulate(pages: PairPages, sessions: int, seed: int, spread: float = 0.0) -> dict[str, np.ndarray]:
    """Per-session outcomes of one seed's users, for both experiments (int8/bool arrays).

    `spread` > 0: heterogeneous users (sensitivity only): each session's user multiplies every
    click probability by an activity drawn from a mean-1 log-normal with that sigma (capped at
    probability 1); 0 keeps the issue's identical users and their random stream."""
    rng = np.random.default_rng([seed, 16])  # the users of seed s, whatever the pair
    n_queries, patterns = pages.interleaved_p.shape[:2]
    page_rng = np.random.default_rng([seed, 16, 1])  # which optimized page: apart from the users' own stream
    out = {key: np.empty(sessions, dtype=np.int8) for key in ("pref", "team_credit", "arm", "clicks")}
    out["optimized_credit"] = np.zeros(sessions)
    for start in range(0, sessions, CHUNK):
        size = min(CHUNK, sessions - start)
        query = rng.integers(0, n_queries, size)
        uniforms = rng.random((size, DEPTH))  # the user's draws: shared by both experiments
        pattern = rng.integers(0, patterns, size)
        arm_a = rng.random(size) < 0.5
        activity = rng.lognormal(-spread**2 / 2, spread, size)[:, None] if spread > 0 else 1.0
        clicked = uniforms < np.minimum(activity * pages.interleaved_p[query, pattern], 1.0)
        credit = (clicked * pages.interleaved_team[query, pattern]).sum(axis=1)  # A's clicks minus B's
        out["pref"][start : start + size] = np.sign(credit)
        out["team_credit"][start : start + size] = credit
        if pages.optimized_cum is not None:
            page = np.searchsorted(pages.optimized_cum, query + page_rng.random(size) * (1 - 1e-12), side="right")
            clicked = uniforms < np.minimum(activity * pages.optimized_p[page], 1.0)
            optimized_credit = (clicked * pages.optimized_credit[page]).sum(axis=1)
            out["optimized_credit"][start : start + size] = optimized_credit
        ab_p = np.where(arm_a[:, None], pages.a_p[query], pages.b_p[query])
        out["arm"][start : start + size] = arm_a
        out["clicks"][start : start + size] = (uniforms < np.minimum(activity * ab_p, 1.0)).sum(axis=1)
    return out


def study_pair(pages: PairPages, better: int, counts: list[int], seeds: int, spread: float,
               sequential: bool = False) -> dict:
    """Sessions needed by each experiment over `seeds` seeds, and the A/B-to-interleaving ratios;
    `sequential`: also read after every session with the always-valid test, per mixing effect."""
    per_seed, per_seed_sequential = [], {effect: [] for effect in SEQUENTIAL_EFFECTS} if sequential else {}
    for seed in range(seeds):
        outcome = simulate(pages, counts[-1], seed, spread)
        per_seed.append(tests_at(outcome, counts))
        for effect, results in per_seed_sequential.items():
            results.append(sequential_tests(outcome, effect))
    summary = summarise(per_seed, counts, better, counts[-1])
    if sequential:
        summary["sequential"] = {}
        for effect, results in per_seed_sequential.items():
            block = summarise_sequential(results, better, counts[-1])
            optimized = block["optimized_interleaving"]["median_sessions_needed"]
            block["ab_clicks_over_optimized_interleaving"] = ratio(block["ab_clicks"]["median_sessions_needed"], optimized)
            block["ab_ctr_over_optimized_interleaving"] = ratio(block["ab_ctr"]["median_sessions_needed"], optimized)
            summary["sequential"][f"effect {effect:g}"] = block
    inter = summary["interleaving"]["median_sessions_needed"]
    optimized = summary["optimized_interleaving"]["median_sessions_needed"]
    return {**summary,
            "ab_clicks_over_interleaving": ratio(summary["ab_clicks"]["median_sessions_needed"], inter),
            "ab_ctr_over_interleaving": ratio(summary["ab_ctr"]["median_sessions_needed"], inter),
            "ab_clicks_over_optimized_interleaving": ratio(summary["ab_clicks"]["median_sessions_needed"], optimized),
            "ab_ctr_over_optimized_interleaving": ratio(summary["ab_ctr"]["median_sessions_needed"], optimized)}


def expected(pages: PairPages) -> dict[str, float]:
    """Closed-form check of the simulation: each experiment's per-session statistics from the
    click probabilities, and the sessions a fixed-sample test needs for 50% power at ALPHA
    (normal approximation: z = 1.96 reached on average)."""
    p, team = pages.interleaved_p, pages.interleaved_team
    depth = p.shape[-1]
    dist = np.zeros((*p.shape[:2], 2 * depth + 1))  # distribution of A's clicks minus B's per page
    dist[..., depth] = 1.0
    for r in range(depth):
        pr, tr = p[..., r][..., None], team[..., r][..., None]
        dist = dist * (1 - pr) + np.where(tr == 1, np.roll(dist, 1, axis=-1), np.where(tr == -1, np.roll(dist, -1, axis=-1), dist)) * pr
    win, loss = float(dist[..., depth + 1:].sum(-1).mean()), float(dist[..., :depth].sum(-1).mean())
    decided, z = win + loss, stats.norm.ppf(1 - ALPHA / 2)
    interleaving = (z / (2 * abs(win / decided - 0.5))) ** 2 / decided if win != loss else math.inf
    mean = {k: float(v.sum(1).mean()) for k, v in (("a", pages.a_p), ("b", pages.b_p))}
    var = {k: float((v * (1 - v)).sum(1).mean() + v.sum(1).var()) for k, v in (("a", pages.a_p), ("b", pages.b_p))}
    ab_clicks = 2 * z**2 * (var["a"] + var["b"]) / (mean["a"] - mean["b"]) ** 2  # both arms, fair coin
    ctr = {k: float((1 - np.prod(1 - v, axis=1)).mean()) for k, v in (("a", pages.a_p), ("b", pages.b_p))}
    pooled = (ctr["a"] + ctr["b"]) / 2
    ab_ctr = 4 * z**2 * 2 * pooled * (1 - pooled) / (ctr["a"] - ctr["b"]) ** 2 / 2
    return {"interleaving_win": round(win, 4), "interleaving_loss": round(loss, 4),
            "clicks_a": round(mean["a"], 4), "clicks_b": round(mean["b"], 4),
            "clicks_sd_a": round(var["a"] ** 0.5, 4), "clicks_sd_b": round(var["b"] ** 0.5, 4),
            "ctr_a": round(ctr["a"], 4), "ctr_b": round(ctr["b"], 4),
            "power50_sessions": {"interleaving": round(interleaving), "ab_clicks": round(ab_clicks), "ab_ctr": round(ab_ctr)}}


def grid(max_sessions: int) -> list[int]:
    counts, i = [], 0
    while (n := int(round(50 * 2 ** (i / 2)))) <= max_sessions:
        counts.append(n)
        i += 1
    return counts


def tests_at(outcome: dict[str, np.ndarray], counts: Sequence[int]) -> dict[str, list[tuple[float, int]]]:
    """(p-value, direction: +1 A ahead, -1 B ahead, 0 even) of each test at each session count."""
    idx = np.asarray(counts) - 1
    wins = np.cumsum(outcome["pref"] > 0)[idx]
    losses = np.cumsum(outcome["pref"] < 0)[idx]
    credit = outcome["optimized_credit"]
    credit_sum, credit_squares = np.cumsum(credit)[idx], np.cumsum(credit**2)[idx]
    arm = outcome["arm"].astype(bool)
    clicks = outcome["clicks"].astype(np.float64)
    n_a = np.cumsum(arm)[idx]
    n_b = np.asarray(counts) - n_a
    s_a, s_b = np.cumsum(clicks * arm)[idx], np.cumsum(clicks * ~arm)[idx]
    q_a, q_b = np.cumsum(clicks**2 * arm)[idx], np.cumsum(clicks**2 * ~arm)[idx]
    c_a, c_b = np.cumsum((clicks > 0) & arm)[idx], np.cumsum((clicks > 0) & ~arm)[idx]
    result: dict[str, list[tuple[float, int]]] = {"interleaving": [], "optimized_interleaving": [], "ab_clicks": [], "ab_ctr": []}
    for j in range(len(counts)):
        result["interleaving"].append(_sign_test(int(wins[j]), int(losses[j])))
        result["optimized_interleaving"].append(_one_sample_t(credit_sum[j], credit_squares[j], counts[j]))
        result["ab_clicks"].append(_welch(s_a[j], q_a[j], n_a[j], s_b[j], q_b[j], n_b[j]))
        result["ab_ctr"].append(_two_proportions(c_a[j], n_a[j], c_b[j], n_b[j]))
    return result


def sequential_tests(outcome: dict[str, np.ndarray], effect: float) -> dict[str, tuple[int | None, int]]:
    """(first session count at which the always-valid p < ALPHA, the direction there) of each
    experiment read after every session (mSPRT, `ltr.sequential_test`; None: never). The
    interleaving tests are `models compare`'s own function on the per-session credit (team draft:
    A's clicks minus B's); A/B is the two-sample form of the same normal mixture."""
    result: dict[str, tuple[int | None, int]] = {}
    for test, key in (("interleaving", "team_credit"), ("optimized_interleaving", "optimized_credit")):
        values = outcome[key].astype(np.float64)
        p = always_valid_p_values(values, effect)
        result[test] = _first_crossing(p, np.cumsum(values))
    arm = outcome["arm"].astype(bool)
    clicks = outcome["clicks"].astype(np.float64)
    for test, values in (("ab_clicks", clicks), ("ab_ctr", (clicks > 0).astype(np.float64))):
        p, lead = _two_sample_sequential(values, arm, effect)
        result[test] = _first_crossing(p, lead)
    return result


def _first_crossing(p: np.ndarray, lead: np.ndarray) -> tuple[int | None, int]:
    crossed = np.flatnonzero(p < ALPHA)
    if not len(crossed):
        return None, 0
    return int(crossed[0]) + 1, int(np.sign(lead[crossed[0]]))


def _two_sample_sequential(values: np.ndarray, arm: np.ndarray, effect: float) -> tuple[np.ndarray, np.ndarray]:
    """Always-valid p after each session of "arm A's mean equals arm B's" (normal mixture over the
    difference with sd `effect` x the arms' mean per-session sd; plug-in variances), and A's lead."""
    stats_by_arm = []
    for mask in (arm, ~arm):
        n = np.cumsum(mask).astype(np.float64)
        total, squares = np.cumsum(values * mask), np.cumsum(values**2 * mask)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, total / np.maximum(n, 1), 0.0)
            variance = np.maximum(squares - n * mean**2, 0.0) / np.maximum(n - 1, 1)
        stats_by_arm.append((n, mean, variance))
    (n_a, m_a, v_a), (n_b, m_b, v_b) = stats_by_arm
    with np.errstate(invalid="ignore", divide="ignore"):
        estimate_variance = v_a / np.maximum(n_a, 1) + v_b / np.maximum(n_b, 1)
        z2 = np.where(estimate_variance > 0, (m_a - m_b) ** 2 / estimate_variance, 0.0)
        r = np.where(estimate_variance > 0, effect**2 * (v_a + v_b) / 2 / estimate_variance, 0.0)
    log_ratio = mixture_log_likelihood_ratio(z2, r)
    log_ratio[(n_a < SEQUENTIAL_MIN_ARM) | (n_b < SEQUENTIAL_MIN_ARM) | ~(estimate_variance > 0)] = 0.0
    return np.minimum.accumulate(np.minimum(1.0, np.exp(-log_ratio))), m_a - m_b


def summarise_sequential(per_seed: list[dict[str, tuple[int | None, int]]], better: int,
                         max_sessions: int) -> dict[str, dict]:
    """Per experiment read after every session: the sessions to the first always-valid p < ALPHA
    in the right direction (a seed whose first crossing is the wrong way is counted as wrong and
    as undecided: the experiment stopped there), their median."""
    summary = {}
    for test in per_seed[0]:
        needed = [n if n is not None and d == better else None for n, d in (s[test] for s in per_seed)]
        wrong = sum(1 for s in per_seed if s[test][0] is not None and s[test][1] != better)
        median = float(np.median([n if n is not None else math.inf for n in needed]))
        summary[test] = {
            "sessions_needed_per_seed": [n if n is not None else f">{max_sessions}" for n in needed],
            "median_sessions_needed": median if math.isfinite(median) else f">{max_sessions}",
            "seeds_decided": sum(n is not None for n in needed), "seeds_wrong": wrong,
        }
    return summary


def study_null(pages: PairPages, counts: list[int], seeds: int) -> dict:
    """Users blind to relevance: the share of seeds each experiment ever calls significant, read
    at every grid count with its fixed-sample test, and read after every session with the
    always-valid test (the service's default mixing)."""
    fixed = np.zeros(4)
    sequential = np.zeros(4)
    names: list[str] = []
    for seed in range(seeds):
        outcome = simulate(pages, counts[-1], seed)
        grid_tests = tests_at(outcome, counts)
        names = list(grid_tests)
        fixed += [any(p < ALPHA for p, _ in grid_tests[t]) for t in names]
        crossing = sequential_tests(outcome, SEQUENTIAL_EFFECT)
        sequential += [crossing[t][0] is not None for t in names]
    return {"max_sessions": counts[-1], "looks_fixed_sample": len(counts),
            "false_positive_rate_fixed_sample_read_at_every_grid_count": dict(zip(names, (fixed / seeds).round(3).tolist())),
            "false_positive_rate_always_valid_read_after_every_session": dict(zip(names, (sequential / seeds).round(3).tolist()))}


def _sign_test(wins: int, losses: int) -> tuple[float, int]:
    """Two-sided binomial test of wins against losses (ties left out), what `models compare` reports."""
    decided = wins + losses
    return (float(stats.binomtest(wins, decided, 0.5).pvalue) if decided else 1.0), int(np.sign(wins - losses))


def _one_sample_t(total: float, squares: float, n: int) -> tuple[float, int]:
    """Two-sided one-sample t-test of a mean of zero, from the sum and the sum of squares."""
    if n < 2:
        return 1.0, 0
    mean = total / n
    variance = max(squares - n * mean**2, 0.0) / (n - 1)
    if variance <= 0:
        return (1.0, 0) if mean == 0 else (0.0, int(np.sign(mean)))
    t = mean / math.sqrt(variance / n)
    return float(2 * stats.t.sf(abs(t), n - 1)), int(np.sign(mean))


def _welch(s_a: float, q_a: float, n_a: int, s_b: float, q_b: float, n_b: int) -> tuple[float, int]:
    """Welch's two-sided t-test from sums and sums of squares."""
    if n_a < 2 or n_b < 2:
        return 1.0, 0
    m_a, m_b = s_a / n_a, s_b / n_b
    v_a = max(q_a - n_a * m_a**2, 0.0) / (n_a - 1)
    v_b = max(q_b - n_b * m_b**2, 0.0) / (n_b - 1)
    se2 = v_a / n_a + v_b / n_b
    if se2 <= 0:
        return (1.0, 0) if m_a == m_b else (0.0, int(np.sign(m_a - m_b)))
    t = (m_a - m_b) / math.sqrt(se2)
    df = se2**2 / ((v_a / n_a) ** 2 / (n_a - 1) + (v_b / n_b) ** 2 / (n_b - 1))
    return float(2 * stats.t.sf(abs(t), df)), int(np.sign(m_a - m_b))


def _two_proportions(c_a: int, n_a: int, c_b: int, n_b: int) -> tuple[float, int]:
    if n_a == 0 or n_b == 0:
        return 1.0, 0
    pooled = (c_a + c_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    diff = c_a / n_a - c_b / n_b
    if se == 0:
        return 1.0, 0
    return float(2 * stats.norm.sf(abs(diff) / se)), int(np.sign(diff))


def summarise(per_seed: list[dict[str, list[tuple[float, int]]]], counts: list[int], better: int,
              max_sessions: int) -> dict[str, dict]:
    """Per experiment: sessions needed per seed (first right-direction p < ALPHA), their median,
    seeds wrongly significant first, and the power curve."""
    summary = {}
    for test in per_seed[0]:
        needed, wrong_first = [], 0
        power = np.zeros(len(counts))
        for seed_result in per_seed:
            significant = [(j, d) for j, (p, d) in enumerate(seed_result[test]) if p < ALPHA and d != 0]
            for j, direction in significant:
                power[j] += direction == better
            right = [j for j, d in significant if d == better]
            needed.append(counts[right[0]] if right else None)
            wrong_first += bool(significant) and significant[0][1] != better
        power /= len(per_seed)
        decided = [n for n in needed if n is not None]
        ordered = sorted(n if n is not None else math.inf for n in needed)
        median = float(np.median(ordered)) if ordered else math.inf
        n50 = next((counts[j] for j in range(len(counts)) if power[j] >= 0.5), None)
        summary[test] = {
            "sessions_needed_per_seed": [n if n is not None else f">{max_sessions}" for n in needed],
            "median_sessions_needed": median if math.isfinite(median) else f">{max_sessions}",
            "seeds_decided": len(decided),
            "seeds_wrongly_significant_first": wrong_first,
            "fixed_n_power50_sessions": n50 if n50 is not None else f">{max_sessions}",
            "power_curve": {str(n): round(float(p), 3) for n, p in zip(counts, power)},
        }
    return summary


def ratio(slow: object, fast: object) -> float | str | None:
    if isinstance(slow, (int, float)) and isinstance(fast, (int, float)) and fast:
        return round(float(slow) / float(fast), 1)
    if isinstance(slow, str) and isinstance(fast, (int, float)) and fast:
        return f">{round(float(slow[1:]) / float(fast), 1)}"
    return None


def parse_runs(specs: Sequence[str]) -> dict[str, Path]:
    runs = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--run must look like NAME=PATH, got {spec!r}")
        if not Path(path).is_file():
            raise SystemExit(f"--run {name}: no such file {path}")
        runs[name] = Path(path)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=DATASET)
    parser.add_argument("--split", default="test")
    parser.add_argument("--run", action="append", required=True, help="NAME=PATH of a TREC run file")
    parser.add_argument("--pair", action="append", required=True, help="NAME_A,NAME_B (two --run names)")
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--max-sessions", type=int, default=1 << 20)
    parser.add_argument("--spread", type=float, action="append", default=[],
                        help="also run heterogeneous users with this activity spread (sensitivity; repeatable)")
    parser.add_argument("--null", action="store_true",
                        help="also run each pair with users blind to relevance: false-positive rates of reading "
                             "the fixed-sample tests at every grid count and the always-valid tests after every session")
    parser.add_argument("--null-max-sessions", type=int, default=1 << 16)
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_interleaving.json")
    args = parser.parse_args()
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    started = time.perf_counter()
    dataset = load_dataset(args.dataset, args.split)
    paths = parse_runs(args.run)
    runs = {name: read_run(path) for name, path in paths.items()}
    queries = sorted(dataset.qrels)
    rankings = {name: {q: [d for d, _ in trec_order(ranked)][: 2 * DEPTH] for q, ranked in run.items()}
                for name, run in runs.items()}
    ndcg = {name: float(evaluate_run(run, dataset.qrels, ["nDCG@10"]).values["nDCG@10"].mean()) for name, run in runs.items()}
    max_grade = max(g for docs in dataset.qrels.values() for g in docs.values())
    counts = grid(args.max_sessions)
    report: dict = {
        "dataset": str(args.dataset), "split": args.split, "queries": len(queries), "depth": DEPTH,
        "users": {"model": "pbm", "eta": USERS.eta, "click_probs": {str(k): v for k, v in USERS.click_probs.items()},
                  "noise": USERS.noise, "query_choice": "uniform over the split's judged queries"},
        "tests": {"interleaving": "team draft; two-sided binomial sign test on per-session wins vs losses (ties left out)",
                  "optimized_interleaving": "optimized interleaving (inverse-rank credit, top 10); two-sided one-sample "
                                            "t-test of the per-session credit (its clicks' summed credit, 0 without "
                                            "clicks) against a mean of 0",
                  "ab_clicks": "A/B, fair coin per session; clicks@10 per session, Welch two-sided t-test",
                  "ab_ctr": "A/B, fair coin per session; sessions with >= 1 click, two-sided two-proportion z-test"},
        "sequential": "each experiment read after every session with an always-valid p-value (mSPRT, normal mixture "
                      "with sd 'effect' x the per-session sd, plug-in variance; ltr.sequential_test, what models "
                      "compare reports as always_valid_p_value): sessions to the first p < alpha; a first crossing "
                      "the wrong way stops the experiment (counted in seeds_wrong, not decided)",
        "alpha": ALPHA, "seeds": args.seeds, "grid": counts, "max_sessions": counts[-1],
        "runs": {name: {"path": str(path), "nDCG@10": round(ndcg[name], 4)} for name, path in paths.items()},
        "pairs": [],
        "heterogeneous_users": [],
        "heterogeneous_users_note": "sensitivity only, not the issue's users: each session's click probabilities "
                                    "times a mean-1 log-normal activity with sigma = spread (capped at 1)",
    }
    for spec in args.pair:
        name_a, _, name_b = spec.partition(",")
        if name_a not in runs or name_b not in runs or name_a == name_b:
            raise SystemExit(f"--pair {spec!r}: name two different --run names")
        pages = pair_pages(name_a, name_b, rankings, dataset.qrels, queries, max_grade)
        better = 1 if ndcg[name_a] > ndcg[name_b] else -1
        study = study_pair(pages, better, counts, args.seeds, 0.0, sequential=True)
        closed_form = expected(pages)
        power50 = closed_form["power50_sessions"]
        pair = {
            "a": name_a, "b": name_b, "better": name_a if better > 0 else name_b,
            "ndcg_gap": round(abs(ndcg[name_a] - ndcg[name_b]), 4),
            **study,
            "expected": closed_form,
            "expected_ab_clicks_over_interleaving": ratio(power50["ab_clicks"], power50["interleaving"]),
            "expected_ab_ctr_over_interleaving": ratio(power50["ab_ctr"], power50["interleaving"]),
        }
        report["pairs"].append(pair)
        print(f"{name_a} vs {name_b} (nDCG@10 {ndcg[name_a]:.4f} vs {ndcg[name_b]:.4f}): median sessions to p < {ALPHA}: "
              f"team-draft interleaving {study['interleaving']['median_sessions_needed']}, "
              f"optimized interleaving {study['optimized_interleaving']['median_sessions_needed']}, "
              f"A/B clicks@10 {study['ab_clicks']['median_sessions_needed']} ({study['ab_clicks_over_interleaving']}x), "
              f"A/B CTR {study['ab_ctr']['median_sessions_needed']} ({study['ab_ctr_over_interleaving']}x); "
              f"A/B over optimized: clicks@10 {study['ab_clicks_over_optimized_interleaving']}x, "
              f"CTR {study['ab_ctr_over_optimized_interleaving']}x; "
              f"closed form at 50% power: {power50}", flush=True)
        for effect, block in study["sequential"].items():
            print(f"  read after every session, always-valid (mSPRT, {effect}): team draft "
                  f"{block['interleaving']['median_sessions_needed']}, optimized "
                  f"{block['optimized_interleaving']['median_sessions_needed']}, A/B clicks@10 "
                  f"{block['ab_clicks']['median_sessions_needed']} ({block['ab_clicks_over_optimized_interleaving']}x), "
                  f"A/B CTR {block['ab_ctr']['median_sessions_needed']} ({block['ab_ctr_over_optimized_interleaving']}x); "
                  f"wrong-way stops: " + ", ".join(f"{t} {block[t]['seeds_wrong']}" for t in
                                                   ("interleaving", "optimized_interleaving", "ab_clicks", "ab_ctr")),
                  flush=True)
        if args.null:
            blind = pair_pages(name_a, name_b, rankings, dataset.qrels, queries, max_grade, BLIND_USERS)
            pair["null_users"] = study_null(blind, grid(args.null_max_sessions), args.seeds)
            print(f"  users blind to relevance, up to {args.null_max_sessions:,} sessions: seeds ever significant: "
                  f"fixed-sample tests read at {pair['null_users']['looks_fixed_sample']} grid counts "
                  f"{pair['null_users']['false_positive_rate_fixed_sample_read_at_every_grid_count']}; always-valid read "
                  f"after every session {pair['null_users']['false_positive_rate_always_valid_read_after_every_session']}",
                  flush=True)
        for spread in args.spread:
            hetero = study_pair(pages, better, counts, args.seeds, spread)
            report["heterogeneous_users"].append({"a": name_a, "b": name_b, "spread": spread, **hetero})
            print(f"  users with activity spread {spread}: interleaving {hetero['interleaving']['median_sessions_needed']}, "
                  f"optimized {hetero['optimized_interleaving']['median_sessions_needed']}, "
                  f"A/B clicks@10 {hetero['ab_clicks']['median_sessions_needed']} ({hetero['ab_clicks_over_interleaving']}x), "
                  f"A/B CTR {hetero['ab_ctr']['median_sessions_needed']} ({hetero['ab_ctr_over_interleaving']}x)", flush=True)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    if args.json.is_file():  # a rerun keeps the figures of plain team draft (before the shared prefix)
        before = json.loads(args.json.read_text()).get("before_shared_prefix")
        if before is not None:
            report["before_shared_prefix"] = before
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"json: {args.json}")


if __name__ == "__main__":
    main()
