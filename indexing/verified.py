"""Verified-file stamps: a full SHA-256 check remembered per file identity, so that loading the
same unchanged files again (every `serve` start, every reload) need not read and hash them again.

A stamp file (`.NAME.verified.json`, beside the directory NAME it covers, so that the directory
holds only what its manifest lists) records, per file, the checksum the
file matched and the file's identity when it was hashed: size, mtime_ns, ctime_ns, inode and
device. Writing to a file changes its ctime, which no user-space call can set back (unlike the
mtime), and replacing it gives another inode: a file whose identity still matches its stamp is
the very file that was hashed, unchanged since. Anything that does not match (or a stamp for
another checksum, or no stamp) is hashed in full again, and refused if it does not match. What a
stamp cannot see is damage below the file system (bit rot on the disk): `index status --verify`
hashes every file regardless of stamps.

Writing the stamp is best-effort (a read-only home just hashes on every load) and atomic (a
temporary file renamed over it), so concurrent workers never read half a stamp.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import astuple, dataclass
from pathlib import Path

from indexing.durable import sha256_file

STAMP_SUFFIX = ".verified.json"
STAMP_FORMAT = 1
logger = logging.getLogger("ltr_search.verified")


@dataclass(frozen=True)
class FileIdentity:
    """What changes whenever a file's content can have: size, times, inode."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, path: Path) -> "FileIdentity":
        stat = os.stat(path)
        return cls(stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev)


def stamp_path(directory: Path) -> Path:
    """Where the stamps of `directory`'s files live: a hidden file beside it."""
    directory = Path(directory)
    return directory.parent / f".{directory.name}{STAMP_SUFFIX}"


class VerifiedStamps:
    """The stamps of one directory: relative path -> (sha256, identity) of a verified file."""

    def __init__(self, directory: Path):
        self.path = stamp_path(directory)
        self._entries = self._read()
        self._changed = False

    def _read(self) -> dict[str, list]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # none yet, or unreadable: everything is hashed and the stamp rewritten
        if not isinstance(data, dict) or data.get("format") != STAMP_FORMAT or not isinstance(data.get("files"), dict):
            return {}
        return data["files"]

    def matches(self, relative: str, sha256: str, identity: FileIdentity) -> bool:
        """True when `relative` was verified against `sha256` and is, by its identity, unchanged since."""
        entry = self._entries.get(relative)
        return isinstance(entry, list) and entry == [sha256, *astuple(identity)]

    def record(self, relative: str, sha256: str, identity: FileIdentity) -> None:
        """`identity`: the file's, taken before it was hashed (a change during hashing then misses)."""
        self._entries[relative] = [sha256, *astuple(identity)]
        self._changed = True

    def save(self) -> None:
        """Write the stamp if anything was recorded; a failure only costs the next load a full hash."""
        if not self._changed:
            return
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            temporary.write_text(json.dumps({"format": STAMP_FORMAT, "files": self._entries}), encoding="utf-8")
            os.replace(temporary, self.path)
            self._changed = False
        except OSError as exc:
            logger.debug("verification stamp %s not written: %s", self.path, exc)
            try:
                temporary.unlink()
            except OSError:
                pass


def file_matches(file: Path, relative: str, sha256: str, stamps: VerifiedStamps | None) -> bool:
    """Whether `file` has checksum `sha256`: trusted from a matching stamp, else hashed in full
    (and stamped when it matches). `stamps=None` always hashes."""
    identity = FileIdentity.of(file)
    if stamps is not None and stamps.matches(relative, sha256, identity):
        return True
    if sha256_file(file) != sha256:
        return False
    if stamps is not None and FileIdentity.of(file) == identity:  # unchanged while it was hashed
        stamps.record(relative, sha256, identity)
    return True
