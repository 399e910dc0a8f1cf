"""Analyser: behaviour, and the manifest round trip that keeps queries analysed like documents."""
from __future__ import annotations

import json

import pytest

from indexing.analysis import Analyzer, AnalyzerSettings


def test_default_analysis_pipeline():
    analyzer = Analyzer()
    # NFKC folds the ligature and full-width letters; stop words go; Porter2 stems.
    assert analyzer.analyze("The ﬁnal Ｒunning of the Studies") == ["final", "run", "studi"]
    assert analyzer.analyze("Café CAFÉ café") == ["café", "café", "café"]
    assert analyzer.analyze("") == []


def test_stopwords_and_stemmer_are_configurable():
    assert Analyzer(AnalyzerSettings(stopwords="none", stemmer="none")).analyze("The cats") == ["the", "cats"]
    assert Analyzer(AnalyzerSettings(stemmer="porter")).analyze("generalization") == ["gener"]


def test_manifest_round_trip_analyses_identically():
    settings = AnalyzerSettings(unicode_form="NFKC", stopwords="lucene", stemmer="english")
    restored = AnalyzerSettings.from_dict(json.loads(json.dumps(settings.to_dict())))
    texts = ["Running runners ran: the 5 Ｑuick foxes!", "Naïve café façade — coöperation", "IL-6 and TNF-α levels"]
    assert [Analyzer(restored).analyze(t) for t in texts] == [Analyzer(settings).analyze(t) for t in texts]
    assert restored.stopword_set() == settings.stopword_set()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stemmer": "klingon"}, "unknown stemmer 'klingon'"),
        ({"stopwords": "french-ish"}, "stopwords must be one of"),
        ({"unicode_form": "NFX"}, "unicode_form must be one of"),
        ({"token_pattern": "("}, "invalid token_pattern"),
    ],
)
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AnalyzerSettings(**kwargs)
