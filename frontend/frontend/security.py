"""Sessions and CSRF: who is logged in, and proof that a form was posted from one of our pages.

A login is a record in the portal's database (`UserStore.start_session`); the browser holds only its random id,
inside the signed session cookie (which also carries the CSRF token and the notices of the next page). Ending
the record ends the login for every copy of the cookie.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from flask import g, request, session

from frontend.store import ApiToken, Role, SessionInfo, User, UserStore
from miaas.errors import BadRequest, Forbidden

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
_CSRF_KEY = "_csrf"
_SESSION_KEY = "sid"
TOUCH_EVERY = timedelta(seconds=60)  # last_seen is written at most this often (the idle timeout is that exact)


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


@dataclass(frozen=True)
class Sessions:
    """Logins as server-side records: start one, find the one a request carries, end it."""

    store: UserStore
    lifetime: timedelta
    idle: timedelta
    clock: Callable[[], datetime]

    def log_in(self, user: User) -> None:
        """Start a fresh session for user: nothing from before the login survives, the CSRF token included (a
        session the cookie carried ends)."""
        previous = current_session_id()
        if previous is not None:
            self.store.end_session(previous)
        session.clear()
        session.permanent = True
        session[_SESSION_KEY] = self.store.start_session(user.id, self.clock(), self.lifetime, self.idle)
        csrf_token()

    def log_out(self) -> None:
        """End this session for good (a copy of the cookie is worth nothing after), and forget the cookie's data."""
        session_id = current_session_id()
        if session_id is not None:
            self.store.end_session(session_id)
        session.clear()

    def find(self, session_id: str) -> tuple[User, SessionInfo] | None:
        """The user of a live session, or None."""
        return self.store.session(session_id, self.clock(), TOUCH_EVERY)

    def load(self) -> User | None:
        """The user of the request's session; a cookie whose session has ended is emptied."""
        session_id = current_session_id()
        found = self.find(session_id) if session_id is not None else None
        if found is None:
            if session_id is not None:
                session.clear()  # the login ended (logout elsewhere, password change, removal, time)
            return None
        g.session = found[1]
        return found[0]


def current_session_id() -> str | None:
    """The id of the request's session (from its cookie), checked by nobody yet."""
    value = session.get(_SESSION_KEY)
    return value if isinstance(value, str) and value else None


def current_user() -> User | None:
    return g.get("user")


def current_token() -> ApiToken | None:
    """The API token a /api/v1 request authenticated with."""
    return g.get("token")


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
