"""The pages in a real browser: Debian's Chromium, headless, driven by Playwright, against a real
`ltr-search serve` on 127.0.0.1 over a small BM25 + dense index. Screenshots of every page go
to $LTR_SEARCH_SCREENSHOTS (default: TMPDIR/ltr-search-screenshots) as test artefacts.

Without Chromium (or the playwright package) every test here skips, saying what is missing.
`.ci/run` installs Chromium with apt; never `playwright install` (no browser downloads).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from eval.judgments import JudgmentStore, query_id_for
from indexing.home import event_store_path, judgments_path
from search.event_store import EventStore
from tests.conftest import home_sharing_encoder, run_cli, running_service, write_jsonl
from tests.test_pages import ADMIN_TOKEN, JUDGE_TOKEN, PAGE_DOCS

CHROMIUM = os.environ.get("LTR_SEARCH_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is not None and not os.access(CHROMIUM, os.X_OK):
    CHROMIUM = None  # a configured path that is not an executable: skip as without a browser
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
SCREENSHOTS = Path(os.environ.get("LTR_SEARCH_SCREENSHOTS") or Path(tempfile.gettempdir()) / "ltr-search-screenshots")

try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="browser tests need the playwright package (pip install -e '.[dev]')"),
    pytest.mark.skipif(CHROMIUM is None, reason="browser tests need Chromium: apt-get install -y chromium "
                                                "(or set LTR_SEARCH_CHROMIUM to its binary)"),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory, shared_encoder_home):
    """A real service over PAGE_DOCS (bm25, dense, hybrid) with both tokens set."""
    root = tmp_path_factory.mktemp("browser")
    corpus = root / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "corpus.jsonl", PAGE_DOCS)
    home = home_sharing_encoder(root / "home", shared_encoder_home)
    run_cli(home, "index", "build", "--dataset", str(corpus), "--name", "pages", "--quiet")
    env = {"LTR_SEARCH_ADMIN_TOKEN": ADMIN_TOKEN, "LTR_SEARCH_JUDGE_TOKEN": JUDGE_TOKEN}
    with running_service(home, "--name", "pages", "--no-access-log", env=env) as (url, _):
        yield url, home


@pytest.fixture(scope="module")
def browser():
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 860}, accept_downloads=True)
    opened = context.new_page()
    yield opened
    context.close()


def shoot(page: Page, name: str) -> Path:
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def log_in(page: Page, url: str, token: str, name: str, next_: str = "/judge") -> None:
    page.goto(f"{url}/login?next={next_}")
    page.fill("input[name=token]", token)
    page.fill("input[name=name]", name)
    page.click("button[type=submit]")
    page.wait_for_load_state()


def press_and_wait(page: Page, action) -> None:
    """Grade the shown document, then wait until another one (or the end of the pool) shows: a
    next key pressed on the old page would grade the old document again."""
    shown = page.locator("input[name=doc_id]").get_attribute("value")
    action()
    page.locator(f"input[name=doc_id]:not([value='{shown}'])").or_(page.locator("#query-done")).first.wait_for(state="attached")
    # The new document's input can be in the DOM before the page's key handler runs: a key pressed
    # then was lost under full-suite load (the next wait timed out); wait for the page to finish.
    page.wait_for_load_state("load")


def wait_for(condition, timeout: float = 10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def test_search_click_is_stored_with_its_position(served, page):
    url, home = served
    page.goto(f"{url}/?q=cats+garden")
    assert page.title().startswith("cats garden")
    assert page.locator("ol.results li.result").count() >= 4
    assert page.locator("mark").count() > 0
    script_title = page.locator("a[data-doc-id=d4]")
    assert script_title.inner_text() == "<script>alert(1)</script>"  # shown as text: it never ran
    page.locator("details.why summary").first.click()
    shoot(page, "search")
    request_id = page.locator("#summary").get_attribute("data-request-id")
    third = page.locator("ol.results a.title").nth(2)
    doc_id = third.get_attribute("data-doc-id")
    third.click()
    page.wait_for_url(f"**/doc/{doc_id}**")
    shoot(page, "document")
    with EventStore(event_store_path(home, "pages")) as store:
        clicks = wait_for(lambda: [e for e in store.iter_events(types=["click"]) if e.request_id == request_id])
    assert [(c.doc_id, c.position) for c in clicks] == [(doc_id, 3)]


def test_script_title_renders_inert(served, page):
    url, _ = served
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(f"{url}/?q=entanglement+photons")
    page.goto(f"{url}/doc/d4?q=photons")
    assert page.locator("h1").inner_text() == "<script>alert(1)</script>"
    assert dialogs == []


def test_judge_five_documents_export_and_eval(served, page, tmp_path):
    url, home = served
    log_in(page, url, JUDGE_TOKEN, "ann")
    page.fill("textarea[name=queries]", "cats\ngarden mice")
    page.locator("input[name=depth]").fill("3")
    for box in page.locator("input[name=pipelines]").all():
        box.set_checked(box.get_attribute("value") == "bm25")
    page.click("#add-queries button[type=submit]")
    page.wait_for_load_state()
    shoot(page, "judge-workbench")
    page.click("#next-query")
    page.wait_for_load_state()
    shoot(page, "judge-document")
    for grade in ["3", "0", "2"]:  # the first query's pool of 3 (bm25 alone pooled, top 3) ...
        press_and_wait(page, lambda: page.click(f"button[name=grade][value='{grade}']"))
    assert page.locator("#query-done").count() == 1
    page.click("#next-query")  # ... then two documents of the second
    for grade in ["1", "3"]:
        press_and_wait(page, lambda: page.click(f"button[name=grade][value='{grade}']"))
    with page.expect_download() as download:
        page.goto(f"{url}/judge")
        page.click("#export-beir")
    dataset = tmp_path / "judged"
    (dataset / "qrels").mkdir(parents=True)
    download.value.save_as(dataset / "qrels" / "judged.tsv")
    with page.expect_download() as queries:
        page.click("#export-queries")
    queries.value.save_as(dataset / "queries.jsonl")
    assert len((dataset / "qrels" / "judged.tsv").read_text().splitlines()) == 1 + 5
    reports = home / "reports"
    result = run_cli(home, "eval", "--dataset", str(dataset), "--split", "judged", "--pipeline", "bm25,hybrid",
                     "--name", "pages", "--quiet", "--json", str(reports / "judged.json"), "--report", str(reports / "judged.md"))
    assert "judged/judged: 2 queries, 0 skipped" in result.stdout


def test_compare_two_pipelines(served, page):
    url, _ = served
    log_in(page, url, ADMIN_TOKEN, "admin", next_="/compare")
    page.fill("input[name=q]", "cats")
    page.select_option("select[name=a]", "bm25")
    page.select_option("select[name=b]", "dense")
    page.click("form.searchbar button[type=submit]")
    page.wait_for_load_state()
    columns = page.locator("#compare-columns section")
    assert columns.count() == 2
    assert columns.nth(0).locator("h2").inner_text().startswith("bm25")
    assert columns.nth(1).locator("h2").inner_text().startswith("dense")
    assert page.locator("#compare-columns .tag").count() > 0  # dense moves or brings in something
    shoot(page, "compare")


def test_dashboard_renders(served, page):
    url, _ = served
    log_in(page, url, ADMIN_TOKEN, "admin", next_="/dashboard")
    assert page.locator("h1").inner_text().startswith("Dashboard")
    for heading in ("Models", "Drift of the served model", "Events per minute", "Latest eval report"):
        assert page.locator("h2", has_text=heading).count() == 1
    assert page.locator("#events-per-minute span").count() == 60
    shoot(page, "dashboard")


def test_keyboard_only_judging_pass(served, page):
    url, home = served
    query = "quantum entanglement"
    with JudgmentStore(judgments_path(home, "pages")) as store:
        query_id = store.add_query(query, "text")
        store.add_pool(query_id, {"bm25": ["d2", "d4", "d1"], "dense": ["d2", "d8", "d5"]})
        pool = store.pool(query_id)
    assert len(pool) == 5
    assert query_id == query_id_for(query)
    page.goto(f"{url}/login?next=/judge/q/{query_id}")
    # The token field has the focus (autofocus), which Chromium applies after the load event: keys
    # typed before it were lost under full-suite load, the login failed and the page stayed there.
    page.wait_for_function("document.activeElement && document.activeElement.name === 'token'")
    page.keyboard.type(JUDGE_TOKEN)
    page.keyboard.press("Tab")
    page.keyboard.type("kim")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(rf"^{re.escape(url)}/judge/q/{query_id}$"))  # not the login URL's ?next=
    keys = ["2", "3", "s", "0", "1"]
    for key in keys:
        press_and_wait(page, lambda: page.keyboard.press(key))  # each key submits; the next document loads
    assert page.locator("#query-done").count() == 1
    shoot(page, "judge-keyboard-done")
    with JudgmentStore(judgments_path(home, "pages")) as store:
        mine = {j.doc_id: j.grade for j in store.judgments(query_id, "kim")}
    assert mine == dict(zip(pool, [2, 3, None, 0, 1]))
