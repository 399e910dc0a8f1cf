"""Server-rendered pages of the query service (Jinja2 templates and a little local JS/CSS,
served from this package, never from a CDN): the search page (/), the judging workbench
(/judge), the compare page (/compare) and the dashboard (/dashboard), behind a token login
for all but the search page. `install` adds them to an app."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles


def install(app: FastAPI) -> None:
    """Mount the static files and include the page routers; the login's tokens come from the
    service config (admin) and $LTR_SEARCH_JUDGE_TOKEN (judge). The page modules are imported
    here, not at package import: the search router imports `pages.highlight`, and the search page
    imports the search router, so importing them with the package would make a cycle."""
    from search.app.pages import auth, compare, dashboard, judge, login, search_page
    from search.app.pages.common import STATIC_DIR, STATIC_URL

    config = app.state.serving.config
    app.state.page_auth = auth.PageAuth.from_environment(config.admin_token, config.trusted_origins)
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="pages-static")
    for router in (search_page.router, login.router, judge.router, compare.router, dashboard.router):
        app.include_router(router)
