"""`ltr` means one thing per context, and the catalogue says which (search.app.pipelines)."""
from __future__ import annotations

import pytest

from search.app.pipelines import describe_pipelines, needs_dense, pipeline_spec, resolve_pipeline


def test_ltr_is_the_promoted_model_when_serving_and_a_fitted_ranker_in_eval():
    assert resolve_pipeline("ltr", "serve") == "model:active"
    assert resolve_pipeline("ltr", "fit") == "ltr" and pipeline_spec("ltr").learned
    assert "model:active" in describe_pipelines("serve") and "fitted here" in describe_pipelines("fit")
    assert "model:active" in pipeline_spec("ltr").description


def test_fitted_pipelines_cannot_be_served():
    with pytest.raises(ValueError, match="fitted on training queries"):
        resolve_pipeline("hybrid-tuned", "serve")
    assert resolve_pipeline("hybrid-tuned", "fit") == "hybrid-tuned"


def test_unknown_names_and_contexts_are_refused():
    with pytest.raises(ValueError, match="unknown pipeline 'bm26'"):
        resolve_pipeline("bm26", "serve")
    with pytest.raises(ValueError, match="context"):
        resolve_pipeline("bm25", "train")  # type: ignore[arg-type]


def test_only_bm25_runs_without_dense_vectors():
    assert not needs_dense("bm25")
    assert all(needs_dense(n) for n in ("dense", "hybrid", "hybrid-convex", "ltr", "model:active"))
