"""Online model comparison: optimized and team-draft interleaving, shadow scoring, the experiment
log and `models compare` (click credit, t-test and sign test), unit-level and through a real
`ltr-search serve`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ltr.experiments import (
    ExperimentLog, InterleavedRequest, ShadowRanking, TeamPick, compare_interleaved, interleaving_rng, overlap_at,
    rank_biased_overlap, render, shadow_agreement,
)
from search.app.cli.compare import add_compare_parser, cmd_models_compare
from search.event_store import Event, EventStore, ServedRequest, ServedResult
from search.app.config import ExplorationSettings, OnlineExperimentSettings, load_service_config
from search import interleaving
from search.interleaving import (
    TEAM_SHARED, candidate_pages, inverse_rank_credit, optimized_distribution, optimized_interleave, shared_prefix,
    team_draft,
)
from tests.conftest import home_sharing_encoder, run_cli, running_service
from tests.test_ltr import _collection


# ------------------------------------------------------------------------------ team draft


def _rankings(seed: int, n: int, overlap: bool = True) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    docs = [f"d{i}" for i in range(n)]
    a = list(rng.permutation(docs))
    if overlap:  # the same documents in another order
        return a, list(rng.permutation(docs))
    return a, list(rng.permutation(docs + [f"x{i}" for i in range(n // 2)]))[: max(1, n - 2)]


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(0, 30), k=st.integers(0, 40), overlap=st.booleans())
def test_team_draft_properties(seed, n, k, overlap):
    a, b = _rankings(seed, n, overlap) if n else ([], [])
    if seed % 3 == 0 and n:  # a common prefix of random length (often none otherwise)
        head = int(seed // 3 % (n + 1))
        b = a[:head] + [d for d in b if d not in a[:head]]
    docs, teams = team_draft(a, b, k, np.random.default_rng(seed))
    assert len(docs) == len(teams) == min(k, len(set(a) | set(b)))
    assert len(set(docs)) == len(docs)  # no duplicates
    assert all(d in a or d in b for d in docs)
    shared = min(k, shared_prefix(a, b))
    assert teams[:shared] == [TEAM_SHARED] * shared and docs[:shared] == a[:shared] == b[:shared]
    assert TEAM_SHARED not in teams[shared:]  # "=" only for the common prefix, placed first
    for team, ranking in (("A", a), ("B", b)):
        picked = [d for d, t in zip(docs, teams) if t == team]
        assert all(d in ranking for d in picked)
        assert picked == sorted(picked, key=ranking.index)  # each team keeps its ranking's order
    if set(a) == set(b):  # both can always pick: the teams stay balanced on every prefix of the draft
        for prefix in range(shared + 1, len(teams) + 1):
            assert abs(teams[shared:prefix].count("A") - teams[shared:prefix].count("B")) <= 1
    again = team_draft(a, b, k, np.random.default_rng(seed))
    assert again == (docs, teams)  # same seed, same page


def test_team_draft_identical_rankings_are_all_shared_and_draw_no_coin():
    ranking = [f"d{i}" for i in range(11)]
    for k in (0, 3, 11, 20):
        rng = np.random.default_rng(7)
        docs, teams = team_draft(ranking, list(ranking), k, rng)
        assert docs == ranking[:k] and teams == [TEAM_SHARED] * min(k, 11)
        assert rng.random() == np.random.default_rng(7).random()  # no coin drawn: nothing to decide


def test_team_draft_shares_the_common_prefix_then_drafts_the_rest_a_coin_per_round():
    a = ["s1", "s2", "s3"] + [f"d{i}" for i in range(8)]
    b = ["s1", "s2", "s3"] + [f"d{i}" for i in reversed(range(8))]
    firsts = set()
    for seed in range(40):
        docs, teams = team_draft(a, b, 11, np.random.default_rng(seed))
        assert docs[:3] == ["s1", "s2", "s3"] and teams[:3] == ["=", "=", "="]
        assert all({teams[i], teams[i + 1]} == {"A", "B"} for i in range(3, 11, 2))  # one pick each per round
        firsts.add(teams[3])
        assert docs[3] == ("d0" if teams[3] == "A" else "d7")
    assert firsts == {"A", "B"}  # the coin decides who picks first after the prefix
    # the prefix is the SAME document at the SAME rank: a swap ends it, a later agreement is drafted
    assert shared_prefix(["x", "y", "z"], ["x", "z", "y"]) == 1 and shared_prefix(["x", "y"], ["y", "x"]) == 0
    docs, teams = team_draft(["x", "y", "z"], ["y", "x", "z"], 3, np.random.default_rng(0))
    assert TEAM_SHARED not in teams  # z is third in both, but after a disagreement
    assert shared_prefix(["x", "x", "y"], ["x", "x", "y"]) == 1  # a repeated document ends it: no duplicates
    assert team_draft(["s", "a"], ["s"], 2, np.random.default_rng(0)) == (["s", "a"], ["=", "A"])  # B has nothing left


def test_team_draft_example_and_errors():
    a, b = ["a", "b", "c", "d"], ["b", "e", "a", "f"]
    docs, teams = team_draft(a, b, 6, np.random.default_rng(1))
    assert set(docs) == {"a", "b", "c", "d", "e", "f"} and teams.count("A") == teams.count("B") == 3
    assert team_draft(a, b, 0, np.random.default_rng(1)) == ([], [])
    with pytest.raises(ValueError, match="k must be"):
        team_draft(a, b, -1, np.random.default_rng(1))


# ------------------------------------------------------------------------------ optimized interleaving


def _is_interleaving(page, a, b) -> bool:
    """Every document is the highest-ranked one of A or of B not yet on the page."""
    for i, doc in enumerate(page):
        before = set(page[:i])
        heads = [next((d for d in ranking if d not in before), None) for ranking in (a, b)]
        if doc not in heads:
            return False
    return True


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 14), depth=st.integers(1, 8), overlap=st.booleans())
def test_optimized_distribution_is_fair_at_every_rank(seed, n, depth, overlap):
    a, b = _rankings(seed, n, overlap)
    if seed % 3 == 0:  # a common prefix
        head = int(seed // 3 % (n + 1))
        b = a[:head] + [d for d in b if d not in a[:head]]
    pages = candidate_pages(a, b, depth)
    assert len(set(pages)) == len(pages) <= 2 ** depth
    assert all(_is_interleaving(page, a, b) and len(set(page)) == len(page) for page in pages)
    assert all(len(page) == min(depth, len(set(a) | set(b))) for page in pages)
    shared = min(depth, shared_prefix(a, b))
    assert all(page[:shared] == tuple(a[:shared]) for page in pages)  # the common prefix opens every page
    credit = inverse_rank_credit(a, b)
    probabilities = optimized_distribution(pages, credit)
    if probabilities is None:  # rankings of different documents may have none (then: team draft)
        assert not overlap
        return
    assert probabilities.min() >= 0 and probabilities.sum() == pytest.approx(1.0)
    for rank in range(len(pages[0])):  # a click at any rank credits neither ranker in expectation
        expected = sum(p * credit[page[rank]] for p, page in zip(probabilities, pages))
        assert expected == pytest.approx(0.0, abs=1e-7)
    assert all(credit[doc] == 0 for doc in a[:shared])


def test_inverse_rank_credit_and_the_page_of_optimized_interleaving():
    credit = inverse_rank_credit(["a", "b", "c"], ["b", "a", "d"])
    assert credit == pytest.approx({"a": 1 - 1 / 2, "b": 1 / 2 - 1, "c": 1 / 3 - 1 / 4, "d": 1 / 4 - 1 / 3})
    a, b = [f"d{i}" for i in range(30)], [f"d{i}" for i in [1, 0, 5, 4, 3, 2] + list(range(6, 30))]
    pages = {}
    for seed in range(30):
        docs, credits = optimized_interleave(a, b, 14, np.random.default_rng(seed))
        assert len(docs) == 14 and len(set(docs)) == 14 and _is_interleaving(docs[:10], a, b)
        full = inverse_rank_credit(a, b)
        assert credits[:10] == [full[d] for d in docs[:10]] and credits[10:] == [0.0] * 4  # below the top 10: no credit
        assert docs[10:] == [d for d in a if d not in docs[:10]][:4]  # then A's order
        assert optimized_interleave(a, b, 14, np.random.default_rng(seed)) == (docs, credits)  # same seed, same page
        pages[tuple(docs[:6])] = credits[:6]
    assert len(pages) > 1  # the draw varies the page
    assert optimized_interleave(a, list(a), 5, np.random.default_rng(0)) == (a[:5], [0.0] * 5)  # alike: nothing to credit
    assert optimized_interleave(a, b, 0, np.random.default_rng(0)) == ([], [])
    with pytest.raises(ValueError, match="k must be"):
        optimized_interleave(a, b, -1, np.random.default_rng(0))


def test_optimized_interleaving_falls_back_to_team_draft_without_a_fair_distribution(monkeypatch):
    a, b = ["a", "b", "c", "d"], ["b", "e", "a", "f"]
    monkeypatch.setattr(interleaving, "optimized_distribution", lambda pages, credit: None)
    interleaving._fair_pages.cache_clear()  # solved distributions are cached per rankings
    docs, credits = optimized_interleave(a, b, 4, np.random.default_rng(1))
    drafted, teams = team_draft(a, b, 4, np.random.default_rng(1))
    assert docs == drafted and credits == [{"A": 1.0, "B": -1.0, "=": 0.0}[t] for t in teams]
    interleaving._fair_pages.cache_clear()


def test_optimized_interleaving_prefers_the_ranker_users_click_and_neither_for_random_clicks():
    """Simulated users (PBM, examination 1/rank): relevance-driven clicks credit the ranker that
    puts the relevant documents higher; clicks that ignore the documents average to zero credit."""
    rng = np.random.default_rng(5)
    docs = [f"d{i}" for i in range(20)]
    relevant = {"d3", "d7", "d11"}
    better = sorted(docs, key=lambda d: (d not in relevant, docs.index(d)))
    worse = list(rng.permutation(docs))
    examination = 1 / np.arange(1, 11)
    informed, random_clicks = [], []
    for _ in range(3000):
        page, credits = optimized_interleave(better, worse, 10, rng)
        seen = rng.random(10) < examination
        informed.append(sum(c for d, c, s in zip(page, credits, seen) if s and (d in relevant or rng.random() < 0.05)))
        random_clicks.append(sum(c for c, s in zip(credits, seen) if s and rng.random() < 0.5))
    assert np.mean(informed) > 4 * np.std(informed) / np.sqrt(len(informed))  # clearly for the better ranker
    assert abs(np.mean(random_clicks)) < 3 * np.std(random_clicks) / np.sqrt(len(random_clicks))


# ------------------------------------------------------------------------------ config


def _config(tmp_path: Path, text: str):
    path = tmp_path / "service.toml"
    path.write_text(text)
    return load_service_config(tmp_path / "home", path)


@pytest.mark.parametrize("section, message", [
    ("interleave_model = 'm2'\ninterleave_share = 1.5", "experiments.interleave_share must be a number in [0, 1], got 1.5"),
    ("interleave_share = -0.1\ninterleave_model = 'm2'", "experiments.interleave_share"),
    ("interleave_share = true\ninterleave_model = 'm2'", "experiments.interleave_share"),
    ("interleave_share = 0.2", "experiments.interleave_share = 0.2 needs experiments.interleave_model"),
    ("shadow = 'm2'", "experiments.shadow: unknown key"),
    ("shadow_model = ''", "experiments.shadow_model must be a model version"),
    ("shadow_model = 3", 'experiments.shadow_model: expected a string, got 3'),
    ("seed = 1.5", 'experiments.seed: expected an integer, got 1.5'),
    ("interleave_method = 'balanced'", "experiments.interleave_method must be one of optimized, team-draft, got 'balanced'"),
])
def test_experiment_settings_errors_name_the_key(tmp_path, section, message):
    with pytest.raises(ValueError, match="service.toml: " + re.escape(message)):
        _config(tmp_path, f"[experiments]\n{section}\n")


def test_experiment_settings_load(tmp_path):
    config = _config(tmp_path, "[experiments]\nshadow_model = 'm2'\ninterleave_model = 'm3'\ninterleave_share = 1\nseed = 4\n")
    assert config.experiments == OnlineExperimentSettings("m2", "m3", 1, 4) and config.experiments.enabled
    assert config.experiments.interleave_method == "optimized"  # the default: fewest sessions to decide
    assert _config(tmp_path, "[experiments]\ninterleave_method = 'team-draft'\n").experiments.interleave_method == "team-draft"
    assert config.experiment_log_path == tmp_path / "home" / "experiments" / "default.sqlite3"
    assert not _config(tmp_path, "rerank_window = 10\n").experiments.enabled
    assert not OnlineExperimentSettings(interleave_model="m3").enabled  # share 0: nothing interleaved


# ------------------------------------------------------------------------------ compare statistics


def _page(request_id: str, teams: str, models=("m1", "m2"), offset=0, t=1000.0) -> InterleavedRequest:
    picks = tuple(TeamPick(offset + i + 1, f"{request_id}-d{i}", team) for i, team in enumerate(teams))
    return InterleavedRequest(request_id, t, models[0], models[1], offset, picks)


def _click(page: InterleavedRequest, position: int) -> Event:
    pick = page.pick_at(position)
    return Event(page.request_id, "click", pick.doc_id, position, page.timestamp + 1)


def compare_fixed(*args, **kwargs):
    """The comparison read as a fixed sample (`models compare --fixed-sample`): these tests check
    the fixed-sample tests on samples far too small for the always-valid default."""
    return compare_interleaved(*args, **kwargs, reading="fixed")


def test_clicks_are_credited_to_teams_and_the_sign_test_decides():
    pages = [_page(f"r{i}", "ABAB") for i in range(12)]
    clicks = [_click(pages[i], 1) for i in range(10)]  # position 1 is A's: 10 wins for m1
    clicks += [_click(pages[10], 2), _click(pages[10], 4)]  # two B clicks: a loss
    clicks += [_click(pages[11], 1), _click(pages[11], 2)]  # one each: a tie
    clicks += [_click(pages[0], 1)]  # the same document clicked again counts once
    clicks += [Event("r1", "click", "not-on-page", 1, 2000.0), Event("elsewhere", "click", "x", 1, 2000.0)]
    result = compare_fixed("m1", "m2", pages, clicks)
    assert (result.wins, result.losses, result.ties) == (10, 1, 1)
    assert result.unmatched_clicks == 1  # the unknown request is not counted at all
    assert result.p_value == pytest.approx(2 * (1 + 11) / 2 ** 11)  # exact two-sided binomial, n = 11
    assert result.preferred == "m1" and "m1 preferred" in result.verdict()
    flipped = compare_fixed("m2", "m1", pages, clicks)  # the other order: the same evidence, turned
    assert (flipped.wins, flipped.losses, flipped.preferred) == (1, 10, "m1")
    few = compare_fixed("m1", "m2", pages[:4], clicks)
    assert few.wins == 4 and few.p_value == pytest.approx(0.125) and few.verdict() == "no significant preference"
    assert compare_fixed("m1", "m2", [], []).p_value == 1.0


def test_an_undecided_comparison_says_when_the_sample_is_too_small():
    pages = [_page(f"r{i}", "ABAB") for i in range(20)]

    def compared(wins: int, losses: int, ties: int = 0):
        clicks = [_click(pages[i], 1) for i in range(wins)]  # position 1: A's document
        clicks += [_click(pages[wins + i], 2) for i in range(losses)]  # position 2: B's
        clicks += [c for i in range(ties) for c in (_click(pages[wins + losses + i], 1), _click(pages[wins + losses + i], 2))]
        return compare_fixed("m1", "m2", pages[: wins + losses + ties], clicks)

    nothing = compare_fixed("m1", "m2", pages[:3], [])
    assert nothing.note() == ("sample too small to decide: no request with more clicks for one model "
                              "(no clicks, only ties, or clicks only on results both rank alike)")
    unanimous_but_few = compared(5, 0)
    assert unanimous_but_few.verdict() == "no significant preference"
    assert unanimous_but_few.note() == ("sample too small to decide: 5 decided request(s); even 5-0 gives p = 0.0625, "
                                        "at least 6 are needed for p < 0.05")
    assert compared(6, 0).preferred == "m1" and compared(6, 0).note() is None  # 6-0: p = 0.031
    assert compared(3, 3).note() == "no preference at all in 6 decided requests (win rate 0.5)"
    leaning = compared(7, 2, ties=3)  # win rate 7/9: (1.96 / (2 * 0.278))**2 = 12.4 -> 13 decided, 13 / 0.75 -> 18 requests
    assert leaning.p_value > 0.05
    assert leaning.note() == ("sample too small to decide: at the observed win rate 0.778 about 13 decided requests "
                              "(~18 interleaved requests at this rate of ties) would reach p < 0.05; 9 so far")
    report = leaning.to_dict()
    report["since"] = None
    assert report["note"] == leaning.note()
    assert render(report).splitlines()[-1] == f"note: {leaning.note()}"
    decided = compared(12, 1)
    assert decided.preferred == "m1" and decided.to_dict()["note"] is None
    assert "note:" not in render({**decided.to_dict(), "since": None})


def test_pages_logged_in_either_order_are_oriented():
    pages = [_page("x", "AB", models=("m2", "m1")), _page("y", "AB")]  # x: m2 was active (team A)
    clicks = [_click(pages[0], 1), _click(pages[1], 1)]
    result = compare_interleaved("m1", "m2", pages, clicks)
    assert {r.request_id: r.outcome for r in result.requests} == {"x": "loss", "y": "win"}


def test_clicks_on_the_shared_prefix_credit_neither_team_in_either_order():
    pages = [_page("s", "==AB"), _page("t", "=BA", models=("m2", "m1")), _page("u", "AB")]
    clicks = [_click(pages[0], 1), _click(pages[0], 2),  # shared only: a tie, not a win
              _click(pages[1], 1), _click(pages[1], 2),  # shared + B's: B is m1 on this page
              _click(pages[2], 2)]  # an older page with only A and B: still credited
    for a, b, wins, losses in (("m1", "m2", 1, 1), ("m2", "m1", 1, 1)):
        result = compare_interleaved(a, b, pages, clicks)
        outcomes = {r.request_id: (r.clicks_a, r.clicks_b, r.clicks_shared, r.outcome) for r in result.requests}
        assert outcomes["s"] == (0, 0, 2, "tie")
        assert outcomes["t"] == ((1, 0, 1, "win") if a == "m1" else (0, 1, 1, "loss"))  # "=" stays when turned
        assert outcomes["u"] == ((0, 1, 0, "loss") if a == "m1" else (1, 0, 0, "win"))
        assert (result.wins, result.losses, result.ties, result.unmatched_clicks) == (wins, losses, 1, 0)
    report = {**compare_interleaved("m1", "m2", pages, clicks).to_dict(), "since": None}
    assert (report["clicks_a"], report["clicks_b"], report["clicks_shared"], report["requests_with_clicks"]) == (1, 1, 3, 3)
    text = render(report)
    assert "  s  A 0  B 0  shared 2  tie" in text and "clicks A 1, B 1, 3 on results both rank alike (credited to neither)" in text
    only_shared = compare_interleaved("m1", "m2", pages[:1], clicks)
    assert only_shared.preferred is None and "clicks only on results both rank alike" in only_shared.note()
    old_style = render({**compare_interleaved("m1", "m2", pages[2:], clicks).to_dict(), "since": None})
    assert "both rank alike" not in old_style and "shared" not in old_style


def _optimized_page(request_id: str, credits: list[float], models=("m1", "m2")) -> InterleavedRequest:
    picks = tuple(TeamPick(i + 1, f"{request_id}-d{i}", "A" if c > 0 else "B" if c < 0 else "=", c)
                  for i, c in enumerate(credits))
    return InterleavedRequest(request_id, 1000.0, models[0], models[1], 0, picks)


def test_optimized_pages_sum_credit_per_request_and_the_t_test_decides():
    credits = [0.5, -0.5, 1 / 3 - 0.25, 0.0]
    pages = [_optimized_page(f"r{i}", credits) for i in range(12)]
    clicks = [_click(pages[i], 1) for i in range(8)]  # +0.5 each
    clicks += [_click(pages[8], 2), _click(pages[8], 3)]  # -0.5 + 0.083: a loss
    clicks += [_click(pages[9], 1), _click(pages[9], 2)]  # +0.5 - 0.5: a tie
    clicks += [_click(pages[10], 4), _click(pages[0], 1)]  # credit 0 ("="); a repeated click counts once
    result = compare_fixed("m1", "m2", pages, clicks)
    per_request = {r.request_id: r for r in result.requests}
    assert per_request["r0"].credit == pytest.approx(0.5) and per_request["r8"].credit == pytest.approx(-0.5 + 1 / 12)
    assert per_request["r9"].outcome == "tie" and per_request["r10"].clicks_shared == 1
    assert (result.wins, result.losses, result.ties) == (8, 1, 3) and result.test == "t"
    from scipy.stats import ttest_1samp

    values = [r.credit for r in result.requests]
    assert result.p_value == pytest.approx(ttest_1samp(values, 0.0).pvalue) and result.p_value < 0.05
    assert result.preferred == "m1" and result.mean_credit == pytest.approx(np.mean(values))
    flipped = compare_fixed("m2", "m1", pages, clicks)  # the other order: credits turned
    assert flipped.mean_credit == pytest.approx(-result.mean_credit) and flipped.preferred == "m1"
    turned = [_optimized_page(p.request_id, [-c for c in credits], models=("m2", "m1")) for p in pages]
    assert compare_fixed("m1", "m2", turned, clicks).mean_credit == pytest.approx(result.mean_credit)
    report = {**result.to_dict(), "since": None}
    assert report["test"] == "t" and report["per_request"][0]["credit"] == pytest.approx(0.5)
    text = render(report)
    assert "t-test (two-sided, mean credit per request +" in text and "m1 preferred" in text
    assert "  r8  A 1  B 1  credit -0.417  loss" in text
    few = compare_fixed("m1", "m2", pages[:3], clicks[:2])  # +0.5, +0.5, 0: too few to decide
    assert few.preferred is None and few.note().startswith("sample too small to decide: at the observed mean credit +0.3333")
    alike = compare_fixed("m1", "m2", pages[:2], clicks[:2])  # +0.5, +0.5: no spread to test
    assert alike.p_value == 1.0 and "a test of their mean needs them to vary" in alike.note()
    mixed = compare_fixed("m1", "m2", pages[:2] + [_page("td", "AB")], clicks[:2] + [_click(_page("td", "AB"), 2)])
    assert mixed.test == "t" and {r.request_id: r.credit for r in mixed.requests}["td"] == -1.0  # a team-draft click: -1


def test_the_experiment_log_keeps_shared_labels_and_refuses_unknown_teams(tmp_path):
    with ExperimentLog(tmp_path / "experiments.sqlite3") as log:
        log.log_interleaved(_page("r", "=AB"))
        with pytest.raises(ValueError, match=re.escape("bad: teams must be 'A', 'B' or '=' (shared), got 'C'")):
            log.log_interleaved(_page("bad", "=CA"))
        assert [p.team for p in next(log.iter_interleaved()).teams] == ["=", "A", "B"]
        assert [row.request_id for row in log.iter_interleaved()] == ["r"]
        log.log_interleaved(_optimized_page("o", [0.25, -0.5, 0.0]))
        rows = {row.request_id: row for row in log.iter_interleaved()}
        assert [(p.team, p.credit) for p in rows["o"].teams] == [("A", 0.25), ("B", -0.5), ("=", 0.0)]
        assert [p.credit for p in rows["r"].teams] == [None, None, None]  # team draft: no credit stored
        raw = log._select("SELECT teams FROM interleaved WHERE request_id = 'r'", [])[0][0]
        assert "credit" not in raw  # team-draft rows keep their former shape


def test_shadow_agreement_measures():
    ranking = [f"d{i}" for i in range(10)]
    assert overlap_at(ranking, ranking) == 1.0 and rank_biased_overlap(ranking, ranking) == pytest.approx(1.0)
    assert overlap_at(ranking, [f"x{i}" for i in range(10)]) == 0.0
    assert rank_biased_overlap(ranking, [f"x{i}" for i in range(10)]) == 0.0
    swapped_top = ranking[1::-1] + ranking[2:]
    swapped_bottom = ranking[:8] + ranking[:7:-1]
    assert rank_biased_overlap(ranking, swapped_top) < rank_biased_overlap(ranking, swapped_bottom) < 1.0
    rows = [ShadowRanking("r", 1.0, "m2", tuple((d, 0.0) for d in swapped_top), "m1", tuple((d, 0.0) for d in ranking)),
            ShadowRanking("s", 1.0, "m3", (("a", 0.0),), "m1", (("a", 0.0),))]
    agreement = shadow_agreement("m1", "m2", rows)
    assert agreement["requests"] == 1 and agreement["mean_overlap@10"] == 1.0 and agreement["top1_agreement"] == 0.0
    assert shadow_agreement("m1", "m4", rows) is None


def _compare_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_compare_parser(parser.add_subparsers(dest="models_command"))
    return parser.parse_args(["compare", *argv])


def test_models_compare_reads_the_experiment_log_and_the_event_store(tmp_path, capsys):
    home = tmp_path / "home"
    pages = [_page(f"r{i}", "ABBA", t=1000.0 + i) for i in range(8)] + [_page("old", "AB", t=10.0)]
    events_path = tmp_path / "events.sqlite3"
    with EventStore(events_path) as store, ExperimentLog(tmp_path / "experiments.sqlite3") as log:
        for page in pages:
            log.log_interleaved(page)
            store.log_request(ServedRequest(page.request_id, page.timestamp, "q", "ltr", "idx", "g1", "m1", None, None, 0,
                                            [ServedResult(p.doc_id, p.position, 1.0) for p in page.teams]))
        log.log_shadow(ShadowRanking("r0", 1000.0, "m2", (("a", 2.0), ("b", 1.0)), "m1", (("a", 1.5), ("c", 1.0))))
        clicks = [_click(pages[i], 1) for i in range(7)] + [_click(pages[7], 2), _click(pages[8], 2)]
        store.append_events(clicks)
    common = ("--events", str(events_path), "--experiments", str(tmp_path / "experiments.sqlite3"), "--json")
    assert cmd_models_compare(home, _compare_args("m1", "m2", *common)) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["requests"], report["wins_a"], report["wins_b"], report["ties"]) == (9, 7, 2, 0)
    assert report["p_value"] == pytest.approx(0.1796875) and report["preferred"] is None
    assert report["shadow"]["requests"] == 1 and report["shadow"]["mean_overlap@10"] == 0.5
    assert cmd_models_compare(home, _compare_args("m1", "m2", *common, "--since", "1970-01-01T00:16:40")) == 0
    recent = json.loads(capsys.readouterr().out)
    assert (recent["requests"], recent["wins_a"], recent["wins_b"]) == (8, 7, 1)
    assert recent["p_value"] == pytest.approx(0.0703125)
    assert cmd_models_compare(home, _compare_args("m1", "m2", *common[:-1])) == 0
    text = capsys.readouterr().out
    assert "wins m1: 7, wins m2: 2" in text and "no significant preference" in text and "overlap@10 0.500" in text
    assert "sign test (two-sided binomial, wins vs losses): p = 0.1797 (holds for a number of requests fixed" in text
    assert "always-valid test (mSPRT, mean credit per request +0.5556 vs 0" in text
    assert "note: sample too small to decide: at the observed mean credit +0.5556" in text  # read sequentially (default)
    assert report["reading"] == "sequential" and report["always_valid_p_value"] == 1.0  # 9 < 20: too few to trust
    assert cmd_models_compare(home, _compare_args("m1", "m2", *common[:-1], "--fixed-sample")) == 0
    text = capsys.readouterr().out
    assert "sign test (two-sided binomial, wins vs losses): p = 0.1797 -> no significant preference" in text
    assert "always-valid" not in text
    assert "note: sample too small to decide: at the observed win rate 0.778 about 13 decided requests" in text
    with pytest.raises(ValueError, match="no experiment log"):
        cmd_models_compare(home, _compare_args("m1", "m2", "--events", str(events_path), "--experiments", str(tmp_path / "none")))


# ------------------------------------------------------------------------------ the service


def _save_inverted_model(home: Path, dataset: Path) -> str:
    """A model trained on inverted labels (as in test_ltr): it ranks the windows very differently."""
    from eval.datasets import load_dataset
    from ltr.features import feature_set
    from ltr.ranker import index_description
    from ltr.registry import ModelRegistry
    from ltr.training import TrainingSettings, build_rows, train_ranker
    from search.embedded import EmbeddedIndex
    from tests.test_ltr import WINDOW

    index = EmbeddedIndex.open(home, "topics")
    data = load_dataset(dataset, "train")
    features = feature_set("text")
    rows = build_rows(index, data.queries, data.qrels, features, WINDOW)
    rows.labels = np.where(rows.labels > 0, 0.0, 1.0).astype(np.float32)
    model = train_ranker(rows, features.names, TrainingSettings(max_rounds=30), None)
    return ModelRegistry(home).save(
        model.booster, feature_set=features.describe(), index=index_description(index),
        training={"dataset": str(dataset.resolve()), "split": "train", "note": "inverted labels",
                  "window": WINDOW.to_dict()}, params={},
        metrics={}, importance=model.importance(), sample_features=rows.features[:8], best_iteration=model.best_iteration,
    ).version


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, shared_encoder_home: Path):
    """A home with the topics collection indexed and two models: m0001 (active) and m0002, which
    prefers the wrong documents, so interleaved pages really mix two rankings."""
    root = tmp_path_factory.mktemp("interleaving")
    home = home_sharing_encoder(root / "home", shared_encoder_home)
    dataset = _collection(root / "topics")
    run_cli(home, "index", "build", "--dataset", str(dataset), "--name", "topics", "--quiet")
    base = "rerank_window = 20\n[exploration]\nepsilon = 0.5\n[fusion.topics]\nbm25_candidates = 8\ndense_candidates = 8\n"
    plain = root / "plain.toml"
    plain.write_text(base)
    run_cli(home, "train", "--dataset", str(dataset), "--split", "train", "--config", str(plain),
            "--valid-fraction", "0.25", "--quiet")
    assert _save_inverted_model(home, dataset) == "m0002"
    run_cli(home, "models", "promote", "m0001")
    experiments = root / "experiments.toml"  # the default interleaving method: optimized
    experiments.write_text(base + '[experiments]\nshadow_model = "m0002"\ninterleave_model = "m0002"\n'
                                  'interleave_share = 1.0\nseed = 5\n')
    team_draft_experiments = root / "team_draft.toml"
    team_draft_experiments.write_text(experiments.read_text() + 'interleave_method = "team-draft"\n')
    shadow_only = root / "shadow.toml"
    shadow_only.write_text(base.replace("epsilon = 0.5", "epsilon = 0.0") + '[experiments]\nshadow_model = "m0002"\n')
    return {"home": home, "plain": plain, "optimized": experiments, "team-draft": team_draft_experiments,
            "shadow_only": shadow_only}


QUERIES = ("volcano lava eruption", "ice crevasse glacier melt", "reef", "honeybee waggle dance drone", "saturn rings")


@pytest.mark.parametrize("method", ["optimized", "team-draft"])
def test_interleaved_service_logs_teams_and_credits_clicks(two_models, capsys, method):
    home = two_models["home"]
    since = time.time()  # both methods log to the index's experiment log: compare this test's rows
    with running_service(home, "--name", "topics", "--config", str(two_models[method]), "--threads", "1") as (url, _):
        with httpx.Client(base_url=url, timeout=30) as client:
            pages = [client.post("/search", json={"query": q, "size": 10, "explain": True}).json() for q in QUERIES]
            excluded = pages[0]["results"][0]["id"]
            titles = sorted({r["fields"]["title"] for r in pages[0]["results"][1:5]})
            filtered = client.post("/search", json={"query": QUERIES[0], "exclude": [excluded],
                                                    "filters": {"title": {"in": titles}}}).json()
            hybrid = client.post("/search", json={"query": QUERIES[0], "pipeline": "hybrid"}).json()
            clicked = pages[1]["results"][0]
            stored = client.post("/events", json={"events": [
                {"request_id": pages[1]["request_id"], "type": "click", "doc_id": clicked["id"], "position": 1}]})
            assert stored.status_code == 200, stored.text
            metrics = client.get("/metrics").text
    for page in pages + [filtered]:
        assert page["interleaved"] is True and page["model_version"] == "m0001" and not page["explored"]
        assert all(r["propensity"] == 1.0 for r in page["results"])
    assert "interleaved" not in hybrid
    assert filtered["results"] and excluded not in [r["id"] for r in filtered["results"]]
    assert all(r["fields"]["title"] in titles for r in filtered["results"])
    for page in pages:  # shown scores and explanations are the active model's
        for r in page["results"]:
            assert sum(r["explain"]["contributions"].values()) == pytest.approx(r["score"], abs=1e-4)
    with ExperimentLog(home / "experiments" / "topics.sqlite3", create=False) as log:
        logged = {row.request_id: row for row in log.iter_interleaved(since=since)}
        shadows = {row.request_id: row for row in log.iter_shadow(since=since)}
    for page in pages + [filtered]:
        row = logged[page["request_id"]]
        assert (row.model_a, row.model_b, row.page_offset) == ("m0001", "m0002", 0)
        assert [(p.position, p.doc_id) for p in row.teams] == [(r["position"], r["id"]) for r in page["results"]]
        teams = [p.team for p in row.teams]
        assert set(teams) <= {"A", "B", "="}
        if method == "team-draft":
            shared = teams.count("=")  # the models' common prefix, first on the page, credited to neither
            assert teams[:shared] == ["="] * shared and abs(teams.count("A") - teams.count("B")) <= 1
            assert all(p.credit is None for p in row.teams)
        else:  # every shown document carries its credit; the team is its sign
            assert all(p.team == ("A" if p.credit > 0 else "B" if p.credit < 0 else "=") for p in row.teams)
        shadow = shadows[page["request_id"]]  # interleaved requests are shadowed too
        assert shadow.model_version == "m0002" and shadow.served_model == "m0001" and len(shadow.ranking) > 0
    settings = load_service_config(home, two_models[method]).experiments
    assert settings.interleave_method == method
    mixed = 0
    for page in pages:  # the page replays from the request id: the interleaving of A's and B's window rankings
        shadow = shadows[page["request_id"]]  # B (the shadow here too) and A over the whole window (<= 16 < 20)
        ranking_a, ranking_b = [d for d, _ in shadow.served_ranking], [d for d, _ in shadow.ranking]
        rng, size = interleaving_rng(page["request_id"], settings), len(page["results"])
        picks = logged[page["request_id"]].teams
        if method == "team-draft":
            docs, teams = team_draft(ranking_a, ranking_b, size, rng)
            assert teams == [p.team for p in picks]
        else:
            docs, credits = optimized_interleave(ranking_a, ranking_b, size, rng)
            assert credits == pytest.approx([p.credit for p in picks])
            full = inverse_rank_credit(ranking_a, ranking_b)
            assert credits[:10] == pytest.approx([full[d] for d in docs[:10]])
        assert docs == [r["id"] for r in page["results"]]
        mixed += docs != ranking_a[:len(docs)]
    assert mixed >= 3  # the models disagree: most pages differ from A's own
    assert 'ltr_search_interleaved_requests_total{model_a="m0001",model_b="m0002"} 6.0' in metrics
    assert 'ltr_search_shadow_scorings_total{model="m0002"} 6.0' in metrics

    team = logged[pages[1]["request_id"]].pick_at(1).team
    since_iso = datetime.fromtimestamp(since, timezone.utc).isoformat()
    assert cmd_models_compare(home, _compare_args("m0001", "m0002", "--name", "topics", "--since", since_iso, "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    outcomes = {r["request_id"]: r for r in report["per_request"]}
    assert report["requests"] == 6 and report["requests_with_clicks"] == 1
    credited = outcomes[pages[1]["request_id"]]
    assert (credited["clicks_a"], credited["clicks_b"], credited["clicks_shared"]) == {
        "A": (1, 0, 0), "B": (0, 1, 0), "=": (0, 0, 1)}[team]
    assert credited["outcome"] == {"A": "win", "B": "loss", "=": "tie"}[team]
    assert report["test"] == {"optimized": "t", "team-draft": "sign"}[method]
    click_credit = logged[pages[1]["request_id"]].pick_at(1).click_credit
    assert credited["credit"] == pytest.approx(click_credit) and report["mean_credit"] == pytest.approx(click_credit / 6)
    assert report["p_value"] > 0.05 and report["verdict"] == "no significant preference"
    assert report["shadow"]["requests"] >= 6 and 0.0 <= report["shadow"]["mean_rbo@10"] <= 1.0 + 1e-9


def _save_copy(home: Path, version: str) -> str:
    """Another version with the same trees: it ranks every window exactly as `version` does."""
    from ltr.registry import ModelRegistry

    registry = ModelRegistry(home)
    model = registry.load(version)
    m = model.manifest
    return registry.save(
        model.booster, feature_set=m.feature_set, index=m.index, training={**m.training, "note": f"a copy of {version}"},
        params=m.params, metrics=m.metrics, importance=m.importance, sample_features=m.sample_array(),
        best_iteration=None, reference=m.reference, stage=m.base_stage, sample_base=m.sample_base(),
    ).version


def test_a_challenger_ranking_alike_shares_every_result_and_its_clicks_credit_nobody(two_models, tmp_path, capsys):
    """Through a real `ltr-search serve`: interleaved against a copy of itself, every shown result
    is the models' common prefix ("="), logged so, and a click on it is credited to neither."""
    home = two_models["home"]
    twin = _save_copy(home, "m0001")
    events = tmp_path / "events.sqlite3"  # its own event store; the experiment log is the index's (rows by pair)
    config = tmp_path / "twin.toml"
    config.write_text(f'events_path = "{events}"\n' + two_models["plain"].read_text()
                      + f'[experiments]\ninterleave_model = "{twin}"\ninterleave_share = 1.0\nseed = 5\n')
    with running_service(home, "--name", "topics", "--config", str(config), "--threads", "1") as (url, _):
        with httpx.Client(base_url=url, timeout=30) as client:
            pages = [client.post("/search", json={"query": q, "size": 10}).json() for q in QUERIES[:2]]
            stored = client.post("/events", json={"events": [
                {"request_id": pages[0]["request_id"], "type": "click", "doc_id": pages[0]["results"][0]["id"],
                 "position": 1}]})
            assert stored.status_code == 200, stored.text
    with ExperimentLog(home / "experiments" / "topics.sqlite3", create=False) as log:
        logged = {row.request_id: row for row in log.iter_interleaved(models=("m0001", twin))}
    for page in pages:
        assert page["interleaved"] is True and len(page["results"]) > 1
        row = logged[page["request_id"]]
        assert [(p.position, p.doc_id, p.team) for p in row.teams] == [(r["position"], r["id"], "=") for r in page["results"]]
    assert cmd_models_compare(home, _compare_args("m0001", twin, "--name", "topics", "--events", str(events), "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["requests"], report["requests_with_clicks"], report["ties"]) == (2, 1, 2)
    assert (report["clicks_a"], report["clicks_b"], report["clicks_shared"], report["unmatched_clicks"]) == (0, 0, 1, 0)
    assert report["preferred"] is None and "both rank alike" in report["note"]


def test_the_service_interleaves_the_registry_challenge_from_its_next_reload(two_models, tmp_path):
    """`models challenge` (what `retrain --interleave` starts): a real `ltr-search serve` with no
    [experiments] of its own interleaves the challenger on the challenge's share once reloaded, and
    stops once the challenge ends and it reloads again."""
    home = two_models["home"]
    events = tmp_path / "events.sqlite3"
    config = tmp_path / "plain.toml"
    config.write_text(f'events_path = "{events}"\n' + two_models["plain"].read_text())
    token = {"Authorization": "Bearer challenge-test-token"}
    with running_service(home, "--name", "topics", "--config", str(config), "--threads", "1",
                         env={"LTR_SEARCH_ADMIN_TOKEN": "challenge-test-token"}) as (url, _):
        with httpx.Client(base_url=url, timeout=30) as client:
            before = client.post("/search", json={"query": QUERIES[0]}).json()
            try:
                started = run_cli(home, "models", "challenge", "m0002", "--share", "1")
                assert "m0002 interleaved against m0001 on 100% of ltr requests" in started.stdout
                assert "interleaved against m0001" in run_cli(home, "models", "challenge").stdout
                not_yet = client.post("/search", json={"query": QUERIES[1]}).json()  # read on reload only
                assert client.post("/admin/reload", headers=token).status_code == 200
                during = [client.post("/search", json={"query": q}).json() for q in QUERIES[:3]]
                hybrid = client.post("/search", json={"query": QUERIES[0], "pipeline": "hybrid"}).json()
            finally:
                ended = run_cli(home, "models", "challenge", "--end")
            assert "challenge ended: m0002" in ended.stdout
            assert client.post("/admin/reload", headers=token).status_code == 200
            after = client.post("/search", json={"query": QUERIES[0]}).json()
    assert not before.get("interleaved") and not not_yet.get("interleaved") and not after.get("interleaved")
    assert all(page["interleaved"] is True and page["model_version"] == "m0001" for page in during)
    assert "interleaved" not in hybrid
    with ExperimentLog(home / "experiments" / "topics.sqlite3", create=False) as log:
        logged = {row.request_id: row for row in log.iter_interleaved(models=("m0001", "m0002"))}
    for page in during:
        row = logged[page["request_id"]]
        assert (row.model_a, row.model_b) == ("m0001", "m0002") and all(p.credit is not None for p in row.teams)
    assert after["request_id"] not in logged and not_yet["request_id"] not in logged
    assert "no challenge running" in run_cli(home, "models", "challenge").stdout


def test_shadow_scoring_logs_and_never_changes_the_page(two_models, tmp_path):
    from fastapi.testclient import TestClient

    from search.app.service import create_app

    home = two_models["home"]
    served = {}
    for label in ("plain", "shadow_only"):
        config = dataclasses.replace(load_service_config(home, two_models[label], {"index": "topics"}),
                                     events_path=tmp_path / f"{label}.sqlite3", exploration=ExplorationSettings())
        with TestClient(create_app(config)) as client:
            served[label] = [client.post("/search", json={"query": q, "size": 10, "explain": True}).json() for q in QUERIES]
            if label == "shadow_only":
                app_state = client.app.state
                shadow = app_state.serving.snapshot.experiments.shadow
                assert shadow.version == "m0002" and app_state.serving.snapshot.experiments.challenger is None
                shadow.model = _Broken(shadow.model)  # a shadow that errors: the response is unaffected
                broken = client.post("/search", json={"query": QUERIES[0], "size": 10}).json()
                metrics = client.get("/metrics").text
    for plain_page, shadow_page in zip(served["plain"], served["shadow_only"]):
        assert "interleaved" not in shadow_page
        assert [(r["id"], r["score"]) for r in plain_page["results"]] == [(r["id"], r["score"]) for r in shadow_page["results"]]
        assert "shadow" in shadow_page["timings_ms"] and "shadow" not in plain_page["timings_ms"]
    assert [r["id"] for r in broken["results"]] == [r["id"] for r in served["plain"][0]["results"]]
    assert 'ltr_search_experiment_failures_total{experiment="shadow",stage="score"} 1.0' in metrics
    assert 'ltr_search_shadow_scorings_total{model="m0002"} 5.0' in metrics
    with ExperimentLog(home / "experiments" / "topics.sqlite3", create=False) as log:
        rows = {row.request_id: row for row in log.iter_shadow()}
    for page in served["shadow_only"]:
        row = rows[page["request_id"]]
        assert [d for d, _ in row.served_ranking[:len(page["results"])]] == [r["id"] for r in page["results"]]
        assert [s for _, s in row.ranking] == sorted((s for _, s in row.ranking), reverse=True)
    assert broken["request_id"] not in rows


class _Broken:
    def __init__(self, model):
        self.version = model.version

    def predict(self, features):
        raise RuntimeError("shadow model exploded")


def test_unusable_experiment_models_never_break_serving(two_models, tmp_path):
    from fastapi.testclient import TestClient

    from search.app.service import create_app

    path = tmp_path / "missing.toml"
    path.write_text(two_models["plain"].read_text() + '[experiments]\nshadow_model = "m0099"\n'
                    'interleave_model = "m0001"\ninterleave_share = 1.0\n')
    config = load_service_config(two_models["home"], path, {"index": "topics"})
    config = dataclasses.replace(config, events_path=tmp_path / "events.sqlite3")
    with TestClient(create_app(config)) as client:
        page = client.post("/search", json={"query": "reef"}).json()
        experiments = client.app.state.serving.snapshot.experiments
        metrics = client.get("/metrics").text
    assert page["model_version"] == "m0001" and "interleaved" not in page and page["results"]
    assert experiments.shadow is None and experiments.challenger is None
    reasons = dict(experiments.errors)
    assert "m0099" in reasons["shadow"] and "is the active model" in reasons["interleave"]
    assert 'ltr_search_experiment_failures_total{experiment="shadow",stage="load"} 1.0' in metrics


def test_other_feature_sets_score_the_served_window_through_the_one_feature_path(two_models):
    """A model reading other features gets them for the SAME window via extract_features: the
    served window keeps its candidates (a cached replay too). A window without them is refused."""
    from types import SimpleNamespace

    from ltr.experiments import ExperimentScoringError, scoring_problem, window_features
    from ltr.features import feature_set
    from ltr.ranker import LtrPipeline, registry_pipeline
    from ltr.training import build_rows
    from search.embedded import EmbeddedIndex
    from tests.test_ltr import WINDOW

    home = two_models["home"]
    index = EmbeddedIndex.open(home, "topics")
    served = registry_pipeline(index, home, "m0001")
    basic = LtrPipeline(index, features=feature_set("basic"), fusion=WINDOW)
    assert scoring_problem(served, registry_pipeline(index, home, "m0002")) is None
    query = "comet dust tail"
    scored = served.rank_window(query)
    if served.fusion != WINDOW:
        assert "fusion" in scoring_problem(served, basic)
        basic = LtrPipeline(index, features=feature_set("basic"), fusion=served.fusion)
    assert scoring_problem(served, basic) is None
    assert scored.candidates is not None and list(scored.candidates.doc_ids) == [hit.doc_id for hit in scored.hits]
    assert window_features(served, query, scored) is scored.features  # same set: the matrix is reused
    rows = build_rows(index, {"q": query}, {}, feature_set("basic"), served.fusion)  # the training path
    expected = rows.features[[rows.doc_ids.index(hit.doc_id) for hit in scored.hits]]
    for window in (scored, served.rank_window(query)):  # computed, then replayed from the window cache
        assert window_features(basic, query, window).tobytes() == expected.tobytes()
    bare = SimpleNamespace(hits=scored.hits, features=scored.features, feature_names=scored.feature_names)
    with pytest.raises(ExperimentScoringError, match="no candidates"):
        window_features(basic, query, bare)
