"""Progress bars are drawn for a person at a terminal, never into a log file or a pipe."""
from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

from indexing.progress import progress_bar
from tests.conftest import ROOT, lexical_home


def batch_search(tmp_path: Path) -> list[str]:
    """A batch search of 50 queries (`search --queries`, which shows a bar unless --quiet)."""
    home = lexical_home(tmp_path, "t")
    queries = tmp_path / "queries.tsv"
    queries.write_text("".join(f"q{i}\tcats and quantum mice {i}\n" for i in range(50)))
    return [sys.executable, "-m", "search.app.cli", "--home", str(home), "search", "--queries", str(queries),
            "--out", str(tmp_path / "run.trec"), "--name", "t", "--pipeline", "bm25"]


def test_a_job_logged_to_a_pipe_has_no_bar_residue(tmp_path):
    result = subprocess.run(batch_search(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "%|" not in result.stderr, result.stderr
    assert "50 queries with bm25" in result.stderr  # its own log line is still there


def test_a_job_at_a_terminal_draws_its_bar(tmp_path):
    command = batch_search(tmp_path)
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    try:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=terminal)
        os.close(terminal)
        seen = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal closed: the process ended
                break
            if not chunk:
                break
            seen += chunk
        assert process.wait(timeout=300) == 0
    finally:
        os.close(controller)
    assert b"%|" in seen, seen[-500:]


def test_a_disabled_bar_still_iterates():
    assert list(progress_bar(range(3), enabled=False, desc="x")) == [0, 1, 2]
