"""One writer lock for the versioned stores (index bundles, model registry): wait up to a timeout,
then an error naming the lock file and its holder. Held by a real second process or thread."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from indexing.build import BuildSettings, build_index
from indexing.bundle import IndexBusyError, IndexStore
from indexing.corpus import CorpusSpec
from indexing.durable import LockBusyError, file_lock, lock_holder
from ltr.registry import ModelRegistry, RegistryBusyError
from tests.conftest import ROOT
from tests.test_registry import save, train

HOLDER = """
import sys, time
from pathlib import Path
from indexing.durable import file_lock
with file_lock(Path(sys.argv[1]), 5.0, "test holder", "busy"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold_in_child(path: Path, seconds: float) -> subprocess.Popen:
    """A second process holding the lock; returns once it holds it."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(seconds)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_process_waits_then_gets_a_clear_error_naming_file_and_holder(tmp_path):
    path = tmp_path / ".lock"
    child = hold_in_child(path, 30)
    try:
        started = time.monotonic()
        with pytest.raises(LockBusyError) as info:
            with file_lock(path, 0.3, "second", "the store is busy"):
                pass
        waited = time.monotonic() - started
        assert 0.3 <= waited < 2.0  # it waited for the timeout, not failed at once
        message = str(info.value)
        assert message.startswith("the store is busy: lock file ") and str(path) in message
        assert f"pid {child.pid} on " in message and "(test holder, since " in message
        assert info.value.holder and info.value.path == path
    finally:
        child.kill()
        child.wait()
    with file_lock(path, 0.3, "after", "busy"):  # the kernel released the dead holder's lock
        assert lock_holder(path).startswith("pid ")
    assert lock_holder(path) is None  # released locks name nobody


def test_a_waiter_gets_the_lock_when_the_holder_finishes(tmp_path):
    path = tmp_path / ".lock"
    child = hold_in_child(path, 0.5)
    try:
        started = time.monotonic()
        with file_lock(path, 10.0, "waiter", "busy"):
            waited = time.monotonic() - started
        assert 0.2 < waited < 5.0
    finally:
        child.wait()


def test_index_store_and_registry_share_the_policy(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"_id": "d1", "title": "t", "text": "cats and dogs"}\n', encoding="utf-8")
    settings = BuildSettings(corpus=CorpusSpec(str(corpus)), dense=False)
    home = tmp_path / "home"
    store = IndexStore(home)
    child = hold_in_child(store.lock_path("t"), 30)
    try:
        with pytest.raises(IndexBusyError, match=rf"another build or rollback of index 't' is running: lock file "
                                                 rf".*\.lock is held by pid {child.pid} on "):
            build_index(home, "t", settings, progress=False, log=lambda m: None, lock_timeout_s=0.2)
    finally:
        child.kill()
        child.wait()

    registry = ModelRegistry(home, lock_timeout_s=0.2)
    version = save(registry, train()).version
    release = threading.Event()
    held = threading.Event()

    def hold() -> None:
        with ModelRegistry(home)._lock("a slow promote"):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    try:
        with pytest.raises(RegistryBusyError, match=r"model registry is running: lock file .*held by pid \d+ .*"
                                                    r"\(a slow promote in the model registry"):
            registry.promote(version)
        threading.Timer(0.3, release.set).start()
        ModelRegistry(home, lock_timeout_s=10).promote(version)  # waits for the holder, then succeeds
        assert registry.active() == version
    finally:
        release.set()
        holder.join()
