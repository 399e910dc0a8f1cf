"""Progress bars (tqdm) for long jobs, shown only where someone watches them.

Every command that reads a corpus, encodes, simulates or trains shows a bar unless `--quiet`;
but a bar written to a file or a pipe (a cron job's log, CI, `2> build.log`) is a stream of
carriage returns, one redraw every tenth of a second. So a bar is drawn only when stderr is a
terminal, or in a notebook (tqdm.auto draws its widget there); elsewhere the job prints only
its own log lines.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable


def watched() -> bool:
    """Whether a person can see a bar: stderr is a terminal, or the code runs in a Jupyter kernel."""
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)()) or "ipykernel" in sys.modules


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **options: Any) -> Any:
    """A tqdm bar over `iterable` (or with `total=`), on stderr, drawn only when `enabled` and
    `watched()`; otherwise a silent tqdm that only iterates."""
    from tqdm.auto import tqdm  # progress bars only on the paths that show one (start-up time)

    options.setdefault("file", sys.stderr)
    return tqdm(iterable, disable=not (enabled and watched()), **options)
