"""Named ranking pipelines: what `ltr-search search`, `ltr-search eval` and the service run.

A pipeline turns a query into a ranked list of `Hit`s. Plain pipelines (`bm25`, `dense`) need
only an index; learned pipelines also have `fit(queries, qrels)`, which the evaluation harness
calls on training queries only (a train split, or the training folds of a cross-validation).
Later stages (hybrid fusion, the learning-to-rank model) register themselves here, so every
caller sees the same names, in the style of PyTerrier's composable transformers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, runtime_checkable

from search.backend import Hit, SearchBackend
from search.hybrid import FusionSettings, HybridPipeline, TunedHybridPipeline
from ltr.features import feature_set
from ltr.ranker import LtrPipeline, registry_pipeline

Qrels = Mapping[str, Mapping[str, int]]


@runtime_checkable
class Pipeline(Protocol):
    name: str

    def search(self, query: str, k: int) -> list[Hit]:
        """The top `k` documents for `query`, best first."""
        ...


@runtime_checkable
class LearnedPipeline(Pipeline, Protocol):
    def fit(self, queries: Mapping[str, str], qrels: Qrels) -> "LearnedPipeline":
        """Learn from judged training queries; never called with evaluation queries."""
        ...


PipelineFactory = Callable[[SearchBackend], Pipeline]


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    factory: PipelineFactory
    learned: bool
    description: str


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


class BM25Pipeline:
    """BM25 over the combined title + text field."""

    name = "bm25"

    def __init__(self, index: SearchBackend):
        self.index = index

    def search(self, query: str, k: int) -> list[Hit]:
        return self.index.retrieve_bm25(query, k).hits()


class DensePipeline:
    """Nearest neighbours of the query embedding (cosine)."""

    name = "dense"

    def __init__(self, index: SearchBackend):
        self.index = index

    def search(self, query: str, k: int) -> list[Hit]:
        return self.index.retrieve_dense(self.index.encode_query(query), k).hits()


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
