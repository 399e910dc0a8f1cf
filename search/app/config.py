"""Query-service settings: one loader for the TOML file, the environment and command-line flags.

Precedence: flags > environment > file > defaults. The admin token is read from the
environment (or the file), never from a flag, so it does not show up in process listings.

    # ltr-search.toml
    index = "scifact"
    backend = "elasticsearch"   # default "embedded"; see search/backend_factory.py
    default_pipeline = "ltr"     # the active model; hybrid (then bm25) while none is promoted
    rerank_window = 200
    access_log = true           # one line per request on stdout (default); false behind a proxy that logs
    [exploration]
    epsilon = 0.05
    [experiments]               # online comparison of ranking models (see search/interleaving.py)
    shadow_model = "m0004"      # also scores every ltr request's window; logged, never shown
    interleave_model = "m0004"  # interleaved against the active model ...
    interleave_share = 0.1      # ... on this share of ltr requests (by request id, reproducibly)
    interleave_method = "optimized"  # the default; or "team-draft"
    [elasticsearch]             # connection settings (indexing/elastic.py), also LTR_SEARCH_ES_*
    url = "https://es.example.internal:9200"
    ca_certs = "/etc/ltr-search/es-ca.pem"
    [fusion.scifact]            # per index, e.g. what `ltr-search eval` tuned on a train split
    method = "convex"
    dense_weight = 0.6
    normalisation = "z-score"
"""
from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from indexing.config import DEFAULT_INDEX_NAME, settings_from_dict
from indexing.home import event_store_path, experiment_log_path
from search.backend_factory import BackendChoice, choose_backend
from search.interleaving import INTERLEAVING_METHODS
from search.hybrid import FusionSettings
from search.limits import DEFAULT_RERANK_WINDOW, MAX_BODY_BYTES, MAX_PAGE_SIZE, MAX_QUERY_CHARS, MAX_RERANK_WINDOW

ADMIN_TOKEN_ENV_VAR = "LTR_SEARCH_ADMIN_TOKEN"
CONFIG_ENV_VAR = "LTR_SEARCH_CONFIG"



EXPLORATION_MODES = ("swap", "shuffle")


@dataclass(frozen=True)
class ExplorationSettings:
    epsilon: float = 0.0  # share of requests that get one deeper result swapped into the page
    protected_top: int = 3  # the first positions of a page are never swapped
    seed: int = 0  # with the request id, makes each request's exploration reproducible
    # "swap": one deeper result swapped into the page (finds documents the ranker buries);
    # "shuffle": the whole page shown in random order (RandTop-n; identifies position bias)
    mode: str = "swap"

    def __post_init__(self) -> None:
        if self.mode not in EXPLORATION_MODES:
            raise ValueError(f"exploration.mode must be one of {', '.join(EXPLORATION_MODES)}, got '{self.mode}'")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"exploration.epsilon must be in [0, 1], got {self.epsilon}")
        if self.protected_top < 0:
            raise ValueError(f"exploration.protected_top must be >= 0, got {self.protected_top}")


@dataclass(frozen=True)
class OnlineExperimentSettings:
    """Online model comparisons on requests served by the `ltr` pipeline; all off by default."""

    shadow_model: str | None = None  # a registry version scored on every ltr request's window, logged only
    interleave_model: str | None = None  # the challenger (B) interleaved against the active model (A)
    interleave_share: float = 0.0  # share of ltr requests interleaved, decided from the request id
    seed: int = 0  # with the request id, makes the interleaving decision and its coin flips reproducible
    # "optimized" (default: fewest sessions to decide, bench/bench_interleaving.py) or "team-draft"
    interleave_method: str = INTERLEAVING_METHODS[0]

    def __post_init__(self) -> None:
        for key in ("shadow_model", "interleave_model"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"experiments.{key} must be a model version such as 'm0002', got {value!r}")
        share = self.interleave_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
            raise ValueError(f"experiments.interleave_share must be a number in [0, 1], got {share!r}")
        if share > 0 and self.interleave_model is None:
            raise ValueError(f"experiments.interleave_share = {share} needs experiments.interleave_model "
                             "(the model to interleave against the active one)")
        if self.interleave_method not in INTERLEAVING_METHODS:
            raise ValueError(f"experiments.interleave_method must be one of {', '.join(INTERLEAVING_METHODS)}, "
                             f"got {self.interleave_method!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"experiments.seed must be an integer, got {self.seed!r}")

    @property
    def enabled(self) -> bool:
        return self.shadow_model is not None or (self.interleave_model is not None and self.interleave_share > 0)

    @classmethod
    def from_dict(cls, section: Any) -> "OnlineExperimentSettings":
        if not isinstance(section, Mapping):
            raise ValueError(f"[experiments] must be a table, got {section!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(section) - set(known))
        if unknown:
            raise ValueError(f"experiments.{unknown[0]}: unknown key; known: {', '.join(known)}")
        return cls(**section)


@dataclass(frozen=True)
class ServiceConfig:
    home: Path
    index: str = DEFAULT_INDEX_NAME
    default_pipeline: str = "ltr"  # falls back to hybrid, then bm25, when it cannot be served
    rerank_window: int = DEFAULT_RERANK_WINDOW
    max_query_chars: int = MAX_QUERY_CHARS
    max_page_size: int = MAX_PAGE_SIZE
    max_body_bytes: int = MAX_BODY_BYTES
    admin_token: str | None = None
    events_path: Path | None = None  # default HOME/events/INDEX.sqlite3
    threads: int | None = None  # ONNX Runtime intra-op threads per query (default: all cores); BLAS gets 1
    access_log: bool = True  # uvicorn's access log (one line per request) on stdout; `serve --no-access-log`
    exploration: ExplorationSettings = field(default_factory=ExplorationSettings)
    experiments: OnlineExperimentSettings = field(default_factory=OnlineExperimentSettings)
    fusion: Mapping[str, FusionSettings] = field(default_factory=dict)  # per index name
    backend: BackendChoice = field(default_factory=BackendChoice)
    # Origins (scheme://host[:port]) besides the request's own Host whose page forms are accepted:
    # the public address when a reverse proxy rewrites Host (`trusted_origins = ["https://search.example"]`).
    trusted_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for origin in self.trusted_origins:
            if parse_origin(origin) != origin:
                raise ValueError(f"trusted_origins: {origin!r} is not a normalised origin; write it as {parse_origin(origin)!r}")
        if not 1 <= self.rerank_window <= MAX_RERANK_WINDOW:
            raise ValueError(f"rerank_window must be between 1 and {MAX_RERANK_WINDOW}, got {self.rerank_window}")
        if not 1 <= self.max_query_chars <= MAX_QUERY_CHARS:
            raise ValueError(f"max_query_chars must be between 1 and {MAX_QUERY_CHARS}, got {self.max_query_chars}")
        if not 1 <= self.max_page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"max_page_size must be between 1 and {MAX_PAGE_SIZE}, got {self.max_page_size}")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ValueError(f"the admin token (${ADMIN_TOKEN_ENV_VAR}) must be at least 16 characters")

    @property
    def event_store_path(self) -> Path:
        return self.events_path or event_store_path(self.home, self.index)

    @property
    def experiment_log_path(self) -> Path:
        """Interleaved requests and shadow rankings (ltr/experiments.py), one file per index."""
        return experiment_log_path(self.home, self.index)

    def fusion_for(self, index: str) -> FusionSettings:
        return self.fusion.get(index, FusionSettings())


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path (string)"}


def _expected_types(hint: Any) -> tuple[type, ...]:
    """The scalar types a field accepts (empty: not a scalar, checked by its own loader)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return tuple(t for t in options if t in _EXPECTED)


def _matches(value: Any, expected: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in expected
    if isinstance(value, int) and (int in expected or float in expected):
        return True
    return any(isinstance(value, str if t is Path else t) for t in expected if t is not bool)


def parse_origin(text: str) -> str:
    """'https://Search.Example:8443/' -> 'https://search.example:8443': a browser's Origin header
    as it is compared (scheme and host lower case, no path); anything else is refused by name."""
    scheme, sep, rest = text.strip().partition("://")
    host = rest.rstrip("/").lower()
    if not sep or scheme.lower() not in ("http", "https") or not host or any(c in host for c in "/?#@ "):
        raise ValueError(f"trusted_origins: {text!r} is not an origin such as 'https://search.example.com[:port]'")
    return f"{scheme.lower()}://{host}"


def check_section(prefix: str, cls: type, values: Any, unknown_keys: bool = True) -> None:
    """Refuse a wrong type or an unknown key in one config section, naming the key and what it
    expects (`exploration.epsilon: expected a number, got "lots"`), never a Python TypeError."""
    if not isinstance(values, Mapping):
        raise ValueError(f"[{prefix.rstrip('.')}] must be a table, got {_shown(values)}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key, value in values.items():
        if key not in hints:
            if unknown_keys:
                raise ValueError(f"{prefix}{key}: unknown key; known: {', '.join(known)}")
            continue
        expected = _expected_types(hints[key])
        if expected and value is not None and not _matches(value, expected):
            wanted = " or ".join(dict.fromkeys(_EXPECTED[t] for t in expected))
            raise ValueError(f"{prefix}{key}: expected {wanted}, got {_shown(value)}")


def _shown(value: Any) -> str:
    return json.dumps(value, default=str) if isinstance(value, (str, bool, int, float, list, dict)) else repr(value)


def load_service_config(
    home: Path, config_file: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> ServiceConfig:
    """Defaults, then the TOML file (`--config` or $LTR_SEARCH_CONFIG), then the environment's
    admin token, then non-None `overrides` (command-line flags)."""
    values: dict[str, Any] = {}
    config_file = config_file or (Path(os.environ[CONFIG_ENV_VAR]) if os.environ.get(CONFIG_ENV_VAR) else None)
    if config_file is not None:
        try:
            with open(config_file, "rb") as handle:
                values = tomllib.load(handle)
        except FileNotFoundError:
            raise ValueError(f"{config_file}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{config_file}: invalid TOML ({exc})") from None
    try:
        check_section("", ServiceConfig, {k: v for k, v in values.items() if k not in ("backend", "elasticsearch")},
                      unknown_keys=False)  # unknown top-level keys: listed together below
        if "exploration" in values:
            check_section("exploration.", ExplorationSettings, values["exploration"])
            values["exploration"] = settings_from_dict(ExplorationSettings, values["exploration"])
        if "experiments" in values:
            check_section("experiments.", OnlineExperimentSettings, values["experiments"])
            values["experiments"] = OnlineExperimentSettings.from_dict(values["experiments"])
        if "fusion" in values:
            if not isinstance(values["fusion"], Mapping):
                raise ValueError(f"[fusion] must hold one table per index, got {_shown(values['fusion'])}")
            for name, section in values["fusion"].items():
                check_section(f"fusion.{name}.", FusionSettings, section)
            values["fusion"] = {name: FusionSettings.from_dict(section) for name, section in values["fusion"].items()}
        if "events_path" in values:
            values["events_path"] = Path(values["events_path"])
        if "trusted_origins" in values:
            origins = values["trusted_origins"]
            if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
                raise ValueError(f"trusted_origins: expected a list of strings, got {_shown(origins)}")
            values["trusted_origins"] = tuple(parse_origin(o) for o in origins)
        overrides = dict(overrides or {})
        values["backend"] = choose_backend(overrides.pop("backend", None), overrides.pop("es_url", None),
                                           {key: values.pop(key) for key in ("backend", "elasticsearch") if key in values})
        token = os.environ.get(ADMIN_TOKEN_ENV_VAR)
        if token:
            values["admin_token"] = token
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        values["home"] = home
        known = {f.name for f in dataclasses.fields(ServiceConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known - {'home'}))}")
        return ServiceConfig(**values)
    except (TypeError, ValueError) as exc:
        where = f"{config_file}: " if config_file else ""
        raise ValueError(f"{where}{exc}") from None
