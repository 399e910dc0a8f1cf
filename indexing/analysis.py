"""Text analysis: Unicode normalisation, lowercasing, tokenisation, stop words, stemming.

The settings are recorded in every index manifest and the query side rebuilds its analyser from
them, so a query is always analysed exactly as the documents of the generation it searches.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import Stemmer

# Lucene's EnglishAnalyzer default stop set (what Anserini's BEIR BM25 baselines use).
LUCENE_ENGLISH_STOPWORDS: tuple[str, ...] = (
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it",
    "no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these",
    "they", "this", "to", "was", "will", "with",
)
STOPWORD_LISTS: dict[str, tuple[str, ...]] = {"lucene": LUCENE_ENGLISH_STOPWORDS, "none": ()}
UNICODE_FORMS = ("NFC", "NFKC", "NFD", "NFKD", "none")


@dataclass(frozen=True)
class AnalyzerSettings:
    unicode_form: str = "NFKC"
    lowercase: bool = True
    token_pattern: str = r"\w+"
    stopwords: str = "lucene"  # a name from STOPWORD_LISTS, or "custom" with `custom_stopwords`
    custom_stopwords: tuple[str, ...] = field(default_factory=tuple)
    stemmer: str = "english"  # any PyStemmer algorithm, or "none"

    def __post_init__(self) -> None:
        if self.unicode_form not in UNICODE_FORMS:
            raise ValueError(f"unicode_form must be one of {', '.join(UNICODE_FORMS)}, got '{self.unicode_form}'")
        if self.stopwords != "custom" and self.stopwords not in STOPWORD_LISTS:
            names = ", ".join([*STOPWORD_LISTS, "custom"])
            raise ValueError(f"stopwords must be one of {names}, got '{self.stopwords}'")
        if self.stemmer != "none" and self.stemmer not in Stemmer.algorithms():
            raise ValueError(f"unknown stemmer '{self.stemmer}'; choose 'none' or one of {', '.join(Stemmer.algorithms())}")
        try:
            re.compile(self.token_pattern)
        except re.error as exc:
            raise ValueError(f"invalid token_pattern {self.token_pattern!r}: {exc}") from None

    def stopword_set(self) -> frozenset[str]:
        if self.stopwords == "custom":
            return frozenset(self.custom_stopwords)
        return frozenset(STOPWORD_LISTS[self.stopwords])

    def to_dict(self) -> dict[str, Any]:
        """The manifest form; it spells out the stop words so an old index survives a list change."""
        return {
            "unicode_form": self.unicode_form,
            "lowercase": self.lowercase,
            "token_pattern": self.token_pattern,
            "stopwords": self.stopwords,
            "stopword_list": sorted(self.stopword_set()),
            "stemmer": self.stemmer,
            "pystemmer_version": Stemmer.__version__ if hasattr(Stemmer, "__version__") else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AnalyzerSettings":
        settings = cls(
            unicode_form=data["unicode_form"],
            lowercase=data["lowercase"],
            token_pattern=data["token_pattern"],
            stopwords="custom",
            custom_stopwords=tuple(data["stopword_list"]),
            stemmer=data["stemmer"],
        )
        return settings


class Analyzer:
    """Turns text into index terms. Stems are cached: corpora repeat a small vocabulary a lot."""

    def __init__(self, settings: AnalyzerSettings = AnalyzerSettings()):
        self.settings = settings
        self._pattern = re.compile(settings.token_pattern)
        self._stopwords = settings.stopword_set()
        self._stemmer = None if settings.stemmer == "none" else Stemmer.Stemmer(settings.stemmer)
        self._stem_cache: dict[str, str] = {}

    def normalize(self, text: str) -> str:
        if self.settings.unicode_form != "none":
            text = unicodedata.normalize(self.settings.unicode_form, text)
        if self.settings.lowercase:
            text = text.lower()
        return text

    def tokenize(self, text: str) -> list[str]:
        """Normalised tokens before stop words and stemming."""
        return self._pattern.findall(self.normalize(text))

    def analyze(self, text: str) -> list[str]:
        stop = self._stopwords
        return self._stem([token for token in self.tokenize(text) if token not in stop])

    def _stem(self, tokens: list[str]) -> list[str]:
        if self._stemmer is None:
            return tokens
        cache = self._stem_cache
        unseen = [token for token in tokens if token not in cache]
        if unseen:
            unique = list(dict.fromkeys(unseen))
            cache.update(zip(unique, self._stemmer.stemWords(unique)))
        return [cache[token] for token in tokens]
