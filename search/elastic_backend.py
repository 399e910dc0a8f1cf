"""The Elasticsearch `SearchBackend`: retrieval, exact scores and ranking statistics computed by
the cluster, everything above the backend interface (fusion, features, model, rules) unchanged.

Round trips per learning-to-rank request: one `_msearch` (BM25 top-k and kNN top-k), one
`_msearch` for the window's exact scores (BM25 and cosine), one `_termvectors` on the query
(Elasticsearch's own analysis of it, with document frequencies), one `_search` whose named
queries return every per-candidate text statistic (`include_named_queries_score`, 8.8+).
Only free-tier features are used: no RRF retriever, no learning_to_rank rescorer.

The request bodies are pure functions (`*_body`), unit-tested against the Elasticsearch 8 REST
API reference (tests/test_elastic_backend.py).
"""
from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from indexing.bm25 import COMBINED_FIELD, SOURCE_FIELDS, CandidateStats, lucene_idf
from indexing.elastic import (
    BACKEND_ELASTICSEARCH, LENGTH_SUBFIELD, METADATA_FIELD, TF_SUBFIELD, VECTOR_FIELD, ElasticsearchError,
    ElasticsearchSettings, IncompatibleIndexError, IndexMissingError, alias_name, check_meta, connect, explain_error,
)
from indexing.encoder import EncoderSettings
from search.backend import AnalysedQuery, QueryInput, Retrieved
from search.rules import FieldFilter

MAX_RESULT_WINDOW = 10_000  # Elasticsearch's default index.max_result_window
MIN_NUM_CANDIDATES = 100  # HNSW candidates per shard for a kNN search (ef_search, roughly)
BM25_QUERY = "bm25"  # named-query prefixes of the feature request
TF_QUERY = "tf"
BIGRAM_QUERY = "bigram"
# Elasticsearch stores cosine similarity as (1 + cos) / 2 in kNN scores; script_score below adds 1.
COSINE_SCRIPT = f"cosineSimilarity(params.query_vector, '{VECTOR_FIELD}') + 1.0"


# ---------------------------------------------------------------------------------------------
# Request bodies (pure)


def ids_filter(doc_ids: Sequence[str]) -> dict[str, Any]:
    return {"ids": {"values": list(doc_ids)}}


def bm25_search_body(query: str, k: int) -> dict[str, Any]:
    """BM25 top-k over the combined field; only documents that match a query term."""
    return {"query": {"match": {COMBINED_FIELD: {"query": query}}}, "size": k, "_source": False,
            "track_total_hits": False}


def knn_search_body(query_vector: np.ndarray, k: int) -> dict[str, Any]:
    """Approximate nearest neighbours on the HNSW graph (`knn` search section)."""
    return {
        "knn": {"field": VECTOR_FIELD, "query_vector": _vector(query_vector), "k": k,
                "num_candidates": min(MAX_RESULT_WINDOW, max(k * 2, MIN_NUM_CANDIDATES))},
        "size": k, "_source": False, "track_total_hits": False,
    }


def exact_bm25_body(query: str, doc_ids: Sequence[str]) -> dict[str, Any]:
    """Combined-field BM25 of given documents: all of them come back, 0 where nothing matches."""
    return {"query": {"bool": {"filter": [ids_filter(doc_ids)], "should": [{"match": {COMBINED_FIELD: {"query": query}}}]}},
            "size": len(doc_ids), "_source": False, "track_total_hits": False}


def exact_cosine_body(query_vector: np.ndarray, doc_ids: Sequence[str]) -> dict[str, Any]:
    """Exact cosine of given documents (a script over their stored vectors, not the graph)."""
    return {
        "query": {"script_score": {"query": ids_filter(doc_ids),
                                   "script": {"source": COSINE_SCRIPT, "params": {"query_vector": _vector(query_vector)}}}},
        "size": len(doc_ids), "_source": False, "track_total_hits": False,
    }


def query_terms_request(query: str) -> dict[str, Any]:
    """Keyword arguments of `termvectors` on an artificial document holding the query: the
    cluster's analysis of the query (terms in order) with each term's document frequency."""
    return {"doc": {field: query for field in (*SOURCE_FIELDS, COMBINED_FIELD)},
            "fields": [*SOURCE_FIELDS, COMBINED_FIELD], "positions": True, "offsets": False, "payloads": False,
            "term_statistics": True, "field_statistics": True}


def feature_search_body(query: str, doc_ids: Sequence[str], terms: Sequence[str],
                        bigrams: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """One search restricted to the window whose named queries are the ranking statistics:
    `bm25:FIELD` (per-field BM25), `tf:FIELD:i` (frequency of query term i, through the `.tf`
    subfield's term-frequency similarity) and `bigram:FIELD:j` (query term pair j adjacent and in
    order); field lengths come back as `token_count` doc values."""
    should: list[dict[str, Any]] = [
        {"match": {field: {"query": query, "_name": f"{BM25_QUERY}:{field}"}}} for field in (*SOURCE_FIELDS, COMBINED_FIELD)
    ]
    for field in SOURCE_FIELDS:
        should += [{"term": {f"{field}.{TF_SUBFIELD}": {"value": term, "_name": f"{TF_QUERY}:{field}:{i}"}}}
                   for i, term in enumerate(terms)]
        should += [{"span_near": {"clauses": [{"span_term": {field: first}}, {"span_term": {field: second}}],
                                  "slop": 0, "in_order": True, "_name": f"{BIGRAM_QUERY}:{field}:{j}"}}
                   for j, (first, second) in enumerate(bigrams)]
    return {
        "query": {"bool": {"filter": [ids_filter(doc_ids)], "should": should}},
        "size": len(doc_ids), "_source": False, "track_total_hits": False,
        "docvalue_fields": [f"{field}.{LENGTH_SUBFIELD}" for field in SOURCE_FIELDS],
    }


def filter_clause(rule: FieldFilter, field_types: Mapping[str, str]) -> dict[str, Any]:
    """One `FieldFilter` as an Elasticsearch filter with the embedded semantics: a missing field
    never matches; ranges only match numbers; a value of the wrong type for the field's mapping
    matches nothing (instead of failing the request)."""
    if rule.field == "id":
        values = [v for v in rule.values if isinstance(v, str)]
        return {"ids": {"values": values}} if values and not rule.is_range else {"match_none": {}}
    target = "title.raw" if rule.field == "title" else f"{METADATA_FIELD}.{rule.field}"
    kind = "keyword" if rule.field == "title" else field_types.get(rule.field)
    if kind is None:  # no document has this field
        return {"match_none": {}}
    if rule.is_range:
        if kind not in ("double", "long", "float", "integer"):
            return {"match_none": {}}
        bounds: dict[str, Any] = {}
        if rule.lower is not None:
            bounds["gte" if rule.lower_inclusive else "gt"] = rule.lower
        if rule.upper is not None:
            bounds["lte" if rule.upper_inclusive else "lt"] = rule.upper
        return {"range": {target: bounds}}
    values = [v for v in rule.values if _fits(v, kind)]
    return {"terms": {target: values}} if values else {"match_none": {}}


def filter_body(filters: Sequence[FieldFilter], doc_ids: Sequence[str], field_types: Mapping[str, str]) -> dict[str, Any]:
    """Which of the window's documents pass every filter (all AND-ed)."""
    return {"query": {"bool": {"filter": [ids_filter(doc_ids), *(filter_clause(f, field_types) for f in filters)]}},
            "size": len(doc_ids), "_source": False, "track_total_hits": False}


def _fits(value: Any, kind: str) -> bool:
    if kind == "boolean":
        return isinstance(value, bool)
    if kind in ("double", "long", "float", "integer"):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, str)  # keyword


def _vector(vector: np.ndarray) -> list[float]:
    return np.asarray(vector, dtype=np.float32).ravel().tolist()


# ---------------------------------------------------------------------------------------------
# Responses (pure)


def hits_of(response: Mapping[str, Any]) -> tuple[list[str], np.ndarray]:
    hits = response["hits"]["hits"]
    return [h["_id"] for h in hits], np.array([h["_score"] or 0.0 for h in hits], dtype=np.float32)


def aligned_scores(response: Mapping[str, Any], doc_ids: Sequence[str], index: str) -> np.ndarray:
    """Scores in `doc_ids` order; an id the index does not hold is an error, as embedded."""
    scores = {h["_id"]: h["_score"] or 0.0 for h in response["hits"]["hits"]}
    missing = [d for d in doc_ids if d not in scores]
    if missing:
        raise KeyError(f"unknown document id '{missing[0]}' in index '{index}'")
    return np.array([scores[d] for d in doc_ids], dtype=np.float32)


def parse_query_terms(response: Mapping[str, Any]) -> dict[str, Any]:
    """From the `termvectors` response: distinct terms in query order, their counts, the token
    sequence (for bigrams), and per field each term's document frequency and the doc count.

    The query's own tokens are read from a source field: in the artificial document `all` holds the
    query several times (its own value plus the copies `copy_to` makes from title and text), so its
    term frequencies and positions would repeat the query; every field has the same analyser."""
    vectors = response.get("term_vectors") or {}
    analysed = vectors.get(SOURCE_FIELDS[0], {}).get("terms", {})
    tokens = sorted((token["position"], term) for term, info in analysed.items() for token in info.get("tokens", []))
    sequence = [term for _, term in tokens]
    distinct = list(dict.fromkeys(sequence))
    stats: dict[str, Any] = {"terms": distinct, "counts": [analysed[t].get("term_freq", 1) for t in distinct],
                             "sequence": sequence, "df": {}, "doc_count": {}}
    for field in (*SOURCE_FIELDS, COMBINED_FIELD):
        entry = vectors.get(field, {})
        field_terms = entry.get("terms", {})
        stats["df"][field] = [int(field_terms.get(t, {}).get("doc_freq", 0)) for t in distinct]
        stats["doc_count"][field] = int(entry.get("field_statistics", {}).get("doc_count", 0))
    return stats


def candidate_stats_from(feature_response: Mapping[str, Any], query_terms: Mapping[str, Any],
                         doc_ids: Sequence[str], index: str) -> CandidateStats:
    """`CandidateStats` as the embedded index computes them, from the feature search's named
    scores and the query's term statistics."""
    terms = list(query_terms["terms"])
    pairs = list(dict.fromkeys(zip(query_terms["sequence"], query_terms["sequence"][1:])))
    n, t = len(doc_ids), len(terms)
    by_id = {hit["_id"]: hit for hit in feature_response["hits"]["hits"]}
    missing = [d for d in doc_ids if d not in by_id]
    if missing:
        raise KeyError(f"unknown document id '{missing[0]}' in index '{index}'")
    bm25 = {field: np.zeros(n, np.float32) for field in (*SOURCE_FIELDS, COMBINED_FIELD)}
    tfs = {field: np.zeros((n, t), np.float32) for field in SOURCE_FIELDS}
    found = {field: np.zeros((n, len(pairs)), bool) for field in SOURCE_FIELDS}
    lengths = {field: np.zeros(n, np.float32) for field in SOURCE_FIELDS}
    for row, doc_id in enumerate(doc_ids):
        hit = by_id[doc_id]
        named = hit.get("matched_queries") or {}
        if isinstance(named, list):  # a server before 8.8 ignores include_named_queries_score
            raise IncompatibleIndexError("Elasticsearch returned matched_queries without scores: the ranking features "
                                         "need Elasticsearch 8.8 or later (include_named_queries_score)")
        for name, score in named.items():
            kind, field, *rest = name.split(":")
            if kind == BM25_QUERY:
                bm25[field][row] = score
            elif kind == TF_QUERY:
                tfs[field][row, int(rest[0])] = score
            elif kind == BIGRAM_QUERY:
                found[field][row, int(rest[0])] = True
        fields = hit.get("fields") or {}
        for field in SOURCE_FIELDS:
            lengths[field][row] = (fields.get(f"{field}.{LENGTH_SUBFIELD}") or [0])[0]
    tfs[COMBINED_FIELD] = tfs["title"] + tfs["text"]  # `all` is title + text (copy_to)
    lengths[COMBINED_FIELD] = lengths["title"] + lengths["text"]
    df = {field: np.asarray(query_terms["df"][field], dtype=np.float64) for field in query_terms["df"]}
    idf = {field: lucene_idf(df[field], query_terms["doc_count"][field]).astype(np.float32) for field in df}
    bigrams = {field: (found[field].sum(axis=1) / len(pairs)).astype(np.float32) if pairs
               else np.full(n, np.nan, dtype=np.float32) for field in SOURCE_FIELDS}
    return CandidateStats(
        doc_indices=np.arange(n, dtype=np.int64),
        terms=tuple(terms),
        term_counts=np.asarray(query_terms["counts"], dtype=np.float32),
        known=df[COMBINED_FIELD] > 0 if t else np.zeros(0, bool),
        query_length=len(query_terms["sequence"]),
        bm25=bm25, term_freqs=tfs, idf=idf, field_lengths=lengths, bigram_coverage=bigrams,
    )


def document_of(hit: Mapping[str, Any]) -> dict[str, Any]:
    """The stored document in the embedded docstore's shape."""
    source = hit.get("_source") or {}
    return {"id": hit["_id"], "title": source.get("title", ""), "text": source.get("text", ""),
            "metadata": source.get(METADATA_FIELD) or {}}


def metadata_field_types(mapping: Mapping[str, Any]) -> dict[str, str]:
    """Top-level metadata field -> mapped type (keyword, double, boolean, object)."""
    properties = mapping.get("properties", {}).get(METADATA_FIELD, {}).get("properties", {})
    return {name: spec.get("type", "object") for name, spec in properties.items()}


REQUIRED_FIELDS = ("doc_id", "title", "text", COMBINED_FIELD, METADATA_FIELD)


def check_mapping(index: str, mapping: Mapping[str, Any]) -> None:
    properties = mapping.get("properties", {})
    absent = [f for f in REQUIRED_FIELDS if f not in properties]
    absent += [f"{f}.{sub}" for f in SOURCE_FIELDS for sub in (TF_SUBFIELD, LENGTH_SUBFIELD)
               if sub not in properties.get(f, {}).get("fields", {})]
    if absent:
        raise IncompatibleIndexError(f"index '{index}' lacks mapped fields {', '.join(absent)}; rebuild it with "
                                     "`ltr-search index build --backend elasticsearch`")


# ---------------------------------------------------------------------------------------------
# The backend


class ElasticsearchBackend:
    """One generation index on a cluster, resolved through the index's alias when opened (so a
    swap by a rebuild never changes what an open backend reads; the service reloads to follow)."""

    kind = BACKEND_ELASTICSEARCH

    def __init__(self, home: Path, name: str, settings: ElasticsearchSettings, client: Any, index: str,
                 mapping: Mapping[str, Any], encoder: Any | None):
        self.home = home
        self.settings = settings
        self.client = client
        self.index = index
        self.meta = check_meta(index, mapping.get("_meta"))
        check_mapping(index, mapping)
        self._name = name
        self.encoder = encoder
        self.field_types = metadata_field_types(mapping)
        self._search_type = "dfs_query_then_fetch" if settings.shards > 1 else None
        self._rows = RowTable()

    @classmethod
    def open(cls, home: Path, name: str, settings: ElasticsearchSettings, encoder_threads: int | None = None,
             client: Any | None = None) -> "ElasticsearchBackend":
        client = client or connect(settings)
        alias = alias_name(settings, name)
        aliases = _call(settings, f"resolve alias '{alias}'", lambda: client.indices.get_alias(name=alias), alias=alias)
        indices = sorted(aliases)
        if len(indices) != 1:
            raise ElasticsearchError(f"alias '{alias}' points at {len(indices)} indices ({', '.join(indices)}); "
                                     f"expected one generation: repair it with `ltr-search index rollback --backend "
                                     f"elasticsearch --name {name} --to GENERATION`")
        index = indices[0]
        response = _call(settings, f"read the mapping of '{index}'", lambda: client.indices.get_mapping(index=index))
        mapping = dict(response)[index]["mappings"]
        meta = check_meta(index, mapping.get("_meta"))
        encoder = None
        if meta.get("dense"):
            from search.embedded import open_query_encoder

            encoder = open_query_encoder(home, meta["dense"]["encoder"], EncoderSettings.from_dict(meta["build"]["encoder"]),
                                         encoder_threads)
        return cls(home, name, settings, client, index, mapping, encoder)

    # ----- identity -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def generation_id(self) -> str:
        return self.meta["generation"]

    @property
    def has_dense(self) -> bool:
        return self.encoder is not None and bool(self.meta.get("dense"))

    def __len__(self) -> int:
        return int(self.meta.get("counts", {}).get("documents", 0))

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "generation": self.generation_id, "backend": self.kind,
                "analyzer": self.meta.get("analyzer", {}), "elasticsearch_index": self.index}

    # ----- the SearchBackend interface -----------------------------------------------------------
    def analyse(self, query: str) -> AnalysedQuery:
        """Elasticsearch analyses on the server: the text is what travels."""
        return AnalysedQuery(query)

    def doc_ids(self, rows: np.ndarray) -> list[str]:
        return self._rows.ids_of(rows)

    def rows_of(self, doc_ids: Sequence[str]) -> np.ndarray:
        return self._rows.rows_of(doc_ids)

    def retrieve_bm25(self, query: QueryInput, k: int) -> Retrieved:
        return self._retrieved(*hits_of(self._search(bm25_search_body(_text(query), self._k(k)), "BM25 search")))

    def encode_query(self, query: str) -> np.ndarray:
        self._require_dense()
        return self.encoder.encode_query(query)  # LRU-cached, read-only

    def retrieve_dense(self, query_vector: np.ndarray, k: int) -> Retrieved:
        self._require_dense()
        ids, scores = hits_of(self._search(knn_search_body(query_vector, self._k(k)), "kNN search"))
        return self._retrieved(ids, 2.0 * scores - 1.0)

    def retrieve_hybrid(self, query: QueryInput, bm25_k: int, dense_k: int) -> tuple[Retrieved, np.ndarray, Retrieved]:
        """BM25 and kNN top-k in one `_msearch` round trip (and the query embedding)."""
        self._require_dense()
        text = _text(query)
        vector = self.encode_query(text)
        lexical, semantic = self._msearch([bm25_search_body(text, self._k(bm25_k)),
                                           knn_search_body(vector, self._k(dense_k))], "hybrid retrieval")
        ids, scores = hits_of(semantic)
        return self._retrieved(*hits_of(lexical)), vector, self._retrieved(ids, 2.0 * scores - 1.0)

    def bm25_scores(self, query: QueryInput, rows: np.ndarray) -> np.ndarray:
        doc_ids = self.doc_ids(rows)
        if not doc_ids:
            return np.zeros(0, np.float32)
        return aligned_scores(self._search(exact_bm25_body(_text(query), doc_ids), "BM25 scoring"), doc_ids, self.index)

    def dense_scores(self, query_vector: np.ndarray, rows: np.ndarray) -> np.ndarray:
        self._require_dense()
        doc_ids = self.doc_ids(rows)
        if not doc_ids:
            return np.zeros(0, np.float32)
        return aligned_scores(self._search(exact_cosine_body(query_vector, doc_ids), "cosine scoring"), doc_ids,
                              self.index) - 1.0

    def exact_scores(self, query: QueryInput, query_vector: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`bm25_scores` and `dense_scores` in one `_msearch` round trip."""
        self._require_dense()
        doc_ids = self.doc_ids(rows)
        if not doc_ids:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        lexical, semantic = self._msearch([exact_bm25_body(_text(query), doc_ids),
                                           exact_cosine_body(query_vector, doc_ids)], "window scoring")
        return (aligned_scores(lexical, doc_ids, self.index), aligned_scores(semantic, doc_ids, self.index) - 1.0)

    def candidate_stats(self, query: QueryInput, rows: np.ndarray) -> CandidateStats:
        text = _text(query)
        doc_ids = self.doc_ids(rows)
        terms = parse_query_terms(self._call("analyse the query", lambda: self.client.termvectors(
            index=self.index, **query_terms_request(text))))
        pairs = list(dict.fromkeys(zip(terms["sequence"], terms["sequence"][1:])))
        if not doc_ids:
            return candidate_stats_from({"hits": {"hits": []}}, terms, [], self.index)
        response = self._search(feature_search_body(text, doc_ids, terms["terms"], pairs), "ranking features",
                                include_named_queries_score=True)
        return candidate_stats_from(response, terms, doc_ids, self.index)

    def document(self, doc_id: str) -> dict[str, Any] | None:
        return self.documents([doc_id])[0]

    def documents(self, doc_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Stored fields of many documents in one `_mget`; None for an unknown id."""
        if not doc_ids:
            return []
        response = self._call("fetch documents", lambda: self.client.mget(index=self.index, ids=list(doc_ids)))
        return [document_of(doc) if doc.get("found") else None for doc in response["docs"]]

    def write_documents(self, upserts: Sequence[Any] = (), deletes: Sequence[str] = ()) -> dict[str, Any]:
        """Upserts and deletes as native `_bulk` calls (see `write_documents_elastic`)."""
        return write_documents_elastic(self, upserts, deletes)

    def filter_mask(self, filters: Sequence[FieldFilter], doc_ids: Sequence[str]) -> np.ndarray:
        """True for each window document that passes every filter, decided by Elasticsearch."""
        if not filters or not doc_ids:
            return np.ones(len(doc_ids), dtype=bool)
        passed = {h["_id"] for h in self._search(filter_body(filters, doc_ids, self.field_types), "filters")["hits"]["hits"]}
        return np.fromiter((d in passed for d in doc_ids), dtype=bool, count=len(doc_ids))

    # ----- plumbing ------------------------------------------------------------------------------
    def _retrieved(self, doc_ids: list[str], scores: np.ndarray) -> Retrieved:
        return Retrieved(self._rows.rows_of(doc_ids), scores, self._rows.ids)

    def _k(self, k: int) -> int:
        if k > MAX_RESULT_WINDOW:
            raise ValueError(f"Elasticsearch returns at most {MAX_RESULT_WINDOW} hits per search (index.max_result_window); "
                             f"asked for {k}")
        return k

    def _require_dense(self) -> None:
        if not self.has_dense:
            from search.embedded import DenseUnavailableError

            raise DenseUnavailableError(f"Elasticsearch index '{self.index}' was built without dense vectors; rebuild it "
                                        "with dense vectors or use the bm25 pipeline")

    def _search(self, body: dict[str, Any], what: str, **params: Any) -> Mapping[str, Any]:
        if self._search_type:
            params["search_type"] = self._search_type
        return self._call(what, lambda: self.client.search(index=self.index, **body, **params))

    def _msearch(self, bodies: Sequence[dict[str, Any]], what: str) -> list[Mapping[str, Any]]:
        header: dict[str, Any] = {"index": self.index}
        if self._search_type:
            header["search_type"] = self._search_type
        searches: list[dict[str, Any]] = []
        for body in bodies:
            searches += [header, body]
        responses = self._call(what, lambda: self.client.msearch(searches=searches))["responses"]
        for response in responses:
            if "error" in response:
                error = response["error"]
                root = (error.get("root_cause") or [error])[0] if isinstance(error, dict) else {"reason": error}
                raise ElasticsearchError(f"{what}: Elasticsearch answered {response.get('status')}: "
                                         f"{root.get('type', 'error')}: {root.get('reason', '')}")
        return responses

    def _call(self, what: str, request: Callable[[], Any]) -> Any:
        return _call(self.settings, what, request, index=self.index)


class RowTable:
    """Rows for a cluster's string ids: each id gets the next row the first time this backend
    sees it (append-only, so rows stay valid for the backend's life; bounded by the corpus)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self._row_of: dict[str, int] = {}
        self._lock = threading.Lock()

    def rows_of(self, doc_ids: Sequence[str]) -> np.ndarray:
        row_of = self._row_of
        if any(d not in row_of for d in doc_ids):
            with self._lock:
                for doc_id in doc_ids:
                    if doc_id not in row_of:
                        row_of[doc_id] = len(self.ids)
                        self.ids.append(doc_id)
        return np.fromiter((row_of[d] for d in doc_ids), dtype=np.int64, count=len(doc_ids))

    def ids_of(self, rows: np.ndarray) -> list[str]:
        ids = self.ids
        return [ids[r] for r in np.asarray(rows).tolist()]


def _text(query: QueryInput) -> str:
    return query.text if isinstance(query, AnalysedQuery) else query


def _call(settings: ElasticsearchSettings, what: str, request: Callable[[], Any], alias: str | None = None,
          index: str | None = None) -> Any:
    from elasticsearch import ApiError, NotFoundError
    from elastic_transport import TransportError

    try:
        return request()
    except NotFoundError as exc:
        target = alias or index
        raise IndexMissingError(f"{what}: no Elasticsearch index or alias '{target}' at {settings.url}; build it with "
                                f"`ltr-search index build --backend elasticsearch`") from exc
    except (ApiError, TransportError) as exc:
        raise explain_error(exc, settings, what) from exc



# ---------------------------------------------------------------------------------------------
# Document updates (issue 18): native `_bulk` index and delete calls on the live index.
#
# Refresh policy: every write is sent with refresh=wait_for, so the call returns (and the API
# acknowledges) once a refresh has made the change searchable, never forcing one (at most the
# index's refresh_interval, 1 s by default, later). Durability is Elasticsearch's: the bulk is
# acknowledged after its translog is fsynced (index.translog.durability=request, the default).
# Writes go through the alias to the generation it points at; BM25 statistics follow Lucene's
# segments (deleted documents count until a merge expunges them: `index compact` asks for one).

UPDATE_REFRESH = "wait_for"


def update_operations(alias: str, upserts: Sequence[Any], vectors: Sequence[np.ndarray | None],
                      deletes: Sequence[str]) -> list[dict[str, Any]]:
    """The `_bulk` body of one batch: an `index` action (create or replace) and its source per
    upsert, then a `delete` action per id."""
    from indexing.elastic import document_source  # same source as a build writes

    operations: list[dict[str, Any]] = []
    for doc, vector in zip(upserts, vectors):
        operations.append({"index": {"_index": alias, "_id": doc.id}})
        operations.append(document_source(doc.id, doc.title, doc.text, doc.metadata,
                                          None if vector is None else _vector(vector)))
    operations += [{"delete": {"_index": alias, "_id": doc_id}} for doc_id in deletes]
    return operations


def update_failures(response: Mapping[str, Any]) -> list[str]:
    """'op id: reason' for each failed item of a `_bulk` answer (a delete of a missing id included)."""
    failures = []
    for item in response.get("items", []):
        (op, result), = item.items()
        if result.get("status", 200) >= 300:
            error = result.get("error") or {}
            reason = error.get("reason") if isinstance(error, dict) else error
            failures.append(f"{op} {result.get('_id')}: {reason or result.get('result', 'status ' + str(result.get('status')))}")
    return failures


def write_documents_elastic(backend: "ElasticsearchBackend", upserts: Sequence[Any] = (),
                            deletes: Sequence[str] = ()) -> dict[str, Any]:
    """One batch of upserts and deletes on the cluster (see the refresh policy above). A delete of
    an id the index does not hold is refused before anything is sent (one `_mget`)."""
    from indexing.updates import UnknownDocumentError  # the error the API maps to 404

    pending = {d.id for d in upserts}
    known = backend.documents([d for d in deletes if d not in pending])
    missing = [d for d, found in zip([d for d in deletes if d not in pending], known) if found is None]
    if missing:
        raise UnknownDocumentError(missing[0], backend.name)
    vectors: list[np.ndarray | None] = [None] * len(upserts)
    if upserts and backend.has_dense:
        from indexing.build import dense_text  # what the build encoded

        vectors = list(backend.encoder.encode([dense_text(d) for d in upserts]))
    alias = alias_name(backend.settings, backend.name)
    operations = update_operations(alias, upserts, vectors, deletes)
    response = backend._call("update documents",
                             lambda: backend.client.bulk(operations=operations, refresh=UPDATE_REFRESH))
    failures = update_failures(response)
    if failures:
        raise ElasticsearchError(f"{len(failures)} of {len(upserts) + len(deletes)} updates failed on alias {alias}: "
                                 + "; ".join(failures[:5]))
    return {"index": backend.name, "upserted": len(upserts), "deleted": len(deletes), "refresh": UPDATE_REFRESH,
            "durable": True}


class ElasticLiveAdmin:
    """`index upsert|delete-docs|compact` and the live part of `index status` on Elasticsearch."""

    def __init__(self, home: Path, settings: ElasticsearchSettings, client: Any | None = None):
        self.home, self.settings, self.client = home, settings, client

    def _backend(self, name: str) -> "ElasticsearchBackend":
        return ElasticsearchBackend.open(self.home, name, self.settings, client=self.client)

    def upsert_file(self, name: str, path: Path) -> dict[str, Any]:
        from indexing.build import BuildSettings
        from indexing.updates import MAX_BATCH, read_upsert_file

        backend = self._backend(name)
        documents = read_upsert_file(path, BuildSettings.from_dict(backend.meta["build"]))
        receipts = [write_documents_elastic(backend, documents[i:i + MAX_BATCH]) for i in range(0, len(documents), MAX_BATCH)]
        return {**receipts[-1], "upserted": len(documents), "batches": len(receipts)}

    def delete_ids(self, name: str, ids: Sequence[str]) -> dict[str, Any]:
        return write_documents_elastic(self._backend(name), deletes=list(ids))

    def compact(self, name: str, log: Callable[[str], None]) -> dict[str, Any]:
        """A force merge that expunges deleted documents (what makes the statistics exact again)."""
        backend = self._backend(name)
        backend._call("force merge", lambda: backend.client.indices.forcemerge(index=backend.index,
                                                                               only_expunge_deletes=True))
        log(f"merged the segments of {backend.index}, expunging deleted documents")
        return {"index": name, "elasticsearch_index": backend.index, "force_merge": "only_expunge_deletes"}

    def describe(self, name: str) -> dict[str, Any]:
        """The live-update line of `index status`; a cluster that cannot be read is reported, not
        raised (the status of the generations is still useful)."""
        try:
            backend = self._backend(name)
            stats = backend._call("index stats", lambda: backend.client.indices.stats(index=backend.index, metric="docs"))
        except ElasticsearchError as exc:
            return {"error": str(exc)}
        docs = dict(stats)["indices"][backend.index]["primaries"]["docs"]
        return {"delta": {"upserts": 0, "deletes": int(docs.get("deleted", 0)), "bytes": 0},
                "documents": int(docs.get("count", 0)), "last_compaction": None,
                "note": f"updates are applied in place (refresh={UPDATE_REFRESH}); deletes shown are not yet merged away"}
