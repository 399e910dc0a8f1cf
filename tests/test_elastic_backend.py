"""The Elasticsearch backend without an Elasticsearch server.

Three layers:
1. The request bodies (pure functions) against the Elasticsearch 8 REST API reference: each
   group of tests names the reference page its expectations were checked against.
2. Filters: `FieldFilter`s as Elasticsearch filter clauses, with the embedded semantics.
3. The wire protocol, through a loopback HTTP test double (`FakeElasticsearch`) that answers the
   official `elasticsearch` client the way Elasticsearch 8 answers for one index, with the
   statistics of an embedded index: the round trip shows that the ranking features computed
   through the Elasticsearch backend equal the embedded ones when Elasticsearch reports the same
   statistics, and the error paths (missing index, old server, failed sub-search, no cluster)
   become the engine's own errors.

What none of this measures is Elasticsearch's own analysis and BM25 (Lucene's one-byte length
norms, its Snowball release, stop-word position gaps): only the integration suite run against a
real cluster (ES_URL) does.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pytest

from indexing.analysis import LUCENE_ENGLISH_STOPWORDS, Analyzer, AnalyzerSettings
from indexing.bm25 import COMBINED_FIELD, SOURCE_FIELDS, BM25Settings, bigram_coverage
from indexing.build import BuildSettings, build_index
from indexing.corpus import CorpusSpec
from indexing.elastic import (
    ClusterUnavailableError, ElasticsearchError, ElasticsearchSettings, IncompatibleIndexError, IndexMissingError,
    alias_name, document_source, generation_index, index_body, index_meta, mappings,
)
from ltr.features import FEATURES, extract_features, feature_set
from search.elastic_backend import (
    COSINE_SCRIPT, MAX_RESULT_WINDOW, ElasticsearchBackend, aligned_scores, bm25_search_body, exact_bm25_body,
    exact_cosine_body, feature_search_body, filter_body, filter_clause, hits_of, knn_search_body,
    metadata_field_types, parse_query_terms, query_terms_request,
)
from search.embedded import DenseUnavailableError, EmbeddedIndex
from search.backend import SearchBackend
from search.hybrid import Candidates
from search.rules import FieldFilter, parse_filters
from tests.conftest import SMALL_DOCS, write_jsonl

NAME = "t"
IDS = [d["_id"] for d in SMALL_DOCS]


def named_queries(body: dict) -> list[str]:
    """Every `_name` in a request body, wherever it sits."""
    names: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "_name" in node:
                names.append(node["_name"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(body)
    return names


# =============================================================================================
# 1. Request bodies
# =============================================================================================

# Checked against: Search API, `knn` section, and the kNN search guide
# https://www.elastic.co/guide/en/elasticsearch/reference/8.19/search-search.html#search-api-knn
# https://www.elastic.co/guide/en/elasticsearch/reference/8.19/knn-search.html
# (field, query_vector, k, num_candidates: per shard, >= k, at most 10,000); match query and
# `_source: false`: https://www.elastic.co/guide/en/elasticsearch/reference/8.19/query-dsl-match-query.html


def test_bm25_search_body_is_a_match_on_the_combined_field():
    assert bm25_search_body("dogs chase cats", 7) == {
        "query": {"match": {COMBINED_FIELD: {"query": "dogs chase cats"}}},
        "size": 7, "_source": False, "track_total_hits": False,
    }


@pytest.mark.parametrize("k", [1, 10, 49, 50, 51, 100, 4999, 5000, 5001, MAX_RESULT_WINDOW])
def test_knn_search_body_follows_the_knn_section(k):
    vector = np.array([0.1, -0.2, 0.3], dtype=np.float64)
    body = knn_search_body(vector, k)
    assert set(body) == {"knn", "size", "_source", "track_total_hits"}
    knn = body["knn"]
    assert set(knn) == {"field", "query_vector", "k", "num_candidates"}
    assert knn["field"] == "embedding"
    assert knn["query_vector"] == np.float32(vector).tolist()  # a JSON array of floats, float32 like the index
    assert all(isinstance(x, float) for x in knn["query_vector"])
    assert knn["k"] == k and body["size"] == k
    assert k <= knn["num_candidates"] <= 10_000  # "cannot be less than k", "cannot exceed 10,000"
    assert knn["num_candidates"] == min(10_000, max(2 * k, 100))
    assert body["_source"] is False and body["track_total_hits"] is False


# Checked against: ids query https://www.elastic.co/guide/en/elasticsearch/reference/8.17/query-dsl-ids-query.html
# (`values`: array of ids); bool query (filter + should: should clauses optional when a filter
# is present, so every filtered document comes back)
# https://www.elastic.co/guide/en/elasticsearch/reference/8.13/query-dsl-bool-query.html;
# script_score with the vector functions
# https://www.elastic.co/guide/en/elasticsearch/reference/8.19/query-dsl-script-score-query.html#vector-functions-cosine
# ("cosineSimilarity(params.query_vector, 'my_dense_vector') + 1.0": scores cannot be negative)


def test_exact_bm25_body_scores_exactly_the_given_documents():
    ids = ["d3", "d1", "x-9"]
    body = exact_bm25_body("cats", ids)
    assert body == {
        "query": {"bool": {"filter": [{"ids": {"values": ids}}],
                           "should": [{"match": {COMBINED_FIELD: {"query": "cats"}}}]}},
        "size": 3, "_source": False, "track_total_hits": False,
    }
    assert body["size"] == len(ids)


def test_exact_cosine_body_is_a_script_score_over_the_ids():
    ids = ["d2", "d5"]
    vector = np.array([0.6, 0.8], dtype=np.float32)
    body = exact_cosine_body(vector, ids)
    assert COSINE_SCRIPT == "cosineSimilarity(params.query_vector, 'embedding') + 1.0"
    assert body == {
        "query": {"script_score": {"query": {"ids": {"values": ids}},
                                   "script": {"source": COSINE_SCRIPT, "params": {"query_vector": vector.tolist()}}}},
        "size": 2, "_source": False, "track_total_hits": False,
    }


# Checked against: term vectors API, artificial documents
# https://www.elastic.co/guide/en/elasticsearch/reference/8.19/docs-termvectors.html
# (`doc`, `fields`, `positions`, `offsets`, `payloads`, `term_statistics`: doc_freq and ttf of each
# term, `field_statistics`: doc_count, sum_doc_freq, sum_ttf)


def test_query_terms_request_asks_for_term_and_field_statistics_of_an_artificial_document():
    assert query_terms_request("dogs chase cats") == {
        "doc": {"title": "dogs chase cats", "text": "dogs chase cats", COMBINED_FIELD: "dogs chase cats"},
        "fields": ["title", "text", COMBINED_FIELD],
        "positions": True, "offsets": False, "payloads": False,
        "term_statistics": True, "field_statistics": True,
    }


# Checked against: named queries (`_name`; with the `include_named_queries_score` query
# parameter, 8.8+, `matched_queries` becomes an object name -> score, and duplicate names are
# undefined behaviour) in the bool query page
# https://www.elastic.co/guide/en/elasticsearch/reference/8.13/query-dsl-bool-query.html#named-queries
# and the search API query parameters
# https://www.elastic.co/guide/en/elasticsearch/reference/8.19/search-search.html#search-search-api-query-params;
# term query https://www.elastic.co/guide/en/elasticsearch/reference/8.19/query-dsl-term-query.html;
# span_near (clauses, slop, in_order) and span_term
# https://www.elastic.co/guide/en/elasticsearch/reference/8.17/query-dsl-span-near-query.html;
# docvalue_fields https://www.elastic.co/guide/en/elasticsearch/reference/8.19/search-fields.html#docvalue-fields


def test_feature_search_body_names_every_statistic_once():
    ids = ["d1", "d4", "d6"]
    terms = ["dog", "chase", "cat"]
    bigrams = [("dog", "chase"), ("chase", "cat")]
    body = feature_search_body("dogs chase cats", ids, terms, bigrams)
    assert set(body) == {"query", "size", "_source", "track_total_hits", "docvalue_fields"}
    assert body["size"] == len(ids) and body["_source"] is False and body["track_total_hits"] is False
    assert body["docvalue_fields"] == ["title.length", "text.length"]
    boolean = body["query"]["bool"]
    assert set(boolean) == {"filter", "should"}
    assert boolean["filter"] == [{"ids": {"values": ids}}]
    should = boolean["should"]
    assert should[:3] == [
        {"match": {field: {"query": "dogs chase cats", "_name": f"bm25:{field}"}}} for field in ("title", "text", "all")
    ]
    for field in SOURCE_FIELDS:
        for i, term in enumerate(terms):
            assert {"term": {f"{field}.tf": {"value": term, "_name": f"tf:{field}:{i}"}}} in should
        for j, (first, second) in enumerate(bigrams):
            assert {"span_near": {"clauses": [{"span_term": {field: first}}, {"span_term": {field: second}}],
                                  "slop": 0, "in_order": True, "_name": f"bigram:{field}:{j}"}} in should
    assert len(should) == 3 + len(SOURCE_FIELDS) * (len(terms) + len(bigrams))
    names = named_queries(body)
    assert len(names) == len(should) and len(set(names)) == len(names)  # unique: duplicates are undefined


def test_feature_search_body_without_terms_keeps_only_the_bm25_queries():
    body = feature_search_body("the and of", ["d1"], [], [])
    assert named_queries(body) == ["bm25:title", "bm25:text", "bm25:all"]
    assert body["query"]["bool"]["filter"] == [{"ids": {"values": ["d1"]}}]


# Checked against (the index body):
# similarity module, BM25 (k1, b, discount_overlaps) and scripted similarity (`script.source`
# with `doc.freq` and `query.boost`)
#   https://www.elastic.co/guide/en/elasticsearch/reference/8.19/index-modules-similarity.html
# pattern tokenizer (pattern, flags: Java flags such as UNICODE_CHARACTER_CLASS, group: 0 = the
# whole match is the token) https://www.elastic.co/guide/en/elasticsearch/reference/8.19/analysis-pattern-tokenizer.html
# stop filter (stopwords, ignore_case) https://www.elastic.co/guide/en/elasticsearch/reference/8.19/analysis-stop-tokenfilter.html
# snowball filter (language: English, German2, ...) https://www.elastic.co/guide/en/elasticsearch/reference/8.19/analysis-snowball-tokenfilter.html
# token_count (analyzer, enable_position_increments) https://www.elastic.co/guide/en/elasticsearch/reference/8.19/token-count.html
# dense_vector (dims, index, similarity: cosine, index_options: type hnsw, m, ef_construction)
#   https://www.elastic.co/guide/en/elasticsearch/reference/8.19/dense-vector.html
# mappings: dynamic strict https://www.elastic.co/guide/en/elasticsearch/reference/8.19/dynamic.html,
#   dynamic_templates (path_match, match_mapping_type) https://www.elastic.co/guide/en/elasticsearch/reference/8.19/dynamic-templates.html,
#   _source excludes https://www.elastic.co/guide/en/elasticsearch/reference/8.19/mapping-source-field.html,
#   _meta https://www.elastic.co/guide/en/elasticsearch/reference/8.19/mapping-meta-field.html

META = {"engine": "ltr-search", "schema_version": 1, "name": NAME, "generation": "g000001"}


def test_index_body_settings_spell_the_embedded_analyser_and_bm25():
    bm25 = BM25Settings()
    body = index_body(AnalyzerSettings(), bm25, 384, META, ElasticsearchSettings(shards=2, replicas=1))
    index = body["settings"]["index"]
    assert index["number_of_shards"] == 2 and index["number_of_replicas"] == 1
    assert index["refresh_interval"] == "-1"
    assert index["similarity"] == {
        "engine_bm25": {"type": "BM25", "k1": bm25.k1, "b": bm25.b, "discount_overlaps": True},
        "term_frequency": {"type": "scripted", "script": {"source": "return query.boost * doc.freq;"}},
    }
    analysis = body["settings"]["analysis"]
    assert analysis["tokenizer"] == {
        "engine_tokens": {"type": "pattern", "pattern": r"\w+", "group": 0, "flags": "UNICODE_CHARACTER_CLASS"}
    }
    # The very stop list the embedded analyser uses (and its manifest records), case-sensitive
    # after lowercasing, and the English Snowball stemmer.
    assert analysis["filter"] == {
        "engine_stop": {"type": "stop", "stopwords": sorted(LUCENE_ENGLISH_STOPWORDS), "ignore_case": False},
        "engine_stemmer": {"type": "snowball", "language": "English"},
    }
    assert analysis["filter"]["engine_stop"]["stopwords"] == AnalyzerSettings().to_dict()["stopword_list"]
    assert analysis["analyzer"] == {
        "engine_text": {"type": "custom", "tokenizer": "engine_tokens", "filter": ["lowercase", "engine_stop", "engine_stemmer"]}
    }
    assert "char_filter" not in analysis  # no ICU plugin assumed


def test_index_body_icu_normalises_like_the_embedded_analyser():
    analysis = index_body(AnalyzerSettings(), BM25Settings(), None, META, ElasticsearchSettings(icu=True))["settings"]["analysis"]
    assert analysis["char_filter"] == {"engine_unicode": {"type": "icu_normalizer", "name": "nfkc", "mode": "compose"}}
    assert analysis["analyzer"]["engine_text"]["char_filter"] == ["engine_unicode"]


def test_index_body_without_stemming_or_stop_words_has_neither_filter():
    settings = AnalyzerSettings(stopwords="none", stemmer="none", lowercase=False)
    analysis = index_body(settings, BM25Settings(), None, META, ElasticsearchSettings())["settings"]["analysis"]
    assert analysis["filter"] == {}
    assert analysis["analyzer"]["engine_text"]["filter"] == []


def test_index_body_refuses_a_stemmer_without_a_lucene_snowball_language():
    import Stemmer

    if "greek" not in Stemmer.algorithms():
        pytest.skip("this PyStemmer has no greek stemmer")
    with pytest.raises(ValueError, match="stemmer 'greek' has no Lucene Snowball equivalent"):
        index_body(AnalyzerSettings(stemmer="greek"), BM25Settings(), None, META, ElasticsearchSettings())


def test_index_body_mappings_are_strict_typed_and_carry_the_meta():
    meta = {**META, "counts": {"documents": 6}}
    mapping = index_body(AnalyzerSettings(), BM25Settings(), 384, meta, ElasticsearchSettings())["mappings"]
    assert mapping["dynamic"] == "strict"
    assert mapping["_meta"] == meta
    assert mapping["_source"] == {"excludes": ["embedding"]}
    assert mapping["dynamic_templates"] == [
        {"metadata_strings": {"path_match": "metadata.*", "match_mapping_type": "string",
                              "mapping": {"type": "keyword", "ignore_above": 1024}}},
        {"metadata_integers": {"path_match": "metadata.*", "match_mapping_type": "long",
                               "mapping": {"type": "double", "ignore_malformed": True}}},
        {"metadata_decimals": {"path_match": "metadata.*", "match_mapping_type": "double",
                               "mapping": {"type": "double", "ignore_malformed": True}}},
    ]
    properties = mapping["properties"]
    assert set(properties) == {"doc_id", "title", "text", "all", "metadata", "embedding"}
    assert properties["doc_id"] == {"type": "keyword"}
    assert properties["all"] == {"type": "text", "analyzer": "engine_text", "similarity": "engine_bm25"}
    assert properties["metadata"] == {"type": "object", "dynamic": True}
    for field in SOURCE_FIELDS:
        spec = properties[field]
        assert spec["type"] == "text" and spec["analyzer"] == "engine_text" and spec["similarity"] == "engine_bm25"
        assert spec["copy_to"] == "all"
        assert spec["fields"]["tf"] == {"type": "text", "analyzer": "engine_text", "similarity": "term_frequency",
                                        "norms": False, "index_options": "freqs"}
        # token_count counting tokens, not positions: stop words do not count, as embedded.
        assert spec["fields"]["length"] == {"type": "token_count", "analyzer": "engine_text",
                                            "enable_position_increments": False}
    assert properties["title"]["fields"]["raw"] == {"type": "keyword", "ignore_above": 1024}
    assert "raw" not in properties["text"]["fields"]
    assert properties["embedding"] == {"type": "dense_vector", "dims": 384, "index": True, "similarity": "cosine",
                                       "index_options": {"type": "hnsw", "m": 16, "ef_construction": 100}}
    assert "embedding" not in mappings(None, meta)["properties"]  # a BM25-only index has no vector field


# =============================================================================================
# 2. Filters
# =============================================================================================
# Checked against: terms query https://www.elastic.co/guide/en/elasticsearch/reference/8.19/query-dsl-terms-query.html,
# range query (gt, gte, lt, lte) https://www.elastic.co/guide/en/elasticsearch/reference/8.19/query-dsl-range-query.html,
# match_none https://www.elastic.co/guide/en/elasticsearch/reference/8.19/query-dsl-match-all-query.html#query-dsl-match-none-query

FIELD_TYPES = {"author": "keyword", "year": "double", "open": "boolean"}


def clause(spec: dict) -> dict:
    (rule,) = parse_filters(spec)
    return filter_clause(rule, FIELD_TYPES)


@pytest.mark.parametrize("spec, expected", [
    ({"author": "ann"}, {"terms": {"metadata.author": ["ann"]}}),
    ({"author": {"eq": "ann"}}, {"terms": {"metadata.author": ["ann"]}}),
    ({"author": ["ann", "bob"]}, {"terms": {"metadata.author": ["ann", "bob"]}}),
    ({"author": {"in": ["ann", 3, True]}}, {"terms": {"metadata.author": ["ann"]}}),  # only strings fit a keyword
    ({"author": 3}, {"match_none": {}}),
    ({"year": 2015}, {"terms": {"metadata.year": [2015]}}),
    ({"year": {"in": [2015, 2016.5]}}, {"terms": {"metadata.year": [2015, 2016.5]}}),
    ({"year": "2015"}, {"match_none": {}}),  # a string never equals a number (embedded: JSON types)
    ({"year": [2015, "2016", True]}, {"terms": {"metadata.year": [2015]}}),
    ({"year": {"gt": 2000, "lte": 2010}}, {"range": {"metadata.year": {"gt": 2000, "lte": 2010}}}),
    ({"year": {"gte": 2000.5, "lt": 2010}}, {"range": {"metadata.year": {"gte": 2000.5, "lt": 2010}}}),
    ({"year": {"gte": 1999}}, {"range": {"metadata.year": {"gte": 1999}}}),
    ({"year": {"lt": 5}}, {"range": {"metadata.year": {"lt": 5}}}),
    ({"author": {"gt": 1}}, {"match_none": {}}),  # ranges only match numbers
    ({"open": True}, {"terms": {"metadata.open": [True]}}),
    ({"open": [False]}, {"terms": {"metadata.open": [False]}}),
    ({"open": 1}, {"match_none": {}}),  # 1 is not true
    ({"id": "d1"}, {"ids": {"values": ["d1"]}}),
    ({"id": ["d1", "d2"]}, {"ids": {"values": ["d1", "d2"]}}),
    ({"id": 7}, {"match_none": {}}),
    ({"id": {"gte": 1}}, {"match_none": {}}),
    ({"title": "Cats and dogs"}, {"terms": {"title.raw": ["Cats and dogs"]}}),
    ({"title": {"lt": 3}}, {"match_none": {}}),
    ({"colour": "red"}, {"match_none": {}}),  # no document has the field: the mapping lacks it
])
def test_filter_clause(spec, expected):
    assert clause(spec) == expected


def test_filter_body_ands_the_window_ids_with_every_clause():
    filters = parse_filters({"author": ["ann", "bob"], "year": {"gte": 2000}})
    ids = ["d1", "d2", "d9"]
    body = filter_body(filters, ids, FIELD_TYPES)
    assert body == {
        "query": {"bool": {"filter": [{"ids": {"values": ids}},
                                      {"terms": {"metadata.author": ["ann", "bob"]}},
                                      {"range": {"metadata.year": {"gte": 2000}}}]}},
        "size": 3, "_source": False, "track_total_hits": False,
    }


def test_metadata_field_types_come_from_the_mapping():
    mapping = mappings(None, META)
    mapping["properties"]["metadata"]["properties"] = {
        "author": {"type": "keyword", "ignore_above": 1024}, "year": {"type": "double", "ignore_malformed": True},
        "open": {"type": "boolean"}, "venue": {"properties": {"name": {"type": "keyword"}}},
    }
    assert metadata_field_types(mapping) == {"author": "keyword", "year": "double", "open": "boolean", "venue": "object"}
    assert filter_clause(FieldFilter("venue", values=("x",)), metadata_field_types(mapping)) == {"terms": {"metadata.venue": ["x"]}}


# =============================================================================================
# Pure response parsers
# =============================================================================================


def test_hits_of_and_aligned_scores():
    response = {"hits": {"hits": [{"_id": "d2", "_score": 2.5}, {"_id": "d1", "_score": None}]}}
    ids, scores = hits_of(response)
    assert ids == ["d2", "d1"] and scores.dtype == np.float32 and scores.tolist() == [2.5, 0.0]
    assert aligned_scores(response, ["d1", "d2"], "ix").tolist() == [0.0, 2.5]
    with pytest.raises(KeyError, match="unknown document id 'd7' in index 'ix'"):
        aligned_scores(response, ["d1", "d7"], "ix")


def test_parse_query_terms_orders_terms_by_position_across_stop_word_gaps():
    """Query "dogs the cats zyx cats": the stop word leaves position 1 unused; in the artificial
    document `all` holds the query three times (copy_to from title and text, then its own value,
    100 positions apart), which must not repeat the query's terms or pairs."""
    def entry(doc_count, df, copies):
        positions = {"dog": [0], "cat": [2, 4], "zyx": [3]}
        return {"field_statistics": {"doc_count": doc_count, "sum_doc_freq": 40, "sum_ttf": 50},
                "terms": {t: {"term_freq": len(p) * copies, "doc_freq": df[t],
                              "tokens": [{"position": x + 105 * c} for c in range(copies) for x in p]}
                          for t, p in positions.items()}}

    vectors = {"title": entry(5, {"dog": 1, "cat": 1, "zyx": 0}, 1), "text": entry(6, {"dog": 2, "cat": 2, "zyx": 0}, 1),
               "all": entry(6, {"dog": 2, "cat": 3, "zyx": 0}, 3)}
    parsed = parse_query_terms({"term_vectors": vectors})
    assert parsed["terms"] == ["dog", "cat", "zyx"]
    assert parsed["sequence"] == ["dog", "cat", "zyx", "cat"]
    assert parsed["counts"] == [1, 2, 1]
    assert parsed["df"] == {"title": [1, 1, 0], "text": [2, 2, 0], "all": [2, 3, 0]}
    assert parsed["doc_count"] == {"title": 5, "text": 6, "all": 6}
    empty = parse_query_terms({"term_vectors": {}})  # a query of stop words only
    assert empty["terms"] == [] and empty["sequence"] == [] and empty["doc_count"] == {"title": 0, "text": 0, "all": 0}


# =============================================================================================
# 3. The wire protocol: a loopback Elasticsearch test double
# =============================================================================================

POSITION_INCREMENT_GAP = 100  # Elasticsearch's default between the values of a multi-valued text field


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]
    body: Any  # parsed JSON, or a list of JSON lines for _msearch


class FakeError(Exception):
    def __init__(self, status: int, kind: str, reason: str):
        super().__init__(reason)
        self.status, self.kind, self.reason = status, kind, reason


def es_error(status: int, kind: str, reason: str) -> dict:
    """An error body as Elasticsearch writes it."""
    return {"error": {"root_cause": [{"type": kind, "reason": reason}], "type": kind, "reason": reason}, "status": status}


class FakeElasticsearch:
    """A test double for the Elasticsearch 8 REST wire protocol, serving one embedded index as the
    alias `ltr-search-t` -> concrete index `ltr-search-t-g000001`.

    `handlers` maps (method, path) to a function of the request returning (status, JSON body);
    tests replace entries to inject faults. Every answer carries `X-Elastic-Product:
    Elasticsearch` (the official client refuses a server without it). The statistics come from the
    embedded index: the term vectors of an artificial document are the embedded analyser's tokens
    (positions kept across removed stop words, and `copy_to` filling `all` from `title` and
    `text` as Elasticsearch's document parser does), with the embedded document frequencies; a
    feature search answers each named query with the embedded value it stands for. It is not a
    search engine: a request body it does not recognise fails the request (400)."""

    def __init__(self, index: EmbeddedIndex, alias: str, concrete: str, mapping: dict):
        self.index, self.alias, self.concrete, self.mapping = index, alias, concrete, mapping
        self.analyzer: Analyzer = index.analyzer
        self.url = ""  # set once the loopback server listens
        self.requests: list[Request] = []
        self.handlers: dict[tuple[str, str], Callable[[Request], tuple[int, Any]]] = {}
        self.reset()

    def reset(self) -> None:
        self.requests.clear()
        self.handlers.clear()
        self.handlers.update({
            ("GET", f"/_alias/{self.alias}"): lambda r: (200, {self.concrete: {"aliases": {self.alias: {}}}}),
            ("GET", f"/{self.concrete}/_mapping"): lambda r: (200, {self.concrete: {"mappings": self.mapping}}),
            ("POST", f"/{self.concrete}/_termvectors"): self.termvectors,
            ("POST", f"/{self.concrete}/_search"): lambda r: (200, self.search(r.body, r.params)),
            ("POST", "/_msearch"): self.msearch,
            ("POST", f"/{self.concrete}/_mget"): self.mget,
        })

    # ----- HTTP -------------------------------------------------------------------------------
    def serve(self, http: BaseHTTPRequestHandler) -> None:
        url = urlsplit(http.path)
        raw = http.rfile.read(int(http.headers.get("content-length") or 0))
        if url.path.endswith("/_msearch"):
            body: Any = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
        else:
            body = json.loads(raw) if raw else None
        request = Request(http.command, url.path, dict(parse_qsl(url.query)), body)
        self.requests.append(request)
        handler = self.handlers.get((request.method, request.path))
        try:
            if handler is None:
                raise FakeError(404, "index_not_found_exception", f"no such index [{request.path.strip('/').split('/')[-1]}]")
            status, payload = handler(request)
        except FakeError as exc:
            status, payload = exc.status, es_error(exc.status, exc.kind, exc.reason)
        data = json.dumps(payload).encode()
        http.send_response(status)
        http.send_header("content-type", "application/json")
        http.send_header("X-Elastic-Product", "Elasticsearch")
        http.send_header("content-length", str(len(data)))
        http.end_headers()
        http.wfile.write(data)

    # ----- _termvectors -------------------------------------------------------------------------
    def lucene_tokens(self, text: str) -> list[tuple[int, str]]:
        """(position, term) as a Lucene analysis chain emits them: a removed stop word leaves its
        position unused."""
        return [(position, term) for position, token in enumerate(self.analyzer.tokenize(text))
                for term in self.analyzer.analyze(token)]

    def termvectors(self, request: Request) -> tuple[int, Any]:
        body = request.body
        for flag in ("positions", "term_statistics", "field_statistics"):
            if body.get(flag) is not True:
                raise FakeError(400, "fake_request", f"the backend must ask for {flag}")
        doc = body["doc"]
        values = {field: [doc[field]] for field in SOURCE_FIELDS if field in doc}
        # copy_to: the document parser adds title's and text's values to `all`, then `all`'s own.
        values[COMBINED_FIELD] = [doc[f] for f in SOURCE_FIELDS if f in doc] + ([doc[COMBINED_FIELD]] if COMBINED_FIELD in doc else [])
        vectors = {}
        for field in body["fields"]:
            tokens: list[tuple[int, str]] = []
            for value in values.get(field, []):
                start = tokens[-1][0] + POSITION_INCREMENT_GAP + 1 if tokens else 0
                tokens += [(start + position, term) for position, term in self.lucene_tokens(value)]
            if not tokens:
                continue
            stats = self.index.bm25.fields[field]
            terms = {}
            for term in sorted({t for _, t in tokens}):  # Lucene returns terms in byte order
                term_id = self.index.bm25.term_to_id.get(term)
                df = int(stats.document_frequencies[term_id]) if term_id is not None else 0
                ttf = int(stats.term_freqs[stats.weights.indptr[term_id]:stats.weights.indptr[term_id + 1]].sum()) if term_id is not None else 0
                positions = [p for p, t in tokens if t == term]
                terms[term] = {"doc_freq": df, "ttf": ttf, "term_freq": len(positions),
                               "tokens": [{"position": p} for p in positions]}
            vectors[field] = {"field_statistics": {"sum_doc_freq": int(stats.weights.nnz), "doc_count": stats.doc_count,
                                                   "sum_ttf": int(stats.doc_lengths.sum())},
                              "terms": terms}
        return 200, {"_index": self.concrete, "_version": 0, "found": True, "took": 1, "term_vectors": vectors}

    # ----- _search ------------------------------------------------------------------------------
    def search(self, body: dict, params: dict[str, str]) -> dict:
        query = body["query"]
        if "docvalue_fields" in body:
            if params.get("include_named_queries_score") != "true":
                raise FakeError(400, "fake_request", "a feature search needs include_named_queries_score=true")
            hits = self.feature_hits(query, body["docvalue_fields"])
        elif set(query) == {"match"}:
            (text,) = [spec["query"] for field, spec in query["match"].items() if field == COMBINED_FIELD]
            retrieved = self.index.retrieve_bm25(text, body["size"])
            hits = [self.hit(d, float(s)) for d, s in zip(retrieved.doc_ids, retrieved.scores.tolist())]
        elif "bool" in query and [list(c) for c in query["bool"]["should"]] == [["match"]]:
            ids = self.known(self.ids_of(query))
            text = query["bool"]["should"][0]["match"][COMBINED_FIELD]["query"]
            hits = [self.hit(d, float(s)) for d, s in zip(ids, self.index.bm25_scores(text, self.index.rows_of(ids)).tolist())]
        else:
            raise FakeError(400, "fake_request", f"the test double does not answer {json.dumps(body)[:200]}")
        hits.sort(key=lambda h: -(h["_score"] or 0.0))
        if len(hits) > body["size"]:
            raise FakeError(400, "fake_request", "more hits than size")
        return {"took": 1, "timed_out": False, "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
                "hits": {"max_score": max((h["_score"] for h in hits), default=None), "hits": hits}}

    def hit(self, doc_id: str, score: float, **extra: Any) -> dict:
        return {"_index": self.concrete, "_id": doc_id, "_score": score, **extra}

    def ids_of(self, query: dict) -> list[str]:
        (ids,) = [c["ids"]["values"] for c in query["bool"]["filter"] if "ids" in c]
        return ids

    def known(self, ids: list[str]) -> list[str]:
        return [d for d in ids if d in self.index.docs.index_of]  # an unknown id simply matches nothing

    def feature_hits(self, query: dict, docvalue_fields: list[str]) -> list[dict]:
        bm25 = self.index.bm25
        hits = []
        for doc_id in self.known(self.ids_of(query)):
            row = np.array([self.index.docs.index_of[doc_id]])
            named: dict[str, float] = {}
            for clause in query["bool"]["should"]:
                (kind, spec), = clause.items()
                if kind == "match":  # per-field BM25 of the analysed query
                    (field, options), = spec.items()
                    score = float(bm25.scores_of(self.analyzer.analyze(options["query"]), row, field)[0])
                    if score > 0:
                        named[options["_name"]] = score
                elif kind == "term":  # `.tf` subfield: the scripted similarity scores the term frequency
                    (subfield, options), = spec.items()
                    field, sub = subfield.split(".")
                    assert sub == "tf", subfield
                    tf = float(bm25.candidate_stats([options["value"]], row).term_freqs[field][0, 0])
                    if tf > 0:
                        named[options["_name"]] = tf
                elif kind == "span_near":  # the two terms adjacent and in order
                    assert spec["slop"] == 0 and spec["in_order"] is True
                    (field, first), = spec["clauses"][0]["span_term"].items()
                    (field_2, second), = spec["clauses"][1]["span_term"].items()
                    assert field == field_2
                    pair = np.array([[bm25.term_to_id.get(first, -1), bm25.term_to_id.get(second, -1)]])
                    stats = bm25.fields[field]
                    if bigram_coverage(pair, stats.token_ids, stats.token_offsets, row)[0] > 0:
                        named[spec["_name"]] = 1.0
                else:
                    raise FakeError(400, "fake_request", f"unexpected clause {kind}")
            fields = {}
            for name in docvalue_fields:
                field, sub = name.split(".")
                assert sub == "length", name
                fields[name] = [int(bm25.fields[field].doc_lengths[row[0]])]
            extra: dict[str, Any] = {"fields": fields}
            if named:  # Elasticsearch leaves out the queries a document does not match
                extra["matched_queries"] = named
            hits.append(self.hit(doc_id, float(sum(named.values())), **extra))
        return hits

    # ----- _msearch and _mget -------------------------------------------------------------------
    def msearch(self, request: Request) -> tuple[int, Any]:
        lines = request.body
        responses = []
        for header, body in zip(lines[::2], lines[1::2]):
            if header.get("index") != self.concrete:
                raise FakeError(400, "fake_request", f"msearch header {header}")
            try:
                responses.append({**self.search(body, {}), "status": 200})
            except FakeError as exc:
                responses.append(es_error(exc.status, exc.kind, exc.reason))
        return 200, {"took": 1, "responses": responses}

    def mget(self, request: Request) -> tuple[int, Any]:
        docs = []
        for doc_id in request.body["ids"]:
            doc = self.index.document(doc_id)
            if doc is None:
                docs.append({"_index": self.concrete, "_id": doc_id, "found": False})
            else:
                source = document_source(doc["id"], doc["title"], doc["text"], doc["metadata"], None)
                docs.append({"_index": self.concrete, "_id": doc_id, "_version": 1, "_seq_no": 0, "_primary_term": 1,
                             "found": True, "_source": source})
        return 200, {"docs": docs}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> EmbeddedIndex:
    """SMALL_DOCS as a BM25-only embedded index (no encoder needed)."""
    root = tmp_path_factory.mktemp("es-backend")
    corpus = root / "small"
    corpus.mkdir()
    write_jsonl(corpus / "corpus.jsonl", SMALL_DOCS)
    build_index(root / "home", NAME, BuildSettings(corpus=CorpusSpec(str(corpus)), dense=False), progress=False,
                log=lambda message: None)
    return EmbeddedIndex.open(root / "home", NAME)


def es_mapping(index: EmbeddedIndex, generation: str, dense: dict | None = None) -> dict:
    """The mapping Elasticsearch would return for the generation index the build creates."""
    manifest = index.generation.manifest
    meta = index_meta(NAME, generation, {"analyzer": manifest["analyzer"], "bm25": manifest["bm25"]["settings"],
                                         "counts": manifest["counts"], "dense": dense, "build": manifest["build"]})
    mapping = mappings(None, meta)
    mapping["properties"]["metadata"]["properties"] = {"author": {"type": "keyword", "ignore_above": 1024}}
    return mapping


@pytest.fixture(scope="module")
def server(embedded):
    settings = ElasticsearchSettings()
    alias, concrete = alias_name(settings, NAME), generation_index(settings, NAME, "g000001")
    fake = FakeElasticsearch(embedded, alias, concrete, es_mapping(embedded, "g000001"))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 (http.server's naming)
            fake.serve(self)

        do_POST = do_PUT = do_DELETE = do_HEAD = do_GET

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield fake
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture
def fake(server) -> FakeElasticsearch:
    server.reset()
    yield server
    server.reset()


@pytest.fixture
def es(fake, embedded, tmp_path) -> ElasticsearchBackend:
    backend = ElasticsearchBackend.open(tmp_path, NAME, ElasticsearchSettings(url=fake.url, timeout=5, max_retries=0))
    yield backend
    backend.client.close()


def window_of(index: SearchBackend, query: str) -> Candidates:
    """The whole small corpus as the window, in `index`'s rows: BM25 hits first in BM25 order, then
    the rest; no dense."""
    lexical = index.retrieve_bm25(query, len(IDS))
    ids = list(lexical.doc_ids) + [d for d in IDS if d not in lexical.doc_ids]
    rows = index.rows_of(ids)
    rank = np.full(len(ids), np.nan)
    rank[: len(lexical)] = np.arange(1, len(lexical) + 1)
    no_rank = np.full(len(ids), np.nan)
    return Candidates(rows=rows, bm25=index.bm25_scores(query, rows), dense=np.full(len(ids), np.nan, dtype=np.float32),
                      bm25_rank=rank, dense_rank=no_rank, id_table=lexical.id_table)


ROUND_TRIP_QUERIES = [
    "dogs chase cats",  # bigrams present in order in d1's text
    "cats chase cats dogs",  # a repeated term
    "the garden of mice",  # stop words
    "quantum zyzzyva entanglement",  # a term no document has
    "entanglement",  # one term: no bigram
    "Cats and dogs",  # a stop word between the terms of a title
    "café crème brûlée",  # non-ASCII, NFKC
    "the and of",  # nothing but stop words
]


@pytest.mark.parametrize("query", ROUND_TRIP_QUERIES)
def test_features_through_elasticsearch_equal_the_embedded_features(es, embedded, fake, query):
    """If Elasticsearch reports the statistics the embedded index has (the test double answers
    with exactly those), the Elasticsearch backend's `candidate_stats` - its term-vector parsing,
    bigram pairs, named-query decoding, idf from the reported document frequencies, field lengths
    from token_count doc values - and so every ranking feature equal the embedded ones.

    It does not show that Elasticsearch computes those statistics as the embedded index does
    (its analysis chain, Lucene's BM25 with one-byte length norms, stop-word position gaps for
    the bigram feature): only the integration suite against a real cluster (ES_URL) measures that."""
    window = window_of(embedded, query)
    es_window = window_of(es, query)
    assert es_window.doc_ids == window.doc_ids
    fake.requests.clear()  # count the feature requests only
    expected = embedded.candidate_stats(query, window.rows)
    got = es.candidate_stats(query, es_window.rows)
    assert got.terms == expected.terms
    assert got.query_length == expected.query_length
    np.testing.assert_array_equal(got.term_counts, expected.term_counts)
    np.testing.assert_array_equal(got.known, expected.known)
    for name in ("bm25", "term_freqs", "idf", "field_lengths", "bigram_coverage"):
        assert set(getattr(got, name)) == set(getattr(expected, name)), name
        for field, values in getattr(expected, name).items():
            np.testing.assert_allclose(getattr(got, name)[field], values, rtol=1e-6, equal_nan=True, err_msg=f"{name}[{field}]")

    features = feature_set("text")
    got_matrix = extract_features(es, query, es_window, features)
    expected_matrix = extract_features(embedded, query, window, features)
    text_columns = [i for i, name in enumerate(features.names) if FEATURES[name][0] == "text"]
    assert len(text_columns) == 18
    np.testing.assert_allclose(got_matrix[:, text_columns], expected_matrix[:, text_columns], rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(got_matrix, expected_matrix, rtol=1e-6, equal_nan=True)  # the window's columns too

    searches = [r for r in fake.requests if r.path.endswith("/_search")]
    assert len(searches) == 2  # one feature search for candidate_stats above, one for each extraction
    assert all(r.params.get("include_named_queries_score") == "true" for r in searches)


def test_the_round_trip_is_not_vacuous(es, embedded):
    """The queries above exercise matches, term frequencies above one and bigrams found."""
    stats = es.candidate_stats("dogs chase cats", es.rows_of(IDS))
    assert stats.bm25["all"].max() > 0 and stats.term_freqs["text"].max() >= 2
    assert np.nanmax(stats.bigram_coverage["text"]) == 1.0  # d1: "Dogs chase cats"
    assert np.isnan(es.candidate_stats("entanglement", es.rows_of(IDS)).bigram_coverage["title"]).all()


def test_retrieve_bm25_parses_the_hits(es, embedded, fake):
    got = es.retrieve_bm25("dogs chase cats", 3)
    expected = embedded.retrieve_bm25("dogs chase cats", 3)
    assert got.doc_ids == expected.doc_ids == ["d1", "d5"]  # only documents that match a term
    np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-6)
    assert got.scores.dtype == np.float32
    (request,) = [r for r in fake.requests if r.path.endswith("/_search")]
    assert request.body == bm25_search_body("dogs chase cats", 3)
    assert es.retrieve_bm25("cats garden", 1).doc_ids == embedded.retrieve_bm25("cats garden", 1).doc_ids
    with pytest.raises(ValueError, match="at most 10000 hits"):
        es.retrieve_bm25("cats", MAX_RESULT_WINDOW + 1)


def test_bm25_scores_align_with_the_ids_and_refuse_an_unknown_one(es, embedded):
    ids = ["d5", "d1", "d2"]
    np.testing.assert_allclose(es.bm25_scores("dogs chase cats", es.rows_of(ids)),
                               embedded.bm25_scores("dogs chase cats", embedded.rows_of(ids)), rtol=1e-6)
    assert es.bm25_scores("cats", es.rows_of([])).shape == (0,)
    with pytest.raises(KeyError, match="unknown document id 'nope'"):
        es.bm25_scores("cats", es.rows_of(["d1", "nope"]))  # Elasticsearch simply returns no hit for it
    with pytest.raises(KeyError, match="unknown document id 'nope'"):
        es.candidate_stats("cats", es.rows_of(["nope", "d1"]))


def test_rows_are_stable_per_backend_and_ids_only_made_on_demand(es):
    """The Elasticsearch backend numbers ids as it meets them: the same id keeps its row, and
    rows map back to the same ids, across requests."""
    first = es.retrieve_bm25("dogs chase cats", 3)
    assert first.rows.dtype == np.int64
    again = es.rows_of(["d5", "d1", "d9-unknown"])
    assert again[:2].tolist() == [first.rows[first.doc_ids.index("d5")], first.rows[first.doc_ids.index("d1")]]
    assert es.doc_ids(again) == ["d5", "d1", "d9-unknown"]
    assert es.describe()["elasticsearch_index"] == es.index and es.describe()["backend"] == "elasticsearch"


def test_documents_via_mget(es, embedded, fake):
    assert es.documents(["d1", "nope", "d6"]) == [embedded.document("d1"), None, embedded.document("d6")]
    assert es.document("d4") == embedded.document("d4")
    assert es.document("nope") is None
    assert es.documents([]) == []
    assert [r.body for r in fake.requests if r.path.endswith("/_mget")][0] == {"ids": ["d1", "nope", "d6"]}


def test_open_reads_the_generation_behind_the_alias(es, embedded, fake):
    assert es.index == fake.concrete and es.generation_id == "g000001"
    assert es.name == NAME and len(es) == len(SMALL_DOCS)
    assert es.has_dense is False
    assert es.field_types == {"author": "keyword"}
    with pytest.raises(DenseUnavailableError, match="built without dense vectors"):
        es.retrieve_dense(np.ones(3, np.float32), 3)


def test_filter_mask_sends_the_filters_with_the_window(es, fake):
    seen = []

    def answer(request):
        seen.append(request.body)
        return 200, {"hits": {"hits": [{"_index": fake.concrete, "_id": "d3", "_score": 0.0}]}}

    fake.handlers[("POST", f"/{fake.concrete}/_search")] = answer
    filters = parse_filters({"author": "ann"})
    assert es.filter_mask(filters, ["d1", "d3"]).tolist() == [False, True]
    assert seen == [filter_body(filters, ["d1", "d3"], {"author": "keyword"})]
    assert es.filter_mask([], ["d1"]).tolist() == [True]  # no filter: no request


class StubEncoder:
    def encode(self, texts):
        return np.ones((len(texts), 3), dtype=np.float32) / np.sqrt(3)


def test_a_failed_msearch_sub_search_raises_with_its_reason(fake, embedded, tmp_path):
    """exact_scores sends BM25 and cosine in one _msearch; a sub-response with `error` is an error
    (a backend with dense vectors, built directly: the fake has no vectors to serve)."""
    from elasticsearch import Elasticsearch

    settings = ElasticsearchSettings(url=fake.url, timeout=5, max_retries=0)
    mapping = es_mapping(embedded, "g000001", dense={"encoder": {"directory": "unused", "sha256": "0" * 64}})
    client = Elasticsearch(fake.url, request_timeout=5, max_retries=0)
    backend = ElasticsearchBackend(tmp_path, NAME, settings, client, fake.concrete, mapping, StubEncoder())
    assert backend.has_dense

    def answer(request):
        headers, bodies = request.body[::2], request.body[1::2]
        assert headers == [{"index": fake.concrete}] * 2
        assert bodies[0] == exact_bm25_body("cats", ["d1", "d2"])
        assert bodies[1] == exact_cosine_body(np.ones(3, np.float32), ["d1", "d2"])
        ok = {"hits": {"hits": [{"_id": "d1", "_score": 1.0}, {"_id": "d2", "_score": 0.5}]}, "status": 200}
        return 200, {"responses": [ok, es_error(400, "script_exception", "runtime error in cosineSimilarity")]}

    fake.handlers[("POST", "/_msearch")] = answer
    with pytest.raises(ElasticsearchError, match="window scoring: Elasticsearch answered 400: "
                                                 "script_exception: runtime error in cosineSimilarity"):
        backend.exact_scores("cats", np.ones(3, np.float32), backend.rows_of(["d1", "d2"]))
    client.close()


def test_a_server_older_than_8_8_is_refused_for_features(es, fake):
    """Before 8.8 Elasticsearch ignores include_named_queries_score and lists names only."""
    def old_server(request):
        response = fake.search(request.body, request.params)
        for hit in response["hits"]["hits"]:
            if "matched_queries" in hit:
                hit["matched_queries"] = sorted(hit["matched_queries"])
        return 200, response

    fake.handlers[("POST", f"/{fake.concrete}/_search")] = old_server
    with pytest.raises(IncompatibleIndexError, match="8.8"):
        es.candidate_stats("dogs chase cats", es.rows_of(IDS))


def test_opening_an_alias_that_does_not_exist(fake, tmp_path):
    settings = ElasticsearchSettings(url=fake.url, timeout=5, max_retries=0)
    with pytest.raises(IndexMissingError, match="no Elasticsearch index or alias 'ltr-search-nope'"):
        ElasticsearchBackend.open(tmp_path, "nope", settings)
    assert fake.requests[-1].path == "/_alias/ltr-search-nope"


def test_opening_an_alias_over_two_indices_is_refused(fake, tmp_path):
    fake.handlers[("GET", f"/_alias/{fake.alias}")] = lambda r: (200, {fake.concrete: {"aliases": {fake.alias: {}}},
                                                                       "other": {"aliases": {fake.alias: {}}}})
    with pytest.raises(ElasticsearchError, match="points at 2 indices"):
        ElasticsearchBackend.open(tmp_path, NAME, ElasticsearchSettings(url=fake.url, timeout=5, max_retries=0))


def test_opening_an_index_the_engine_did_not_create(fake, embedded, tmp_path):
    mapping = es_mapping(embedded, "g000001")
    del mapping["_meta"]["engine"]
    fake.handlers[("GET", f"/{fake.concrete}/_mapping")] = lambda r: (200, {fake.concrete: {"mappings": mapping}})
    with pytest.raises(IncompatibleIndexError, match="was not created by ltr-search"):
        ElasticsearchBackend.open(tmp_path, NAME, ElasticsearchSettings(url=fake.url, timeout=5, max_retries=0))


def test_opening_an_index_without_the_feature_fields(fake, embedded, tmp_path):
    mapping = es_mapping(embedded, "g000001")
    del mapping["properties"]["text"]["fields"]["length"]
    fake.handlers[("GET", f"/{fake.concrete}/_mapping")] = lambda r: (200, {fake.concrete: {"mappings": mapping}})
    with pytest.raises(IncompatibleIndexError, match="lacks mapped fields text.length"):
        ElasticsearchBackend.open(tmp_path, NAME, ElasticsearchSettings(url=fake.url, timeout=5, max_retries=0))


def test_opening_against_a_closed_port(tmp_path: Path):
    url = "http://127.0.0.1:9"
    with pytest.raises(ClusterUnavailableError, match="cannot reach Elasticsearch at http://127.0.0.1:9"):
        ElasticsearchBackend.open(tmp_path, NAME, ElasticsearchSettings(url=url, timeout=1, max_retries=0))
