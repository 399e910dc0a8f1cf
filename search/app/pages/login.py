"""The login form (GET/POST /login, POST /logout) and `require_page`, the check every protected
page starts with. Tokens, sessions and CSRF are in pages/auth.py."""
from __future__ import annotations

import hmac
import secrets
import time
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from search.app.pages.auth import (
    JUDGE_NAME, LOGIN_CSRF_COOKIE, SESSION_COOKIE, SESSION_SECONDS, Session, check_csrf, current_session, page_auth,
    safe_next,
)
from search.app.pages.common import render

router = APIRouter(include_in_schema=False)


def require_page(request: Request, page: str) -> Session | Response:
    """The session allowed to open `page`, or the response to send instead: the login form
    (redirect) without a session, 403 with one that may not open it."""
    session = current_session(request)
    if session is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
    if not session.may(page):
        return render(request, "message.html", status=403, title="Not allowed",
                      message=f"The {session.role} token does not open the {page} page; log in with the admin token.")
    return session


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str | None = None, error: str | None = None) -> Response:
    nonce = secrets.token_urlsafe(24)
    response = render(request, "login.html", status=400 if error else 200, title="Log in",
                      next=safe_next(next), error=error, login_csrf=nonce, enabled=page_auth(request).enabled)
    response.set_cookie(LOGIN_CSRF_COOKIE, nonce, httponly=True, samesite="strict", path="/login",
                        secure=request.url.scheme == "https", max_age=3600)
    return response


@router.post("/login")
def login(request: Request, token: str = Form("", max_length=4096), name: str = Form("", max_length=200),
          next: str = Form("/judge", max_length=2048), login_csrf: str = Form("", max_length=200)) -> Response:
    auth = page_auth(request)
    cookie_nonce = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not login_csrf or not hmac.compare_digest(login_csrf, cookie_nonce):
        return login_form(request, next, "The form expired (CSRF check failed); try again.")
    if not auth.enabled:
        return login_form(request, next, "Log-in is disabled: set LTR_SEARCH_ADMIN_TOKEN (or LTR_SEARCH_JUDGE_TOKEN).")
    role = auth.role_of(token)
    if role is None:
        return login_form(request, next, "Unknown token.")
    name = name.strip() or ("admin" if role == "admin" else "")
    if not JUDGE_NAME.fullmatch(name):
        return login_form(request, next, "Your name: 1-64 letters, digits, spaces or _ . @ - (it is stored with your judgments).")
    session = Session(role, name, time.time() + SESSION_SECONDS, secrets.token_urlsafe(16))
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(SESSION_COOKIE, auth.cookie(session), httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https", max_age=SESSION_SECONDS)
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    return response


@router.post("/logout")
def logout(request: Request, csrf: str = Form("", max_length=200)) -> Response:
    session = current_session(request)
    if session is not None:
        check_csrf(request, session, csrf)
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
