"""Synthetic BEIR-style corpora and queries for the BM25 benchmarks, plus shared bench helpers.

    python bench/synthetic_corpus.py --docs 1000000 --queries 1000

writes (once; later runs reuse it) under bench/results/synthetic/<key>/:
    corpus.jsonl            {"_id", "title", "text"} per line
    queries-<n>-s<seed>.jsonl  {"_id", "text"} per line
    spec.json               the parameters and generation statistics

Vocabulary: `vocab` distinct pseudo-words of lowercase ASCII letters (3-12 letters, English letter
frequencies). Every word is a fixed point of the PyStemmer English stemmer, differs from every
Lucene English stop word and is unique, so our analyser maps each word to itself: the analysed
vocabulary *is* the generated one (no stemming merges). Frequent ranks get the shorter words.
Token frequencies follow a finite Zipf law p(rank r) ~ r^-zipf. Titles have 5-15 words
(uniform), texts a lognormal length (median `text_median`, sigma `text_sigma`, clipped 10-2000).
Queries have 2-8 distinct words: 80% drawn log-uniformly from mid-frequency ranks, 10% from the
most frequent ranks and 10% from the rare tail.

Everything is drawn from seeded numpy generators in fixed-size chunks, so a given key always
produces byte-identical files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
SCIFACT = Path(os.environ.get("LTR_SEARCH_DATASETS", ROOT.parent / "shared" / "datasets")) / "scifact"

CHUNK_DOCS = 20_000  # part of the reproducibility contract: do not change without a new key
LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
# English letter frequencies (percent), a-z.
LETTER_FREQ = np.array(
    [8.2, 1.5, 2.8, 4.3, 12.7, 2.2, 2.0, 6.1, 7.0, 0.15, 0.77, 4.0, 2.4,
     6.7, 7.5, 1.9, 0.095, 6.0, 6.3, 9.1, 2.8, 0.98, 2.4, 0.15, 2.0, 0.074]
)


@dataclass(frozen=True)
class SyntheticSpec:
    docs: int = 1_000_000
    vocab: int = 300_000
    zipf: float = 1.1
    seed: int = 20261121
    title_min: int = 5
    title_max: int = 15
    text_median: float = 150.0
    text_sigma: float = 0.5

    @property
    def key(self) -> str:
        return (
            f"d{self.docs}_v{self.vocab}_z{self.zipf:g}_s{self.seed}"
            f"_t{self.title_min}-{self.title_max}_x{self.text_median:g}-{self.text_sigma:g}"
        )

    @property
    def directory(self) -> Path:
        return RESULTS / "synthetic" / self.key

    @property
    def corpus_file(self) -> Path:
        return self.directory / "corpus.jsonl"

    def queries_file(self, n_queries: int, seed: int) -> Path:
        return self.directory / f"queries-{n_queries}-s{seed}.jsonl"


# ----- vocabulary ------------------------------------------------------------------------------
def make_vocabulary(size: int, seed: int) -> list[str]:
    """`size` unique pseudo-words, index = Zipf rank - 1 (shorter words for frequent ranks)."""
    import Stemmer

    from indexing.analysis import LUCENE_ENGLISH_STOPWORDS

    rng = np.random.default_rng([seed, 1])
    stemmer = Stemmer.Stemmer("english")
    stop = set(LUCENE_ENGLISH_STOPWORDS)
    probabilities = LETTER_FREQ / LETTER_FREQ.sum()
    words: dict[str, None] = {}
    while len(words) < size:
        n = 2 * (size - len(words)) + 10_000
        lengths = np.clip(np.round(rng.normal(7.0, 2.0, n)), 3, 12).astype(np.int64)
        letters = LETTERS[rng.choice(26, size=int(lengths.sum()), p=probabilities)]
        ends = np.cumsum(lengths)
        blob = letters.tobytes().decode("ascii")
        candidates = [blob[e - l:e] for e, l in zip(ends.tolist(), lengths.tolist())]
        stems = stemmer.stemWords(candidates)
        for word, stem in zip(candidates, stems):
            if word == stem and word not in stop and word not in words:
                words[word] = None
                if len(words) == size:
                    break
    ordered = list(words)
    # Frequent ranks get short words (as in natural language); random order within a length.
    order = np.lexsort((rng.random(len(ordered)), np.array([len(w) for w in ordered])))
    return [ordered[i] for i in order.tolist()]


def zipf_cdf(size: int, exponent: float) -> np.ndarray:
    weights = np.arange(1, size + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


# ----- corpus ----------------------------------------------------------------------------------
def ensure_corpus(spec: SyntheticSpec, log=print) -> Path:
    """Path of the corpus for `spec`, generating it first if it is not cached yet."""
    if spec.corpus_file.is_file() and (spec.directory / "spec.json").is_file():
        return spec.corpus_file
    spec.directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    vocabulary = make_vocabulary(spec.vocab, spec.seed)
    words = np.array(vocabulary, dtype=object)
    cdf = zipf_cdf(spec.vocab, spec.zipf)
    tmp = spec.corpus_file.with_suffix(".jsonl.tmp")
    tokens = 0
    with open(tmp, "w", encoding="ascii", buffering=1 << 24) as handle:
        for chunk, first in enumerate(range(0, spec.docs, CHUNK_DOCS)):
            n = min(CHUNK_DOCS, spec.docs - first)
            rng = np.random.default_rng([spec.seed, 2, chunk])
            title_len = rng.integers(spec.title_min, spec.title_max + 1, n)
            text_len = np.clip(np.round(rng.lognormal(np.log(spec.text_median), spec.text_sigma, n)), 10, 2000).astype(np.int64)
            lengths = np.stack([title_len, text_len], axis=1).ravel()  # title0, text0, title1, ...
            ranks = np.searchsorted(cdf, rng.random(int(lengths.sum())), side="right")
            np.minimum(ranks, spec.vocab - 1, out=ranks)
            flat = words[ranks].tolist()
            bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
            join = " ".join
            lines = []
            for i in range(n):
                a, b, c = bounds[2 * i], bounds[2 * i + 1], bounds[2 * i + 2]
                lines.append(f'{{"_id": "s{first + i}", "title": "{join(flat[a:b])}", "text": "{join(flat[b:c])}"}}\n')
            handle.write("".join(lines))
            tokens += bounds[-1]
            if log and chunk % 10 == 9:
                log(f"  generated {first + n:,}/{spec.docs:,} documents ({time.perf_counter() - started:.0f}s)")
    os.replace(tmp, spec.corpus_file)
    info = {
        "spec": asdict(spec),
        "tokens": tokens,
        "bytes": spec.corpus_file.stat().st_size,
        "seconds": round(time.perf_counter() - started, 1),
        "sha256_vocabulary": hashlib.sha256("\n".join(vocabulary).encode()).hexdigest(),
    }
    (spec.directory / "spec.json").write_text(json.dumps(info, indent=2))
    if log:
        log(f"wrote {spec.corpus_file} ({spec.docs:,} docs, {tokens:,} tokens, {info['bytes'] / 1e6:,.0f} MB) in {info['seconds']}s")
    return spec.corpus_file


def ensure_queries(spec: SyntheticSpec, n_queries: int = 1000, seed: int = 7, log=print) -> Path:
    """Queries of 2-8 distinct words, mostly mid-frequency (see the module docstring)."""
    path = spec.queries_file(n_queries, seed)
    if path.is_file():
        return path
    spec.directory.mkdir(parents=True, exist_ok=True)
    vocabulary = make_vocabulary(spec.vocab, spec.seed)
    rng = np.random.default_rng([spec.seed, 3, seed])
    mid_lo, mid_hi = 100, min(30_000, spec.vocab)
    lines = []
    for q in range(n_queries):
        length = int(rng.integers(2, 9))
        chosen: list[int] = []
        while len(chosen) < length:
            u = rng.random()
            if u < 0.8:
                rank = int(np.exp(rng.uniform(np.log(mid_lo), np.log(mid_hi))))
            elif u < 0.9:
                rank = int(rng.integers(0, mid_lo))
            else:
                rank = int(rng.integers(mid_hi, spec.vocab))
            if rank not in chosen:
                chosen.append(rank)
        lines.append(json.dumps({"_id": f"q{q}", "text": " ".join(vocabulary[r] for r in chosen)}) + "\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(lines), encoding="ascii")
    os.replace(tmp, path)
    if log:
        log(f"wrote {path} ({n_queries} queries)")
    return path


# ----- shared bench helpers --------------------------------------------------------------------
def read_queries(path: Path, ids: set[str] | None = None) -> list[tuple[str, str]]:
    out = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                if ids is None or str(record["_id"]) in ids:
                    out.append((str(record["_id"]), record["text"]))
    return out


def scifact_test_queries() -> list[tuple[str, str]] | None:
    """SciFact's 300 test queries (ids with qrels in qrels/test.tsv), or None if absent."""
    if not (SCIFACT / "corpus.jsonl").is_file():
        return None
    with open(SCIFACT / "qrels" / "test.tsv", encoding="utf-8") as handle:
        next(handle)
        ids = {line.split("\t")[0] for line in handle if line.strip()}
    return read_queries(SCIFACT / "queries.jsonl", ids)


@dataclass
class AnalysedCorpus:
    """A corpus analysed with our analyser, kept as flat term ids (compact, cacheable)."""

    vocabulary: list[str]
    title_ids: np.ndarray
    title_lengths: np.ndarray
    text_ids: np.ndarray
    text_lengths: np.ndarray

    @property
    def n_docs(self) -> int:
        return len(self.title_lengths)

    def _lists(self, ids: np.ndarray, lengths: np.ndarray, words: np.ndarray):
        bounds = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).tolist()
        step = 50_000
        for first in range(0, len(lengths), step):
            last = min(first + step, len(lengths))
            flat = words[ids[bounds[first]:bounds[last]]].tolist()
            base = bounds[first]
            for i in range(first, last):
                yield flat[bounds[i] - base:bounds[i + 1] - base]

    def fields(self):
        """Yield (title tokens, text tokens) per document, as string lists."""
        words = np.array(self.vocabulary, dtype=object)
        yield from zip(self._lists(self.title_ids, self.title_lengths, words), self._lists(self.text_ids, self.text_lengths, words))

    def combined(self) -> list[list[str]]:
        """Title + text tokens per document (what the combined "all" field indexes)."""
        return [title + text for title, text in self.fields()]


def analyse_corpus(corpus_file: Path, log=print) -> AnalysedCorpus:
    """Read and analyse a corpus with our default analyser; cached under bench/results/tokens."""
    from indexing.analysis import Analyzer, AnalyzerSettings
    from indexing.corpus import CorpusSpec, read_corpus

    settings = AnalyzerSettings()
    stat = corpus_file.stat()
    key_text = json.dumps([str(corpus_file.resolve()), stat.st_size, stat.st_mtime_ns, settings.to_dict()], sort_keys=True)
    cache = RESULTS / "tokens" / (hashlib.sha256(key_text.encode()).hexdigest()[:16] + ".npz")
    if cache.is_file():
        data = np.load(cache)
        return AnalysedCorpus(
            json.loads(bytes(data["vocabulary"]).decode()), data["title_ids"], data["title_lengths"], data["text_ids"], data["text_lengths"]
        )
    started = time.perf_counter()
    documents = read_corpus(CorpusSpec(str(corpus_file))).documents
    analyzer = Analyzer(settings)
    vocab: dict[str, int] = {}
    from array import array

    parts = {name: (array("i"), array("i")) for name in ("title", "text")}
    for doc in documents:
        for name, text in (("title", doc.title), ("text", doc.text)):
            ids = [vocab.setdefault(t, len(vocab)) for t in analyzer.analyze(text)]
            parts[name][0].extend(ids)
            parts[name][1].append(len(ids))
    del documents
    arrays = {f"{name}_{kind}": np.frombuffer(buf, dtype=np.int32).copy() for name, (ids, lens) in parts.items() for kind, buf in (("ids", ids), ("lengths", lens))}
    result = AnalysedCorpus(list(vocab), arrays["title_ids"], arrays["title_lengths"], arrays["text_ids"], arrays["text_lengths"])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, vocabulary=np.frombuffer(json.dumps(result.vocabulary).encode(), dtype=np.uint8), **arrays)
    os.replace(tmp, cache)
    if log:
        log(f"analysed {corpus_file} in {time.perf_counter() - started:.0f}s (cached as {cache.name})")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=SyntheticSpec.docs)
    parser.add_argument("--vocab", type=int, default=SyntheticSpec.vocab)
    parser.add_argument("--zipf", type=float, default=SyntheticSpec.zipf)
    parser.add_argument("--seed", type=int, default=SyntheticSpec.seed)
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args(argv)
    spec = SyntheticSpec(docs=args.docs, vocab=args.vocab, zipf=args.zipf, seed=args.seed)
    print(ensure_corpus(spec))
    print(ensure_queries(spec, args.queries))


if __name__ == "__main__":
    main()
