"""SHA-256 of files: the one implementation every bundle, encoder and vector file check uses."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """Size and checksum, as index manifests record every file."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
