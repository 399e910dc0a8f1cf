"""Index and model lifecycle on the storage side: rollback to a generation that does not exist,
pruning that never keeps a corrupt generation over a valid one, field typos in a corpus, failed
first builds that leave nothing listed, listing and deleting indexes, deleting models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import indexing.build as build_module
from indexing.build import BuildSettings, build_index
from indexing.bundle import GenerationNotFoundError, IndexCorruptError, IndexListing, IndexNotFoundError, IndexStore
from indexing.corpus import CorpusError, CorpusSpec
from ltr.registry import ModelInUseError, ModelNotFoundError, ModelRegistry
from tests.test_registry import save, train

DOCS = [
    {"_id": "d1", "title": "Cats and dogs", "text": "dogs chase cats"},
    {"_id": "d2", "title": "Quantum", "text": "quantum computing"},
]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    return path


def build(home: Path, corpus: Path, name: str = "t", keep: int = 10, **spec) -> str:
    settings = BuildSettings(corpus=CorpusSpec(str(corpus), **spec), dense=False, keep=keep)
    return build_index(home, name, settings, progress=False, log=lambda m: None).generation


def corrupt(store: IndexStore, name: str, generation: str) -> None:
    path = store.index_dir(name) / "generations" / generation
    victim = next(p for p in sorted(path.rglob("*")) if p.is_file() and p.name != "manifest.json")
    victim.write_bytes(victim.read_bytes()[:-1])  # truncated by one byte


# ---- defect 4: rollback and pruning ------------------------------------------------------------


def test_rollback_to_a_generation_that_does_not_exist_says_so_and_lists_them(tmp_path, corpus):
    home = tmp_path / "home"
    build(home, corpus)
    build(home, corpus)
    store = IndexStore(home)
    with pytest.raises(GenerationNotFoundError) as info:
        store.rollback("t", to="g000009")
    assert str(info.value) == "index 't' has no generation g000009; its generations: g000001, g000002 (active)"
    assert "corrupt" not in str(info.value)
    with pytest.raises(GenerationNotFoundError):  # the path the CLI takes today
        store.activate("t", "g000009")
    assert store.active_generation("t") == "g000002"
    assert store.rollback("t") == ("g000002", "g000001")


def test_rollback_of_an_index_that_does_not_exist_creates_nothing(tmp_path, corpus):
    home = tmp_path / "home"
    build(home, corpus, name="real")
    store = IndexStore(home)
    with pytest.raises(IndexNotFoundError, match=r"no index named 'typo' in .* \(indexes here: real\)"):
        store.rollback("typo", to="g000001")
    assert store.names() == ["real"]
    assert sorted(p.name for p in store.root.iterdir()) == [".real.lock", "real"]


def test_prune_keeps_the_newest_valid_generations_never_a_corrupt_one(tmp_path, corpus):
    home = tmp_path / "home"
    for _ in range(3):
        build(home, corpus)
    store = IndexStore(home)
    corrupt(store, "t", "g000003")  # the newest generation, active until the next build
    settings = BuildSettings(corpus=CorpusSpec(str(corpus)), dense=False, keep=1)
    summary = build_index(home, "t", settings, progress=False, log=lambda m: None)
    # the old rule kept g000003 (corrupt, newest) and deleted g000002 (valid)
    assert store.generations("t") == ["g000002", "g000004"]
    assert summary.pruned == ["g000001", "g000003"]
    assert list(summary.pruned_corrupt) == ["g000003"] and "bytes" in summary.pruned_corrupt["g000003"]
    assert any(line.startswith("  pruned corrupt g000003: ") for line in summary.lines())
    assert store.rollback("t") == ("g000004", "g000002")


def test_rollback_without_a_target_skips_a_corrupt_previous_generation(tmp_path, corpus):
    home = tmp_path / "home"
    for _ in range(3):
        build(home, corpus)
    store = IndexStore(home)
    corrupt(store, "t", "g000002")
    assert store.previous_generation("t") == "g000001"
    with pytest.raises(IndexCorruptError):  # named explicitly, a corrupt generation is still refused
        store.rollback("t", to="g000002")


# ---- defect 5: field typos ---------------------------------------------------------------------


def test_a_title_field_in_no_record_is_an_error_naming_field_file_and_fields(tmp_path, corpus):
    with pytest.raises(CorpusError) as info:
        build(tmp_path / "home", corpus, title_field="titel")
    assert str(info.value) == f"{corpus}: title field 'titel' is in no record; the records have: _id, text, title"


def test_a_second_text_field_in_no_record_is_an_error_too(tmp_path, corpus):
    with pytest.raises(CorpusError, match=r"text field 'abstrct' is in no record; the records have: _id, text, title"):
        build(tmp_path / "home", corpus, text_fields=("text", "abstrct"))


def test_the_default_title_field_may_be_absent_and_a_missing_text_field_names_the_record(tmp_path):
    path = tmp_path / "untitled.jsonl"
    path.write_text('{"_id": "a", "text": "no title here"}\n', encoding="utf-8")
    assert build(tmp_path / "home", path) == "g000001"
    with pytest.raises(CorpusError, match=r":1: missing text field 'body' \(the record has: _id, text\)"):
        build(tmp_path / "home", path, text_fields=("body",))


# ---- defect 6: failed builds, listing and deleting ------------------------------------------------


def test_a_failed_first_build_leaves_no_index_listed(tmp_path, corpus, monkeypatch):
    home = tmp_path / "home"
    store = IndexStore(home)
    with pytest.raises(CorpusError):
        build(home, corpus, title_field="titel")
    assert store.names() == [] and store.list_indexes() == [] and not store.index_dir("t").exists()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(build_module, "write_docstore", disk_full)  # fails after staging was created
    with pytest.raises(OSError, match="No space left"):
        build(home, corpus)
    assert store.names() == [] and not store.index_dir("t").exists()
    monkeypatch.undo()
    build(home, corpus)
    monkeypatch.setattr(build_module, "write_docstore", disk_full)
    with pytest.raises(OSError):
        build(home, corpus)  # a later build failing keeps the index and its active generation
    assert store.list_indexes() == [IndexListing("t", "g000001", ["g000001"], True)]


def test_list_indexes_says_which_are_usable(tmp_path, corpus):
    home = tmp_path / "home"
    build(home, corpus, name="good")
    build(home, corpus, name="broken")
    store = IndexStore(home)
    (store.index_dir("broken") / "generations" / "g000001" / "manifest.json").write_text("{", encoding="utf-8")
    (store.index_dir("empty") / "generations").mkdir(parents=True)  # left by an older engine's failed build
    listing = {entry.name: entry for entry in store.list_indexes()}
    assert sorted(listing) == ["broken", "empty", "good"]
    assert listing["good"] == IndexListing("good", "g000001", ["g000001"], True)
    assert not listing["broken"].usable and "manifest.json is not valid JSON" in listing["broken"].problem
    assert listing["empty"] == IndexListing("empty", None, [], False, "no active generation (no build finished)")


def test_delete_index_removes_it_and_refuses_unknown_names(tmp_path, corpus):
    home = tmp_path / "home"
    build(home, corpus, name="a")
    build(home, corpus, name="b")
    store = IndexStore(home)
    store.delete_index("a")
    assert store.names() == ["b"] and not store.index_dir("a").exists()
    assert not any(p.name.startswith(".deleting") for p in store.root.iterdir())
    with pytest.raises(IndexNotFoundError, match=r"no index named 'a' .*\(indexes here: b\)"):
        store.delete_index("a")
    assert build(home, corpus, name="a") == "g000001"  # the name can be built again


def test_models_delete_refuses_the_active_model_and_removes_others_durably(tmp_path):
    registry = ModelRegistry(tmp_path)
    booster = train()
    first, second, third = (save(registry, booster).version for _ in range(3))
    registry.promote(first)
    registry.promote(second)
    with pytest.raises(ModelInUseError, match=rf"model {second} is the active model; promote another"):
        registry.delete(second)
    registry.delete(first)  # in the rollback history: it leaves the history too
    registry.delete(third)
    assert registry.version_ids() == [second] and registry.active() == second
    assert json.loads((registry.root / "active.json").read_text()) == {"active": second, "history": []}
    assert sorted(p.name for p in registry.root.iterdir()) == [".lock", "active.json", second]
    with pytest.raises(ModelNotFoundError, match=rf"no model {first} in .* \(versions here: {second}\)"):
        registry.delete(first)
