"""Matched-term snippets: the stretch of a field with the most query terms, as segments of
(text, matched). The segments stay plain text, so every consumer escapes them itself: the pages
through Jinja2's autoescape, the API through `to_html` (html.escape, then <mark>).

A token matches when the index's own analyser turns it into one of the query's analysed terms,
so "dogs" lights up for the query "dog" exactly when BM25 counted it.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from indexing.analysis import Analyzer, AnalyzerSettings

Segment = tuple[str, bool]  # (text, matched)
SNIPPET_TOKENS = 40  # tokens in one text snippet
CONTEXT_BEFORE = 6  # tokens shown before the first match of the chosen window
TITLE_MAX_CHARS = 300  # titles up to this length are shown whole
HIGHLIGHT_FIELDS = ("title", "text")
ELLIPSIS = "…"
MAX_CACHED_TOKENS = 500_000  # analysed tokens kept per index generation (a corpus's vocabulary, roughly)


@dataclass(frozen=True)
class Highlighter:
    """Snippets for one query over one index generation's analyser."""

    analyzer: Analyzer
    terms: frozenset[str]
    analysed: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False, repr=False)  # token -> terms

    def field(self, text: str, max_tokens: int = SNIPPET_TOKENS) -> list[Segment]:
        """The best window of `text` as segments; the start of the text when nothing matches."""
        spans = [(m.start(), m.end()) for m in re.finditer(self.analyzer.settings.token_pattern, text)]
        if not spans:
            return [(text[:400], False)] if text else []
        matched = [bool(self.terms) and self._matches(text[s:e]) for s, e in spans]
        first = max(0, min(best_window(matched, max_tokens), len(spans) - max_tokens))  # a short text: whole
        last = min(len(spans), first + max_tokens)
        start = 0 if first == 0 else spans[first][0]
        end = len(text) if last == len(spans) else spans[last - 1][1]
        segments: list[Segment] = [(ELLIPSIS, False)] if start > 0 else []
        cursor = start
        for (s, e), hit in zip(spans[first:last], matched[first:last]):
            if hit:
                if s > cursor:
                    segments.append((text[cursor:s], False))
                segments.append((text[s:e], True))
                cursor = e
        if end > cursor:
            segments.append((text[cursor:end], False))
        if end < len(text):
            segments.append((ELLIPSIS, False))
        return merge(segments)

    def document(self, fields: Mapping[str, Any]) -> dict[str, list[Segment]]:
        """Snippets of the title (whole when short) and the text of one stored document."""
        out: dict[str, list[Segment]] = {}
        for name in HIGHLIGHT_FIELDS:
            value = fields.get(name)
            if isinstance(value, str) and value:
                limit = 10_000 if name == "title" and len(value) <= TITLE_MAX_CHARS else SNIPPET_TOKENS
                out[name] = self.field(value, limit)
        return out

    def _matches(self, token: str) -> bool:
        terms = self.analysed.get(token)
        if terms is None:
            if len(self.analysed) > MAX_CACHED_TOKENS:
                self.analysed.clear()
            terms = self.analysed[token] = tuple(self.analyzer.analyze(token))
        return any(term in self.terms for term in terms)


def best_window(matched: list[bool], size: int) -> int:
    """The first token of the window of `size` tokens with the most matches (a few tokens of
    context before its first match); 0 when nothing matches."""
    hits = [i for i, m in enumerate(matched) if m]
    if not hits:
        return 0
    best, best_count, j = hits[0], 0, 0
    for i, start in enumerate(hits):  # windows starting at each match: two pointers over the hits
        while j < len(hits) and hits[j] < start + size - CONTEXT_BEFORE:
            j += 1
        if j - i > best_count:
            best, best_count = start, j - i
    return max(0, best - CONTEXT_BEFORE)


def merge(segments: Iterable[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for text, hit in segments:
        if out and out[-1][1] == hit:
            out[-1] = (out[-1][0] + text, hit)
        else:
            out.append((text, hit))
    return out


def to_html(segments: Iterable[Segment]) -> str:
    """Escaped text with matches in <mark>: safe to insert as HTML."""
    return "".join(f"<mark>{html.escape(t)}</mark>" if hit else html.escape(t) for t, hit in segments)


_ANALYZERS: dict[str, tuple[Analyzer, dict[str, tuple[str, ...]]]] = {}


def analyzer_for(description: Mapping[str, Any]) -> tuple[Analyzer, dict[str, tuple[str, ...]]]:
    """The analyser recorded with an index generation (`SearchBackend.describe()`) and its cache
    of analysed tokens, kept per generation; the default analyser where the backend records none
    it can rebuild (Elasticsearch)."""
    key = f"{description.get('name')}/{description.get('generation')}"
    cached = _ANALYZERS.get(key)
    if cached is None:
        try:
            analyzer = Analyzer(AnalyzerSettings.from_dict(description["analyzer"]))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            analyzer = Analyzer(AnalyzerSettings())
        if len(_ANALYZERS) > 16:
            _ANALYZERS.clear()
        cached = _ANALYZERS[key] = (analyzer, {})
    return cached


def highlighter(description: Mapping[str, Any], query: str) -> Highlighter:
    analyzer, analysed = analyzer_for(description)
    return Highlighter(analyzer, frozenset(analyzer.analyze(query)), analysed)
