"""Start-up of the query service (issue 17: `serve` ready in <= 2 s on SciFact): the app imports
XGBoost without scikit-learn's scipy.stats nor its own wrappers' scipy.special, the index opened
and the active model loaded in the background before the app existed are the ones the first load
serves (or their errors are the ones the service reports), and a real `serve` process opens them
that way and answers."""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from search.app.config import load_service_config
from search.backend_factory import open_backend
from tests.conftest import ROOT, lexical_home, running_service

PROBE = """
import sys
import search.app.service
print("LOADED", "xgboost" in sys.modules, "sklearn" in sys.modules, "scipy.stats" in sys.modules, "scipy.special" in sys.modules)
try:
    import sklearn  # hidden from XGBoost only: still importable for anyone else
    print('SKLEARN', sklearn.__name__)
except ImportError:
    print('SKLEARN', 'not installed')
import xgboost, xgboost.sklearn  # the engine's parts are there; the wrappers still import for anyone
print('XGBOOST', callable(xgboost.train), xgboost.Booster.__name__, xgboost.sklearn.XGBRanker.__name__)
"""


def test_the_app_imports_xgboost_without_scikit_learn():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert "LOADED True False False False" in result.stdout, result.stdout + result.stderr  # nor scipy.special
    assert "XGBOOST True Booster XGBRanker" in result.stdout
    assert "SKLEARN sklearn" in result.stdout or "SKLEARN not installed" in result.stdout


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return lexical_home(tmp_path_factory.mktemp("startup"), "lex")


def test_the_first_load_serves_the_index_opened_in_the_background(home, monkeypatch):
    from search.app import state
    from search.app.service import create_app

    config = load_service_config(home, None, {"index": "lex"})
    opened: Future = Future()
    opened.set_result(open_backend(home, "lex", config.backend))
    calls = []
    monkeypatch.setattr(state, "open_backend", lambda *a, **k: calls.append(a) or open_backend(*a, **k))
    with TestClient(create_app(config, opening=opened)) as client:
        assert client.get("/ready").json()["ready"] is True
        assert client.app.state.serving.snapshot.index is opened.result()  # the very object, not a second opening
        assert calls == []
        assert client.get("/search", params={"q": "cats", "pipeline": "bm25"}).status_code == 200
        client.app.state.serving.reload()  # later reloads open the active generation afresh
        assert len(calls) == 1


def test_an_opening_that_failed_is_what_ready_reports(home):
    from search.app.service import create_app

    config = load_service_config(home, None, {"index": "lex"})
    failed: Future = Future()
    failed.set_exception(FileNotFoundError("index 'lex' vanished while opening"))
    with TestClient(create_app(config, opening=failed)) as client:
        response = client.get("/ready")
        assert response.status_code == 503
        assert "vanished while opening" in response.json()["reason"]


def test_serve_opens_in_the_background_and_answers(home):
    with running_service(home, "--name", "lex", "--no-access-log") as (url, process):
        assert httpx.get(f"{url}/ready", timeout=10).json()["index"]["name"] == "lex"
        hits = httpx.get(f"{url}/search", params={"q": "cats", "pipeline": "bm25"}, timeout=10).json()
        assert hits["results"], hits


def test_serve_reports_a_missing_index_on_ready(tmp_path):
    from tests.conftest import first_ready_answer, free_port

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "search.app.cli", "--home", str(tmp_path / "empty"), "serve",
                                "--port", str(port), "--name", "nope"], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        response = first_ready_answer(port, process)
        assert response.status_code == 503 and "nope" in response.json()["reason"]
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def model_home(tmp_path_factory, shared_encoder_home) -> Path:
    """The topics collection indexed with dense vectors, one model trained and promoted."""
    from tests.conftest import run_cli
    from tests.test_ltr import indexed_topics

    home, dataset = indexed_topics(tmp_path_factory.mktemp("startup-model"), shared_encoder_home)
    run_cli(home, "train", "--dataset", str(dataset), "--split", "train", "--valid-fraction", "0.25", "--quiet")
    run_cli(home, "models", "promote", "m0001")
    return home


def test_the_first_load_serves_the_model_loaded_in_the_background(model_home, monkeypatch):
    from search.app import state
    from search.app.preload import load_model
    from search.app.service import create_app

    config = load_service_config(model_home, None, {"index": "topics"})
    index = open_backend(model_home, "topics", config.backend)
    opened, preloaded = Future(), Future()
    opened.set_result(index)
    preloaded.set_result(load_model(index, model_home, config.event_store_path))
    calls = []
    monkeypatch.setattr(state, "load_model", lambda *a, **k: calls.append(a) or load_model(*a, **k))
    with TestClient(create_app(config, opening=opened, model=preloaded)) as client:
        assert client.get("/ready").json()["ready"] is True
        snapshot = client.app.state.serving.snapshot
        assert snapshot.model_version == "m0001" and snapshot.pipelines["ltr"].first_stage is preloaded.result()
        assert calls == []  # not loaded a second time
        assert client.get("/search", params={"q": "volcano lava", "pipeline": "ltr"}).json()["pipeline"] == "ltr"
        client.app.state.serving.reload()  # later reloads load the model active then
        assert len(calls) == 1 and client.app.state.serving.snapshot.model_version == "m0001"


def test_a_model_that_failed_to_load_in_the_background_is_what_the_service_reports(model_home):
    from ltr.ranker import ModelUnavailableError
    from search.app.service import create_app

    config = load_service_config(model_home, None, {"index": "topics"})
    opened, preloaded = Future(), Future()
    opened.set_result(open_backend(model_home, "topics", config.backend))
    preloaded.set_exception(ModelUnavailableError("no active model (as the background loading found)"))
    with TestClient(create_app(config, opening=opened, model=preloaded)) as client:
        snapshot = client.app.state.serving.snapshot
        assert "ltr" not in snapshot.pipelines and snapshot.default_pipeline == "hybrid"
        assert snapshot.model_error == "no active model (as the background loading found)"


def test_serve_loads_the_active_model_in_the_background_and_ranks_with_it(model_home):
    with running_service(model_home, "--name", "topics", "--no-access-log") as (url, process):
        ready = httpx.get(f"{url}/ready", timeout=10).json()
        assert ready["ready"] is True, ready
        hits = httpx.get(f"{url}/search", params={"q": "volcano lava"}, timeout=10).json()
        assert hits["pipeline"] == "ltr" and hits["model_version"] == "m0001" and hits["results"], hits
