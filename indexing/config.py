"""The defaults every job shares (one place for each constant); where files live is `indexing.home`."""
from __future__ import annotations

import dataclasses

DEFAULT_INDEX_NAME = "default"

# On-disk index bundle format; bump when a file layout or manifest field changes meaning.
INDEX_SCHEMA_VERSION = 1
# How many generations an index keeps besides the active one (for rollback).
DEFAULT_KEEP_GENERATIONS = 3
# How long a writer of a versioned store (index bundle, model registry) waits for another one to
# finish before it gives up with an error naming the lock file and its holder.
DEFAULT_LOCK_TIMEOUT_S = 30.0

# Lucene's BM25 defaults as Anserini uses them for BEIR.
DEFAULT_BM25_K1 = 0.9
DEFAULT_BM25_B = 0.4

# Corpora at least this large get an HNSW index; smaller ones are searched exactly (bench_ann:
# exact search costs ~16 ms a query at 200k documents, HNSW ef=128 well under 1 ms at recall 0.998+).
DEFAULT_HNSW_THRESHOLD = 50_000


def settings_from_dict(cls: type, data: dict) -> object:
    """Rebuild a settings dataclass from its manifest form, refusing keys it does not know
    (a manifest from a newer engine must fail loudly, not lose a setting)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return cls(**data)
