"""Sessions and CSRF: who is logged in, and proof that a form was posted from one of our pages."""

from __future__ import annotations

import hmac
import secrets

from flask import g, request, session

from frontend.store import Role, User
from miaas.errors import BadRequest, Forbidden

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
_CSRF_KEY = "_csrf"
_USER_KEY = "user_id"


class CsrfError(BadRequest):
    code = "csrf_failed"

    def __init__(self) -> None:
        super().__init__("CSRF token missing or invalid")


def csrf_token() -> str:
    """This session's CSRF token, created on first use; every POST form carries it."""
    token = session.get(_CSRF_KEY)
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        session[_CSRF_KEY] = token
    return token


def check_csrf() -> None:
    """Refuse a POST whose form (or header) does not carry this session's token."""
    expected = session.get(_CSRF_KEY)
    given = request.form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
    if not isinstance(expected, str) or not expected or not given:
        raise CsrfError()
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise CsrfError()


def log_in(user: User) -> None:
    """Start a fresh session for user: nothing from before the login survives, the CSRF token included."""
    session.clear()
    session.permanent = True
    session[_USER_KEY] = user.id
    csrf_token()


def log_out() -> None:
    session.clear()


def session_user_id() -> int | None:
    value = session.get(_USER_KEY)
    return value if isinstance(value, int) else None


def current_user() -> User | None:
    return g.get("user")


def safe_next(target: str | None, default: str) -> str:
    """Where to go after login: only a path on this site, never another host."""
    if not target or not target.startswith("/") or "\\" in target:
        return default
    # Browsers drop tabs and newlines from URLs, so "/\t/evil.example" would become "//evil.example".
    cleaned = "".join(c for c in target if c.isprintable() and not c.isspace())
    return default if cleaned != target or target.startswith("//") else target


def require_change_rights() -> User:
    """The logged-in user, if their role may change things (upload, edit, deploy, stop); 403 otherwise."""
    user = current_user()
    if user is None or not user.role.can_change:
        raise Forbidden("your role may look but not change anything; ask an admin")
    return user


def require_admin() -> User:
    """The logged-in user, if an admin (who manages users); 403 otherwise."""
    user = current_user()
    if user is None or user.role is not Role.ADMIN:
        raise Forbidden("only an admin may manage users")
    return user


def client_address() -> str:
    """The address the request came from (the proxy's, behind a reverse proxy)."""
    return request.remote_addr or "unknown"


def username() -> str:
    """The logged-in user's name (every page but the public ones requires a session)."""
    user = current_user()
    assert user is not None
    return user.username
