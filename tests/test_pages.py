"""A small BM25-only index for the page tests (HTTP in-process and in a real browser): metadata
fields for the filters, and a document whose title is a script tag."""
from __future__ import annotations

from pathlib import Path

from tests.conftest import run_cli, write_jsonl

PAGE_DOCS = [
    {"_id": "d1", "title": "Cats and dogs", "text": "Cats chase mice. Dogs chase cats around the garden.", "author": "ann", "year": 2001},
    {"_id": "d2", "title": "Quantum computing", "text": "Qubits use superposition and entanglement for computing.", "author": "bob", "year": 2015},
    {"_id": "d3", "title": "Gardening tips", "text": "Water the garden early; mice avoid mint plants and cats.", "author": "ann", "year": 2010},
    {"_id": "d4", "title": "<script>alert(1)</script>", "text": "Entanglement with <b>photons</b> & <img src=x onerror=alert(2)> cats.",
     "author": "cy", "year": 2020},
    {"_id": "d5", "title": "Dog training", "text": "Training dogs requires patience, treats and practice with cats nearby.", "author": "bob", "year": 2018},
    {"_id": "d6", "title": "Café culture", "text": "The café serves crème brûlée; cafés are popular in Paris.", "author": "dee", "year": 2012},
    {"_id": "d7", "title": "Cat nutrition", "text": "Cats need protein; a cat's diet differs from a dog's diet.", "author": "ann", "year": 2021},
    {"_id": "d8", "title": "Wild cats", "text": "Lions and tigers are big cats that hunt in the wild.", "author": "eve", "year": 2019},
]
ADMIN_TOKEN = "admin-token-0123456789"
JUDGE_TOKEN = "judge-token-0123456789"


def build_page_index(root: Path, name: str = "pages") -> Path:
    """The engine home holding PAGE_DOCS as index `name` (BM25 only: seconds, no encoder)."""
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    write_jsonl(corpus / "corpus.jsonl", PAGE_DOCS)
    home = root / "home"
    run_cli(home, "index", "build", "--dataset", str(corpus), "--name", name, "--no-dense", "--quiet")
    return home


# ------------------------------------------------------------------------------------------ tests

import json  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from search.app.pages.highlight import Highlighter, best_window, to_html  # noqa: E402
from indexing.analysis import Analyzer  # noqa: E402


@pytest.fixture(scope="module")
def page_home(tmp_path_factory) -> Path:
    return build_page_index(tmp_path_factory.mktemp("pages"))


@pytest.fixture
def client(page_home: Path, tmp_path: Path, monkeypatch):
    from search.app.config import load_service_config
    from search.app.service import create_app

    import shutil

    shutil.rmtree(page_home / "judgments", ignore_errors=True)  # each test judges from scratch
    monkeypatch.setenv("LTR_SEARCH_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("LTR_SEARCH_JUDGE_TOKEN", JUDGE_TOKEN)
    config = load_service_config(page_home, None, {"index": "pages", "events_path": tmp_path / "events.sqlite3"})
    with TestClient(create_app(config)) as test_client:
        yield test_client


def test_highlight_marks_analysed_matches_and_escapes():
    marker = Highlighter(Analyzer(), frozenset(Analyzer().analyze("dog chasing")))
    segments = marker.field("Dogs <b>chase</b> the cat & a DOG.")
    assert [t for t, hit in segments if hit] == ["Dogs", "chase", "DOG"]  # stems match: dog/dogs, chasing/chase
    assert to_html(segments) == "<mark>Dogs</mark> &lt;b&gt;<mark>chase</mark>&lt;/b&gt; the cat &amp; a <mark>DOG</mark>."


def test_snippet_window_is_the_densest_stretch():
    assert best_window([False] * 10, 5) == 0
    matched = [True] + [False] * 50 + [True, False, True, True] + [False] * 20
    assert best_window(matched, 10) == 51 - 6  # the three-match cluster, six tokens of context before it
    text = " ".join(f"w{i}" for i in range(100)) + " cat cats " + " ".join(f"v{i}" for i in range(100))
    segments = Highlighter(Analyzer(), frozenset({"cat"})).field(text, 20)
    assert segments[0][0].startswith("…w94 ") and segments[-1][0].endswith(" v11…")  # 6 + 2 + 12 = 20 tokens
    assert [t for t, hit in segments if hit] == ["cat", "cats"]


def test_search_api_fields_highlight_and_eligible(client):
    body = client.get("/search", params={"q": "cats", "fields": "title,metadata", "highlight": "true"}).json()
    assert body["eligible"] == len(body["results"]) == 6
    first = body["results"][0]
    assert set(first["fields"]) == {"title", "metadata"}
    assert "<mark>" in first["highlights"]["text"]
    script = next(r for r in body["results"] if r["id"] == "d4")
    assert script["highlights"]["title"] == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert "&lt;img src=x onerror=alert(2)&gt;" in script["highlights"]["text"]
    none = client.post("/search", json={"query": "cats", "fields": [], "size": 2}).json()
    assert [r["fields"] for r in none["results"]] == [{}, {}] and "highlights" not in none["results"][0]
    full = client.post("/search", json={"query": "cats", "size": 1}).json()
    assert set(full["results"][0]["fields"]) == {"id", "title", "text", "metadata"}  # default: everything


def test_search_api_refuses_unknown_fields(client):
    for response in (client.get("/search", params={"q": "cats", "fields": "title,body"}),
                     client.post("/search", json={"query": "cats", "fields": ["body"]})):
        assert response.status_code == 400
        assert response.json()["error"]["details"] == [
            {"field": "fields", "reason": "unknown field(s) body; known: id, title, text, metadata"}]


def test_search_page_renders_escaped_highlighted_results(client):
    response = client.get("/", params={"q": "cats"})
    assert response.status_code == 200
    html = response.text
    assert "<script>alert(1)</script>" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<mark>Cats</mark>" in html
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert re.findall(r'<script[^>]*>', html) == ['<script src="/static/pages.js" defer>']
    positions = re.findall(r'<a class="title"[^>]*data-position="(\d+)"', html)
    assert positions == [str(i) for i in range(1, 7)]
    assert 'name="f.author"' in html and 'name="f.year.gte"' in html  # filters from the metadata fields


def test_search_page_filters_and_pages(client):
    html = client.get("/", params={"q": "cats", "f.author": '"ann"', "f.year.gte": "2005"}).text
    ids = re.findall(r'data-doc-id="([^"]+)"', html)
    assert sorted(set(ids)) == ["d3", "d7"]
    bad = client.get("/", params={"q": "cats", "f.year.gte": "soon"})
    assert bad.status_code == 400 and "year: &#39;soon&#39; is not a number" in bad.text


def test_search_page_click_is_a_valid_event(client):
    html = client.get("/", params={"q": "cats"}).text
    request_id = re.search(r'data-request-id="([0-9a-f]+)"', html).group(1)
    doc_id, position = re.findall(r'data-doc-id="([^"]+)" data-position="(\d+)"', html)[2]
    event = {"request_id": request_id, "type": "click", "doc_id": doc_id, "position": int(position)}
    assert client.post("/events", json={"events": [event]}).json() == {"stored": 1, "duplicates": 0}
    wrong = client.post("/events", json={"events": [{**event, "position": int(position) + 1}]})
    assert wrong.status_code == 422  # the position must be the one the page was served with


def test_static_files_and_document_page(client):
    assert client.get("/static/pages.js").status_code == 200
    assert "sendBeacon" in client.get("/static/pages.js").text
    page = client.get("/doc/d4", params={"q": "photons"})
    assert page.status_code == 200 and "&lt;script&gt;" in page.text and "<mark>photons</mark>" in page.text
    assert client.get("/doc/nope").status_code == 404


# --------------------------------------------------------------------------- login, CSRF, judging


def login(client, token: str = ADMIN_TOKEN, name: str = "alice", next_: str = "/judge"):
    form = client.get("/login", params={"next": next_}).text
    nonce = re.search(r'name="login_csrf" value="([^"]+)"', form).group(1)
    return client.post("/login", data={"token": token, "name": name, "next": next_, "login_csrf": nonce},
                       follow_redirects=False)


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def test_pages_need_a_login_and_the_right_token(client):
    for path in ("/judge", "/compare", "/dashboard"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"].startswith("/login?next=")
    assert login(client, token="wrong-token-0123456789").status_code == 400
    response = login(client, token=JUDGE_TOKEN, name="jo")
    assert response.status_code == 303 and response.headers["location"] == "/judge"
    cookie = response.headers["set-cookie"]
    assert "ltr_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert client.get("/judge").status_code == 200
    assert client.get("/dashboard", follow_redirects=False).status_code == 403  # the judge token opens /judge only
    value = cookie.split("ltr_session=")[1].split(";")[0]
    client.cookies.clear()
    client.cookies.set("ltr_session", value[:-3] + ("abc" if not value.endswith("abc") else "abd"))  # forged signature
    assert client.get("/judge", follow_redirects=False).status_code == 303


def test_login_refuses_a_missing_csrf_nonce_and_an_open_redirect(client):
    refused = client.post("/login", data={"token": ADMIN_TOKEN, "name": "a", "login_csrf": "x"}, follow_redirects=False)
    assert refused.status_code == 400 and "CSRF" in refused.text
    assert login(client, next_="https://evil.example/").headers["location"] == "/judge"
    assert login(client, next_="//evil.example/").headers["location"] == "/judge"


def test_judging_forms_need_the_csrf_token(client):
    login(client)
    page = client.get("/judge").text
    missing = client.post("/judge/queries", data={"source": "text", "queries": "cats", "pipelines": "bm25"})
    assert missing.status_code == 403 and "CSRF" in missing.text
    cross = client.post("/judge/queries", data={"csrf": csrf_of(page), "source": "text", "queries": "cats",
                                                "pipelines": "bm25"}, headers={"origin": "https://evil.example"})
    assert cross.status_code == 403


def test_a_configured_trusted_origin_may_post_the_forms(page_home, tmp_path, monkeypatch):
    """Behind a proxy that rewrites Host, the browser's Origin is the public address: accepted when
    it is in `trusted_origins`, still refused otherwise (and the CSRF token is still required)."""
    from search.app.config import load_service_config
    from search.app.service import create_app

    monkeypatch.setenv("LTR_SEARCH_ADMIN_TOKEN", ADMIN_TOKEN)
    config = load_service_config(page_home, None, {"index": "pages", "events_path": tmp_path / "events.sqlite3",
                                                   "trusted_origins": ("https://search.example",)})
    with TestClient(create_app(config)) as client:
        login(client)
        token = csrf_of(client.get("/judge").text)
        form = {"csrf": token, "source": "text", "queries": "cats", "pipelines": "bm25", "depth": "3"}
        public = client.post("/judge/queries", data=form, headers={"origin": "https://search.example"},
                             follow_redirects=False)
        assert public.status_code == 303
        other = client.post("/judge/queries", data=form, headers={"origin": "https://evil.example"})
        assert other.status_code == 403 and "cross-origin" in other.text
        tokenless = client.post("/judge/queries", data={**form, "csrf": "x"}, headers={"origin": "https://search.example"})
        assert tokenless.status_code == 403 and "CSRF" in tokenless.text


def test_judge_pool_grade_skip_export(client, page_home):
    login(client, name="alice")
    token = csrf_of(client.get("/judge").text)
    added = client.post("/judge/queries", data={"csrf": token, "source": "text", "queries": "cats\ngarden mice\n",
                                                "pipelines": ["bm25"], "depth": "3"}, follow_redirects=False)
    assert added.status_code == 303
    overview = client.get(added.headers["location"]).text
    assert "2 queries added and pooled." in overview and "cats" in overview
    query_link = re.search(r'href="/judge/q/([^"]+)">cats<', overview).group(1)
    seen = []
    for grade in ("3", "skip", "1"):
        page = client.get(f"/judge/q/{query_link}").text
        doc_id = re.search(r'name="doc_id" value="([^"]+)"', page).group(1)
        seen.append(doc_id)
        response = client.post(f"/judge/q/{query_link}", data={"csrf": token, "doc_id": doc_id, "grade": grade},
                               follow_redirects=False)
        assert response.status_code == 303
    assert len(set(seen)) == 3 and 'id="query-done"' in client.get(f"/judge/q/{query_link}").text
    bad = client.post(f"/judge/q/{query_link}", data={"csrf": token, "doc_id": "d404", "grade": "2"})
    assert bad.status_code == 400 and "not in the pool" in bad.text
    trec = client.get("/judge/export", params={"format": "trec"}).text.splitlines()
    assert sorted(trec) == sorted([f"{query_link} 0 {seen[0]} 3", f"{query_link} 0 {seen[2]} 1"])  # the skip is not exported
    beir = client.get("/judge/export").text.splitlines()
    assert beir[0] == "query-id\tcorpus-id\tscore" and len(beir) == 3
    assert json.loads(client.get("/judge/queries.jsonl").text) == {"_id": query_link, "text": "cats"}


# ------------------------------------------------------------------------------ why, compare, dashboard


def test_why_rows_rank_contributions_by_size():
    from search.app.pages.search_page import why_rows
    from search.app.schemas import ResultExplanation, SearchResult

    explain = ResultExplanation(first_stage_rank=3, first_stage_score=1.0,
                                contributions={"bm25": 0.5, "dense": -1.0, "ctr": None, "bias": 0.25, "base": 0.5})
    rows, constant = why_rows(SearchResult(id="d", score=1.0, position=1, propensity=1.0, fields={}, explain=explain))
    assert [(r.name, r.value, r.width) for r in rows] == [("dense", -1.0, 100.0), ("bm25", 0.5, 50.0)]
    assert constant == 0.75
    assert why_rows(SearchResult(id="d", score=1.0, position=1, propensity=1.0, fields={})) == ([], None)


def test_compare_marks_moves_and_reads_the_last_eval_run(client, page_home, tmp_path):
    from eval.datasets import write_run
    from search.app.pages.compare import side_by_side

    left, right = side_by_side(["a", "b", "c"], ["c", "a", "d"])
    assert left == [("a", "", ""), ("b", "gone", "gone"), ("c", "", "")]
    assert right == [("c", "up", "↑2"), ("a", "down", "↓1"), ("d", "new", "new")]
    dataset = tmp_path / "ds"
    (dataset / "qrels").mkdir(parents=True)
    write_jsonl(dataset / "queries.jsonl", [{"_id": "q1", "text": "cats"}, {"_id": "q2", "text": "quantum"}])
    (dataset / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n")
    runs = {"bm25": {"q1": {"d1": 2.0, "d3": 1.0}}, "dense": {"q1": {"d3": 2.0, "d1": 1.0}}}
    runs["bm25"]["q2"] = runs["dense"]["q2"] = {"d2": 1.0}
    report = {"dataset_path": str(dataset), "split": "test", "pipelines": {
        name: {"run_file": str(write_run(run, tmp_path / f"{name}.trec", name)), "metrics": {}} for name, run in runs.items()}}
    (page_home / "reports").mkdir(exist_ok=True)
    (page_home / "reports" / "last.json").write_text(json.dumps(report))
    try:
        login(client, next_="/compare")
        html = client.get("/compare", params={"q": "cats", "a": "bm25", "b": "bm25"}).text
        assert html.count('<li data-doc-id="d1">') == 2 and 'class="tag' not in html.split('id="compare-columns"')[1].split("</div>")[0]
        table = html.split('id="differences"')[1]
        assert table.index(">cats<") < table.index(">quantum<")  # q1 differs (1.0 vs 0.63), q2 does not
        assert "-0.369" in table
    finally:
        (page_home / "reports" / "last.json").unlink()


def test_dashboard_renders_and_serves_only_report_plots(client, page_home):
    login(client, next_="/dashboard")
    html = client.get("/dashboard").text
    for heading in ("Models", "Drift of the served model", "Events per minute", "Latest eval report"):
        assert heading in html
    (page_home / "reports").mkdir(exist_ok=True)
    plot = page_home / "reports" / "run-metrics.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n")
    try:
        assert client.get("/dashboard/plots/run-metrics.png").headers["content-type"] == "image/png"
        for bad in ("..%2Findexes", "..%2F..%2Fetc%2Fpasswd", "nope.png", "run-metrics.txt"):
            assert client.get(f"/dashboard/plots/{bad}").status_code == 404
    finally:
        plot.unlink()


def test_queries_from_the_request_log_and_a_dataset(client, tmp_path):
    for query in ("garden", "cats", "garden", "Garden ", "quantum"):
        client.get("/", params={"q": query})
    login(client, token=JUDGE_TOKEN, name="jo")
    token = csrf_of(client.get("/judge").text)
    added = client.post("/judge/queries", data={"csrf": token, "source": "log", "limit": "2", "pipelines": ["bm25"]},
                        follow_redirects=False)
    assert added.headers["location"] == "/judge?pooled=2"
    rows = re.findall(r'<a href="/judge/q/[^"]+">([^<]+)</a>', client.get("/judge").text)
    assert rows[:2] == ["garden", "cats"]  # most frequent first; case and spaces folded
    dataset = tmp_path / "ds"
    (dataset / "qrels").mkdir(parents=True)
    write_jsonl(dataset / "queries.jsonl", [{"_id": "7", "text": "mice in the garden"}])
    (dataset / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n7\td3\t1\n")
    form = {"csrf": token, "source": "dataset", "dataset": str(dataset), "split": "test", "pipelines": ["bm25"]}
    assert client.post("/judge/queries", data=form).status_code == 403  # a server path: admin only
    login(client, name="root")
    form["csrf"] = csrf_of(client.get("/judge").text)
    assert client.post("/judge/queries", data=form, follow_redirects=False).status_code == 303
    assert 'href="/judge/q/7">mice in the garden<' in client.get("/judge").text  # the dataset's own query id
    missing = client.post("/judge/queries", data={**form, "split": "dev"})
    assert missing.status_code == 400 and "no qrels for split" in missing.text


def test_two_judges_show_their_agreement(client):
    for name, grades in (("ann", ("3", "0")), ("bob", ("3", "1"))):
        login(client, name=name)
        token = csrf_of(client.get("/judge").text)
        client.post("/judge/queries", data={"csrf": token, "source": "text", "queries": "cats", "pipelines": ["bm25"],
                                            "depth": "2"})
        link = re.search(r'href="/judge/q/([^"]+)"', client.get("/judge").text).group(1)
        for grade in grades:
            doc_id = re.search(r'name="doc_id" value="([^"]+)"', client.get(f"/judge/q/{link}").text).group(1)
            client.post(f"/judge/q/{link}", data={"csrf": token, "doc_id": doc_id, "grade": grade})
    table = client.get("/judge").text.split('id="agreement"')[1]
    assert "ann · bob" in table and "<td class=\"num\">2</td>" in table and "0.333" in table and "0.857" in table  # (3,0) vs (3,1): po .5, pe .25


def test_search_page_pages_with_absolute_positions(client):
    first = client.get("/", params={"q": "cats", "size": "2"}).text
    assert "Page 1 of 3" in first and 'rel="prev"' not in first
    next_link = re.search(r'<a rel="next" href="([^"]+)"', first).group(1).replace("&amp;", "&")
    assert next_link == "/?q=cats&size=2&page=2"
    second = client.get(next_link).text
    assert "Page 2 of 3" in second and '<ol class="results" start="3">' in second
    assert re.findall(r'<a class="title"[^>]*data-position="(\d+)"', second) == ["3", "4"]
    first_ids = re.findall(r'data-doc-id="([^"]+)"', first)
    assert not set(first_ids) & set(re.findall(r'data-doc-id="([^"]+)"', second))
    assert client.get("/", params={"q": "cats", "size": "many"}).status_code == 400


def test_session_cookies_hold_across_workers_and_die_with_a_new_token():
    import time as clock

    from search.app.pages.auth import PageAuth, Session

    session = Session("judge", "ann", clock.time() + 60, "sid")
    cookie = PageAuth(ADMIN_TOKEN, JUDGE_TOKEN).cookie(session)
    assert PageAuth(ADMIN_TOKEN, JUDGE_TOKEN).read(cookie) == session  # another worker, same tokens
    assert PageAuth(ADMIN_TOKEN + "x", JUDGE_TOKEN).read(cookie) is None  # a changed token logs everybody out
    assert ADMIN_TOKEN not in cookie and JUDGE_TOKEN not in cookie
    expired = PageAuth(ADMIN_TOKEN, JUDGE_TOKEN).cookie(Session("judge", "ann", clock.time() - 1, "sid"))
    assert PageAuth(ADMIN_TOKEN, JUDGE_TOKEN).read(expired) is None
    assert PageAuth(ADMIN_TOKEN, "short").judge_token is None  # under 16 characters: refused


def test_queries_from_an_uploaded_file(client):
    login(client, name="ann")
    token = csrf_of(client.get("/judge").text)
    form = {"csrf": token, "source": "file", "pipelines": ["bm25"], "depth": "2"}
    beir = b'{"_id": "u1", "text": "wild cats"}\n{"_id": "u2", "text": "cafe culture"}\n'
    added = client.post("/judge/queries", data=form, files={"file": ("q.jsonl", beir)}, follow_redirects=False)
    assert added.headers["location"] == "/judge?pooled=2"
    page = client.get("/judge").text
    assert 'href="/judge/q/u1">wild cats<' in page and 'href="/judge/q/u2">cafe culture<' in page
    plain = client.post("/judge/queries", data=form, files={"file": ("q.txt", b"mint plants\n\nmint plants\n")},
                        follow_redirects=False)
    assert plain.headers["location"] == "/judge?pooled=1"
    broken = client.post("/judge/queries", data=form, files={"file": ("bad.jsonl", b'{"_id": "x", "text": "a"}\n{"_id": 1\n')})
    assert broken.status_code == 400 and "bad.jsonl:2: invalid JSON" in broken.text
    assert client.post("/judge/queries", data=form).status_code == 400  # no file chosen
