"""Business rules that shape a page: filters and exclusions (before ranking), a per-field
diversity cap and epsilon-greedy exploration (after it). Small pure functions; the ranking
pipeline calls them.

Documents' metadata are plain dicts of JSON values (str, int, float, bool, None, lists of
those). Values compare by JSON type: 2015 == 2015.0, but 2015 != "2015" and true != 1, so a
request never matches by accident across types. Every request error is a `RuleError` whose
message starts with the path of the offending value (`filters.year.gte: ...`).
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from dataclasses import dataclass, field as dataclass_field
from typing import Any, Collection, Hashable, Iterable, Mapping, Sequence

import numpy as np

from search.limits import MAX_EXCLUDE_IDS, MAX_FIELD_NAME_LENGTH, MAX_FILTERS, MAX_IN_VALUES, MAX_STRING_LENGTH

FIELD_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
RESERVED_FIELDS = ("id", "title")  # the document id and its title, besides metadata keys
MATCH_OPERATORS = ("eq", "in")
RANGE_OPERATORS = ("gt", "gte", "lt", "lte")
OPERATORS = MATCH_OPERATORS + RANGE_OPERATORS


class RuleError(ValueError):
    """A request's rule is invalid; the message names the path and the reason."""


# ---------------------------------------------------------------------------------------------
# Values


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _key(value: Any) -> tuple[str, Any] | None:
    """A typed key, so equality follows JSON types (True is not 1, "1" is not 1) while 1 == 1.0.
    None, NaN, lists and objects have no key: they never match and are never capped."""
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, (bool, np.bool_)):
        return ("bool", bool(value))
    if _is_number(value):
        return None if math.isnan(value) else ("num", value)
    return None


def _render(value: Any, limit: int = 60) -> str:
    """A value as the client wrote it (JSON), shortened for an error message."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------
# Filters


@dataclass(frozen=True)
class FieldFilter:
    """One field's condition: either membership in `values` (eq is a one-value set) or a numeric
    range. A document matches when its field (or, for a list field, any element) satisfies it."""

    field: str
    values: tuple[str | int | float | bool, ...] = ()  # eq / in; empty for a range
    lower: int | float | None = None
    lower_inclusive: bool = True
    upper: int | float | None = None
    upper_inclusive: bool = True
    _keys: frozenset = dataclass_field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        is_range = self.lower is not None or self.upper is not None
        if bool(self.values) == is_range:
            raise RuleError(f"filters.{self.field}: give either values or a range")
        object.__setattr__(self, "_keys", frozenset(_key(v) for v in self.values))

    @property
    def is_range(self) -> bool:
        return not self.values

    def matches_scalar(self, value: Any) -> bool:
        if not self.is_range:
            return _key(value) in self._keys
        if not _is_number(value) or math.isnan(value):
            return False
        if self.lower is not None and not (value >= self.lower if self.lower_inclusive else value > self.lower):
            return False
        if self.upper is not None and not (value <= self.upper if self.upper_inclusive else value < self.upper):
            return False
        return True

    def matches(self, value: Any) -> bool:
        """A list matches when any element does (elements that are lists or objects never do)."""
        if isinstance(value, (list, tuple)):
            return any(self.matches_scalar(v) for v in value)
        return self.matches_scalar(value)


def check_field_name(name: Any, path: str = "filters") -> str:
    """Field names are metadata keys (or a reserved name), taken literally: a '.' does not reach
    into nested objects. Shared with the diversity field of a request."""
    if not isinstance(name, str):
        raise RuleError(f"{path}: field name {_render(name)} is not a string")
    if not name:
        raise RuleError(f"{path}: field name must not be empty")
    if len(name) > MAX_FIELD_NAME_LENGTH:
        raise RuleError(f"{path}: field name {_render(name)} is longer than {MAX_FIELD_NAME_LENGTH} characters")
    if not FIELD_NAME_PATTERN.fullmatch(name):
        raise RuleError(f"{path}: field name {_render(name)} may only contain letters, digits, '_', '.' and '-'")
    return name


def _match_value(value: Any, path: str) -> str | int | float | bool:
    if isinstance(value, str):
        if len(value) > MAX_STRING_LENGTH:
            raise RuleError(f"{path}: string longer than {MAX_STRING_LENGTH} characters")
        return value
    if isinstance(value, bool):
        return value
    if _is_number(value):
        if not math.isfinite(value):
            raise RuleError(f"{path}: expected a finite number, got {_render(value)}")
        return value
    raise RuleError(f"{path}: expected a string, number or boolean, got {_render(value)}")


def _match_values(values: Any, path: str) -> tuple[str | int | float | bool, ...]:
    if not isinstance(values, (list, tuple)) or not 1 <= len(values) <= MAX_IN_VALUES:
        raise RuleError(f"{path}: expected a non-empty list of at most {MAX_IN_VALUES} values")
    return tuple(_match_value(v, f"{path}[{i}]") for i, v in enumerate(values))


def _bound(value: Any, path: str) -> int | float:
    if not _is_number(value):
        raise RuleError(f"{path}: expected a number, got {_render(value)}")
    if not math.isfinite(value):
        raise RuleError(f"{path}: expected a finite number, got {_render(value)}")
    return value


def _parse_operators(name: str, condition: Mapping[str, Any]) -> FieldFilter:
    path = f"filters.{name}"
    if not condition:
        raise RuleError(f"{path}: expected at least one operator (use {', '.join(OPERATORS)})")
    for op in condition:
        if op not in OPERATORS:
            raise RuleError(f"{path}: unknown operator {_render(op) if not isinstance(op, str) else repr(op)} "
                            f"(use {', '.join(OPERATORS)})")
    ops = set(condition)
    if ops >= {"eq", "in"}:
        raise RuleError(f"{path}: use eq or in, not both")
    for match_op in MATCH_OPERATORS:
        if match_op in ops and ops & set(RANGE_OPERATORS):
            raise RuleError(f"{path}: {match_op} cannot be combined with gt, gte, lt or lte")
    if ops >= {"gt", "gte"}:
        raise RuleError(f"{path}: use gt or gte, not both")
    if ops >= {"lt", "lte"}:
        raise RuleError(f"{path}: use lt or lte, not both")
    if "eq" in ops:
        return FieldFilter(name, values=(_match_value(condition["eq"], f"{path}.eq"),))
    if "in" in ops:
        return FieldFilter(name, values=_match_values(condition["in"], f"{path}.in"))
    bounds = {op: _bound(condition[op], f"{path}.{op}") for op in RANGE_OPERATORS if op in ops}
    lower_op = "gt" if "gt" in bounds else "gte" if "gte" in bounds else None
    upper_op = "lt" if "lt" in bounds else "lte" if "lte" in bounds else None
    if lower_op and upper_op:
        low, high = bounds[lower_op], bounds[upper_op]
        if low > high or (low == high and (lower_op == "gt" or upper_op == "lt")):
            raise RuleError(
                f"{path}: empty range: {lower_op} {_render(low)} and {upper_op} {_render(high)} match nothing"
            )
    return FieldFilter(
        name,
        lower=bounds.get(lower_op) if lower_op else None,
        lower_inclusive=lower_op != "gt",
        upper=bounds.get(upper_op) if upper_op else None,
        upper_inclusive=upper_op != "lt",
    )


def parse_filters(spec: Mapping[str, Any]) -> list[FieldFilter]:
    """The request's `filters` object, field -> condition, all AND-ed. A condition is a value
    (equality), a list (membership), or an object of operators: eq, in, or a numeric range from
    gt/gte and lt/lte. Strict: anything else is a RuleError naming its path."""
    if not isinstance(spec, Mapping):
        raise RuleError(f"filters: expected an object mapping field names to conditions, got {_render(spec)}")
    if len(spec) > MAX_FILTERS:
        raise RuleError(f"filters: at most {MAX_FILTERS} fields, got {len(spec)}")
    parsed = []
    for name, condition in spec.items():
        check_field_name(name)
        path = f"filters.{name}"
        if isinstance(condition, Mapping):
            parsed.append(_parse_operators(name, condition))
        elif isinstance(condition, (list, tuple)):
            parsed.append(FieldFilter(name, values=_match_values(condition, path)))
        elif condition is None:
            raise RuleError(f"{path}: expected a value, a list of values or an object of operators, got null")
        else:
            parsed.append(FieldFilter(name, values=(_match_value(condition, path),)))
    return parsed


def filterable_fields(document: Mapping[str, Any]) -> dict[str, Any]:
    """What filters and diversity caps see: the metadata, plus the reserved `id` and `title`."""
    return {**document.get("metadata", {}), "id": document.get("id"), "title": document.get("title")}


_MISSING = object()


def _kind(value: Any) -> str | None:
    """The JSON kind a filter compares by; list fields count by their elements."""
    key = _key(value)
    return None if key is None else key[0]


def check_value_kinds(rule: FieldFilter, stored: Iterable[Any]) -> None:
    """Refuse a filter that can never match because of its JSON type: `{"year": "2010"}` against
    a field that holds numbers (or `2010` against strings) would silently match nothing. Judged on
    the stored values the filter is applied to; a field with mixed kinds, or none seen, passes."""
    seen: set[str] = set()
    for value in stored:
        for element in value if isinstance(value, (list, tuple)) else (value,):
            kind = _kind(element)
            if kind is not None:
                seen.add(kind)
    if len(seen) != 1:
        return
    (stored_kind,) = seen
    wanted = {"num"} if rule.is_range else {_kind(v) for v in rule.values} - {None}
    if wanted and stored_kind not in wanted:
        names = {"num": "numbers", "str": "strings", "bool": "booleans"}
        example = ", ".join(_render(v) for v in rule.values[:3]) if rule.values else "a range"
        hint = {"num": "write the number without quotes", "str": "quote the value",
                "bool": "write true or false"}[stored_kind]
        raise RuleError(f"filters.{rule.field}: {example} can never match: field '{rule.field}' holds "
                        f"{names[stored_kind]} in this index ({hint})")


def filter_mask(
    filters: Sequence[FieldFilter], metadata: Sequence[Mapping[str, Any]], doc_ids: Sequence[str] | None = None
) -> np.ndarray:
    """True for each candidate that passes every filter. A missing field (or null) never matches;
    numeric ranges never match strings, booleans or NaN. The `id` field is read from `doc_ids`
    when given (stored metadata need not repeat it), otherwise from the metadata like `title`."""
    if doc_ids is not None and len(doc_ids) != len(metadata):
        raise RuleError(f"{len(doc_ids)} document ids but {len(metadata)} metadata records")
    keep = np.ones(len(metadata), dtype=bool)
    for rule in filters:
        check_value_kinds(rule, (record.get(rule.field) for record in metadata))
        for i, record in enumerate(metadata):
            if not keep[i]:
                continue
            value = doc_ids[i] if rule.field == "id" and doc_ids is not None else record.get(rule.field, _MISSING)
            keep[i] = value is not _MISSING and rule.matches(value)
    return keep


# ---------------------------------------------------------------------------------------------
# Exclusion


def exclude_mask(doc_ids: Sequence[str], exclude: Collection[str]) -> np.ndarray:
    """True = keep: drops the documents the request excludes (already seen, hidden by the caller).
    Ids that are not among the candidates are ignored."""
    if isinstance(exclude, (str, bytes)) or not isinstance(exclude, Collection):
        raise RuleError(f"exclude: expected a list of document ids, got {_render(exclude)}")
    if len(exclude) > MAX_EXCLUDE_IDS:
        raise RuleError(f"exclude: at most {MAX_EXCLUDE_IDS} document ids, got {len(exclude)}")
    for doc_id in exclude:
        if not isinstance(doc_id, str):
            raise RuleError(f"exclude: expected document id strings, got {_render(doc_id)}")
    excluded = set(exclude)
    return np.fromiter((d not in excluded for d in doc_ids), dtype=bool, count=len(doc_ids))


# ---------------------------------------------------------------------------------------------
# Diversity


def diversity_values(metadata: Sequence[Mapping[str, Any]], field: str) -> list[Hashable | None]:
    """Each candidate's value of the diversity field as a hashable key for `diversify`: a typed
    key for a scalar (so true and 1 are different values), a frozenset of keys for a list (the
    document counts against every element), None when missing, null, NaN or an empty list."""
    check_field_name(field, "diversity.field")
    values: list[Hashable | None] = []
    for record in metadata:
        value = record.get(field)
        if isinstance(value, (list, tuple)):
            keys = frozenset(k for k in map(_key, value) if k is not None)
            values.append(keys or None)
        else:
            values.append(_key(value))
    return values


def _check_order(order: np.ndarray, n: int | None = None) -> np.ndarray:
    order = np.asarray(order)
    if order.ndim != 1 or (order.size and not np.issubdtype(order.dtype, np.integer)):
        raise RuleError(f"order must be a 1-D array of candidate indices, got shape {order.shape} of {order.dtype}")
    order = order.astype(np.intp, copy=False)
    if n is not None and order.size and (order.min() < 0 or order.max() >= n):
        raise RuleError(f"order holds indices outside 0..{n - 1}")
    return order


def diversify(order: np.ndarray, values: Sequence[Hashable | None], max_per_value: int) -> np.ndarray:
    """Walk the ranking and keep a candidate unless its value already has `max_per_value` kept
    results above it; kept candidates stay in ranked order. None is never capped. A frozenset
    value (a list field) is multi-valued: the candidate is kept only if every element is under the
    cap, and then counts against each (a paper by two authors uses a slot of both)."""
    if isinstance(max_per_value, bool) or not isinstance(max_per_value, numbers.Integral) or max_per_value < 1:
        raise RuleError(f"max_per_value must be an integer >= 1, got {_render(max_per_value)}")
    order = _check_order(order, len(values))
    counts: dict[Hashable, int] = {}
    kept = []
    for index in order.tolist():
        value = values[index]
        if value is None:
            kept.append(index)
            continue
        elements = value if isinstance(value, frozenset) else (value,)
        if all(counts.get(v, 0) < max_per_value for v in elements):
            for v in elements:
                counts[v] = counts.get(v, 0) + 1
            kept.append(index)
    return np.asarray(kept, dtype=np.intp)


# ---------------------------------------------------------------------------------------------
# Exploration


@dataclass(frozen=True, eq=False)
class Exploration:
    order: np.ndarray  # candidate indices in the order shown
    propensities: np.ndarray  # float64, aligned with order: P(this document at this position)
    explored: bool
    swapped: tuple[int, int] | None  # (page slot, deep position) exchanged, when explored


def request_rng(request_id: str, seed: int) -> np.random.Generator:
    """A generator determined by (seed, request id) alone, so a logged request's exploration can
    be replayed; SHA-256, not hash(), which Python salts per process."""
    if not isinstance(request_id, str):
        raise RuleError(f"request_id must be a string, got {_render(request_id)}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise RuleError(f"seed must be an integer, got {_render(seed)}")
    digest = hashlib.sha256(f"{int(seed)}\x00{request_id}".encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise RuleError(f"{name} must be an integer >= 0, got {_render(value)}")
    return int(value)


def explore(
    order: np.ndarray, rng: np.random.Generator, epsilon: float, page_start: int, page_size: int, protected_top: int
) -> Exploration:
    """Epsilon-greedy exploration of one page, with the propensity of every (document, position).

    Slots are the page positions page_start + protected_top .. page_end - 1 (page_end is
    page_start + page_size, cut at len(order)), n_slots of them; deep positions are those after
    the page, page_start + page_size .. len(order) - 1, n_deep of them. Exploration is possible
    when n_slots > 0 and n_deep > 0. Then, with probability epsilon (one draw per request), a slot
    s and a deep position d are drawn uniformly and independently and their documents swap.

    Propensities, given the deterministic ranking (each swap (s, d) has probability
    epsilon / (n_slots * n_deep)):
    - a slot keeps its document unless it is the one drawn: (1 - eps) + eps * (1 - 1/n_slots);
    - a deep document lands in a given slot only through that one swap: eps / (n_slots * n_deep);
    - a deep position keeps its document: (1 - eps) + eps * (1 - 1/n_deep);
    - a slot's document lands at a given deep position: eps / (n_slots * n_deep);
    - every other position (earlier pages, the protected top of the page) is never touched: 1.
    Each position's probabilities over documents sum to 1, and so do each document's over
    positions. When exploration is impossible nothing is drawn and every propensity is 1.
    """
    order = _check_order(order)
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not 0.0 <= epsilon <= 1.0:
        raise RuleError(f"epsilon must be in [0, 1], got {_render(epsilon)}")
    page_start = _check_count("page_start", page_start)
    page_size = _check_count("page_size", page_size)
    protected_top = _check_count("protected_top", protected_top)

    n = len(order)
    first_slot = page_start + protected_top
    deep_start = page_start + page_size
    n_slots = max(0, min(deep_start, n) - first_slot)
    n_deep = max(0, n - deep_start)
    shown = order.copy()
    propensities = np.ones(n, dtype=np.float64)
    if n_slots == 0 or n_deep == 0 or epsilon == 0.0:
        return Exploration(shown, propensities, explored=False, swapped=None)

    epsilon = float(epsilon)
    swap_probability = epsilon / (n_slots * n_deep)
    propensities[first_slot:deep_start] = (1.0 - epsilon) + epsilon * (1.0 - 1.0 / n_slots)
    propensities[deep_start:] = (1.0 - epsilon) + epsilon * (1.0 - 1.0 / n_deep)
    if rng.random() >= epsilon:
        return Exploration(shown, propensities, explored=False, swapped=None)
    slot = first_slot + int(rng.integers(n_slots))
    deep = deep_start + int(rng.integers(n_deep))
    shown[slot], shown[deep] = order[deep], order[slot]
    propensities[slot] = propensities[deep] = swap_probability
    return Exploration(shown, propensities, explored=True, swapped=(slot, deep))


def shuffle_page(order: np.ndarray, rng: np.random.Generator, epsilon: float, page_start: int, page_size: int) -> Exploration:
    """Randomised exploration of one page (RandTop-n, as in Wang et al. 2016): with probability
    epsilon (one draw per request) the page's documents are shown in a uniformly random order.

    This is the intervention that makes position bias identifiable: on a shuffled page every
    document is equally likely at every position, so the click-through rate per position is
    proportional to the examination probability (`ltr.behaviour` fits propensities from it).
    Propensities of the n page documents: (1 - eps) + eps / n where a document stays at its own
    position, eps / n where it moved; outside the page 1. A document moved by a shuffle has a
    propensity <= 1/n, which is how the request log tells shuffled pages apart.
    """
    order = _check_order(order)
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not 0.0 <= epsilon <= 1.0:
        raise RuleError(f"epsilon must be in [0, 1], got {_render(epsilon)}")
    page_start = _check_count("page_start", page_start)
    page_size = _check_count("page_size", page_size)
    end = min(page_start + page_size, len(order))
    n = end - page_start
    shown = order.copy()
    propensities = np.ones(len(order), dtype=np.float64)
    if n < 2 or epsilon == 0.0:
        return Exploration(shown, propensities, explored=False, swapped=None)
    epsilon = float(epsilon)
    stay, move = (1.0 - epsilon) + epsilon / n, epsilon / n
    propensities[page_start:end] = stay
    if rng.random() >= epsilon:
        return Exploration(shown, propensities, explored=False, swapped=None)
    permutation = rng.permutation(n)
    shown[page_start:end] = order[page_start:end][permutation]
    propensities[page_start:end] = np.where(permutation == np.arange(n), stay, move)
    return Exploration(shown, propensities, explored=True, swapped=None)
