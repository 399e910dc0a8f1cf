"""Index build and rebuild jobs: corpus -> analysed BM25 postings + dense vectors -> generation.

The corpus is read and validated completely before anything is written, so a bad corpus (without
`skip_invalid`) fails with a precise error and the active generation is never touched. Every
step after that happens in a private staging directory (see `indexing.bundle`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from indexing.analysis import Analyzer, AnalyzerSettings
from indexing.bm25 import SOURCE_FIELDS, BM25Builder, BM25Settings
from indexing.bundle import IndexGeneration, IndexStore, utc_now
from indexing.config import DEFAULT_KEEP_GENERATIONS, DEFAULT_LOCK_TIMEOUT_S
from indexing.corpus import CorpusReadResult, CorpusSpec, Document, SkippedLine, read_corpus
from indexing.docstore import write_docstore
from indexing.encoder import EncoderSettings, OnnxEncoder, ensure_onnx_encoder
from indexing.vectors import VectorIndexSettings, build_vector_index
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

    def lines(self) -> list[str]:
        """The one-screen summary every build ends with."""
        out = [
            f"index '{self.name}' generation {self.generation} is active ({self.path})",
            f"  documents      {self.documents:,}",
            f"  skipped lines  {len(self.skipped):,}",
            f"  vocabulary     {self.vocabulary:,} terms, {self.postings:,} postings (combined field)",
            f"  dense vectors  {self.dense}",
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
    encoder_dir = ensure_onnx_encoder(home, encoder_settings, progress=progress)
    encoder = OnnxEncoder(encoder_dir, settings=encoder_settings)
    embeddings = encoder.encode([dense_text(d) for d in documents], progress=progress)
    return embeddings, {**encoder.metadata, "directory": encoder_dir.name}


def build_index(
    home: Path,
    name: str,
    settings: BuildSettings,
    progress: bool = True,
    log: Callable[[str], None] = print,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> BuildSummary:
    """Build a new generation of index `name` and activate it; see the module docstring. Waits
    up to `lock_timeout_s` for another writer of the index to finish."""
    store = IndexStore(home, lock_timeout_s=lock_timeout_s)
    with store.lock(name, purpose="build", create=True):
        first = not store.generations(name) and store.active_generation(name) is None
        try:
            return _build_locked(home, store, name, settings, progress, log)
        except BaseException:
            if first:  # a failed first build leaves no empty index behind to be listed
                store.remove_index_files(name)
            raise


def _build_locked(home: Path, store: IndexStore, name: str, settings: BuildSettings, progress: bool,
                  log: Callable[[str], None]) -> BuildSummary:
    """The build itself, under the index's lock."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    corpus = read_corpus(settings.corpus, skip_invalid=settings.skip_invalid, progress=progress)
    seconds["read"] = time.perf_counter() - started
    log(f"read {len(corpus.documents):,} documents from {corpus.file} ({plural(len(corpus.skipped), 'line')} skipped)")

    staging = store.new_staging_dir(name)
    manifest: dict[str, Any] = {"created_at": utc_now(), "build": settings.to_dict()}

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
    if settings.dense:
        started = time.perf_counter()
        embeddings, encoder_entry = encode_documents(home, settings.encoder, corpus.documents, progress)
        seconds["encode"] = time.perf_counter() - started
        started = time.perf_counter()
        vectors = build_vector_index(embeddings, settings.vectors, staging / VECTORS_DIR)
        manifest["dense"] = {"encoder": encoder_entry, "vectors": vectors}
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
    )


def rebuild_index(home: Path, name: str, progress: bool = True, log: Callable[[str], None] = print) -> BuildSummary:
    """Replay the active generation's recorded build settings (re-reading its corpus path)."""
    active: IndexGeneration = IndexStore(home).open(name, verify=False)
    settings = BuildSettings.from_dict(active.manifest["build"])
    log(f"rebuilding '{name}' from {settings.corpus.path} (active generation {active.generation})")
    return build_index(home, name, settings, progress=progress, log=log)


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
    from tqdm import tqdm  # progress bars only on this path

    return tqdm(items, desc=desc, unit="doc", leave=False)
