"""Learning to rank end to end on a small judged collection: train, registry, promotion gate,
serving through a real `ltr-search serve`, the feature log bit for bit, explanations."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from eval.datasets import load_dataset
from search.event_store import EventStore
from ltr.features import feature_set
from ltr.ranker import LtrPipeline, index_description, registry_pipeline
from indexing.home import registry_dir
from ltr.registry import FeatureSetMismatchError, ModelRegistry
from ltr.training import TrainingSettings, build_rows, split_queries, train_ranker
from search.embedded import EmbeddedIndex
from search.hybrid import FusionSettings, top_hits
from tests.conftest import home_sharing_encoder, run_cli, running_service, write_jsonl

TOPICS = {
    "volcano": ("lava eruption magma crater", "basalt ash plume"),
    "glacier": ("ice melt moraine crevasse", "snow firn calving"),
    "coral": ("reef bleaching polyp algae", "lagoon atoll spawning"),
    "comet": ("nucleus coma tail orbit", "perihelion dust ion"),
    "honeybee": ("hive pollen nectar queen", "waggle drone swarm"),
    "sourdough": ("starter yeast crust flour", "levain proofing crumb"),
    "violin": ("bow string rosin bridge", "fingerboard scroll luthier"),
    "tornado": ("funnel vortex supercell wind", "hail debris siren"),
    "orchid": ("petal epiphyte bloom root", "pseudobulb keiki spike"),
    "lighthouse": ("beacon lens keeper coast", "fresnel foghorn shoal"),
    "penguin": ("colony egg krill flipper", "rookery molt huddle"),
    "saturn": ("rings moon titan gas", "cassini hexagon enceladus"),
}
WINDOW = FusionSettings(bm25_candidates=8, dense_candidates=8)


def _collection(root: Path) -> Path:
    """Three documents per topic: the answer (grade 2), a related one (grade 1), a distractor
    that shares one query word; two training queries and one test query per topic."""
    docs, queries, train, test = [], [], [], []
    for t, (core, extra) in TOPICS.items():
        a, b, c, d = core.split()
        docs += [
            {"_id": f"{t}-1", "title": f"{t} {a} {b}", "text": f"The {t} study of {a} {b} {c} and {d}. {extra}."},
            {"_id": f"{t}-2", "title": f"Notes on {c}", "text": f"Some {t} {c} observations; {d} too."},
            {"_id": f"{t}-3", "title": "Miscellany", "text": f"A {a} mentioned once among many unrelated words."},
        ]
        for n, text in enumerate((f"{t} {a} {b}", f"{a} {c} {t}", f"{t} {b} {d}")):
            queries.append({"_id": f"{t}-q{n}", "text": text})
            (test if n == 2 else train).append((f"{t}-q{n}", t))
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "corpus.jsonl", docs)
    write_jsonl(root / "queries.jsonl", queries)
    (root / "qrels").mkdir(exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{t}-1\t2\n{q}\t{t}-2\t1" for q, t in rows]
        (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def indexed_topics(root: Path, shared_encoder_home: Path) -> tuple[Path, Path]:
    """(home, dataset): the topics collection written under `root` and indexed as 'topics'."""
    home = home_sharing_encoder(root / "home", shared_encoder_home)
    dataset = _collection(root / "topics")
    run_cli(home, "index", "build", "--dataset", str(dataset), "--name", "topics", "--quiet")
    return home, dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_encoder_home: Path):
    """A home with the collection indexed, a window config, and one trained, promoted model."""
    root = tmp_path_factory.mktemp("ltr")
    home, dataset = indexed_topics(root, shared_encoder_home)
    config = root / "service.toml"
    config.write_text("rerank_window = 20\n[exploration]\nepsilon = 0.0\n[fusion.topics]\nbm25_candidates = 8\ndense_candidates = 8\n")
    result = run_cli(home, "train", "--dataset", str(dataset), "--split", "train", "--config", str(config),
                     "--selection", "holdout", "--valid-fraction", "0.25", "--quiet")  # a plain model (tests/test_staged_*: staged)
    assert "model m0001" in result.stdout and "top features by gain" in result.stdout
    assert "model m0001: trees compiled (simd" in result.stdout  # compiled by default: served instead of XGBoost
    run_cli(home, "models", "promote", "m0001")
    return {"home": home, "dataset": dataset, "config": config}


def test_train_writes_a_model_with_a_complete_manifest(trained):
    listing = json.loads(run_cli(trained["home"], "models", "list", "--json").stdout)
    assert listing["active"] == "m0001"
    manifest = ModelRegistry(trained["home"]).manifest("m0001")
    index = EmbeddedIndex.open(trained["home"], "topics")
    assert manifest.feature_set == feature_set("text").describe()
    assert manifest.index == index_description(index)
    assert manifest.training["split"] == "train" and manifest.training["queries"] == 24
    assert manifest.training["valid_queries"] == 6 and len(manifest.training["fingerprint"]) == 16
    assert manifest.params["objective"] == "rank:ndcg" and manifest.trees >= 1
    assert set(manifest.importance) == set(feature_set("text").names)
    assert len(manifest.sample["features"]) == len(manifest.sample["predictions"]) > 0
    assert any(v is None for row in manifest.sample["features"] for v in row)  # NaN survives as null
    shown = json.loads(run_cli(trained["home"], "models", "show", "m0001").stdout)
    assert shown["active"] and "sample" not in shown
    compiled = ModelRegistry(trained["home"]).load("m0001").compiled
    assert compiled is not None and compiled.path.name.startswith("simd-trees-")
    assert not list(trained["home"].rglob("*.pkl")) and not list(trained["home"].rglob("*.pickle"))


def test_training_fingerprint_and_labels_follow_the_qrels(trained):
    index = EmbeddedIndex.open(trained["home"], "topics")
    data = load_dataset(trained["dataset"], "train")
    rows = build_rows(index, data.queries, data.qrels, feature_set("basic"), WINDOW)
    assert rows.group_sizes.sum() == len(rows.labels) == len(rows.doc_ids)
    for query_id, start, size in zip(rows.query_ids, np.cumsum(rows.group_sizes) - rows.group_sizes, rows.group_sizes):
        judged = data.qrels[query_id]
        labels = dict(zip(rows.doc_ids[start:start + size], rows.labels[start:start + size].tolist()))
        assert all(labels.get(d, g) == g for d, g in judged.items())  # graded as judged
        assert all(v == 0 for d, v in labels.items() if d not in judged)  # unjudged = 0
    relabelled = load_dataset(trained["dataset"], "train").qrels
    first = next(iter(relabelled))
    changed = {**relabelled, first: {d: 2 - g for d, g in relabelled[first].items()}}
    again = build_rows(index, data.queries, changed, feature_set("basic"), WINDOW)
    assert again.fingerprint() != rows.fingerprint()


def test_learned_ranker_beats_the_fused_order_on_held_out_queries(trained, tmp_path):
    out = tmp_path / "eval.json"
    run_cli(trained["home"], "eval", "--dataset", str(trained["dataset"]), "--split", "test", "--name", "topics",
            "--pipeline", "bm25,ltr:basic,model:active", "--json", str(out), "--quiet")
    payload = json.loads(out.read_text())
    pipelines = payload["pipelines"]
    assert pipelines["ltr:basic"]["learned"] and not pipelines["model:active"]["learned"]
    assert pipelines["model:active"]["metrics"]["nDCG@10"] >= pipelines["bm25"]["metrics"]["nDCG@10"] - 1e-9
    assert pipelines["model:active"]["metrics"]["nDCG@10"] > 0.8


def test_served_features_equal_training_features_bit_for_bit(trained):
    """The one-code-path guarantee: what the live service logged for a request is exactly what
    the training pipeline computes for the same query and documents."""
    home = trained["home"]
    with running_service(home, "--name", "topics", "--config", str(trained["config"]), "--threads", "1") as (url, _):
        with httpx.Client(base_url=url, timeout=30) as client:
            responses = [
                client.post("/search", json={"query": q, "size": 10, "explain": True}).json()
                for q in ("volcano lava eruption", "ice crevasse glacier melt", "reef", "honeybee waggle dance drone")
            ]
            assert client.post("/search", json={"query": "reef", "pipeline": "ltr", "offset": 15, "size": 10}).status_code == 400
            metrics = client.get("/metrics").text
    assert 'ltr_search_model_info{version="m0001"} 1.0' in metrics
    index = EmbeddedIndex.open(home, "topics")
    features = feature_set("text")
    store = EventStore(home / "events" / "topics.sqlite3")  # the service's default event store
    for response in responses:
        assert response["pipeline"] == "ltr" and response["model_version"] == "m0001"  # ltr is the default once promoted
        served = store.get_request(response["request_id"])
        assert served.model_version == "m0001" and served.results
        rows = build_rows(index, {"q": response["query"]}, {}, features, WINDOW)
        position = {d: i for i, d in enumerate(rows.doc_ids)}
        for result in served.results:
            logged = np.array([result.features[name] for name in features.names], dtype=np.float32)
            expected = rows.features[position[result.doc_id]]
            assert logged.tobytes() == expected.tobytes(), result.doc_id  # bit for bit, NaN included
        for result in response["results"]:
            explain = result["explain"]
            assert set(explain["features"]) == set(features.names)
            assert sum(explain["contributions"].values()) == pytest.approx(result["score"], abs=1e-4)
    store.close()


def test_registry_model_scores_like_the_in_memory_one(trained):
    home = trained["home"]
    index = EmbeddedIndex.open(home, "topics")
    served = registry_pipeline(index, home, "active")
    window = served.rank_window("comet dust tail")
    np.testing.assert_allclose(served.model.predict(window.features), window.scores, atol=0)
    assert [h.rank for h in window.hits] == list(range(1, len(window.hits) + 1))
    assert served.search("comet dust tail", 3)[0].doc_id.startswith("comet")



def test_scored_window_is_arrays_with_hits_only_on_demand(trained):
    """rank_window keeps rows and scores; the page's Hits equal the straightforward ranking of the
    whole window's Hits, which are made lazily (and the cached replay ranks the same)."""
    home = trained["home"]
    index = EmbeddedIndex.open(home, "topics")
    served = registry_pipeline(index, home, "active")
    window = served.rank_window("volcano lava eruption")
    assert window.rows.dtype == np.int64 and window._hits is None  # no per-candidate objects yet
    assert window.doc_ids == index.doc_ids(window.rows)
    np.testing.assert_array_equal(np.diff(window.first_stage) <= 0, True)  # first-stage (RRF) order
    reference = top_hits([h.doc_id for h in window.hits], window.scores, 10)
    assert window.page(10) == reference == served.search("volcano lava eruption", 10)
    replay = served.rank_window("volcano lava eruption")
    assert replay.timings_ms == {"cached": 0.0} and replay.page(10) == reference
    assert index_description(index) == index.describe() and index.describe()["backend"] == "embedded"


def test_feature_set_mismatch_is_refused(trained):
    home = trained["home"]
    registry = ModelRegistry(home)
    with pytest.raises(FeatureSetMismatchError, match="text v1"):
        registry.load("m0001", expected_feature_set=feature_set("basic").describe())


def test_promotion_gate_refuses_a_significantly_worse_model(trained):
    """A model trained on inverted labels is worse on every held-out query: refused, unless --force."""
    home = trained["home"]
    index = EmbeddedIndex.open(home, "topics")
    data = load_dataset(trained["dataset"], "train")
    features = feature_set("text")
    rows = build_rows(index, data.queries, data.qrels, features, WINDOW)
    rows.labels = np.where(rows.labels > 0, 0.0, 1.0).astype(np.float32)  # prefers every wrong document
    train_ids, valid_ids = split_queries(rows.query_ids, 0.0, 0)
    bad = train_ranker(rows.select(train_ids), features.names, TrainingSettings(max_rounds=30), None)
    manifest = ModelRegistry(home).save(
        bad.booster, feature_set=features.describe(), index=index_description(index),
        training={"dataset": str(trained["dataset"].resolve()), "split": "train", "note": "inverted labels"},
        params={}, metrics={}, importance=bad.importance(), sample_features=rows.features[:8], best_iteration=bad.best_iteration,
    )
    args = ("models", "promote", manifest.version, "--dataset", str(trained["dataset"]), "--quiet")
    refused = run_cli(home, *args, "--split", "test", check=False)
    assert refused.returncode == 2 and "significantly worse than the active m0001" in refused.stderr
    assert ModelRegistry(home).active() == "m0001"
    same_split = run_cli(home, *args, "--split", "train", check=False)
    assert same_split.returncode == 2 and "was trained on topics/train" in same_split.stderr
    no_gate = run_cli(home, "models", "promote", manifest.version, check=False)
    assert no_gate.returncode == 2 and "--force" in no_gate.stderr
    run_cli(home, *args, "--split", "test", "--force")
    assert ModelRegistry(home).active() == manifest.version
    run_cli(home, "models", "rollback")
    assert ModelRegistry(home).active() == "m0001"


def test_train_no_compile_stores_the_model_uncompiled(trained, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(trained["home"], home, symlinks=True)
    result = run_cli(home, "train", "--dataset", str(trained["dataset"]), "--split", "train", "--config", str(trained["config"]),
                     "--selection", "holdout", "--valid-fraction", "0.25", "--quiet", "--no-compile")
    version = ModelRegistry(home).version_ids()[-1]
    assert "trees compiled" not in result.stdout and ModelRegistry(home).load(version).compiled is None
    assert not list((registry_dir(home) / version).glob("*.so"))


def test_ltr_pipeline_without_a_model_says_how_to_get_one(trained):
    index = EmbeddedIndex.open(trained["home"], "topics")
    with pytest.raises(ValueError, match="has no model"):
        LtrPipeline(index, fusion=WINDOW).search("comet", 3)
    empty = trained["home"].parent / "empty-home"
    bad = run_cli(empty, "models", "rollback", check=False)
    assert bad.returncode == 2 and "ltr-search: error:" in bad.stderr


def test_search_without_pipeline_ranks_with_the_promoted_model_as_the_service_does(trained):
    default = run_cli(trained["home"], "search", "comet tail", "--name", "topics", "--json", "-k", "5")
    chosen = run_cli(trained["home"], "search", "comet tail", "--name", "topics", "--json", "-k", "5", "--pipeline", "ltr")
    payload = json.loads(default.stdout)
    assert payload["pipeline"] == "ltr" and "cannot serve" not in default.stderr
    assert [h["id"] for h in payload["hits"]] == [h["id"] for h in json.loads(chosen.stdout)["hits"]]


def test_service_refuses_a_model_that_fails_its_parity_check(trained, tmp_path):
    """A model whose stored sample no longer scores the same is not served; the rest is."""
    import shutil

    from search.app.config import load_service_config
    from search.app.service import ServingState

    home = tmp_path / "home"
    home.mkdir()
    for part in ("indexes", "encoders"):
        (home / part).symlink_to(trained["home"] / part, target_is_directory=True)
    shutil.copytree(trained["home"] / "models", home / "models")
    run_cli(home, "models", "promote", "m0001", "--force")
    manifest_file = home / "models" / "m0001" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["sample"]["predictions"][0] += 1e-4
    manifest_file.write_text(json.dumps(manifest))
    state = ServingState(load_service_config(home, trained["config"], {"index": "topics"}))
    _, snapshot = state.reload()
    assert "ltr" not in snapshot.pipelines and snapshot.default_pipeline == "hybrid"
    assert "refused" in snapshot.model_error and "m0001" in snapshot.model_error
