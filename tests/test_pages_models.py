"""The pages over a home with a trained, promoted model: the search page's why panel shows the
model's feature contributions, and /compare ranks a stored model (`model:V`) beside a pipeline."""
from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from tests.test_ltr import trained  # noqa: F401 - the module-scoped trained home (m0001 promoted)
from tests.test_pages import ADMIN_TOKEN, csrf_of, login  # noqa: F401


@pytest.fixture
def client(trained, tmp_path, monkeypatch):  # noqa: F811 - the fixture imported above
    from search.app.config import load_service_config
    from search.app.service import create_app

    monkeypatch.setenv("LTR_SEARCH_ADMIN_TOKEN", ADMIN_TOKEN)
    config = load_service_config(trained["home"], trained["config"], {"index": "topics", "events_path": tmp_path / "events.sqlite3"})
    with TestClient(create_app(config)) as test_client:
        yield test_client


def test_why_panel_shows_the_model_contributions(client):
    html = client.get("/", params={"q": "volcano lava eruption", "pipeline": "ltr"}).text
    assert "model m0001" in html
    panel = html.split('<details class="why">')[1].split("</details>")[0]
    assert "Top contributions to the model score" in panel
    rows = re.findall(r"<tr><th>([^<]+)</th><td class=\"num\">([+-][0-9.]+)</td>", panel)
    assert 1 <= len(rows) <= 6
    sizes = [abs(float(v)) for _, v in rows]
    assert sizes == sorted(sizes, reverse=True)


def test_compare_a_stored_model_with_a_pipeline(client):
    login(client, next_="/compare")
    html = client.get("/compare", params={"q": "volcano lava eruption", "a": "bm25", "b": "model:m0001"}).text
    assert '<option selected>model:m0001</option>' in html
    assert html.count("<section>") == 2 and "model:m0001" in html.split('id="compare-columns"')[1]
    assert 'class="error"' not in html
