"""The catalogue of named pipelines: what `ltr-search search`, `ltr-search eval` and the service run.

Names map to factories over a `SearchBackend`, in the style of PyTerrier's composable
transformers: first stages from `search`, learned rankers from `ltr`, the fusion tuned by an
evaluation metric from `eval`. Every caller sees the same names because they all resolve them
here; the experiment runner receives `pipeline_spec` as an argument instead of importing it.
"""
from __future__ import annotations

from typing import Callable

from eval.fusion_tuning import TunedHybridPipeline
from ltr.features import feature_set
from ltr.ranker import LtrPipeline, registry_pipeline
from search.backend import SearchBackend
from search.hybrid import FusionSettings, HybridPipeline
from search.pipelines import BM25Pipeline, DensePipeline, Pipeline, PipelineFactory, PipelineSpec

_REGISTRY: dict[str, PipelineSpec] = {}
# Parameterised names, "family:argument" (e.g. `ltr:basic`, `model:m0003`): prefix -> spec maker.
_FAMILIES: dict[str, Callable[[str], PipelineSpec]] = {}


def register_pipeline(name: str, factory: PipelineFactory, *, learned: bool = False, description: str = "") -> None:
    if name in _REGISTRY:
        raise ValueError(f"pipeline '{name}' is already registered")
    _REGISTRY[name] = PipelineSpec(name, factory, learned, description)


def register_pipeline_family(prefix: str, make_spec: Callable[[str], PipelineSpec], description: str = "") -> None:
    """Pipelines named `prefix:argument`, whose spec is made from the argument on demand."""
    if prefix in _FAMILIES:
        raise ValueError(f"pipeline family '{prefix}' is already registered")
    _FAMILIES[prefix] = make_spec


def pipeline_names() -> list[str]:
    return list(_REGISTRY)


def pipeline_spec(name: str) -> PipelineSpec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    prefix, _, argument = name.partition(":")
    if argument and prefix in _FAMILIES:
        return _FAMILIES[prefix](argument)
    families = ", ".join(f"{p}:..." for p in _FAMILIES)
    raise ValueError(f"unknown pipeline '{name}'; choose from {', '.join(_REGISTRY)}" + (f" or {families}" if families else ""))


def create_pipeline(name: str, index: SearchBackend) -> Pipeline:
    return pipeline_spec(name).factory(index)


def parse_pipeline_list(text: str) -> list[str]:
    """`"bm25,dense"` -> `["bm25", "dense"]`, checking every name and refusing repeats."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError("no pipeline named; give a comma-separated list such as bm25,dense")
    for name in names:
        pipeline_spec(name)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"pipeline listed twice: {', '.join(repeated)}")
    return names


register_pipeline("bm25", BM25Pipeline, description="BM25 (Lucene formula) over title + text")
register_pipeline("dense", DensePipeline, description="exact or HNSW cosine search over MiniLM embeddings")
register_pipeline("hybrid", HybridPipeline, description="BM25 + dense candidates fused by reciprocal rank (k=60)")
register_pipeline(
    "hybrid-convex",
    lambda index: HybridPipeline(index, FusionSettings(method="convex"), name="hybrid-convex"),
    description="BM25 + dense, convex combination of min-max normalised scores, equal weights",
)
register_pipeline(
    "hybrid-tuned", TunedHybridPipeline, learned=True,
    description="convex fusion with weight and normalisation tuned on training queries (nDCG@10)",
)
register_pipeline(
    "ltr", LtrPipeline, learned=True,
    description="XGBoost LambdaMART over the hybrid window (feature set 'text'), trained on training queries",
)


def learned_ltr_spec(feature_set_name: str) -> PipelineSpec:
    features = feature_set(feature_set_name)  # refuses unknown sets up front
    return PipelineSpec(
        f"ltr:{feature_set_name}", lambda index: LtrPipeline(index, features=features, name=f"ltr:{feature_set_name}"),
        learned=True, description=f"LambdaMART on feature set {feature_set_name}, trained on training queries",
    )


def registry_model_spec(version: str) -> PipelineSpec:
    return PipelineSpec(
        f"model:{version}", lambda index: registry_pipeline(index, index.home, version, name=f"model:{version}"),
        learned=False, description=f"registry model {version}, as trained by `ltr-search train`",
    )


register_pipeline_family("ltr", learned_ltr_spec)  # ltr:FEATURE-SET, e.g. ltr:basic, ltr:text-without-dense
register_pipeline_family("model", registry_model_spec)  # model:VERSION or model:active, from the model registry
