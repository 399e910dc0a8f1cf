"""Who may open the workbench pages: a login form takes the admin token ($LTR_SEARCH_ADMIN_TOKEN,
every page) or the judge token ($LTR_SEARCH_JUDGE_TOKEN, the judging workbench only) and sets a
signed, HttpOnly, SameSite=Strict session cookie. Every form that changes something carries a
CSRF token derived from the session (and the login form a double-submit cookie), checked on POST.

The signing key is derived from the tokens (HMAC-SHA256 under a fixed label), so every worker
of `serve --workers N` accepts the cookies the others set, and changing a token logs everybody
out; no secret is ever written to disk, and a cookie never carries a token.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass

from fastapi import Request

from search.app.errors import ApiError

logger = logging.getLogger("ltr_search.service")

JUDGE_TOKEN_ENV_VAR = "LTR_SEARCH_JUDGE_TOKEN"
SESSION_COOKIE = "ltr_session"
LOGIN_CSRF_COOKIE = "ltr_login_csrf"
SESSION_SECONDS = 12 * 3600
MIN_TOKEN_CHARS = 16  # as the admin token (search/app/config.py)
JUDGE_NAME = re.compile(r"[A-Za-z0-9 _.@-]{1,64}")
ROLES = {"admin": ("judge", "compare", "dashboard"), "judge": ("judge",)}  # role -> pages it opens


@dataclass(frozen=True)
class Session:
    role: str  # "admin" or "judge"
    name: str  # the judge's name, stored with every judgment
    expires: float
    sid: str  # random per login: the CSRF token is derived from it

    def may(self, page: str) -> bool:
        return page in ROLES.get(self.role, ())


class PageAuth:
    """The tokens and the signing key of one app (on `app.state.page_auth`)."""

    def __init__(self, admin_token: str | None, judge_token: str | None = None, trusted_origins: tuple[str, ...] = ()):
        self.admin_token = admin_token
        self.trusted_origins = frozenset(trusted_origins)  # normalised (search.app.config.parse_origin)
        if judge_token is not None and len(judge_token) < MIN_TOKEN_CHARS:
            logger.error("$%s is shorter than %d characters: the judge token is disabled", JUDGE_TOKEN_ENV_VAR, MIN_TOKEN_CHARS)
            judge_token = None
        self.judge_token = judge_token
        secret = f"{admin_token or ''}\n{judge_token or ''}".encode()
        self.key = hmac.new(secret, b"ltr-search pages session key v1", hashlib.sha256).digest() if self.enabled \
            else secrets.token_bytes(32)  # no token: nobody logs in, the key only has to exist

    @classmethod
    def from_environment(cls, admin_token: str | None, trusted_origins: tuple[str, ...] = ()) -> "PageAuth":
        return cls(admin_token, os.environ.get(JUDGE_TOKEN_ENV_VAR) or None, trusted_origins)

    @property
    def enabled(self) -> bool:
        return bool(self.admin_token or self.judge_token)

    def role_of(self, token: str) -> str | None:
        given = token.strip().encode()
        for role, expected in (("admin", self.admin_token), ("judge", self.judge_token)):
            if expected and hmac.compare_digest(given, expected.encode()):
                return role
        return None

    def sign(self, payload: bytes) -> str:
        return base64.urlsafe_b64encode(hmac.new(self.key, payload, hashlib.sha256).digest()).decode().rstrip("=")

    def cookie(self, session: Session) -> str:
        payload = base64.urlsafe_b64encode(json.dumps(
            {"r": session.role, "n": session.name, "e": session.expires, "s": session.sid}).encode()).decode()
        return f"{payload}.{self.sign(payload.encode())}"

    def read(self, value: str | None) -> Session | None:
        """The session of a cookie, None when absent, forged, malformed or expired."""
        if not value or "." not in value or len(value) > 4096:
            return None
        payload, signature = value.rsplit(".", 1)
        if not hmac.compare_digest(signature, self.sign(payload.encode())):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(payload.encode()))
            session = Session(str(data["r"]), str(data["n"]), float(data["e"]), str(data["s"]))
        except (ValueError, KeyError, TypeError):
            return None
        return session if session.expires > time.time() and session.role in ROLES else None

    def csrf(self, session: Session) -> str:
        return self.sign(f"csrf:{session.sid}".encode())


def page_auth(request: Request) -> PageAuth:
    return request.app.state.page_auth


def current_session(request: Request) -> Session | None:
    return page_auth(request).read(request.cookies.get(SESSION_COOKIE))


def csrf_token(request: Request, session: Session | None) -> str:
    return page_auth(request).csrf(session) if session is not None else ""


def check_csrf(request: Request, session: Session, token: str | None) -> None:
    """Refuse a state-changing request whose CSRF token is missing or not this session's, and
    one sent from another origin: not the Host it was served under, nor a configured
    `trusted_origins` entry (the public address behind a proxy that rewrites Host)."""
    origin = request.headers.get("origin")
    if origin and origin != "null" and origin.split("://", 1)[-1] != request.headers.get("host", "") \
            and origin.rstrip("/").lower() not in page_auth(request).trusted_origins:
        raise ApiError(403, "csrf", f"cross-origin request from {origin[:100]} refused")
    if not token or not hmac.compare_digest(token, page_auth(request).csrf(session)):
        raise ApiError(403, "csrf", "missing or invalid CSRF token: reload the page and try again")


def safe_next(target: str | None) -> str:
    """Only a path on this site (no scheme, no host, no //): no open redirect after login."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/judge"
    return target


