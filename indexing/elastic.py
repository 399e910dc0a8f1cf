"""Elasticsearch as a second home for an index: connection settings, names, and the index body.

The engine creates every Elasticsearch index itself, so the analysis chain, the BM25 parameters
and the fields the ranking features read are the ones it asked for. Everything here is a pure
function of settings (request bodies are unit-tested against the Elasticsearch 8 REST API);
`indexing.elastic_build` sends them.

Supported servers: Elasticsearch 8.8 to 8.19 (8.8 added `include_named_queries_score`, which the
ranking features need), and 9.x through the 8.x client's REST compatibility headers. The client
is the official `elasticsearch` package, 8.x line (see pyproject.toml for the pin).

Where the Elasticsearch analysis cannot match the embedded analyser exactly (see
`analysis_settings` and README "Elasticsearch"):
- Unicode normalisation: the embedded analyser applies NFKC; core Elasticsearch has no NFKC
  filter. With `icu = true` (needs the analysis-icu plugin) an `icu_normalizer` char filter
  applies the same form; without it text is not normalised (identical for NFKC-stable text).
- `\\w` is Python's Unicode word class in the embedded analyser, Java's with
  UNICODE_CHARACTER_CLASS here; they differ on combining marks and some connector punctuation.
- Stemming: PyStemmer's Snowball and Lucene's bundled Snowball are different releases of the
  same algorithms; a few rare words stem differently.
- BM25: Lucene stores each field length in one byte (lossy above ~40 tokens), so scores of long
  fields differ slightly; with more than one shard, statistics are per shard unless searches use
  `dfs_query_then_fetch` (the backend does when `shards > 1`).
- Stop words leave position gaps in Lucene; the embedded forward index drops them, so the
  adjacent-bigram feature can differ around stop words.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from indexing.analysis import AnalyzerSettings
from indexing.bm25 import COMBINED_FIELD, SOURCE_FIELDS, BM25Settings
from indexing.config import DEFAULT_KEEP_GENERATIONS

BACKEND_ELASTICSEARCH = "elasticsearch"
ENGINE_MARK = "ltr-search"  # `_meta.engine` of every index the engine creates
ES_SCHEMA_VERSION = 1  # bump when the mapping changes meaning

ENV_PREFIX = "LTR_SEARCH_ES_"
DEFAULT_INDEX_PREFIX = "ltr-search-"
DEFAULT_BULK_BATCH = 500
GENERATION_PATTERN = re.compile(r"^g(\d{6})$")

ANALYZER = "engine_text"  # the analysis chain of title, text and all
BM25_SIMILARITY = "engine_bm25"
TF_SIMILARITY = "term_frequency"  # scores a term query with the raw term frequency
TF_SUBFIELD = "tf"
LENGTH_SUBFIELD = "length"
KEYWORD_SUBFIELD = "raw"
VECTOR_FIELD = "embedding"
METADATA_FIELD = "metadata"
KEYWORD_IGNORE_ABOVE = 1024

# PyStemmer algorithm -> Lucene Snowball language (the `snowball` token filter's names).
SNOWBALL_LANGUAGES: dict[str, str] = {
    "arabic": "Arabic", "armenian": "Armenian", "basque": "Basque", "catalan": "Catalan", "danish": "Danish",
    "dutch": "Dutch", "english": "English", "estonian": "Estonian", "finnish": "Finnish", "french": "French",
    "german": "German2", "hungarian": "Hungarian", "irish": "Irish", "italian": "Italian",
    "lithuanian": "Lithuanian", "norwegian": "Norwegian", "porter": "Porter", "portuguese": "Portuguese",
    "romanian": "Romanian", "russian": "Russian", "spanish": "Spanish", "swedish": "Swedish", "turkish": "Turkish",
}
ICU_FORMS = {"NFC": ("nfc", "compose"), "NFKC": ("nfkc", "compose"), "NFD": ("nfc", "decompose"),
             "NFKD": ("nfkc", "decompose")}


class ElasticsearchError(RuntimeError):
    """A problem with the cluster or an index on it, worded for the person running the engine."""


class ClusterUnavailableError(ElasticsearchError):
    pass


class IndexMissingError(ElasticsearchError):
    pass


class IncompatibleIndexError(ElasticsearchError):
    """The index exists but was not made by this engine, or by an incompatible version of it."""


@dataclass(frozen=True)
class ElasticsearchSettings:
    """How to reach the cluster and how to lay out indices on it.

    Read by `from_sources`: flags > environment (LTR_SEARCH_ES_URL, _API_KEY, _USERNAME,
    _PASSWORD, _CA_CERTS, _VERIFY_CERTS, _TIMEOUT, _INDEX_PREFIX, _SHARDS, _REPLICAS, _ICU)
    > the `[elasticsearch]` table of the config file > defaults.
    """

    url: str = "http://127.0.0.1:9200"
    api_key: str | None = None
    username: str | None = None
    password: str | None = None
    ca_certs: str | None = None
    verify_certs: bool = True
    timeout: float = 30.0  # seconds per request
    max_retries: int = 3  # per request, on connection errors, timeouts, 429, 502, 503, 504
    index_prefix: str = DEFAULT_INDEX_PREFIX
    shards: int = 1
    replicas: int = 0  # 0 suits a single node; give production clusters at least 1
    icu: bool = False  # the analysis-icu plugin is installed: normalise Unicode as the embedded analyser
    bulk_batch: int = DEFAULT_BULK_BATCH  # documents per bulk request
    keep: int = DEFAULT_KEEP_GENERATIONS  # old generation indices kept for rollback

    def __post_init__(self) -> None:
        if not re.match(r"^https?://[^\s/]+", self.url or ""):
            raise ValueError(f"elasticsearch.url must be an http:// or https:// URL, got {self.url!r}")
        if (self.username is None) != (self.password is None):
            raise ValueError("elasticsearch: give both username and password (basic auth), or neither")
        if self.api_key and self.username:
            raise ValueError("elasticsearch: give an API key or a username and password, not both")
        if not self.timeout > 0:
            raise ValueError(f"elasticsearch.timeout must be > 0 seconds, got {self.timeout}")
        if self.max_retries < 0:
            raise ValueError(f"elasticsearch.max_retries must be >= 0, got {self.max_retries}")
        if not re.match(r"^[a-z0-9][a-z0-9_.-]*$", self.index_prefix):
            raise ValueError(f"elasticsearch.index_prefix must be lowercase letters, digits, '-', '_' or '.', "
                             f"got {self.index_prefix!r}")
        if self.shards < 1 or self.replicas < 0:
            raise ValueError(f"elasticsearch: shards must be >= 1 and replicas >= 0, got {self.shards} and {self.replicas}")
        if not 1 <= self.bulk_batch <= 10_000:
            raise ValueError(f"elasticsearch.bulk_batch must be between 1 and 10000, got {self.bulk_batch}")
        if self.keep < 0:
            raise ValueError(f"elasticsearch.keep must be >= 0, got {self.keep}")

    @classmethod
    def from_sources(cls, file_section: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
                     overrides: Mapping[str, Any] | None = None) -> "ElasticsearchSettings":
        known = {name: type_ for name, type_ in cls.__annotations__.items()}
        values: dict[str, Any] = {}
        for key, value in (file_section or {}).items():
            if key not in known:
                raise ValueError(f"unknown elasticsearch setting '{key}'; known: {', '.join(known)}")
            values[key] = value
        environ = os.environ if environ is None else environ
        for key in known:
            raw = environ.get(ENV_PREFIX + key.upper())
            if raw is not None and raw != "":
                values[key] = _from_env(key, raw, getattr(cls, key))
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls(**values)

    def redacted(self) -> dict[str, Any]:
        """For logs and status output: credentials never printed."""
        out = asdict(self)
        for secret in ("api_key", "password"):
            if out[secret]:
                out[secret] = "***"
        return out


def _from_env(key: str, raw: str, default: Any) -> Any:
    variable = ENV_PREFIX + key.upper()
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return raw.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ValueError(f"{variable}={raw!r} is not a valid {type(default).__name__}") from None
    return raw


def connect(settings: ElasticsearchSettings) -> Any:
    """An `elasticsearch.Elasticsearch` client; retries whole requests on 429/502/503/504 and
    timeouts with the client's own back-off."""
    from elasticsearch import Elasticsearch  # the Elasticsearch client loads only on that backend

    options: dict[str, Any] = {
        "request_timeout": settings.timeout,
        "max_retries": settings.max_retries,
        "retry_on_timeout": True,
        "retry_on_status": (429, 502, 503, 504),
    }
    if settings.api_key:
        options["api_key"] = settings.api_key
    if settings.username is not None:
        options["basic_auth"] = (settings.username, settings.password)
    if settings.url.startswith("https://"):
        options["verify_certs"] = settings.verify_certs
        if settings.ca_certs:
            options["ca_certs"] = settings.ca_certs
    return Elasticsearch(settings.url, **options)


def explain_error(exc: Exception, settings: ElasticsearchSettings, what: str) -> ElasticsearchError:
    """Turn a client exception into an error that says what failed and what to do about it."""
    from elasticsearch import ApiError, AuthenticationException, AuthorizationException, NotFoundError  # the Elasticsearch client loads only on that backend
    from elastic_transport import ConnectionError as TransportConnectionError, ConnectionTimeout, TlsError  # the Elasticsearch client loads only on that backend

    url = settings.url
    if isinstance(exc, TlsError):
        return ClusterUnavailableError(f"{what}: TLS handshake with {url} failed ({exc}); set elasticsearch.ca_certs "
                                       f"(env {ENV_PREFIX}CA_CERTS) to the cluster's CA certificate")
    if isinstance(exc, ConnectionTimeout):
        return ClusterUnavailableError(f"{what}: Elasticsearch at {url} did not answer within {settings.timeout:g}s "
                                       f"(raise elasticsearch.timeout, env {ENV_PREFIX}TIMEOUT)")
    if isinstance(exc, TransportConnectionError):
        return ClusterUnavailableError(f"{what}: cannot reach Elasticsearch at {url} ({type(exc).__name__}); is the "
                                       f"cluster up? (`docker compose up -d elasticsearch`, or set {ENV_PREFIX}URL)")
    if isinstance(exc, (AuthenticationException, AuthorizationException)):
        return ElasticsearchError(f"{what}: Elasticsearch at {url} refused the credentials ({exc.meta.status}); set "
                                  f"{ENV_PREFIX}API_KEY or {ENV_PREFIX}USERNAME/{ENV_PREFIX}PASSWORD")
    if isinstance(exc, NotFoundError):
        return IndexMissingError(f"{what}: {_reason(exc)}")
    if isinstance(exc, ApiError):
        return ElasticsearchError(f"{what}: Elasticsearch answered {exc.meta.status}: {_reason(exc)}")
    return ElasticsearchError(f"{what}: {type(exc).__name__}: {exc}")


def _reason(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        root = (error.get("root_cause") or [error])[0]
        return f"{root.get('type', 'error')}: {root.get('reason', '')}".strip()
    return str(getattr(exc, "message", exc))


# ---------------------------------------------------------------------------------------------
# Names: an alias per index, a concrete index per generation


def alias_name(settings: ElasticsearchSettings, name: str) -> str:
    """What searches use: always points at exactly one verified generation."""
    if not re.match(r"^[a-z0-9][a-z0-9_.-]*$", name):
        raise ValueError(f"index name '{name}' cannot be an Elasticsearch index name: use lowercase letters, digits, "
                         "'-', '_' or '.'")
    return f"{settings.index_prefix}{name}"


def generation_index(settings: ElasticsearchSettings, name: str, generation: str) -> str:
    if not GENERATION_PATTERN.match(generation):
        raise ValueError(f"generation ids look like g000001, got '{generation}'")
    return f"{alias_name(settings, name)}-{generation}"


def generation_of(settings: ElasticsearchSettings, name: str, index: str) -> str | None:
    """The generation id of a concrete index name, None when it is not one of `name`'s."""
    prefix = alias_name(settings, name) + "-"
    if not index.startswith(prefix):
        return None
    generation = index[len(prefix):]
    return generation if GENERATION_PATTERN.match(generation) else None


def next_generation(existing: list[str]) -> str:
    numbers = [int(GENERATION_PATTERN.match(g).group(1)) for g in existing if GENERATION_PATTERN.match(g)]
    return f"g{max(numbers, default=0) + 1:06d}"


# ---------------------------------------------------------------------------------------------
# The index body


def analysis_settings(analyzer: AnalyzerSettings, icu: bool = False) -> dict[str, Any]:
    """`settings.analysis`: the embedded analyser's chain spelled in Elasticsearch filters.

    pattern tokenizer (the same token pattern, Unicode classes) -> lowercase -> stop (the very
    list the manifest records) -> snowball (the same algorithm)."""
    analysis: dict[str, Any] = {
        "tokenizer": {"engine_tokens": {"type": "pattern", "pattern": analyzer.token_pattern, "group": 0,
                                         "flags": "UNICODE_CHARACTER_CLASS"}},
        "filter": {},
        "analyzer": {},
    }
    filters: list[str] = []
    if analyzer.lowercase:
        filters.append("lowercase")
    stopwords = sorted(analyzer.stopword_set())
    if stopwords:
        analysis["filter"]["engine_stop"] = {"type": "stop", "stopwords": stopwords, "ignore_case": False}
        filters.append("engine_stop")
    if analyzer.stemmer != "none":
        language = SNOWBALL_LANGUAGES.get(analyzer.stemmer)
        if language is None:
            raise ValueError(f"stemmer '{analyzer.stemmer}' has no Lucene Snowball equivalent; Elasticsearch can use "
                             f"{', '.join(sorted(SNOWBALL_LANGUAGES))} or 'none'")
        analysis["filter"]["engine_stemmer"] = {"type": "snowball", "language": language}
        filters.append("engine_stemmer")
    definition: dict[str, Any] = {"type": "custom", "tokenizer": "engine_tokens", "filter": filters}
    if icu and analyzer.unicode_form != "none":
        name, mode = ICU_FORMS[analyzer.unicode_form]
        analysis["char_filter"] = {"engine_unicode": {"type": "icu_normalizer", "name": name, "mode": mode}}
        definition["char_filter"] = ["engine_unicode"]
    analysis["analyzer"][ANALYZER] = definition
    return analysis


def similarity_settings(bm25: BM25Settings) -> dict[str, Any]:
    return {
        BM25_SIMILARITY: {"type": "BM25", "k1": bm25.k1, "b": bm25.b, "discount_overlaps": True},
        # A term query on a `.tf` subfield scores the term's frequency in the document: the
        # per-term counts the ranking features need, read back through named queries.
        TF_SIMILARITY: {"type": "scripted", "script": {"source": "return query.boost * doc.freq;"}},
    }


def source_field_mapping(field: str) -> dict[str, Any]:
    subfields: dict[str, Any] = {
        TF_SUBFIELD: {"type": "text", "analyzer": ANALYZER, "similarity": TF_SIMILARITY, "norms": False,
                      "index_options": "freqs"},
        LENGTH_SUBFIELD: {"type": "token_count", "analyzer": ANALYZER, "enable_position_increments": False},
    }
    if field == "title":
        subfields[KEYWORD_SUBFIELD] = {"type": "keyword", "ignore_above": KEYWORD_IGNORE_ABOVE}
    return {"type": "text", "analyzer": ANALYZER, "similarity": BM25_SIMILARITY, "copy_to": COMBINED_FIELD,
            "fields": subfields}


def mappings(dims: int | None, meta: Mapping[str, Any], hnsw_m: int = 16, hnsw_ef_construction: int = 100) -> dict[str, Any]:
    """Strict at the top (a typo'd field fails the document, it is not silently mapped);
    `metadata` maps new fields by type: strings -> keyword, numbers -> double (so 3 and 3.5 share
    a type), booleans -> boolean; a value of the wrong type is kept in _source but not indexed."""
    properties: dict[str, Any] = {
        "doc_id": {"type": "keyword"},
        **{field: source_field_mapping(field) for field in SOURCE_FIELDS},
        COMBINED_FIELD: {"type": "text", "analyzer": ANALYZER, "similarity": BM25_SIMILARITY},
        METADATA_FIELD: {"type": "object", "dynamic": True},
    }
    if dims:
        properties[VECTOR_FIELD] = {
            "type": "dense_vector", "dims": dims, "index": True, "similarity": "cosine",
            "index_options": {"type": "hnsw", "m": hnsw_m, "ef_construction": hnsw_ef_construction},
        }
    return {
        "dynamic": "strict",
        "_meta": dict(meta),
        "_source": {"excludes": [VECTOR_FIELD]},  # the engine keeps vectors itself; pages stay small
        "dynamic_templates": [
            {"metadata_strings": {"path_match": f"{METADATA_FIELD}.*", "match_mapping_type": "string",
                                  "mapping": {"type": "keyword", "ignore_above": KEYWORD_IGNORE_ABOVE}}},
            {"metadata_integers": {"path_match": f"{METADATA_FIELD}.*", "match_mapping_type": "long",
                                   "mapping": {"type": "double", "ignore_malformed": True}}},
            {"metadata_decimals": {"path_match": f"{METADATA_FIELD}.*", "match_mapping_type": "double",
                                   "mapping": {"type": "double", "ignore_malformed": True}}},
        ],
        "properties": properties,
    }


def index_body(analyzer: AnalyzerSettings, bm25: BM25Settings, dims: int | None, meta: Mapping[str, Any],
               settings: ElasticsearchSettings) -> dict[str, Any]:
    """The body of `PUT /<generation index>`: settings (shards, analysis, similarities) and mappings.
    Refresh is off while bulk loading; the build turns it back on before verifying."""
    return {
        "settings": {
            "index": {
                "number_of_shards": settings.shards,
                "number_of_replicas": settings.replicas,
                "refresh_interval": "-1",
                "similarity": similarity_settings(bm25),
            },
            "analysis": analysis_settings(analyzer, settings.icu),
        },
        "mappings": mappings(dims, meta),
    }


def index_meta(name: str, generation: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """`_meta` of a generation index: what the backend needs to open it (analyser, BM25, encoder)
    and what `index status` shows."""
    return {"engine": ENGINE_MARK, "schema_version": ES_SCHEMA_VERSION, "name": name, "generation": generation,
            **manifest}


def check_meta(index: str, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """Refuse an index the engine did not create, or one from another mapping version."""
    if not meta or meta.get("engine") != ENGINE_MARK:
        raise IncompatibleIndexError(f"index '{index}' was not created by ltr-search (no _meta.engine = "
                                     f"'{ENGINE_MARK}'); build it with `ltr-search index build --backend elasticsearch`")
    if meta.get("schema_version") != ES_SCHEMA_VERSION:
        raise IncompatibleIndexError(f"index '{index}' has mapping schema version {meta.get('schema_version')}; this "
                                     f"engine reads version {ES_SCHEMA_VERSION}: rebuild it")
    return dict(meta)


def document_source(doc_id: str, title: str, text: str, metadata: Mapping[str, Any],
                    embedding: list[float] | None) -> dict[str, Any]:
    """The `_source` of one document (`all` is filled by copy_to)."""
    source: dict[str, Any] = {"doc_id": doc_id, "title": title, "text": text, METADATA_FIELD: dict(metadata)}
    if embedding is not None:
        source[VECTOR_FIELD] = embedding
    return source
