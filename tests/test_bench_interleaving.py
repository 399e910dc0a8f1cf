"""The interleaving study's machinery (bench/bench_interleaving.py): its enumerated team-draft pages
are exactly the pages the service's `team_draft` serves (the shared prefix credited to nobody), its
simulated users agree with the closed form, and the A/B tests read the right direction."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from search.interleaving import inverse_rank_credit, optimized_interleave, shared_prefix, team_draft

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_interleaving.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_interleaving", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_interleaving"] = module
    spec.loader.exec_module(module)
    return module


def _toy(bench):
    rng = np.random.default_rng(3)
    docs = [f"d{i}" for i in range(25)]
    queries = [f"q{i}" for i in range(6)]
    a = {q: list(rng.permutation(docs))[:20] for q in queries}
    b = {q: list(rng.permutation(docs))[:20] for q in queries}
    qrels = {q: {d: int(rng.integers(0, 3)) for d in rng.choice(docs, 6, replace=False)} for q in queries}
    for q in queries:  # A puts two relevant documents on top: the better ranker
        relevant = [d for d, g in qrels[q].items() if g > 0][:2]
        a[q] = relevant + [d for d in a[q] if d not in relevant]
    for q in queries[:2]:  # two queries where B agrees on A's top 3: a shared prefix
        b[q] = a[q][:3] + [d for d in b[q] if d not in a[q][:3]]
    return bench.pair_pages("A", "B", {"A": a, "B": b}, qrels, queries, 2), a, b, qrels, queries


def test_enumerated_pages_are_the_served_team_drafts(bench):
    pages, a, b, qrels, queries = _toy(bench)
    for i, q in enumerate(queries):
        enumerated = {tuple(pages.interleaved_team[i, c]) for c in range(pages.interleaved_team.shape[1])}
        for seed in range(40):
            _, teams = team_draft(a[q], b[q], bench.DEPTH, np.random.default_rng(seed))
            assert tuple({"A": 1, "B": -1, "=": 0}[t] for t in teams) in enumerated


def test_the_shared_prefix_is_on_every_page_and_credited_to_nobody(bench):
    pages, a, b, qrels, queries = _toy(bench)
    prefixes = [shared_prefix(a[q], b[q]) for q in queries]
    assert prefixes[:2] == [3, 3]  # B agrees on A's top 3 for the first two queries
    for i, prefix in enumerate(prefixes):  # zero exactly on the prefix, on every page, whatever the coins
        assert (pages.interleaved_team[i, :, :prefix] == 0).all() and (pages.interleaved_team[i, :, prefix:] != 0).all()
    assert (pages.interleaved_p[:2, :, :3] == pages.a_p[:2, None, :3]).all()  # same documents, same places
    drafted = pages.interleaved_team[:2, :, 3:].sum(axis=-1)
    assert (np.abs(drafted) <= 1).all()  # the draft after the prefix: 7 picks, balanced within one
    # crediting the prefix at random (plain team draft) only adds noise: the same win/loss gap, more decided
    plain = pages.interleaved_team.copy()
    plain[:2, :, :3] = np.where(np.arange(plain.shape[1])[None, :, None] % 2 == 0, 1, -1)
    noisy = bench.expected(bench.PairPages("A", "B", pages.interleaved_p, plain, pages.a_p, pages.b_p))
    shared = bench.expected(pages)
    assert shared["power50_sessions"]["interleaving"] < noisy["power50_sessions"]["interleaving"]


def test_simulated_users_match_the_closed_form_and_favour_the_better_ranker(bench):
    pages, *_ = _toy(bench)
    expected = bench.expected(pages)
    outcome = bench.simulate(pages, 200_000, seed=1)
    win, loss = np.mean(outcome["pref"] > 0), np.mean(outcome["pref"] < 0)
    assert win == pytest.approx(expected["interleaving_win"], abs=0.005)
    assert loss == pytest.approx(expected["interleaving_loss"], abs=0.005)
    arm = outcome["arm"].astype(bool)
    assert outcome["clicks"][arm].mean() == pytest.approx(expected["clicks_a"], abs=0.01)
    assert outcome["clicks"][~arm].mean() == pytest.approx(expected["clicks_b"], abs=0.01)
    tests = bench.tests_at(outcome, [200_000])
    assert all(tests[name][0][0] < 0.05 and tests[name][0][1] == 1 for name in ("interleaving", "ab_clicks", "ab_ctr"))


def test_welch_and_two_proportion_tests_match_scipy(bench):
    from scipy import stats

    x, y = np.array([0, 1, 2, 1, 3, 0, 1]), np.array([1, 2, 2, 3, 3, 1, 2, 4])
    p, direction = bench._welch(x.sum(), (x**2).sum(), len(x), y.sum(), (y**2).sum(), len(y))
    assert p == pytest.approx(stats.ttest_ind(x, y, equal_var=False).pvalue) and direction == -1
    p, direction = bench._two_proportions(60, 100, 45, 100)
    pooled = 105 / 200
    z = 0.15 / np.sqrt(pooled * (1 - pooled) * (2 / 100))
    assert p == pytest.approx(2 * stats.norm.sf(z)) and direction == 1


def test_heterogeneous_users_only_when_asked_and_they_spread_the_clicks(bench):
    pages, *_ = _toy(bench)
    same = bench.simulate(pages, 20_000, seed=2)
    assert all(np.array_equal(same[k], bench.simulate(pages, 20_000, seed=2, spread=0.0)[k]) for k in same)
    spread = bench.simulate(pages, 20_000, seed=2, spread=1.0)
    assert spread["clicks"].var() > 1.2 * same["clicks"].var()


def test_optimized_pages_are_the_served_ones_fair_and_favour_the_better_ranker(bench):
    pages, a, b, qrels, queries = _toy(bench)
    for i, q in enumerate(queries):
        rows = pages.optimized_query == i
        weights = np.diff(np.r_[i, pages.optimized_cum[rows]])
        assert weights.sum() == pytest.approx(1.0) and (weights >= -1e-12).all()
        credits = pages.optimized_credit[rows]
        assert np.abs(weights @ credits).max() < 1e-7  # zero expected credit at every rank
        full = inverse_rank_credit(a[q], b[q])
        served = set()
        for seed in range(20):  # the service's draws are among the enumerated pages
            docs, credit = optimized_interleave(a[q], b[q], bench.DEPTH, np.random.default_rng(seed))
            assert credit == pytest.approx([full[d] for d in docs])
            served.add(tuple(np.round(credit, 9)))
        assert served <= {tuple(np.round(row, 9)) for row in credits}
    outcome = bench.simulate(pages, 100_000, seed=1)
    credit = outcome["optimized_credit"]
    assert credit.mean() > 5 * credit.std() / np.sqrt(len(credit))  # A (relevant documents on top) is preferred
    p, direction = bench.tests_at(outcome, [100_000])["optimized_interleaving"][0]
    assert p < 0.05 and direction == 1
