"""Wording helpers for summaries and messages, shared by every layer (so `1 line`, never `1 lines`)."""
from __future__ import annotations


def plural(count: int, word: str, many: str | None = None) -> str:
    """`1 line`, `2 lines`, `1,200 queries` (with `many`)."""
    return f"{count:,} {word if count == 1 else (many or word + 's')}"
