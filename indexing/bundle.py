"""Immutable index generations and the atomic `ACTIVE` pointer.

    HOME/indexes/.NAME.lock         held (indexing.durable.file_lock) by the one writer of NAME at a time;
                                    beside the index, so deleting or cleaning up NAME never deletes its lock
    HOME/indexes/NAME/
        ACTIVE                      the active generation id, replaced atomically (os.replace)
        generations/g000007/        an immutable bundle: manifest.json + the files it lists
        generations/.staging-.../   a build in progress; never read, removed by the next build
    HOME/indexes/.deleting-NAME-*   an index being deleted (renamed out of the namespace first)

A build writes everything into a staging directory, fsyncs it, renames it to its generation id,
verifies every checksum and only then replaces ACTIVE. A build killed at any point therefore
leaves ACTIVE and the generation it names untouched. Loading checks sizes and SHA-256 of every
file the manifest lists, so a corrupt or truncated bundle is refused with the file's name.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from indexing.durable import LockBusyError, file_lock, file_record, fsync_dir, fsync_tree, write_json_durably
from indexing.verified import VerifiedStamps, file_matches, stamp_path
from indexing.config import DEFAULT_LOCK_TIMEOUT_S, INDEX_SCHEMA_VERSION
from indexing.home import indexes_dir

MANIFEST_FILE = "manifest.json"
ACTIVE_FILE = "ACTIVE"
LOCK_SUFFIX = ".lock"
GENERATIONS_DIR = "generations"
STAGING_PREFIX = ".staging-"
GENERATION_PATTERN = re.compile(r"^g(\d{6,})$")
INDEX_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class IndexBundleError(Exception):
    """Base class for index bundle problems ."""


class IndexNotFoundError(IndexBundleError):
    pass


class GenerationNotFoundError(IndexNotFoundError):
    """A generation id that the index does not have (never built, or pruned): not a corrupt one."""


class IndexCorruptError(IndexBundleError):
    """A generation whose manifest or files do not match: names the generation and the file."""

    def __init__(self, path: Path, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"index generation {path} is corrupt: {reason}")


class IndexBusyError(IndexBundleError, LockBusyError):
    """Another build or rollback held the index's lock for longer than the store waits."""


@dataclass(frozen=True)
class PruneReport:
    """What `prune` removed: every deleted generation, and among them the corrupt ones with why."""

    deleted: list[str]
    corrupt: dict[str, str]


@dataclass(frozen=True)
class IndexListing:
    """One index of a home, as `index list` shows it. `usable`: it has an active generation whose
    manifest and file sizes check out (a full SHA-256 check is `index status --verify`)."""

    name: str
    active: str | None
    generations: list[str]
    usable: bool
    problem: str | None = None  # why it is not usable


@dataclass(frozen=True)
class IndexGeneration:
    """One verified, immutable bundle on disk."""

    name: str
    generation: str
    path: Path
    manifest: dict[str, Any]

    @property
    def number(self) -> int:
        return generation_number(self.generation)


def validate_index_name(name: str) -> str:
    if not INDEX_NAME_PATTERN.match(name):
        raise ValueError(
            f"invalid index name '{name}': use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def generation_number(generation: str) -> int:
    match = GENERATION_PATTERN.match(generation)
    if not match:
        raise ValueError(f"invalid generation id '{generation}' (expected g000001 style)")
    return int(match.group(1))


class IndexStore:
    """All indexes of one engine home."""

    def __init__(self, home: Path, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S):
        self.home = home
        self.root = indexes_dir(home)
        self.lock_timeout_s = lock_timeout_s

    # ----- discovery ---------------------------------------------------------------------------
    def index_dir(self, name: str) -> Path:
        return self.root / validate_index_name(name)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if INDEX_NAME_PATTERN.match(p.name) and (p / GENERATIONS_DIR).is_dir())

    def generations(self, name: str) -> list[str]:
        """Committed generation ids, oldest first."""
        directory = self.index_dir(name) / GENERATIONS_DIR
        if not directory.is_dir():
            return []
        ids = [p.name for p in directory.iterdir() if p.is_dir() and GENERATION_PATTERN.match(p.name)]
        return sorted(ids, key=generation_number)

    def active_generation(self, name: str) -> str | None:
        pointer = self.index_dir(name) / ACTIVE_FILE
        try:
            value = pointer.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        generation_number(value)
        return value

    def open(self, name: str, generation: str | None = None, verify: bool = True, rehash: bool = False) -> IndexGeneration:
        """Load a generation (the active one by default), refusing it if any file is off.

        `verify`: SHA-256 of every file, each trusted from the generation's verification stamp
        while the file is unchanged since it was hashed (indexing/verified.py); `rehash`: hash
        every file regardless (`index status --verify`). Without `verify`, sizes only."""
        if generation is None:
            generation = self.active_generation(name)
            if generation is None:
                known = ", ".join(self.names()) or "none"
                raise IndexNotFoundError(
                    f"no active index named '{name}' in {self.root} (indexes here: {known}); "
                    f"build one with `ltr-search index build --dataset PATH --name {name}`"
                )
        path = self.index_dir(name) / GENERATIONS_DIR / generation
        if not path.is_dir():
            raise GenerationNotFoundError(self._no_such_generation(name, generation))
        manifest = read_manifest(path)
        check_files(path, manifest, full=verify, stamped=not rehash)
        return IndexGeneration(name, generation, path, manifest)

    # ----- writing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str, purpose: str = "write", create: bool = False) -> Iterator[None]:
        """One writer (build, rebuild, rollback, delete) per index at a time, waiting up to
        `lock_timeout_s` for another; readers never lock. Only a build (`create`) may lock an
        index that does not exist yet: a rollback of a typo must not leave an empty index behind."""
        directory = self.index_dir(name)
        if not create and not (directory / GENERATIONS_DIR).is_dir():
            raise IndexNotFoundError(self._no_such_index(name))
        with file_lock(self.lock_path(name), self.lock_timeout_s, f"{purpose} of index '{name}'",
                       f"another build or rollback of index '{name}' is running", IndexBusyError):
            if create:
                (directory / GENERATIONS_DIR).mkdir(parents=True, exist_ok=True)
            elif not (directory / GENERATIONS_DIR).is_dir():  # deleted while this one waited
                raise IndexNotFoundError(self._no_such_index(name))
            yield

    def lock_path(self, name: str) -> Path:
        return self.root / f".{validate_index_name(name)}{LOCK_SUFFIX}"

    def new_staging_dir(self, name: str) -> Path:
        """A fresh private directory for a build (call while holding the lock)."""
        generations = self.index_dir(name) / GENERATIONS_DIR
        for stale in generations.glob(STAGING_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed build; we hold the lock
        path = generations / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def commit(self, name: str, staging: Path, manifest: dict[str, Any]) -> IndexGeneration:
        """Checksum, fsync and rename a staged build into the next generation id (not activated)."""
        existing = self.generations(name)
        number = generation_number(existing[-1]) + 1 if existing else 1
        generation = f"g{number:06d}"
        manifest = dict(manifest)
        manifest.update(
            schema_version=INDEX_SCHEMA_VERSION,
            name=name,
            generation=generation,
            files=describe_files(staging),
        )
        write_json_durably(staging / MANIFEST_FILE, manifest)
        fsync_tree(staging)
        final = staging.parent / generation
        os.replace(staging, final)
        fsync_dir(staging.parent)
        return self.open(name, generation, verify=True)

    def activate(self, name: str, generation: str, verify: bool = True) -> None:
        """Point ACTIVE at a generation in one atomic rename, after verifying it (a build passes
        verify=False for the generation `commit` has just verified)."""
        if verify:
            self.open(name, generation, verify=True)
        directory = self.index_dir(name)
        tmp = directory / f"{ACTIVE_FILE}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(generation + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, directory / ACTIVE_FILE)
        fsync_dir(directory)

    def previous_generation(self, name: str) -> str:
        """The newest generation older than the active one that opens cleanly (corrupt ones are skipped)."""
        active = self.active_generation(name)
        older = [g for g in self.generations(name) if active is None or generation_number(g) < generation_number(active)]
        problems = []
        for generation in reversed(older):
            try:
                self.open(name, generation, verify=True)
                return generation
            except IndexCorruptError as exc:
                problems.append(f"{generation} is corrupt ({exc.reason})")
        detail = f" ({'; '.join(problems)})" if problems else ""
        raise IndexNotFoundError(f"index '{name}' has no valid generation older than {active} to roll back to{detail}")

    def rollback(self, name: str, to: str | None = None) -> tuple[str | None, str]:
        """Activate `to` (default: the previous valid generation) under the index's lock; returns
        (active before, active now). A generation that does not exist is named as such, with the
        generations that do; one that exists but does not verify is refused as corrupt."""
        with self.lock(name, purpose="rollback"):
            before = self.active_generation(name)
            target = to or self.previous_generation(name)
            self.activate(name, target, verify=to is not None)  # previous_generation verified its pick
        return before, target

    def prune(self, name: str, keep: int) -> PruneReport:
        """Keep the active generation and the `keep` newest VALID others (fully verified, so a
        rollback to them works); delete the older ones. A corrupt generation never counts as
        kept: it is deleted and reported with its reason. Call while holding the lock."""
        active = self.active_generation(name)
        kept: list[str] = []
        deleted: list[str] = []
        corrupt: dict[str, str] = {}
        for generation in reversed([g for g in self.generations(name) if g != active]):
            if len(kept) < keep:
                try:
                    self.open(name, generation, verify=True)
                except IndexCorruptError as exc:
                    corrupt[generation] = exc.reason
                else:
                    kept.append(generation)
                    continue
            path = self.index_dir(name) / GENERATIONS_DIR / generation
            shutil.rmtree(path)
            stamp_path(path).unlink(missing_ok=True)  # its verification stamp, beside it
            deleted.append(generation)
        return PruneReport(sorted(deleted, key=generation_number), corrupt)

    def list_indexes(self) -> list[IndexListing]:
        """Every index of the home with its active generation, generations and whether it can serve."""
        return [self._listing(name) for name in self.names()]

    def _listing(self, name: str) -> IndexListing:
        generations = self.generations(name)
        try:
            active = self.active_generation(name)
        except ValueError as exc:  # an ACTIVE file that does not hold a generation id
            return IndexListing(name, None, generations, False, f"ACTIVE is unreadable: {exc}")
        if active is None:
            problem = "no active generation (no build finished)" if not generations else "no active generation"
            return IndexListing(name, None, generations, False, problem)
        try:
            self.open(name, active, verify=False)
        except IndexBundleError as exc:
            return IndexListing(name, active, generations, False, str(exc))
        return IndexListing(name, active, generations, True)

    def delete_index(self, name: str) -> None:
        """Delete an index and all its generations, under its lock. The directory is first renamed
        out of the index namespace (one atomic step), so no reader or listing sees half an index."""
        with self.lock(name, purpose="delete"):
            self.remove_index_files(name)

    def remove_index_files(self, name: str) -> None:
        """Remove an index's directory (call while holding its lock; the lock file stays, beside it)."""
        directory = self.index_dir(name)
        if not directory.exists():
            return
        trash = self.root / f".deleting-{name}-{uuid.uuid4().hex[:8]}"
        os.replace(directory, trash)
        fsync_dir(self.root)
        shutil.rmtree(trash)

    # ----- messages ----------------------------------------------------------------------------
    def _no_such_index(self, name: str) -> str:
        known = ", ".join(self.names()) or "none"
        return f"no index named '{name}' in {self.root} (indexes here: {known})"

    def _no_such_generation(self, name: str, generation: str) -> str:
        existing = self.generations(name)
        if not existing:
            return self._no_such_index(name)
        active = self.active_generation(name)
        listed = ", ".join(f"{g} (active)" if g == active else g for g in existing)
        return f"index '{name}' has no generation {generation}; its generations: {listed}"


def read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexCorruptError(path, f"{MANIFEST_FILE} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexCorruptError(path, f"{MANIFEST_FILE} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or "files" not in manifest:
        raise IndexCorruptError(path, f"{MANIFEST_FILE} has no file list")
    version = manifest.get("schema_version")
    if version != INDEX_SCHEMA_VERSION:
        raise IndexCorruptError(
            path, f"schema version {version} is not supported (this engine reads {INDEX_SCHEMA_VERSION}); rebuild the index"
        )
    return manifest


def check_files(path: Path, manifest: dict[str, Any], full: bool = True, stamped: bool = True) -> None:
    """Sizes always; SHA-256 too when `full` (the default for every load). `stamped`: a file
    unchanged since a full check recorded in the generation's stamp (a hidden file beside its
    directory) is not hashed again, and the
    files hashed now are stamped (see indexing/verified.py)."""
    stamps = VerifiedStamps(path) if full and stamped else None
    for relative, expected in manifest["files"].items():
        file = path / relative
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise IndexCorruptError(path, f"{relative} is missing") from None
        if size != expected["bytes"]:
            raise IndexCorruptError(path, f"{relative} has {size} bytes, manifest says {expected['bytes']} (truncated?)")
        if full and not file_matches(file, relative, expected["sha256"], stamps):
            raise IndexCorruptError(path, f"{relative} does not match its SHA-256 checksum")
    if stamps is not None:
        stamps.save()


def describe_files(directory: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        files[file.relative_to(directory).as_posix()] = file_record(file)
    return files


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
