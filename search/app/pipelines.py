"""The catalogue of named pipelines: what `ltr-search search`, `ltr-search eval` and the service run.

Names map to factories over a `SearchBackend`, in the style of PyTerrier's composable
transformers: first stages from `search`, learned rankers from `ltr`, the fusion tuned by an
evaluation metric from `eval`. Every caller sees the same names because they all resolve them
here; the experiment runner receives `pipeline_spec` as an argument instead of importing it.

What `ltr` means depends on the context, and `resolve_pipeline` is the one place that says so:
- "serve" (`ltr-search search`, the query service): `ltr` is the promoted model, `model:active`;
  pipelines that must be fitted first (`hybrid-tuned`, `ltr:FEATURE-SET`) cannot be served.
- "fit" (`ltr-search eval`): `ltr` is a LambdaMART fitted inside the evaluation on the training
  split (or the other folds); `model:VERSION` scores a stored model as it is.

The factories import their modules when called: plain `bm25`, `dense` and `hybrid` then load
neither xgboost nor the ltr and eval packages (start-up time of `ltr-search search`).
"""
from __future__ import annotations

from typing import Callable, Literal

from search.backend import SearchBackend
from search.pipelines import Pipeline, PipelineFactory, PipelineSpec

Context = Literal["serve", "fit"]
CONTEXTS: tuple[str, ...] = ("serve", "fit")

# Served by default, in this order, when the configured default pipeline (`ltr`: the promoted
# model) cannot be: no model promoted yet, or an index without dense vectors. The service and
# `ltr-search search` both go down this list (`default_candidates`).
FALLBACK_PIPELINES: tuple[str, ...] = ("hybrid", "bm25")

_REGISTRY: dict[str, PipelineSpec] = {}
_DENSE_FREE: set[str] = set()  # pipelines that run on a --no-dense index
# Parameterised names, "family:argument" (e.g. `ltr:basic`, `model:m0003`): prefix -> spec maker.
_FAMILIES: dict[str, Callable[[str], PipelineSpec]] = {}


def register_pipeline(name: str, factory: PipelineFactory, *, learned: bool = False, description: str = "",
                      needs_dense: bool = True) -> None:
    if name in _REGISTRY:
        raise ValueError(f"pipeline '{name}' is already registered")
    _REGISTRY[name] = PipelineSpec(name, factory, learned, description)
    if not needs_dense:
        _DENSE_FREE.add(name)


def register_pipeline_family(prefix: str, make_spec: Callable[[str], PipelineSpec], description: str = "") -> None:
    """Pipelines named `prefix:argument`, whose spec is made from the argument on demand."""
    if prefix in _FAMILIES:
        raise ValueError(f"pipeline family '{prefix}' is already registered")
    _FAMILIES[prefix] = make_spec


def default_candidates(configured: str) -> list[str]:
    """The pipelines a caller without a choice gets, best first: the configured default, then the
    fallbacks (`FALLBACK_PIPELINES`); the first one that can run on the index serves."""
    return list(dict.fromkeys((configured, *FALLBACK_PIPELINES)))


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


def resolve_pipeline(name: str, context: Context) -> str:
    """The catalogue name a user-facing pipeline name runs as in `context` (see the module
    docstring); refuses unknown names, and fitted pipelines where nothing is fitted."""
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {', '.join(CONTEXTS)}, got '{context}'")
    resolved = "model:active" if context == "serve" and name == "ltr" else name
    spec = pipeline_spec(resolved)  # an unknown name fails here
    if context == "serve" and spec.learned:
        raise ValueError(f"pipeline '{name}' is fitted on training queries inside `ltr-search eval`; to search with "
                         "the promoted model use --pipeline ltr (or model:VERSION)")
    return resolved


def needs_dense(name: str) -> bool:
    """Whether the pipeline retrieves or scores with dense vectors (all but bm25 do: fusion,
    and every learned ranker's candidate window)."""
    return name not in _DENSE_FREE


def check_pipelines(names: list[str], index: SearchBackend) -> None:
    """Refuse, before anything runs, pipelines the index cannot answer."""
    missing = [name for name in names if needs_dense(name) and not index.has_dense]
    if missing:
        what = "needs" if len(missing) == 1 else "need"
        raise ValueError(f"pipeline {', '.join(missing)} {what} dense vectors, but index '{index.name}' generation "
                         f"{index.generation_id} was built without dense vectors (--no-dense); rebuild it without --no-dense, or use "
                         f"{', '.join(sorted(_DENSE_FREE))}")


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


def describe_pipelines(context: Context) -> str:
    """The names a user can give in `context`, for --help."""
    if context == "serve":
        return ("bm25, dense, hybrid, hybrid-convex, ltr (the promoted model, = model:active) or model:VERSION "
                "(a stored model)")
    return ("bm25, dense, hybrid, hybrid-convex, hybrid-tuned and ltr / ltr:FEATURE-SET (LambdaMART fitted here on "
            "the training split or the other folds; not the promoted model), model:VERSION or model:active (stored models)")


# Factories: each imports its pipeline's module when called, for start-up time (plain bm25 must
# not load the fusion, ltr or eval code, nor xgboost).


def _bm25(index: SearchBackend) -> Pipeline:
    from search.pipelines import BM25Pipeline  # lazy: start-up time

    return BM25Pipeline(index)


def _dense(index: SearchBackend) -> Pipeline:
    from search.pipelines import DensePipeline  # lazy: start-up time

    return DensePipeline(index)


def _hybrid(index: SearchBackend) -> Pipeline:
    from search.hybrid import HybridPipeline  # here for start-up time

    return HybridPipeline(index)


def _hybrid_convex(index: SearchBackend) -> Pipeline:
    from search.hybrid import FusionSettings, HybridPipeline  # here for start-up time

    return HybridPipeline(index, FusionSettings(method="convex"), name="hybrid-convex")


def _hybrid_tuned(index: SearchBackend) -> Pipeline:
    from eval.fusion_tuning import TunedHybridPipeline  # here for start-up time: loads eval

    return TunedHybridPipeline(index)


def _ltr(index: SearchBackend) -> Pipeline:
    from ltr.ranker import LtrPipeline  # here for start-up time: loads xgboost

    return LtrPipeline(index)


register_pipeline("bm25", _bm25, description="BM25 (Lucene formula) over title + text", needs_dense=False)
register_pipeline("dense", _dense, description="exact or HNSW cosine search over MiniLM embeddings")
register_pipeline("hybrid", _hybrid, description="BM25 + dense candidates fused by reciprocal rank (k=60)")
register_pipeline(
    "hybrid-convex", _hybrid_convex,
    description="BM25 + dense, convex combination of min-max normalised scores, equal weights",
)
register_pipeline(
    "hybrid-tuned", _hybrid_tuned, learned=True,
    description="convex fusion with weight and normalisation tuned on training queries (nDCG@10)",
)
register_pipeline(
    "ltr", _ltr, learned=True,
    description="in eval: XGBoost LambdaMART over the hybrid window (feature set 'text'), fitted on the training "
                "split; in search and the service, `ltr` resolves to model:active (resolve_pipeline)",
)


def learned_ltr_spec(feature_set_name: str) -> PipelineSpec:
    from ltr.features import feature_set  # here for start-up time: loads the ltr package
    from ltr.ranker import LtrPipeline

    features = feature_set(feature_set_name)  # refuses unknown sets up front
    return PipelineSpec(
        f"ltr:{feature_set_name}", lambda index: LtrPipeline(index, features=features, name=f"ltr:{feature_set_name}"),
        learned=True, description=f"LambdaMART on feature set {feature_set_name}, fitted on training queries",
    )


def registry_model_spec(version: str) -> PipelineSpec:
    def factory(index: SearchBackend) -> Pipeline:
        from ltr.ranker import registry_pipeline  # here for start-up time: loads xgboost

        return registry_pipeline(index, index.home, version, name=f"model:{version}")

    return PipelineSpec(f"model:{version}", factory, learned=False,
                        description=f"registry model {version}, as trained by `ltr-search train`")


register_pipeline_family("ltr", learned_ltr_spec)  # ltr:FEATURE-SET, e.g. ltr:basic, ltr:text-without-dense
register_pipeline_family("model", registry_model_spec)  # model:VERSION or model:active, from the model registry
