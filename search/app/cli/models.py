"""`ltr-search train` and `ltr-search models list|show|promote|rollback`.

    ltr-search train --dataset PATH --split train [--name INDEX] [--feature-set text] [--valid-fraction 0.2]
    ltr-search train --from-events [--events PATH] [--debias none|ips|unbiased-lambdamart]
                     [--negatives skip-above|examined] [--since T] [--until T] [--name INDEX] [--feature-set NAME]
    ltr-search models list [--json]
    ltr-search models show VERSION
    ltr-search models promote VERSION [--dataset PATH --split SPLIT] [--force]
    ltr-search models rollback
    ltr-search models compare A B [--since T] [--fixed-sample] [--json]
    ltr-search models challenge [VERSION --share S | --end]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from search.app.cli.common import CliError, add_backend_arguments, log, open_index, plural
from indexing.progress import progress_bar

SAMPLE_ROWS = 64  # feature rows stored with a model and re-scored on every load


class PromotionRefused(ValueError):
    """The candidate is significantly worse than the active model on held-out queries."""


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """The flags of `train` or of `models` (this module is imported only when one of them runs)."""
    if command == "train":
        add_train_arguments(parser)
    else:
        add_models_arguments(parser)


def add_train_arguments(train: argparse.ArgumentParser) -> None:
    from ltr.click_training import DEBIAS, IPS_MAX_WEIGHT, NEGATIVES  # here for start-up time: loads xgboost
    from ltr.features import DEFAULT_CLICK_FEATURE_SET, DEFAULT_FEATURE_SET
    from ltr.training import REGULARISATIONS, SELECTIONS, TrainingSettings  # lazy: start-up time

    defaults = TrainingSettings()
    train.add_argument("--dataset", help="BEIR directory with queries.jsonl and qrels/SPLIT.tsv")
    add_backend_arguments(train)
    train.add_argument("--split", default="train", help="judged split to learn from (default train)")
    train.add_argument("--name", help="index (default: the dataset's name when such an index exists; with "
                                      "--from-events the service's index)")
    train.add_argument("--feature-set", help=f"default {DEFAULT_FEATURE_SET}; with --from-events {DEFAULT_CLICK_FEATURE_SET} "
                                             "(text plus other queries' clicks on each document), or with "
                                             "--method pairs the feature set the request log's rows were logged with")
    clicks = train.add_argument_group("training from clicks (no qrels): the request log joined with click events")
    clicks.add_argument("--from-events", action="store_true",
                        help="learn from logged requests and their clicks instead of judged queries")
    clicks.add_argument("--events", help="event store (default: the service's, HOME/events/INDEX.sqlite3)")
    clicks.add_argument("--debias", choices=DEBIAS, default="none",
                        help="position-bias correction: none, ips (clicks weighted 1/propensity, clipped at "
                             f"{IPS_MAX_WEIGHT:g}) or unbiased-lambdamart (XGBoost estimates the bias); default none")
    clicks.add_argument("--negatives", choices=NEGATIVES, default="skip-above",
                        help="skip-above: non-clicked results above the last click (default); examined: "
                             "non-clicked results down to one below the last click")
    from search.app.cli.retrain import add_click_model_arguments  # --method click-model (default) | pairs

    add_click_model_arguments(clicks)
    clicks.add_argument("--since", help="only requests served at or after this time (epoch seconds or ISO 8601, UTC)")
    clicks.add_argument("--until", help="only requests served before this time")
    train.add_argument("--valid-fraction", type=float, default=defaults.valid_fraction,
                       help=f"--selection holdout (and --from-events): training queries held out for early stopping "
                            f"(default {defaults.valid_fraction})")
    train.add_argument("--selection", choices=SELECTIONS, default=defaults.selection,
                       help="inner-cv (default): the model is staged on the fusion, its base scale and trees chosen by "
                            "k-fold CV inside the training queries; holdout: a plain model, early stopping on a hold-out")
    train.add_argument("--base-scales", type=float, nargs="+", default=list(defaults.base_scales),
                       help=f"inner-cv: base = scale x fused score, scales tried (default {' '.join(f'{x:g}' for x in defaults.base_scales)})")
    train.add_argument("--regularisation", nargs="+", choices=list(REGULARISATIONS), default=list(defaults.regularisations),
                       help="inner-cv: regularisation presets tried (default: "
                            + "; ".join(f"{name} {values or 'as the flags'}" for name, values in REGULARISATIONS.items()) + ")")
    train.add_argument("--base-model", help="with a behaviour feature set: the stored text model the behaviour trees add to "
                                            "(default: a text model trained first, in the same run, and stored too)")
    train.add_argument("--cv-folds", type=int, default=defaults.cv_folds,
                       help="inner-cv folds (default 0: 5 under 1,000 training queries, else 3)")
    train.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    train.add_argument("--max-depth", type=int, default=defaults.max_depth)
    train.add_argument("--max-rounds", type=int, default=defaults.max_rounds)
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--config", help="service TOML (its fusion window is the candidate window trained on)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--no-compile", action="store_true",
                       help="store the model without compiling its trees (`models compile` does it later); by default "
                            "they are compiled (simd kernel, gcc, about 2 s) and served instead of XGBoost")


def add_models_arguments(models: argparse.ArgumentParser) -> None:
    commands = models.add_subparsers(dest="models_command", required=True)
    listing = commands.add_parser("list", help="every stored model, the active one marked")
    listing.add_argument("--json", action="store_true")
    show = commands.add_parser("show", help="one model's manifest")
    show.add_argument("version")
    promote = commands.add_parser("promote", help="make a model active, unless it is significantly worse than the fusion "
                                                  "baseline or the active model on held-out queries")
    promote.add_argument("version", help="a model version, or 'latest'")
    add_backend_arguments(promote)
    promote.add_argument("--dataset", help="BEIR directory with the held-out judged queries of the gate")
    promote.add_argument("--split", help="held-out split (must differ from both models' training split)")
    promote.add_argument("--name", help="index to evaluate on (default: the model's)")
    promote.add_argument("--force", action="store_true", help="promote even without, or against, the gate")
    promote.add_argument("--quiet", action="store_true")
    promote.add_argument("--json", action="store_true", help="print the outcome and the gate's comparisons as JSON")
    commands.add_parser("rollback", help="re-activate the previously active model")
    compile_ = commands.add_parser("compile", help="compile a model's trees to native code (gcc) next to it: served "
                                                   "instead of XGBoost once it matches it to 1e-5 on the stored sample")
    compile_.add_argument("version", help="a model version, or 'active'")
    from ltr.compiled_trees import COMPILERS, DEFAULT_COMPILER  # numpy only: loaded when `models` is the command

    compile_.add_argument("--compiler", choices=COMPILERS, default=DEFAULT_COMPILER,
                          help="simd (default): the trees as tables in a SIMD kernel (AVX-512/AVX2, scalar elsewhere), "
                               "scores equal to XGBoost's; tl2cgen: Treelite + TL2cgen if-else code (slower, see README)")
    delete = commands.add_parser("delete", help="delete a stored model (never the active one)")
    delete.add_argument("version")
    challenge = commands.add_parser(
        "challenge", help="interleave a model against the active one for a share of ltr requests (read by the "
                          "service on reload), show the running challenge, or --end it")
    challenge.add_argument("version", nargs="?", help="the challenger; without it (and --end): show the challenge")
    challenge.add_argument("--share", type=float, default=0.2, help="share of ltr requests interleaved (default 0.2)")
    challenge.add_argument("--end", action="store_true", help="stop interleaving (on the service's next reload)")
    from search.app.cli.compare import add_compare_parser  # lazy: start-up time

    add_compare_parser(commands)  # `models compare A B`: interleaving credit, always-valid p (or fixed-sample tests)


def run(home: Path, args: argparse.Namespace) -> int:
    if args.command == "train":
        if args.from_events and args.dataset:
            raise ValueError("--from-events and --dataset are mutually exclusive: train either on logged clicks "
                             "(--from-events) or on judged queries (--dataset PATH)")
        if args.from_events:
            from search.app.cli.retrain import cmd_train_from_events  # the click-model method, or pairs

            return cmd_train_from_events(home, args)
        if not args.dataset:
            raise ValueError("train needs --dataset PATH (judged queries) or --from-events (logged clicks)")
        return cmd_train(home, args)
    if args.models_command == "compare":
        from search.app.cli.compare import cmd_models_compare  # lazy: start-up time

        return cmd_models_compare(home, args)
    handler = {"list": cmd_list, "show": cmd_show, "promote": cmd_promote, "rollback": cmd_rollback,
               "delete": cmd_delete, "compile": cmd_compile, "challenge": cmd_challenge}
    return handler[args.models_command](home, args)


def cmd_train(home: Path, args: argparse.Namespace) -> int:
    from eval.datasets import load_dataset  # lazy: start-up time
    from ltr.features import DEFAULT_FEATURE_SET, feature_set, uses_behaviour  # lazy: start-up time
    from ltr.point_in_time import BehaviourHistory  # lazy: start-up time
    from ltr.ranker import index_description  # lazy: start-up time
    from ltr.registry import ModelRegistry  # lazy: start-up time
    from ltr.training import TrainingSettings, fit_ranker, text_part  # lazy: start-up time
    from search.app.config import load_service_config  # lazy: start-up time

    settings = TrainingSettings(
        learning_rate=args.learning_rate, max_depth=args.max_depth, max_rounds=args.max_rounds,
        valid_fraction=args.valid_fraction, seed=args.seed, selection=args.selection,
        base_scales=tuple(args.base_scales), cv_folds=args.cv_folds, regularisations=tuple(args.regularisation),
    )
    features = feature_set(args.feature_set or DEFAULT_FEATURE_SET)
    dataset = load_dataset(args.dataset, args.split)
    index = open_index(home, args.name, args, dataset.name)
    fusion = load_service_config(home, args.config).fusion_for(index.name)
    log(f"training on {dataset.name}/{dataset.split}: {len(dataset.queries)} judged queries, index "
        f"{index.name}/{index.generation_id}, feature set {features.name} v{features.version} ({len(features.names)} features), "
        f"window BM25 top {fusion.bm25_candidates} + dense top {fusion.dense_candidates}")
    history = None
    if uses_behaviour(features):
        history = BehaviourHistory.open(home, index.name)
        if history is None:
            log(f"no event store for index {index.name}: behaviour features at their no-history values")
        else:
            log(f"behaviour features point in time from {history.event_store.path}: a cold group and up to "
                f"{history.moments_per_query} served moments per query")
    progress = (lambda items: items) if args.quiet else (lambda items: progress_bar(items, desc="features", unit="row group"))
    registry = ModelRegistry(home)
    base_model = base_feature_set = None
    if args.base_model:
        if not uses_behaviour(features):
            raise ValueError(f"--base-model stages behaviour trees on a text model, but feature set {features.name} has no "
                             "behaviour features (use --feature-set text+behaviour)")
        base_manifest = registry.manifest(args.base_model)
        base_feature_set = base_manifest.feature_set
        base_model = registry.load(args.base_model, expected_feature_set=feature_set(base_feature_set["name"]).describe())
        log(f"behaviour trees on top of the frozen text model {args.base_model} ({base_feature_set['name']})")
    fitted = fit_ranker(index, dataset.queries, dataset.qrels, features, fusion, settings, progress=progress, log=log,
                        history=history, base_model=base_model, base_feature_set=base_feature_set)
    context = {"dataset": str(Path(args.dataset).resolve()), "dataset_name": dataset.name, "split": dataset.split,
               "window": fusion.to_dict(), "settings": settings.to_dict()}
    link = None
    if fitted.base_fit is not None:  # the text stage was trained here: store it first, the behaviour stage names it
        text_manifest = save_fitted(registry, fitted.base_fit, text_part(features), index_description(index), context, settings,
                                    compile_trees=not args.no_compile)
        link = replace(fitted.trained.link, version=text_manifest.version)
    elif fitted.trained.link is not None:
        link = replace(fitted.trained.link, version=args.base_model)
    manifest = save_fitted(registry, fitted, features, index_description(index), context, settings, link,
                           compile_trees=not args.no_compile)
    trained = fitted.trained
    if link is not None:
        print(f"model {manifest.version}: behaviour stage on text model {link.version}; a query with no history ranks "
              f"exactly as {link.version}")
    print(f"serve it with: ltr-search models promote {manifest.version}")
    return 0


def save_fitted(registry: Any, fitted: Any, features: Any, index: dict[str, Any], context: dict[str, Any],
                settings: Any, link: Any = None, compile_trees: bool = True) -> Any:
    """Store a fitted ranker (its manifest: training context, inner-CV evidence, a scored sample,
    drift reference), compile its trees unless told not to, and print what `train` reports of it."""
    rows, trained, train_ids, valid_ids = fitted.rows, fitted.trained, fitted.train_ids, fitted.valid_ids
    extract_seconds = fitted.feature_seconds
    pairs_per_second = len(rows.labels) / extract_seconds if extract_seconds else float("nan")
    picked = np.random.default_rng(settings.seed).choice(len(rows.labels), min(SAMPLE_ROWS, len(rows.labels)), replace=False)
    base = rows.base(trained.stage)
    cv = trained.inner_cv
    train_history = trained.history.get("train ndcg@10")
    manifest = registry.save(
        trained.booster, feature_set=features.describe(), index=index,
        training={
            **context, "queries": len(set(rows.query_ids)), "row_groups": len(rows.query_ids),
            "train_queries": len(train_ids), "valid_queries": len(valid_ids),
            "pairs": int(len(rows.labels)), "fingerprint": rows.fingerprint(),
            "relevant_outside_window": rows.relevant_outside_window,
            "feature_seconds": round(extract_seconds, 2),
            "train_seconds": round(trained.seconds, 2), "pairs_per_second": round(pairs_per_second),
            **({"inner_cv": cv.to_dict()} if cv is not None else {}),
        },
        params=trained.params,
        metrics={"valid nDCG@10": trained.valid_score,
                 "train nDCG@10": float(train_history[trained.best_iteration]) if train_history and trained.trees else None,
                 **({"inner-CV gain nDCG@10": cv.gain} if cv is not None else {})},
        importance=trained.importance(), sample_features=rows.features[picked],
        best_iteration=trained.best_iteration if trained.trees else None,
        reference=drift_reference(trained, rows, page_rows=True, base=base),
        stage=trained.stage, sample_base=None if base is None else base[picked], base_model=link,
    )
    if cv is not None:
        print(inner_cv_report(cv, settings))
        on = f"on text model {link.version}" if link is not None else f"on base {cv.stage.name}" if cv.stage else ""
        print(f"model {manifest.version} ({features.name}): {plural(trained.trees, 'tree')} {on}, trained in {trained.seconds:.1f} s")
    else:
        valid = f"{trained.valid_score:.4f}" if trained.valid_score is not None else "n/a (no validation queries)"
        print(f"model {manifest.version}: {stopping_note(trained, settings.max_rounds, plural(len(valid_ids), 'held-out training query', 'held-out training queries'))}, "
              f"validation nDCG@10 {valid}, trained in {trained.seconds:.1f} s")
    if trained.trees:
        print("top features by gain: " + ", ".join(f"{name} {gain:.0f}" for name, gain in list(trained.importance().items())[:8]))
    if compile_trees:
        print_compiled(registry.home, manifest.version)
    return manifest


def print_compiled(home: Path, version: str) -> None:
    """Compile a just-stored model's trees (`ltr.compiled_trees.compile_trained`) and say so."""
    from ltr.compiled_trees import compile_trained  # lazy: start-up time

    line = compile_trained(home, version)
    if line:
        print(line)


def inner_cv_report(cv: Any, settings: Any) -> str:
    """What `train` says the inner cross-validation chose, and the evidence (gain over the base)."""
    best_fusions = sorted(cv.fusions.items(), key=lambda item: -item[1])
    fusions = ", ".join(f"{name} {value:.4f}" for name, value in best_fusions[:3])
    base_line = (f"base fusion by nDCG@10 on the training queries (best 3 of {len(cv.fusions)}): {fusions} -> {cv.stage.describe()}"
                 if cv.base == "fusion" else "base: the frozen text model's scores (the behaviour trees read behaviour columns only)")
    grid = ", ".join(f"{config} {v['held_out_ndcg@10']:.4f} at {int(v['rounds'])} trees" for config, v in cv.grid.items())
    chosen = settings.regularised(cv.regularisation)
    lines = [
        base_line,
        f"inner CV ({cv.folds} folds over {cv.queries} training queries, seed {settings.seed}; learning rate "
        f"{settings.learning_rate}): held-out nDCG@10 per base scale and regularisation: {grid}",
        f"chosen: base {cv.stage.name if cv.base == 'fusion' and cv.stage else cv.base}, {cv.regularisation} regularisation (depth {chosen.max_depth}, min child weight "
        f"{chosen.min_child_weight:g}, lambda {chosen.reg_lambda:g}), {plural(cv.best_rounds, 'tree')}; "
        f"held-out nDCG@10 {cv.model_ndcg:.4f} vs base "
        f"{cv.base_ndcg:.4f}: gain {cv.gain:+.4f} (95% CI {cv.ci[0]:+.4f} .. {cv.ci[1]:+.4f} over queries)",
    ]
    if not cv.positive:
        lines.append("the trees do not beat the base stage on held-out training queries (the gain's 95% CI is not "
                     "above 0): saving the base stage only (zero trees: the model ranks exactly as "
                     + ("the fusion)" if cv.base == "fusion" else "the text model)"))
    return "\n".join(lines)


def cmd_train_pairs_from_events(home: Path, args: argparse.Namespace) -> int:
    """`--method pairs`: LambdaMART from the request log joined with clicks (`ltr.click_training`), saved like `cmd_train`."""
    from eval.propensity import fit_propensities  # here (and below) for start-up time
    from ltr.behaviour import BehaviourStore
    from ltr.click_training import ClickTrainingSettings, parse_time, train_from_clicks  # lazy: start-up time
    from search.event_store import EventStore  # lazy: start-up time
    from ltr.features import feature_set  # lazy: start-up time
    from ltr.ranker import index_description  # lazy: start-up time
    from ltr.registry import ModelRegistry  # lazy: start-up time
    from ltr.training import TrainingSettings  # lazy: start-up time
    from search.app.config import load_service_config  # lazy: start-up time

    name = args.name or load_service_config(home, args.config).index
    events_path = Path(args.events) if args.events else load_service_config(home, args.config, {"index": name}).event_store_path
    if not events_path.is_file():
        raise ValueError(f"no event store at {events_path}: serve the index with `ltr-search serve` to log requests "
                         "and clicks, or pass --events PATH")
    index = open_index(home, name, args, name)
    settings = ClickTrainingSettings(
        negatives=args.negatives, debias=args.debias, since=parse_time(args.since), until=parse_time(args.until),
        index_name=index.name,
        ranker=TrainingSettings(learning_rate=args.learning_rate, max_depth=args.max_depth, max_rounds=args.max_rounds,
                                valid_fraction=args.valid_fraction, seed=args.seed),
    )
    features = feature_set(args.feature_set) if args.feature_set else None
    with EventStore(events_path) as store:
        propensities = None
        if settings.debias == "ips":
            with BehaviourStore.for_index(home, index.name) as behaviour:
                path = behaviour.path
                propensities = behaviour.propensities()
                if propensities is None:
                    fit = fit_propensities(behaviour, store)
                    propensities = fit.propensities
                    log(f"no fitted propensities in {path}: fitted the position-based click model on "
                        f"{fit.sessions} logged requests ({fit.clicks} clicks) and stored them there")
                else:
                    log(f"propensities from {path}")
            log("IPS propensities by position: " + ", ".join(f"{p:.3f}" for p in propensities))
        result = train_from_clicks(store, features, settings, propensities=propensities, log=log)
    features, trained, record = result.features, result.trained, result.training_record()
    record = {"event_store": str(events_path.resolve()), **record}
    older = sorted(set(result.join.index_generations) - {index.generation_id})
    if older:
        log(f"note: {sum(result.join.index_generations[g] for g in older)} clicked requests were served from other "
            f"generations of {index.name} ({', '.join(older)}) than the current {index.generation_id}; their logged "
            "features are what was served then")
    manifest = ModelRegistry(home).save(
        trained.booster, feature_set=features.describe(), index=index_description(index), training=record,
        params=result.params,
        metrics={"valid click nDCG@10": trained.valid_score,
                 "train click nDCG@10": float(trained.history["train ndcg@10"][trained.best_iteration])},
        importance=trained.importance(), sample_features=result.sample_features(SAMPLE_ROWS),
        best_iteration=trained.best_iteration, reference=drift_reference(trained, result.train.rows, page_rows=False),
    )
    span = record["time_range"]
    skipped = record["skipped"]
    valid = f"{trained.valid_score:.4f}" if trained.valid_score is not None else "n/a (no held-out requests)"
    debias = settings.debias + (f" (weights 1/p clipped at {settings.max_ips_weight:g})" if settings.debias == "ips" else "")
    print(f"model {manifest.version}: {plural(trained.trees, 'tree')} from clicks in {events_path} "
          f"({span['first']} .. {span['last']}), debias {debias}, negatives {settings.negatives}, "
          f"feature set {features.name} v{features.version}")
    print(f"requests: {record['requests']['used']} used of {record['requests']['clicked']} clicked "
          f"({record['requests']['read']} read; skipped: {skipped['requests_without_clicks']} without clicks, "
          f"{skipped['requests_without_features']} without logged features, {skipped['requests_without_negatives']} "
          f"without negatives" + (f", {skipped['requests_not_contiguous']} not positions 1..n" if settings.debias ==
                                  "unbiased-lambdamart" else "") + ")")
    print(f"rows: {record['rows']} in {record['groups']} groups, {record['clicks_used']} clicks used of "
          f"{record['clicks']}; {skipped['results_without_features']} results logged without features skipped; "
          f"fingerprint {record['fingerprint']}")
    print(f"{stopping_note(trained, settings.ranker.max_rounds, plural(len(result.valid_requests), 'held-out request'))}"
          f" (click nDCG@10, position-biased: a stopping rule only): {valid}; trained in {trained.seconds:.1f} s")
    print("top features by gain: " + ", ".join(f"{n} {gain:.0f}" for n, gain in list(trained.importance().items())[:8]))
    if not args.no_compile:
        print_compiled(home, manifest.version)
    print(f"serve it with: ltr-search models promote {manifest.version}")
    return 0


def trained_on(training: dict[str, Any]) -> str:
    """What `models list` says a model learned from: judged queries, or clicks (validation on clicks)."""
    if training.get("source") == "events":
        return f"clicks ({training.get('debias')} debiasing; valid = click nDCG@10)"
    return f"{training.get('dataset_name')}/{training.get('split')}"


def drift_reference(trained, rows, page_rows: bool, base: Any = None) -> dict[str, Any]:
    """The distribution of the model's training features and scores that drift monitoring compares
    served requests with. Served pages show a query's best-scored documents, so a model trained
    on whole candidate windows is referenced on each query's top 10 (`page_rows`); one trained on
    logged pages already is."""
    from ltr.drift import feature_reference  # lazy: start-up time
    from ltr.training import InMemoryModel  # lazy: start-up time

    names = list(trained.row_names or trained.feature_names)  # a model stage's rows hold its base's columns too
    scores = InMemoryModel(trained).predict(rows.features, base)  # base: a staged model's first-stage margin
    if page_rows:
        return feature_reference(rows.features, names, scores, group_sizes=rows.group_sizes, top_k=10).to_dict()
    return feature_reference(rows.features, names, scores).to_dict()


def cmd_list(home: Path, args: argparse.Namespace) -> int:
    from ltr.registry import ModelRegistry  # lazy: start-up time

    registry = ModelRegistry(home)
    active = registry.active()
    manifests = registry.versions()
    if args.json:
        print(json.dumps({"active": active, "models": [summary(m) for m in manifests]}, indent=2))
        return 0
    if not manifests:
        print(f"no models in {home / 'models'}; train one with `ltr-search train --dataset PATH`")
        return 0
    print(f"{'':2}{'version':<9}{'created':<22}{'feature set':<18}{'index':<24}{'trees':>6}{'valid nDCG@10':>15}  trained on")
    for m in manifests:
        valid = m.metrics.get("valid nDCG@10", m.metrics.get("valid click nDCG@10"))
        print(f"{'*' if m.version == active else '':2}{m.version:<9}{m.created_at[:19]:<22}"
              f"{m.feature_set['name'] + ' v' + str(m.feature_set['version']):<18}"
              f"{m.index['name'] + '/' + m.index['generation']:<24}{m.trees:>6}"
              f"{'-' if valid is None else format(valid, '.4f'):>15}  {trained_on(m.training)}")
    return 0


def summary(manifest: Any) -> dict[str, Any]:
    data = manifest.to_dict()
    data.pop("sample", None)
    return data


def cmd_show(home: Path, args: argparse.Namespace) -> int:
    from ltr.registry import ModelRegistry  # lazy: start-up time

    registry = ModelRegistry(home)
    data = summary(registry.manifest(args.version))
    data["active"] = registry.active() == args.version
    print(json.dumps(data, indent=2))
    return 0


def cmd_promote(home: Path, args: argparse.Namespace, gated: Any = None, dry_run: bool = False) -> int:
    """Make a model active if the gate lets it: on held-out queries it must not be significantly
    worse than the fusion baseline nor than the active model (`eval.gate`); without held-out
    queries, its inner-CV evidence from training decides, and replacing an active model needs a
    split or --force. `gated`: the gate's result for this candidate and the current active model,
    already computed by the caller (`retrain` choosing between candidates), not run again.
    `dry_run`: every check (PromotionRefused when one fails), nothing promoted (`retrain --interleave`)."""
    from eval.gate import training_evidence  # lazy: start-up time (eval and xgboost)
    from ltr.registry import ModelRegistry  # lazy: start-up time

    registry = ModelRegistry(home)
    if args.version == "latest":
        if not registry.version_ids():
            raise ValueError("no models to promote; train one with `ltr-search train --dataset PATH`")
        args.version = registry.version_ids()[-1]
    candidate = registry.manifest(args.version)
    active = registry.active()
    if active == args.version:
        print(f"{args.version} is already active")
        return 0
    gate: dict[str, Any] | None = None
    from ltr.click_training import off_policy_refusal  # lazy: start-up time

    off_policy = candidate.training.get("off_policy") if candidate.training.get("source") == "events" else None
    refusal = off_policy_refusal(candidate.training)  # a click-trained model's judgment-free gate
    if refusal and not args.force:
        raise PromotionRefused(f"{args.version}: {refusal}; use --force to promote anyway")
    if off_policy:
        log(f"gate: off-policy estimate vs the logging policy: difference {off_policy['difference']:+.4f} "
            f"(95% CI {off_policy['ci'][0]:+.4f} .. {off_policy['ci'][1]:+.4f}) on {off_policy['pages']} held-out pages"
            + (" (--force: promoted although significantly worse)" if refusal else ""))
    if args.dataset and args.split:
        result = gated or promotion_gate(home, args, candidate, registry.manifest(active) if active else None)
        gate = result.to_dict()
        for line in result.describe():
            log(f"gate: {line}")
        worse = result.worse_than()
        if worse and not args.force:
            raise PromotionRefused(
                f"{args.version} is significantly worse than {' and '.join(_reference(n, active) for n in worse)} on "
                f"{result.queries} held-out queries ({args.split}); use --force to promote anyway")
        if worse:
            log(f"--force: promoting {args.version} although it is significantly worse than {', '.join(worse)}")
    elif active is None:
        refuse, why = training_evidence(candidate)
        if refuse and not args.force:
            raise PromotionRefused(f"{why}; use --force to promote anyway, or gate it on held-out queries "
                                   "(--dataset PATH --split SPLIT)")
        log(f"no active model and no held-out split: {why}")
    elif not args.force and not off_policy:  # a click-trained model's off-policy estimate is its gate
        raise PromotionRefused(
            f"promoting {args.version} over the active {active} needs the held-out judged queries of the gate "
            "(--dataset PATH --split SPLIT), or --force"
        )
    if dry_run:
        return 0
    registry.promote(args.version)
    if args.json:
        print(json.dumps({"active": args.version, "previous": active, "gate": gate}, indent=2))
        return 0
    print(f"active model: {args.version} (previous: {active or 'none'}); a running service picks it up on "
          "POST /admin/reload or restart")
    return 0


def _reference(name: str, active: str | None) -> str:
    from eval.gate import FUSION_BASELINE  # lazy: start-up time

    return "the fusion baseline" if name == FUSION_BASELINE else f"the active {active}" if name == active else name


def promotion_gate(home: Path, args: argparse.Namespace, candidate: Any, active: Any | None) -> Any:
    """`eval.gate.run_gate` on the split the user named, over the candidate's index."""
    from eval.datasets import load_dataset  # lazy: start-up time
    from eval.gate import run_gate  # lazy: start-up time

    dataset = load_dataset(args.dataset, args.split)
    index = open_index(home, args.name or candidate.index["name"], args, dataset.name)
    return run_gate(index, home, dataset, candidate, active, progress=not args.quiet, warn=log)


def cmd_rollback(home: Path, args: argparse.Namespace) -> int:
    from ltr.registry import ModelRegistry  # lazy: start-up time

    registry = ModelRegistry(home)
    previous = registry.active()
    now = registry.rollback()
    print(f"active model: {now} (rolled back from {previous}); reload a running service with POST /admin/reload")
    return 0


def cmd_challenge(home: Path, args: argparse.Namespace) -> int:
    """`models challenge [VERSION --share S | --end]`: the registry's challenge, which the service
    interleaves against the active model and `ltr-search retrain` judges (`models compare`)."""
    import time

    from ltr.registry import ModelRegistry  # lazy: start-up time

    registry = ModelRegistry(home)
    if args.end or not args.version:
        if args.end and args.version:
            raise ValueError("--end takes no version: it ends the running challenge")
        challenge = registry.end_challenge() if args.end else registry.challenge()
        if challenge is None:
            print("no challenge running")
            return 0
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(challenge.started))
        print(f"challenge {'ended' if args.end else 'running'}: {challenge.version} interleaved against "
              f"{challenge.against} on {challenge.share:.0%} of ltr requests since {started}; compare: "
              f"ltr-search models compare {challenge.against} {challenge.version} --since {started}"
              + ("; reload a running service with POST /admin/reload" if args.end else ""))
        return 0
    challenge = registry.start_challenge(args.version, args.share, time.time())
    print(f"challenge: {challenge.version} interleaved against {challenge.against} on {challenge.share:.0%} of ltr "
          "requests once a running service reloads (POST /admin/reload)")
    return 0


def stopping_note(trained: Any, max_rounds: int, held_out: str) -> str:
    """How many trees, and why: early stopping on the held-out queries, or the round cap."""
    rounds = len(trained.history.get("train ndcg@10", [])) or trained.trees
    trees = plural(trained.trees, "tree")
    if rounds < max_rounds:
        return f"{trees} (early stopping on {held_out} at round {rounds})"
    best = f"; best on {held_out} at round {trained.trees}" if trained.valid_score is not None else ""
    return f"{trees} (hit the cap of {max_rounds} rounds{best}: more --max-rounds may help)"


def cmd_compile(home: Path, args: argparse.Namespace) -> int:
    """Compile a stored model's trees (`ltr.compiled_trees.compile_model`); the registry checks the
    library against XGBoost on the stored sample and refuses (and removes) it otherwise."""
    import time

    from ltr.compiled_trees import compile_model  # lazy: start-up time
    from ltr.registry import ModelRegistry  # lazy: start-up time

    version = ModelRegistry(home).active() if args.version == "active" else args.version
    if version is None:
        raise CliError("no active model to compile; name a version")
    started = time.perf_counter()
    path = compile_model(home, version, args.compiler)
    print(f"model {version}: compiled trees in {path} ({args.compiler}, {time.perf_counter() - started:.1f} s), parity with XGBoost "
          "checked on the stored sample; a running service uses them after POST /admin/reload")
    return 0


def cmd_delete(home: Path, args: argparse.Namespace) -> int:
    from ltr.registry import ModelRegistry  # here for start-up time: loads xgboost

    registry = ModelRegistry(home)
    if registry.active() == args.version:
        raise CliError(f"{args.version} is the active model; promote or roll back to another one before deleting it")
    registry.manifest(args.version)  # an unknown version fails here, with the registry's message
    registry.delete(args.version)
    print(f"model {args.version} deleted")
    return 0
