"""Index build and rebuild jobs: corpus -> analysed BM25 postings + dense vectors -> generation.

The corpus is read and validated completely before anything is written, so a bad corpus (without
`skip_invalid`) fails with a precise error and the active generation is never touched. Every
step after that happens in a private staging directory (see `indexing.bundle`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from indexing.analysis import Analyzer, AnalyzerSettings
from indexing.bm25 import SOURCE_FIELDS, BM25Builder, BM25Settings
from indexing.bundle import IndexCorruptError, IndexGeneration, IndexStore, utc_now
from indexing.config import DEFAULT_KEEP_GENERATIONS, DEFAULT_LOCK_TIMEOUT_S
from indexing.corpus import CorpusReadResult, CorpusSpec, Document, SkippedLine, read_corpus
from indexing.delta import UPSERT, Update, apply_updates, journal_end, read_updates, truncate_after_compaction, updates_entry
from indexing.docstore import DocStore, write_docstore
from indexing.durable import LockBusyError
from indexing.encoder import EncoderSettings, OnnxEncoder, ensure_onnx_encoder
from indexing.vector_cache import KEYS_FILE, VectorCache, content_keys, encoder_fingerprint, live_keys
from indexing.vectors import EMBEDDINGS_FILE, VectorIndexSettings, build_vector_index
from indexing.progress import progress_bar
from indexing.text import plural

BM25_DIR = "bm25"
DOCS_DIR = "docs"
VECTORS_DIR = "vectors"


@dataclass(frozen=True)
class BuildSettings:
    """Everything that determines an index; stored in the manifest so `rebuild` can replay it."""

    corpus: CorpusSpec
    analyzer: AnalyzerSettings = AnalyzerSettings()
    bm25: BM25Settings = BM25Settings()
    dense: bool = True
    encoder: EncoderSettings = EncoderSettings()
    vectors: VectorIndexSettings = VectorIndexSettings()
    skip_invalid: bool = False
    keep: int = DEFAULT_KEEP_GENERATIONS

    def __post_init__(self) -> None:
        if self.keep < 0:
            raise ValueError(f"keep must be >= 0, got {self.keep}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "corpus": self.corpus.to_dict(),
            "analyzer": self.analyzer.to_dict(),
            "bm25": self.bm25.to_dict(),
            "dense": self.dense,
            "encoder": self.encoder.to_dict(),
            "vectors": self.vectors.to_dict(),
            "skip_invalid": self.skip_invalid,
            "keep": self.keep,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BuildSettings":
        return cls(
            corpus=CorpusSpec.from_dict(data["corpus"]),
            analyzer=AnalyzerSettings.from_dict(data["analyzer"]),
            bm25=BM25Settings.from_dict(data["bm25"]),
            dense=bool(data["dense"]),
            encoder=EncoderSettings.from_dict(data["encoder"]),
            vectors=VectorIndexSettings.from_dict(data["vectors"]),
            skip_invalid=bool(data["skip_invalid"]),
            keep=int(data["keep"]),
        )


@dataclass
class BuildSummary:
    name: str
    generation: str
    path: Path
    documents: int
    skipped: list[SkippedLine]
    vocabulary: int
    postings: int
    dense: str  # "none", "exact" or "hnsw"
    bytes_on_disk: int
    seconds: dict[str, float] = field(default_factory=dict)
    pruned: list[str] = field(default_factory=list)
    pruned_corrupt: dict[str, str] = field(default_factory=dict)  # generation -> why it did not verify
    vectors_cached: int = 0  # vectors taken from the vector cache (not encoded)
    vectors_encoded: int = 0

    def lines(self) -> list[str]:
        """The one-screen summary every build ends with."""
        out = [
            f"index '{self.name}' generation {self.generation} is active ({self.path})",
            f"  documents      {self.documents:,}",
            f"  skipped lines  {len(self.skipped):,}",
            f"  vocabulary     {self.vocabulary:,} terms, {self.postings:,} postings (combined field)",
            f"  dense vectors  {self.dense}" + (f" ({self.vectors_encoded:,} encoded, {self.vectors_cached:,} from the cache)"
                                                 if self.dense != "none" else ""),
            f"  size on disk   {self.bytes_on_disk / 1e6:,.1f} MB",
        ]
        corrupt = [f"  pruned corrupt {generation}: {reason}" for generation, reason in self.pruned_corrupt.items()]
        return out + summary_tail(self.seconds, self.pruned, self.skipped) + corrupt


def summary_tail(seconds: dict[str, float], pruned: list[str], skipped: list[SkippedLine]) -> list[str]:
    """The end of every build summary (embedded and Elasticsearch): time per phase, pruned
    generations and the first skipped corpus lines."""
    total = sum(seconds.values())
    out = ["  time           " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()) + f" (total {total:.1f}s)"]
    if pruned:
        out.append(f"  pruned         {', '.join(pruned)}")
    for skip in skipped[:20]:
        out.append(f"  skipped {skip.path}:{skip.line}: {skip.reason}")
    if len(skipped) > 20:
        out.append(f"  ... and {plural(len(skipped) - 20, 'more skipped line')}")
    return out


def dense_text(doc: Document) -> str:
    """What the encoder sees of a document (BEIR's convention: title, a space, text)."""
    return f"{doc.title} {doc.text}".strip()


def encode_documents(home: Path, encoder_settings: EncoderSettings, documents: list[Document],
                     progress: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """Embed documents with the home's exported ONNX encoder (exporting it first if needed).
    Returns the (documents x dims) embeddings and the manifest's description of the encoder."""
    encoder = open_document_encoder(home, encoder_settings, progress)
    embeddings = encoder.encode([dense_text(d) for d in documents], progress=progress)
    return embeddings, encoder_entry_of(encoder)


def open_document_encoder(home: Path, encoder_settings: EncoderSettings, progress: bool = False) -> OnnxEncoder:
    """The home's exported ONNX encoder for these settings (exported first if needed)."""
    encoder_dir = ensure_onnx_encoder(home, encoder_settings, progress=progress)
    return OnnxEncoder(encoder_dir, settings=encoder_settings)


def encoder_entry_of(encoder: OnnxEncoder) -> dict[str, Any]:
    """The manifest's description of the encoder, with the fingerprint its cached vectors are filed under."""
    return {**encoder.metadata, "directory": encoder.encoder_dir.name}


def fingerprint_of(encoder: OnnxEncoder) -> str:
    return encoder_fingerprint(encoder.metadata, encoder.settings.max_tokens)


@dataclass
class EncodeReport:
    """How a build got its vectors: from the vector cache, or encoded now."""

    cached: int = 0
    encoded: int = 0


def encode_cached(encoder: OnnxEncoder, cache: VectorCache, keys: np.ndarray, texts: list[str],
                  progress: bool) -> tuple[np.ndarray, EncodeReport]:
    """Vectors of `texts` (content `keys`): cached ones read, the others encoded and cached."""
    fingerprint = fingerprint_of(encoder)
    found, vectors = cache.get(fingerprint, keys, encoder.dim)
    missing = np.flatnonzero(~found)
    if len(missing):
        # Duplicate texts are encoded once.
        _, first, inverse = np.unique(keys[missing], axis=0, return_index=True, return_inverse=True)
        fresh = encoder.encode([texts[missing[i]] for i in first], progress=progress)
        vectors[missing] = fresh[inverse.ravel()]
        cache.put(fingerprint, keys[missing[first]], fresh)
    return vectors, EncodeReport(cached=int(found.sum()), encoded=int(len(missing)))


def build_index(
    home: Path,
    name: str,
    settings: BuildSettings,
    progress: bool = True,
    log: Callable[[str], None] = print,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> BuildSummary:
    """Build a new generation of index `name` from its corpus and activate it; see the module
    docstring. A new source supersedes the update journal (its batches so far are not applied).
    Waits up to `lock_timeout_s` for another writer of the index to finish."""
    store = IndexStore(home, lock_timeout_s=lock_timeout_s)
    with store.lock(name, purpose="build", create=True):
        first = not store.generations(name) and store.active_generation(name) is None
        try:
            previous = _readable_active(store, name)
            end = journal_end(store.index_dir(name))
            started = time.perf_counter()
            corpus = read_corpus(settings.corpus, skip_invalid=settings.skip_invalid, progress=progress)
            summary = _build_locked(home, store, name, settings, progress, log, corpus, updates_entry(end, end),
                                    read_seconds=time.perf_counter() - started)
            if previous is not None:  # the superseded journal goes once no kept generation reads it
                _truncate_journal(store, name, previous, log, lock_timeout_s)
            return summary
        except BaseException:
            if first:  # a failed first build leaves no empty index behind to be listed
                store.remove_index_files(name)
            raise


def _build_locked(home: Path, store: IndexStore, name: str, settings: BuildSettings, progress: bool,
                  log: Callable[[str], None], corpus: CorpusReadResult, updates: dict[str, int],
                  seed: list[tuple[list[Document], np.ndarray]] = (), compacted: dict[str, Any] | None = None,
                  read_seconds: float | None = None) -> BuildSummary:
    """The build itself, under the index's lock: `corpus` is the final document list; `seed`
    (documents, vectors) pairs already known (a generation's own, the journal's) go into the
    vector cache first, so only documents nobody has encoded yet are encoded."""
    seconds: dict[str, float] = {}
    if read_seconds is not None:
        seconds["read"] = read_seconds
    if compacted is None:
        log(f"read {len(corpus.documents):,} documents from {corpus.file} ({plural(len(corpus.skipped), 'line')} skipped)")

    staging = store.new_staging_dir(name)
    manifest: dict[str, Any] = {"created_at": utc_now(), "build": settings.to_dict(), "updates": updates}
    if compacted is not None:
        manifest["compacted"] = compacted

    started = time.perf_counter()
    analyzer = Analyzer(settings.analyzer)
    builder = BM25Builder(SOURCE_FIELDS)
    for doc in _progress(corpus.documents, progress, "analyse"):
        builder.add({"title": analyzer.analyze(doc.title), "text": analyzer.analyze(doc.text)})
    bm25 = builder.build(settings.bm25)
    manifest["bm25"] = bm25.save(staging / BM25_DIR)
    manifest["analyzer"] = settings.analyzer.to_dict()
    seconds["bm25"] = time.perf_counter() - started

    started = time.perf_counter()
    write_docstore(corpus.documents, staging / DOCS_DIR)
    manifest["corpus"] = _corpus_entry(corpus)
    seconds["store"] = time.perf_counter() - started

    dense_kind = "none"
    manifest["dense"] = None
    report = None
    if settings.dense:
        started = time.perf_counter()
        embeddings, encoder_entry, report = _vectors_for(home, store, settings, corpus.documents, staging, seed, progress)
        seconds["encode"] = time.perf_counter() - started
        started = time.perf_counter()
        vectors = build_vector_index(embeddings, settings.vectors, staging / VECTORS_DIR)
        vectors["files"].append(KEYS_FILE)
        manifest["dense"] = {"encoder": encoder_entry, "vectors": vectors,
                             "cache": {"fingerprint": encoder_entry["fingerprint"], "keys": KEYS_FILE,
                                       "cached": report.cached, "encoded": report.encoded}}
        dense_kind = vectors["kind"]
        seconds["vectors"] = time.perf_counter() - started

    started = time.perf_counter()
    manifest["counts"] = {
        "documents": len(corpus.documents),
        "skipped_lines": len(corpus.skipped),
        "vocabulary": len(bm25.vocabulary),
    }
    generation = store.commit(name, staging, manifest)
    store.activate(name, generation.generation, verify=False)  # commit() verified it
    prune = store.prune(name, settings.keep)
    if settings.dense:
        with VectorCache(home) as cache:
            cache.prune(live_keys(store.root))
    seconds["commit"] = time.perf_counter() - started

    return BuildSummary(
        name=name,
        generation=generation.generation,
        path=generation.path,
        documents=len(corpus.documents),
        skipped=corpus.skipped,
        vocabulary=len(bm25.vocabulary),
        postings=int(bm25.fields["all"].weights.nnz),
        dense=dense_kind,
        bytes_on_disk=sum(f["bytes"] for f in generation.manifest["files"].values()),
        seconds=seconds,
        pruned=prune.deleted,
        pruned_corrupt=prune.corrupt,
        vectors_cached=report.cached if report else 0,
        vectors_encoded=report.encoded if report else 0,
    )


def _vectors_for(home: Path, store: IndexStore, settings: BuildSettings, documents: list[Document], staging: Path,
                 seed: list[tuple[list[Document], np.ndarray]], progress: bool
                 ) -> tuple[np.ndarray, dict[str, Any], EncodeReport]:
    """Every document's vector through the cache. The keys (and fingerprint) are written into the
    staging directory before the cache is read, so a concurrent build's prune keeps them."""
    encoder = open_document_encoder(home, settings.encoder, progress)
    fingerprint = fingerprint_of(encoder)
    texts = [dense_text(d) for d in documents]
    keys = content_keys(texts)
    (staging / VECTORS_DIR).mkdir(parents=True, exist_ok=True)
    np.save(staging / VECTORS_DIR / KEYS_FILE, keys, allow_pickle=False)
    (staging / VECTORS_DIR / "fingerprint").write_text(fingerprint + "\n", encoding="utf-8")
    with VectorCache(home) as cache:
        for seed_docs, seed_vectors in seed:
            if len(seed_docs):
                cache.put(fingerprint, content_keys([dense_text(d) for d in seed_docs]), seed_vectors)
        embeddings, report = encode_cached(encoder, cache, keys, texts, progress)
    (staging / VECTORS_DIR / "fingerprint").unlink()
    return embeddings, {**encoder_entry_of(encoder), "fingerprint": fingerprint}, report


def rebuild_index(home: Path, name: str, progress: bool = True, log: Callable[[str], None] = print,
                  dataset: str | Path | None = None) -> BuildSummary:
    """Replay the active generation's recorded build settings, re-reading its corpus path and
    folding the update journal's batches since that source was read (only changed documents are
    encoded: the others come from the vector cache). `dataset`: build from this corpus path
    instead (a new source: the journal so far is superseded)."""
    store = IndexStore(home)
    active: IndexGeneration = store.open(name, verify=False)
    settings = BuildSettings.from_dict(active.manifest["build"])
    if dataset is not None:
        settings = replace(settings, corpus=replace(settings.corpus, path=str(Path(dataset).resolve())))
        log(f"rebuilding '{name}' from new dataset {settings.corpus.path} (active generation {active.generation})")
        return build_index(home, name, settings, progress=progress, log=log)
    log(f"rebuilding '{name}' from {settings.corpus.path} (active generation {active.generation})")
    with store.lock(name, purpose="rebuild"):
        source = int((active.manifest.get("updates") or {}).get("source", 0))
        started = time.perf_counter()
        corpus = read_corpus(settings.corpus, skip_invalid=settings.skip_invalid, progress=progress)
        updates, end = read_updates(store.index_dir(name), source)
        corpus = _with_updates(corpus, updates)
        seed = [_journal_vectors(updates)]
        summary = _build_locked(home, store, name, settings, progress, log, corpus, updates_entry(source, end), seed,
                                read_seconds=time.perf_counter() - started)
        _truncate_journal(store, name, active, log)  # as after a compaction: what every kept generation holds goes
        return summary


def compact_index(home: Path, name: str, progress: bool = False, log: Callable[[str], None] = print,
                  lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> BuildSummary:
    """Fold the journal's batches after the active generation into a new generation (atomically
    activated, like a build): the active generation's documents and vectors plus the delta, with
    fresh BM25 statistics. Nothing is re-encoded that the generation or the journal already holds."""
    store = IndexStore(home, lock_timeout_s=lock_timeout_s)
    with store.lock(name, purpose="compaction"):
        started = time.perf_counter()
        active = store.open(name, verify=False)
        settings = BuildSettings.from_dict(active.manifest["build"])
        recorded = active.manifest.get("updates") or {}
        through = int(recorded.get("through", 0))
        updates, end = read_updates(store.index_dir(name), through)
        docs = DocStore(active.path / DOCS_DIR)
        try:
            base_docs = docs.all_documents()
        finally:
            docs.close()
        seed = [_journal_vectors(updates)]
        if active.manifest.get("dense"):
            seed.insert(0, (base_docs, np.load(active.path / VECTORS_DIR / EMBEDDINGS_FILE, allow_pickle=False)))
        final = list(apply_updates(base_docs, updates).values())
        corpus = CorpusReadResult(final, [], Path(active.manifest["corpus"]["file"]),
                                  active.manifest["corpus"]["fingerprint_sha256"], 0)
        compacted = {"from": active.generation, "at": utc_now(), "operations": len(updates),
                     "documents_before": len(base_docs)}
        log(f"compacting '{name}': generation {active.generation} plus {plural(len(updates), 'update')}")
        summary = _build_locked(home, store, name, settings, progress, log, corpus,
                                updates_entry(int(recorded.get("source", 0)), end), seed, compacted,
                                read_seconds=time.perf_counter() - started)
        _truncate_journal(store, name, active, log, lock_timeout_s)  # the journal keeps what no generation holds
        return summary


def _readable_active(store: IndexStore, name: str) -> IndexGeneration | None:
    """The active generation's manifest, or None when there is none or it is damaged (a build
    replaces it all the same)."""
    if store.active_generation(name) is None:
        return None
    try:
        return store.open(name, verify=False)
    except IndexCorruptError:
        return None


def _truncate_journal(store: IndexStore, name: str, previous: IndexGeneration, log: Callable[[str], None],
                      lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> None:
    """`truncate_after_compaction` once the new generation is active: housekeeping that never fails
    the build it follows (a damaged kept generation, a busy appender); the journal then stays whole
    and the next build, rebuild or compaction truncates it."""
    try:
        truncate_after_compaction(store, name, previous, lock_timeout_s)
    except (IndexCorruptError, LockBusyError, OSError) as exc:
        log(f"the update journal of '{name}' was not truncated ({exc}); the next build or compaction will")


def _with_updates(corpus: CorpusReadResult, updates: list[Update]) -> CorpusReadResult:
    if not updates:
        return corpus
    return replace(corpus, documents=list(apply_updates(corpus.documents, updates).values()))


def _journal_vectors(updates: list[Update]) -> tuple[list[Document], np.ndarray]:
    """The documents of the journal's upserts that carry a vector, and those vectors."""
    with_vectors = [u for u in updates if u.op == UPSERT and u.vector is not None]
    if not with_vectors:
        return [], np.empty((0, 0), np.float32)
    return [u.doc for u in with_vectors], np.stack([u.vector for u in with_vectors])


def _corpus_entry(corpus: CorpusReadResult) -> dict[str, Any]:
    return {
        "file": str(corpus.file.resolve()),
        "fingerprint_sha256": corpus.fingerprint,
        "lines": corpus.lines,
        "documents": len(corpus.documents),
        "skipped": [{"line": s.line, "reason": s.reason} for s in corpus.skipped],
    }


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    return progress_bar(items, desc=desc, unit="doc", leave=False)
