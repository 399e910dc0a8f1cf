"""Document vectors cached by (encoder fingerprint, content hash), so a rebuild encodes only what changed.

    HOME/cache/vectors.sqlite3      one row per (fingerprint, key): the float32 vector's bytes

`key` is the SHA-256 of exactly the text the encoder sees (`dense_text`), `fingerprint` the
SHA-256 of what else decides the vector: the ONNX model's and tokenizer's checksums, the
encoder form (fp32, int8) and the truncation length.

Safe under concurrent builds: SQLite in WAL mode (indexing.sqlite), every write one transaction;
an entry is a pure function of its key, so two builds inserting the same key agree (INSERT OR
IGNORE). The cache is only an accelerator: every generation keeps its own embeddings.npy.

Pruning follows the generations: each generation built with dense vectors stores its keys
(`vectors/keys.npy`, n x 32 bytes) and its fingerprint in the manifest; a build in progress
writes its keys into its staging directory *before* it reads the cache. `prune` keeps exactly
the entries some generation or staging build of the home still lists, so an entry disappears
with the last generation that used it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from indexing.sqlite import SqliteDatabase, SqliteSchema, SqliteStoreError

APPLICATION_ID = 0x4C545643  # "LTVC": marks the file as a vector cache
SCHEMA_VERSION = 1
KEYS_FILE = "keys.npy"
KEY_BYTES = 32
_SCHEMA = (
    "CREATE TABLE vectors (fingerprint TEXT NOT NULL, key BLOB NOT NULL, vector BLOB NOT NULL, "
    "PRIMARY KEY (fingerprint, key)) WITHOUT ROWID",
)
_FILE = SqliteSchema("vector cache", APPLICATION_ID, SCHEMA_VERSION, _SCHEMA, synchronous="NORMAL")
_CHUNK = 500  # keys per SELECT (SQLite's host-parameter limit is 32766; small chunks keep statements short)


class VectorCacheError(SqliteStoreError):
    pass


def vector_cache_path(home: Path) -> Path:
    return Path(home) / "cache" / "vectors.sqlite3"


def encoder_fingerprint(metadata: dict[str, Any], max_tokens: int) -> str:
    """What besides the text decides a vector: model and tokenizer checksums, truncation, pooling."""
    parts = {k: metadata.get(k) for k in ("sha256", "tokenizer_sha256", "pooling", "normalize", "dim")}
    parts["form"] = metadata.get("form", "fp32")  # fp32 or a compressed form (its own model file, too)
    parts["max_tokens"] = int(max_tokens)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def content_keys(texts: Sequence[str]) -> np.ndarray:
    """SHA-256 of each text as an (n, 32) uint8 array."""
    out = np.empty((len(texts), KEY_BYTES), dtype=np.uint8)
    for i, text in enumerate(texts):
        out[i] = np.frombuffer(hashlib.sha256(text.encode("utf-8")).digest(), dtype=np.uint8)
    return out


class VectorCache:
    """The home's vector cache (one SQLite file shared by every index and build)."""

    def __init__(self, home: Path):
        path = vector_cache_path(home)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = SqliteDatabase(path, _FILE)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "VectorCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, fingerprint: str, keys: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, vectors): rows of `keys` found in the cache have their vector, others zero."""
        found = np.zeros(len(keys), dtype=bool)
        vectors = np.zeros((len(keys), dim), dtype=np.float32)
        if not len(keys):
            return found, vectors
        row_of: dict[bytes, list[int]] = {}
        for i, key in enumerate(keys):
            row_of.setdefault(key.tobytes(), []).append(i)
        distinct = list(row_of)
        with self._db.read() as connection:
            for start in range(0, len(distinct), _CHUNK):
                chunk = distinct[start:start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = connection.execute(
                    f"SELECT key, vector FROM vectors WHERE fingerprint = ? AND key IN ({marks})", (fingerprint, *chunk))
                for key, blob in rows:
                    vector = np.frombuffer(blob, dtype=np.float32)
                    if vector.shape != (dim,):
                        continue  # another dimension under the same fingerprint cannot happen; never trust it
                    for i in row_of[bytes(key)]:
                        found[i] = True
                        vectors[i] = vector
        return found, vectors

    def put(self, fingerprint: str, keys: np.ndarray, vectors: np.ndarray) -> int:
        """Insert entries (existing keys are left as they are); returns how many were new."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        rows = [(fingerprint, key.tobytes(), vector.tobytes()) for key, vector in zip(keys, vectors)]
        with self._db.write() as connection:
            before = connection.total_changes
            connection.executemany("INSERT OR IGNORE INTO vectors (fingerprint, key, vector) VALUES (?, ?, ?)", rows)
            return connection.total_changes - before

    def count(self) -> int:
        with self._db.read() as connection:
            return int(connection.execute("SELECT COUNT(*) FROM vectors").fetchone()[0])

    def prune(self, live: Iterable[tuple[str, np.ndarray]]) -> int:
        """Delete every entry not listed in `live` ((fingerprint, keys) pairs); returns how many."""
        with self._db.write() as connection:
            connection.execute("CREATE TEMP TABLE IF NOT EXISTS live (fingerprint TEXT, key BLOB, PRIMARY KEY (fingerprint, key))")
            connection.execute("DELETE FROM temp.live")
            for fingerprint, keys in live:
                connection.executemany("INSERT OR IGNORE INTO temp.live VALUES (?, ?)",
                                       ((fingerprint, key.tobytes()) for key in keys))
            before = connection.total_changes
            connection.execute("DELETE FROM vectors WHERE NOT EXISTS "
                               "(SELECT 1 FROM temp.live l WHERE l.fingerprint = vectors.fingerprint AND l.key = vectors.key)")
            deleted = connection.total_changes - before
            connection.execute("DELETE FROM temp.live")
            return deleted


def live_keys(indexes_root: Path) -> list[tuple[str, np.ndarray]]:
    """(fingerprint, keys) of every generation and staging build of every index under `indexes_root`
    that recorded them (generations from before the cache list none and keep nothing alive)."""
    out = []
    for manifest in sorted(indexes_root.glob("*/generations/*/manifest.json")):
        fingerprint = _fingerprint_of(manifest)
        keys_file = manifest.parent / "vectors" / KEYS_FILE
        if fingerprint and keys_file.is_file():
            out.append((fingerprint, _load_keys(keys_file)))
    for pending in sorted(indexes_root.glob("*/generations/.staging-*/vectors/" + KEYS_FILE)):
        fingerprint_file = pending.with_name("fingerprint")
        if fingerprint_file.is_file():
            out.append((fingerprint_file.read_text(encoding="utf-8").strip(), _load_keys(pending)))
    return out


def _fingerprint_of(manifest_path: Path) -> str | None:
    try:
        dense = json.loads(manifest_path.read_text(encoding="utf-8")).get("dense") or {}
    except (OSError, ValueError):
        return None
    return (dense.get("cache") or {}).get("fingerprint")


def _load_keys(path: Path) -> np.ndarray:
    try:
        keys = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return np.empty((0, KEY_BYTES), dtype=np.uint8)
    return keys if keys.ndim == 2 and keys.shape[1] == KEY_BYTES else np.empty((0, KEY_BYTES), dtype=np.uint8)
