"""Business rules: filter parsing and matching, exclusion, the diversity cap, and epsilon-greedy
exploration whose stated propensities are checked against simulation and used for IPS."""
from __future__ import annotations

import math

import numpy as np
import pytest

from search.rules import (
    MAX_EXCLUDE_IDS,
    MAX_FIELD_NAME_LENGTH,
    MAX_FILTERS,
    MAX_IN_VALUES,
    MAX_STRING_LENGTH,
    FieldFilter,
    RuleError,
    check_field_name,
    diversify,
    diversity_values,
    exclude_mask,
    explore,
    filter_mask,
    parse_filters,
    request_rng,
)

NAN = float("nan")


# --- parsing ---------------------------------------------------------------------------------


def test_parse_filter_shapes():
    parsed = parse_filters({
        "author": "ann",
        "year": {"gte": 2010, "lt": 2020},
        "journal": {"in": ["a", "b"]},
        "lang": {"eq": "en"},
        "tags": ["x", "y"],
        "score": {"gt": 0.5},
        "open": True,
        "id": {"in": ["d1"]},
        "title": "T",
    })
    by_field = {f.field: f for f in parsed}
    assert [f.field for f in parsed] == ["author", "year", "journal", "lang", "tags", "score", "open", "id", "title"]
    assert by_field["author"] == FieldFilter("author", values=("ann",))
    assert by_field["year"] == FieldFilter("year", lower=2010, lower_inclusive=True, upper=2020, upper_inclusive=False)
    assert by_field["journal"].values == ("a", "b") and not by_field["journal"].is_range
    assert by_field["lang"].values == ("en",)
    assert by_field["tags"].values == ("x", "y")
    assert by_field["score"] == FieldFilter("score", lower=0.5, lower_inclusive=False)
    assert by_field["open"].values == (True,)
    assert parse_filters({}) == []
    # a single-point range and field names at the limits are valid
    assert parse_filters({"y": {"gte": 3, "lte": 3}})[0].matches(3)
    assert parse_filters({"a" * MAX_FIELD_NAME_LENGTH: 1, "A-z_0.9": 1})
    assert len(parse_filters({f"f{i}": 1 for i in range(MAX_FILTERS)})) == MAX_FILTERS
    assert len(parse_filters({"t": {"in": list(range(MAX_IN_VALUES))}})[0].values) == MAX_IN_VALUES


OPS = "(use eq, in, gt, gte, lt, lte)"


@pytest.mark.parametrize("spec, message", [
    ({"year": {"gtee": 2010}}, f"filters.year: unknown operator 'gtee' {OPS}"),
    ({"meta": {"author": "ann"}}, f"filters.meta: unknown operator 'author' {OPS}"),
    ({"year": {}}, f"filters.year: expected at least one operator {OPS}"),
    ({"year": {"gte": "abc"}}, 'filters.year.gte: expected a number, got "abc"'),
    ({"year": {"gte": True}}, "filters.year.gte: expected a number, got true"),
    ({"year": {"lt": None}}, "filters.year.lt: expected a number, got null"),
    ({"year": {"lt": [2020]}}, "filters.year.lt: expected a number, got [2020]"),
    ({"year": {"gte": {"value": 1}}}, 'filters.year.gte: expected a number, got {"value": 1}'),
    ({"year": {"gte": math.inf}}, "filters.year.gte: expected a finite number, got Infinity"),
    ({"year": {"lte": NAN}}, "filters.year.lte: expected a finite number, got NaN"),
    ({"year": {"gte": 2020, "lt": 2010}}, "filters.year: empty range: gte 2020 and lt 2010 match nothing"),
    ({"year": {"gt": 5, "lte": 5}}, "filters.year: empty range: gt 5 and lte 5 match nothing"),
    ({"year": {"gte": 5.5, "lt": 5.5}}, "filters.year: empty range: gte 5.5 and lt 5.5 match nothing"),
    ({"year": {"gt": 1, "gte": 2}}, "filters.year: use gt or gte, not both"),
    ({"year": {"lt": 1, "lte": 2}}, "filters.year: use lt or lte, not both"),
    ({"year": {"eq": 2015, "gte": 2010}}, "filters.year: eq cannot be combined with gt, gte, lt or lte"),
    ({"year": {"in": [2015], "lt": 2020}}, "filters.year: in cannot be combined with gt, gte, lt or lte"),
    ({"lang": {"eq": "en", "in": ["en"]}}, "filters.lang: use eq or in, not both"),
    ({"journal": {"in": []}}, f"filters.journal.in: expected a non-empty list of at most {MAX_IN_VALUES} values"),
    ({"journal": {"in": "a"}}, f"filters.journal.in: expected a non-empty list of at most {MAX_IN_VALUES} values"),
    ({"journal": {"in": list(range(MAX_IN_VALUES + 1))}},
     f"filters.journal.in: expected a non-empty list of at most {MAX_IN_VALUES} values"),
    ({"tags": []}, f"filters.tags: expected a non-empty list of at most {MAX_IN_VALUES} values"),
    ({"journal": {"in": ["a", None]}}, "filters.journal.in[1]: expected a string, number or boolean, got null"),
    ({"tags": ["x", ["y"]]}, 'filters.tags[1]: expected a string, number or boolean, got ["y"]'),
    ({"tags": [{"a": 1}]}, 'filters.tags[0]: expected a string, number or boolean, got {"a": 1}'),
    ({"lang": {"eq": {"a": "en"}}}, 'filters.lang.eq: expected a string, number or boolean, got {"a": "en"}'),
    ({"lang": {"eq": None}}, "filters.lang.eq: expected a string, number or boolean, got null"),
    ({"score": NAN}, "filters.score: expected a finite number, got NaN"),
    ({"score": {"eq": -math.inf}}, "filters.score.eq: expected a finite number, got -Infinity"),
    ({"author": None}, "filters.author: expected a value, a list of values or an object of operators, got null"),
    ({"author": "x" * (MAX_STRING_LENGTH + 1)}, f"filters.author: string longer than {MAX_STRING_LENGTH} characters"),
    ({"": 1}, "filters: field name must not be empty"),
    ({"a b": 1}, "filters: field name \"a b\" may only contain letters, digits, '_', '.' and '-'"),
    ({"année": 1}, "filters: field name \"année\" may only contain letters, digits, '_', '.' and '-'"),
    ({"a" * (MAX_FIELD_NAME_LENGTH + 1): 1},
     f'filters: field name "{"a" * 58}… is longer than {MAX_FIELD_NAME_LENGTH} characters'),
    ({3: 1}, "filters: field name 3 is not a string"),
    ({f"f{i}": 1 for i in range(MAX_FILTERS + 1)}, f"filters: at most {MAX_FILTERS} fields, got {MAX_FILTERS + 1}"),
    (["author", "ann"], 'filters: expected an object mapping field names to conditions, got ["author", "ann"]'),
])
def test_parse_errors_name_the_path_and_reason(spec, message):
    with pytest.raises(RuleError) as raised:
        parse_filters(spec)
    assert str(raised.value) == message
    assert isinstance(raised.value, ValueError)


def test_check_field_name_uses_the_given_path():
    assert check_field_name("journal", "diversity.field") == "journal"
    with pytest.raises(RuleError) as raised:
        check_field_name("a/b", "diversity.field")
    assert str(raised.value) == "diversity.field: field name \"a/b\" may only contain letters, digits, '_', '.' and '-'"


# --- filtering -------------------------------------------------------------------------------

METADATA = [
    {"author": "ann", "year": 2015, "tags": ["x", "y"], "open": True, "score": 0.7, "title": "Alpha"},
    {"author": "bob", "year": "2015", "tags": "x", "open": 1, "score": NAN},
    {"author": ["ann", "cy"], "year": 2019.5, "tags": [], "open": False, "score": [0.2, 0.9]},
    {"year": None, "tags": ["z", None, ["x"]], "score": True},
    {"author": "Ann", "year": 2020, "tags": ["y"], "open": "true", "score": "0.8", "title": "Beta"},
]
IDS = ["d0", "d1", "d2", "d3", "d4"]


def mask(spec, metadata=METADATA, doc_ids=None):
    return filter_mask(parse_filters(spec), metadata, doc_ids).tolist()


def test_equality_and_membership_follow_json_types():
    assert mask({"author": "ann"}) == [True, False, True, False, False]  # case-sensitive; list field: any element
    assert mask({"author": {"in": ["cy", "bob"]}}) == [False, True, True, False, False]
    assert mask({"year": 2015}) == [True, False, False, False, False]  # "2015" is a string, not 2015
    assert mask({"year": 2015.0}) == [True, False, False, False, False]  # 2015 == 2015.0
    assert mask({"year": "2015"}) == [False, True, False, False, False]
    assert mask({"open": True}) == [True, False, False, False, False]  # true is not 1 nor "true"
    assert mask({"open": 1}) == [False, True, False, False, False]
    assert mask({"tags": "x"}) == [True, True, False, False, False]  # a nested list element never matches
    assert mask({"tags": ["y", "z"]}) == [True, False, False, True, True]
    assert mask({"missing": "x"}) == [False] * 5


def test_ranges_only_match_numbers():
    assert mask({"year": {"gte": 2015, "lt": 2020}}) == [True, False, True, False, False]
    assert mask({"year": {"gt": 2015, "lte": 2020}}) == [False, False, True, False, True]
    assert mask({"year": {"lt": 1e9}}) == [True, False, True, False, True]  # null and "2015" never match
    # NaN never matches, a bool is not a number, a string is not a number; a list matches if any element does
    assert mask({"score": {"gte": 0}}) == [True, False, True, False, False]
    assert mask({"score": {"gt": 0.8}}) == [False, False, True, False, False]
    assert mask({"score": {"lt": 0.1}}) == [False] * 5


def test_filters_are_anded_and_reserved_fields():
    assert mask({"author": "ann", "year": {"lt": 2016}}) == [True, False, False, False, False]
    assert mask({"title": {"in": ["Alpha", "Beta"]}}) == [True, False, False, False, True]
    assert mask({"id": ["d1", "d3"]}, doc_ids=IDS) == [False, True, False, True, False]
    assert mask({"id": "d1"}, [{"id": "d1"}, {}]) == [True, False]  # without doc_ids, read from metadata
    assert filter_mask([], METADATA).tolist() == [True] * 5
    assert filter_mask(parse_filters({"a": 1}), []).dtype == bool
    with pytest.raises(RuleError, match="2 document ids but 5 metadata records"):
        filter_mask([], METADATA, ["a", "b"])


# --- exclusion -------------------------------------------------------------------------------


def test_exclude_mask():
    assert exclude_mask(IDS, ["d1", "d4", "unknown"]).tolist() == [True, False, True, True, False]
    assert exclude_mask(IDS, set()).tolist() == [True] * 5
    assert exclude_mask([], ["d1"]).tolist() == []
    assert exclude_mask(IDS, [f"x{i}" for i in range(MAX_EXCLUDE_IDS)]).all()
    for exclude, message in [
        ([f"x{i}" for i in range(MAX_EXCLUDE_IDS + 1)],
         f"exclude: at most {MAX_EXCLUDE_IDS} document ids, got {MAX_EXCLUDE_IDS + 1}"),
        ("d1", 'exclude: expected a list of document ids, got "d1"'),
        (["d1", 7], "exclude: expected document id strings, got 7"),
    ]:
        with pytest.raises(RuleError) as raised:
            exclude_mask(IDS, exclude)
        assert str(raised.value) == message


# --- diversity -------------------------------------------------------------------------------


def test_diversify_keeps_order_and_never_caps_missing_values():
    values = ["a", "a", None, "b", "a", None, "b", "b", None, "a"]
    order = np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    assert diversify(order, values, 2).tolist() == [9, 8, 7, 6, 5, 4, 2]
    assert diversify(order, values, 1).tolist() == [9, 8, 7, 5, 2]
    assert diversify(order, values, 100).tolist() == order.tolist()
    assert diversify(np.array([], dtype=int), [], 1).tolist() == []
    assert diversify(np.array([2, 5, 8]), values, 1).tolist() == [2, 5, 8]  # None only


def test_diversify_multi_valued_counts_against_every_element():
    values = [frozenset({"ann", "bob"}), "ann", frozenset({"bob"}), "cy", frozenset({"cy", "dee"}), "dee"]
    assert diversify(np.arange(6), values, 1).tolist() == [0, 3, 5]
    assert diversify(np.arange(6), values, 2).tolist() == [0, 1, 2, 3, 4, 5]
    assert diversify(np.array([1, 0, 2]), values, 1).tolist() == [1, 2]  # "ann" is spent before the pair


def test_diversity_values():
    metadata = [{"j": "x"}, {"j": 1}, {"j": True}, {"j": 1.0}, {"j": ["a", "b", "a"]}, {"j": []},
                {"j": None}, {}, {"j": NAN}, {"j": [None]}]
    values = diversity_values(metadata, "j")
    assert values[1] == values[3] and values[1] != values[2] and values[0] != values[1]
    assert isinstance(values[4], frozenset) and len(values[4]) == 2
    assert values[5:] == [None] * 5
    assert diversify(np.arange(len(metadata)), values, 1).tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]


def test_diversify_validation():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(RuleError, match="max_per_value must be an integer >= 1"):
            diversify(np.arange(2), ["a", "b"], bad)
    with pytest.raises(RuleError, match=r"order holds indices outside 0\.\.1"):
        diversify(np.array([0, 2]), ["a", "b"], 1)
    with pytest.raises(RuleError, match="1-D array of candidate indices"):
        diversify(np.array([0.0, 1.0]), ["a", "b"], 1)
    with pytest.raises(RuleError) as raised:
        diversity_values([{}], "a b")
    assert str(raised.value) == "diversity.field: field name \"a b\" may only contain letters, digits, '_', '.' and '-'"


# --- exploration -----------------------------------------------------------------------------


def test_epsilon_zero_is_the_identity():
    order = np.array([4, 2, 7, 1, 0, 3, 6, 5])
    result = explore(order, np.random.default_rng(1), 0.0, 0, 4, 1)
    assert result.order.tolist() == order.tolist() and result.order is not order
    assert result.propensities.tolist() == [1.0] * 8 and result.propensities.dtype == np.float64
    assert not result.explored and result.swapped is None


def test_epsilon_one_always_swaps_exactly_once_below_the_protected_top():
    order = np.arange(10) * 3
    rng = np.random.default_rng(2)
    seen = set()
    for _ in range(300):
        result = explore(order, rng, 1.0, 2, 4, 1)  # page = 2..5, slots 3..5, deep 6..9
        slot, deep = result.swapped
        assert result.explored and 3 <= slot <= 5 and 6 <= deep <= 9
        changed = np.flatnonzero(result.order != order).tolist()
        assert changed == [slot, deep]
        assert result.order[slot] == order[deep] and result.order[deep] == order[slot]
        assert result.order[:3].tolist() == order[:3].tolist()  # earlier pages and the protected top
        assert result.propensities[:3].tolist() == [1.0] * 3
        assert result.propensities[slot] == result.propensities[deep] == pytest.approx(1 / 12)
        assert np.delete(result.propensities, [0, 1, 2, slot, deep]) == pytest.approx(
            [1 - 1 / 3] * 2 + [1 - 1 / 4] * 3)
        seen.add((slot, deep))
    assert len(seen) == 12  # every (slot, deep) pair occurs


@pytest.mark.parametrize("n, page_start, page_size, protected_top", [
    (5, 0, 5, 1),  # nothing after the page
    (8, 0, 10, 0),  # the list ends inside the page
    (10, 0, 3, 3),  # the whole page is protected
    (10, 0, 3, 5),
    (10, 0, 0, 0),  # empty page
    (10, 12, 3, 0),  # page beyond the list
    (0, 0, 10, 0),
])
def test_no_exploration_when_there_is_nothing_to_swap(n, page_start, page_size, protected_top):
    result = explore(np.arange(n), np.random.default_rng(3), 1.0, page_start, page_size, protected_top)
    assert not result.explored and result.swapped is None
    assert result.order.tolist() == list(range(n)) and result.propensities.tolist() == [1.0] * n


def test_explore_validation():
    order = np.arange(5)
    rng = np.random.default_rng(0)
    for epsilon in (-0.1, 1.5, NAN, "0.5", True):
        with pytest.raises(RuleError, match=r"epsilon must be in \[0, 1\]"):
            explore(order, rng, epsilon, 0, 2, 0)
    for name, args in [("page_start", (-1, 2, 0)), ("page_size", (0, -2, 0)), ("protected_top", (0, 2, 1.5))]:
        with pytest.raises(RuleError, match=f"^{name} must be an integer >= 0, got"):
            explore(order, rng, 0.1, *args)
    with pytest.raises(RuleError, match="1-D array of candidate indices"):
        explore(np.arange(6).reshape(2, 3), rng, 0.1, 0, 2, 0)


# Simulation shared by the empirical checks: a page of 4 at offset 2 with its top 1 protected, so
# positions 0..2 are fixed, slots 3..5 (n_slots = 3) and deep positions 6..9 (n_deep = 4).
DRAWS = 200_000
EPSILON = 0.4
ORDER = np.array([11, 3, 7, 0, 9, 4, 8, 1, 5, 2])
PAGE = dict(page_start=2, page_size=4, protected_top=1)


@pytest.fixture(scope="module")
def simulation():
    rng = np.random.default_rng(20240611)
    shown = np.empty((DRAWS, len(ORDER)), dtype=np.intp)
    propensities = np.empty((DRAWS, len(ORDER)))
    explored = 0
    for n in range(DRAWS):
        result = explore(ORDER, rng, EPSILON, **PAGE)
        shown[n], propensities[n] = result.order, result.propensities
        explored += result.explored
    return shown, propensities, explored


def test_propensities_match_simulated_frequencies(simulation):
    shown, propensities, explored = simulation
    n_slots, n_deep = 3, 4
    # The exploration rate is epsilon (binomial standard error sqrt(eps (1 - eps) / N) ~ 0.0011).
    assert abs(explored / DRAWS - EPSILON) < 5 * math.sqrt(EPSILON * (1 - EPSILON) / DRAWS)
    stated: dict[tuple[int, int], float] = {}
    observed: dict[tuple[int, int], int] = {}
    positions = np.broadcast_to(np.arange(len(ORDER)), shown.shape)
    for doc, position, propensity in zip(shown.ravel(), positions.ravel(), propensities.ravel()):
        pair = (int(doc), int(position))
        observed[pair] = observed.get(pair, 0) + 1
        stated.setdefault(pair, propensity)
        assert stated[pair] == propensity  # a (document, position) always gets the same propensity
    # Every pair the derivation allows occurs, and no other.
    expected_pairs = {(int(d), p) for p, d in enumerate(ORDER)}
    expected_pairs |= {(int(ORDER[d]), s) for s in range(3, 6) for d in range(6, 10)}
    expected_pairs |= {(int(ORDER[s]), d) for s in range(3, 6) for d in range(6, 10)}
    assert set(observed) == expected_pairs
    # The stated values are the derivation's, and they are distributions over documents per position.
    swap = EPSILON / (n_slots * n_deep)
    for (doc, position), value in stated.items():
        if position < 3:
            assert value == 1.0
        elif ORDER[position] == doc:
            keep = 1 / n_slots if position < 6 else 1 / n_deep
            assert value == pytest.approx(1 - EPSILON * keep)
        else:
            assert value == pytest.approx(swap)
    for position in range(len(ORDER)):
        assert sum(v for (d, p), v in stated.items() if p == position) == pytest.approx(1.0)
    for doc in ORDER:
        assert sum(v for (d, p), v in stated.items() if d == doc) == pytest.approx(1.0)
    # Observed frequencies agree with the propensities within 4.5 binomial standard errors,
    # sqrt(p (1 - p) / N); with ~60 pairs the chance that any honest pair strays that far is < 5e-4.
    for pair, count in observed.items():
        p = stated[pair]
        tolerance = 4.5 * math.sqrt(p * (1 - p) / DRAWS) + 1e-12
        assert abs(count / DRAWS - p) <= tolerance, (pair, count / DRAWS, p)


def test_inverse_propensity_weighting_recovers_attractiveness(simulation):
    """Position-based click model: P(click at position k) = theta_k * attractiveness(doc). For each
    (doc, slot) with positive propensity, mean over requests of 1[doc at slot] * click / (pi * theta)
    has expectation attractiveness(doc): IPS is unbiased even for documents the ranking never
    shows there. A naive CTR over impressions is not (it carries the position bias)."""
    shown, propensities, _ = simulation
    attractiveness = np.linspace(0.9, 0.1, 12)  # by candidate index
    theta = np.zeros(len(ORDER))
    theta[2:6] = [0.9, 0.6, 0.45, 0.3]  # only the page (positions 2..5) is shown
    clicks = np.random.default_rng(7).random(shown.shape) < theta * attractiveness[shown]
    slots = range(3, 6)
    for doc in ORDER[3:]:  # the slots' own documents and the deep documents exploration brings up
        weights = np.zeros(DRAWS)
        reachable = [s for s in slots if (shown[:, s] == doc).any()]
        for s in reachable:
            here = shown[:, s] == doc
            weights += here * clicks[:, s] / (propensities[:, s] * theta[s]) / len(reachable)
        estimate = weights.mean()
        standard_error = weights.std() / math.sqrt(DRAWS)
        assert standard_error < 0.02
        assert abs(estimate - attractiveness[doc]) < 4.5 * standard_error, (doc, estimate, attractiveness[doc])
    # The naive estimate for a deep document (clicks per impression on the page) is biased low.
    deep_doc = ORDER[7]
    on_page = shown[:, 3:6] == deep_doc
    naive = clicks[:, 3:6][on_page].mean()
    assert naive < attractiveness[deep_doc] * 0.6


def test_request_rng_is_reproducible_from_the_request_id():
    order = np.arange(30)
    first = [explore(order, request_rng(f"req-{i}", 7), 0.5, 0, 10, 2) for i in range(200)]
    again = [explore(order, request_rng(f"req-{i}", 7), 0.5, 0, 10, 2) for i in range(200)]
    assert [r.swapped for r in first] == [r.swapped for r in again]
    assert all(np.array_equal(a.order, b.order) for a, b in zip(first, again))
    explored = sum(r.explored for r in first)
    assert 60 < explored < 140  # about half of the requests explore
    assert len({r.swapped for r in first if r.explored}) > 20  # ids spread over the swaps
    other_seed = [explore(order, request_rng(f"req-{i}", 8), 0.5, 0, 10, 2).swapped for i in range(200)]
    assert other_seed != [r.swapped for r in first]
    # Pinned: the derivation (SHA-256 of seed and id) must not change between processes or releases,
    # or logged requests could no longer be replayed.
    assert request_rng("req-1", 7).integers(1 << 30) == 928008237
    with pytest.raises(RuleError, match="request_id must be a string"):
        request_rng(123, 7)
    with pytest.raises(RuleError, match="seed must be an integer"):
        request_rng("req-1", "7")


# ---------------------------------------------------------------- filter values of the wrong JSON type


@pytest.mark.parametrize("spec, stored, message", [
    ({"year": "2010"}, [2010, 2012, 2019], 'filters.year: "2010" can never match: field \'year\' holds numbers in this '
                                           'index (write the number without quotes)'),
    ({"year": {"in": ["2010", "2011"]}}, [2010, 2011], "holds numbers"),
    ({"year": {"gte": 2010}}, ["2010", "2012"], "holds strings in this index (quote the value)"),
    ({"author": 7}, [["ann", "bob"], ["cy"]], "holds strings"),
    ({"open": "true"}, [True, False], "holds booleans in this index (write true or false)"),
])
def test_a_filter_of_the_wrong_type_is_an_error_not_an_empty_page(spec, stored, message):
    metadata = [{next(iter(spec)): value} for value in stored]
    with pytest.raises(RuleError) as info:
        filter_mask(parse_filters(spec), metadata)
    assert message in str(info.value)


@pytest.mark.parametrize("spec, stored, expected", [
    ({"year": 2010}, [2010, 2012], [True, False]),
    ({"year": "2010"}, ["2010", 2012], [True, False]),  # mixed kinds: no verdict, plain matching
    ({"year": "2010"}, [None, None], [False, False]),  # nothing seen: nothing to judge by
    ({"year": {"in": ["2010", 2010]}}, [2010, 2011], [True, False]),  # one of the values can match
])
def test_filters_whose_type_can_match_are_applied_as_before(spec, stored, expected):
    metadata = [{next(iter(spec)): value} for value in stored]
    assert filter_mask(parse_filters(spec), metadata).tolist() == expected
