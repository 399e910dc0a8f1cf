"""A live index: rebuild after a small change (vector cache) and upserts/deletes between rebuilds.

    python bench/bench_live_index.py                     # both parts on SciFact
    python bench/bench_live_index.py --part rebuild      # cold build vs rebuild after a 1% change
    python bench/bench_live_index.py --part live         # upserts, deltas, compaction, churn nDCG

Part "rebuild" (dense, the costly case; issue 18 goal: <= 10% of a cold build, same result):
  1. cold build of SciFact in a fresh home (empty vector cache)               -> cold_s
  2. a copy of the corpus with 1% of the documents' text changed;
     `rebuild --dataset COPY` in the same home (cache hits for the other 99%) -> rebuild_s
  3. cold build of the copy in a second fresh home (the peer it must equal)   -> cold_changed_s
  ratio = rebuild_s / mean(cold_s, cold_changed_s); parity: BM25 and document-store files
  byte-identical (SHA-256 of the manifests' file lists), embeddings max |diff| (<= 1e-6 asked).
Part "live": see `live_part`.

Every timing is wall time on a shared, loaded machine; the ratios are measured back to back in
one process. Writes bench/results/bench_live_index.json (one key per part, merged).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "bench_live_index.json"
DATASETS = Path(os.environ.get("LTR_SEARCH_DATASETS", ROOT.parent / "shared" / "datasets"))


def quiet(_: str) -> None:
    pass


def changed_copy(corpus: Path, out: Path, fraction: float, seed: int = 18) -> list[str]:
    """Copy a BEIR corpus, appending a sentence to the text of `fraction` of its documents."""
    lines = corpus.read_text(encoding="utf-8").splitlines()
    rng = np.random.default_rng(seed)
    picked = set(rng.choice(len(lines), size=max(1, round(fraction * len(lines))), replace=False).tolist())
    changed = []
    with open(out, "w", encoding="utf-8") as handle:
        for i, line in enumerate(lines):
            record = json.loads(line)
            if i in picked:
                record["text"] = record["text"] + " This abstract was revised for the live index benchmark."
                changed.append(record["_id"])
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return changed


def fresh_home(root: Path, name: str, encoders: Path) -> Path:
    """A new engine home sharing the exported encoder (the export is not what is measured)."""
    home = root / name
    home.mkdir()
    (home / "encoders").symlink_to(encoders, target_is_directory=True)
    return home


def rebuild_part(scifact: Path, fraction: float) -> dict:
    from indexing.build import BuildSettings, build_index, rebuild_index
    from indexing.corpus import CorpusSpec
    from indexing.encoder import EncoderSettings, ensure_onnx_encoder

    root = Path(tempfile.mkdtemp(prefix="bench-live-"))
    try:
        encoder_home = root / "encoder-home"
        ensure_onnx_encoder(encoder_home, EncoderSettings(), progress=False)
        encoders = encoder_home / "encoders"
        changed_corpus = root / "changed.jsonl"
        changed = changed_copy(scifact / "corpus.jsonl", changed_corpus, fraction)

        home = fresh_home(root, "home", encoders)
        started = time.perf_counter()
        cold = build_index(home, "scifact", BuildSettings(corpus=CorpusSpec(str(scifact))), progress=False, log=quiet)
        cold_s = time.perf_counter() - started
        print(f"cold build: {cold_s:.1f} s", flush=True)

        started = time.perf_counter()
        warm = rebuild_index(home, "scifact", progress=False, log=quiet, dataset=changed_corpus)
        rebuild_s = time.perf_counter() - started
        print(f"rebuild after {len(changed)} changed documents: {rebuild_s:.1f} s "
              f"({warm.vectors_encoded} encoded, {warm.vectors_cached} from the cache)", flush=True)

        peer_home = fresh_home(root, "peer", encoders)
        started = time.perf_counter()
        peer = build_index(peer_home, "scifact", BuildSettings(corpus=CorpusSpec(str(changed_corpus))),
                           progress=False, log=quiet)
        cold_changed_s = time.perf_counter() - started
        print(f"cold build of the changed corpus: {cold_changed_s:.1f} s", flush=True)

        files_warm = json.loads((warm.path / "manifest.json").read_text())["files"]
        files_peer = json.loads((peer.path / "manifest.json").read_text())["files"]
        differing = sorted(f for f in files_warm if files_warm[f]["sha256"] != files_peer.get(f, {}).get("sha256"))
        a = np.load(warm.path / "vectors" / "embeddings.npy")
        b = np.load(peer.path / "vectors" / "embeddings.npy")
        max_diff = float(np.abs(a - b).max())
        cold_mean = (cold_s + cold_changed_s) / 2
        return {
            "dataset": "scifact",
            "documents": cold.documents,
            "changed_documents": len(changed),
            "changed_fraction": fraction,
            "cold_build_s": round(cold_s, 2),
            "cold_build_changed_corpus_s": round(cold_changed_s, 2),
            "rebuild_after_change_s": round(rebuild_s, 2),
            "rebuild_over_cold": round(rebuild_s / cold_mean, 4),
            "vectors_encoded": warm.vectors_encoded,
            "vectors_from_cache": warm.vectors_cached,
            "rebuild_phases_s": {k: round(v, 2) for k, v in warm.seconds.items()},
            "files_differing_from_cold_build": differing,
            "bm25_and_docs_identical": not [f for f in differing if not f.startswith("vectors/")],
            "embeddings_max_abs_diff": max_diff,
            "embeddings_within_1e-6": max_diff <= 1e-6,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def merge_results(part: str, result: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    existing[part] = {**result, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    RESULTS.write_text(json.dumps(existing, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["rebuild", "live", "all"], default="all")
    parser.add_argument("--fraction", type=float, default=0.01, help="share of documents changed before the rebuild")
    args = parser.parse_args()
    scifact = DATASETS / "scifact"
    if not (scifact / "corpus.jsonl").is_file():
        print(f"skipped: SciFact not found at {scifact} (set LTR_SEARCH_DATASETS)")
        return
    if args.part in ("rebuild", "all"):
        result = rebuild_part(scifact, args.fraction)
        print(json.dumps(result, indent=2))
        merge_results("rebuild", result)
    if args.part in ("live", "all"):
        from bench_live_parts import live_part  # noqa: E402  (kept apart: the live part is long)

        result = live_part(scifact)
        print(json.dumps(result, indent=2))
        merge_results("live", result)


if __name__ == "__main__":
    main()
