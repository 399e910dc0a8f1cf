"""Where the engine keeps its files, and the defaults every job shares (one place for each constant)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

HOME_ENV_VAR = "LTR_SEARCH_HOME"
DEFAULT_HOME = Path(".ltr-search")
DEFAULT_INDEX_NAME = "default"

# On-disk index bundle format; bump when a file layout or manifest field changes meaning.
INDEX_SCHEMA_VERSION = 1
# How many generations an index keeps besides the active one (for rollback).
DEFAULT_KEEP_GENERATIONS = 3

# Lucene's BM25 defaults as Anserini uses them for BEIR.
DEFAULT_BM25_K1 = 0.9
DEFAULT_BM25_B = 0.4

# Corpora at least this large get an HNSW index; smaller ones are searched exactly (bench_ann:
# exact search costs ~16 ms a query at 200k documents, HNSW ef=128 well under 1 ms at recall 0.998+).
DEFAULT_HNSW_THRESHOLD = 50_000


def resolve_home(cli_value: str | os.PathLike[str] | None = None) -> Path:
    """The engine home: `--home`, else $LTR_SEARCH_HOME, else ./.ltr-search."""
    if cli_value:
        return Path(cli_value).expanduser().resolve()
    env_value = os.environ.get(HOME_ENV_VAR)
    if env_value:
        return Path(env_value).expanduser().resolve()
    return DEFAULT_HOME.resolve()


def encoders_dir(home: Path) -> Path:
    """Exported ONNX encoders, shared by every index in this home (content-addressed)."""
    return home / "encoders"


def indexes_dir(home: Path) -> Path:
    return home / "indexes"


def settings_from_dict(cls: type, data: dict) -> object:
    """Rebuild a settings dataclass from its manifest form, refusing keys it does not know
    (a manifest from a newer engine must fail loudly, not lose a setting)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return cls(**data)
