"""Durable files: SHA-256 checksums, fsync and the writer lock, the primitives every bundle,
registry and encoder write uses."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """Size and checksum, as index manifests record every file."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_json_durably(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def fsync_tree(directory: Path) -> None:
    for file in directory.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for sub in [directory, *(p for p in directory.rglob("*") if p.is_dir())]:
        fsync_dir(sub)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LockBusyError(RuntimeError):
    """A file lock still held by another writer after the wait: names the lock file and, when the
    holder recorded itself, its pid, host, purpose and start time."""

    def __init__(self, message: str, path: Path, holder: str | None, waited_s: float):
        self.path = path
        self.holder = holder
        self.waited_s = waited_s
        super().__init__(message)


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float, purpose: str, busy: str,
              error: type[LockBusyError] = LockBusyError) -> Iterator[None]:
    """The one writer lock of the versioned stores (index bundles, model registry): an exclusive
    flock on `path`, waited for up to `timeout_s` seconds (polling: flock has no timeout), then
    `error` saying `busy`, the lock file and who holds it. The holder writes its pid, host,
    purpose and start time into the file so a waiter can name it; the kernel drops the flock when
    the holder dies, so a stale file never blocks anyone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        started = time.monotonic()
        delay = 0.01
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            waited = time.monotonic() - started
            if waited >= timeout_s:
                holder = lock_holder(path)
                raise error(f"{busy}: lock file {path} is held by {holder or 'another process (holder unknown)'}; "
                            f"gave up after {waited:.1f} s", path, holder, waited) from None
            time.sleep(min(delay, max(timeout_s - waited, 0.0)))
            delay = min(delay * 2, 0.2)
        try:
            handle.seek(0)
            handle.truncate()
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            handle.write(f"pid {os.getpid()} on {socket.gethostname()} ({purpose}, since {since})\n")
            handle.flush()
            yield
        finally:
            handle.seek(0)
            handle.truncate()  # released: no stale holder for the next waiter to name


def lock_holder(path: Path) -> str | None:
    """Who holds a lock taken with `file_lock`, as it recorded itself (None if unknown)."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None
