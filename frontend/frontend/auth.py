"""Logging in and out, signing up (when open, or by invitation), and one's account: password, sessions, API tokens.

Failed logins slow down the pair (user name, client address) with a doubling wait, and an address that fails
too often (whatever the names) gets 429s for a while: a flood of wrong passwords for a name from one place never
stops that person logging in from another.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from datetime import datetime, timedelta

from flask import Blueprint, abort, g, redirect, render_template, request, url_for
from pydantic import SecretStr
from werkzeug.wrappers import Response

from frontend.notices import notify
from frontend.ratelimit import Backoff, RateLimiter
from frontend.security import Sessions, client_address, current_session_id, current_user, safe_next
from frontend.settings import MIN_PASSWORD_LENGTH, FrontendSettings
from frontend.store import Role, UserStore
from miaas.errors import MiaasError
from miaas.settings import check_secret

log = logging.getLogger(__name__)
MAX_TOKEN_DAYS = 3650


def password_problem(password: str, confirm: str | None = None) -> str | None:
    """Why a new password is not acceptable, or None."""
    if confirm is not None and password != confirm:
        return "The two passwords differ."
    try:
        check_secret(SecretStr(password), "the password", MIN_PASSWORD_LENGTH)
    except ValueError as exc:
        return str(exc).replace("; generate one (e.g. `openssl rand -hex 32`)", "").capitalize() + "."
    return None


def build_auth(store: UserStore, sessions: Sessions, settings: FrontendSettings,
               clock: Callable[[], datetime]) -> Blueprint:
    bp = Blueprint("auth", __name__)
    # (name, address): a doubling wait after a few failures; never a lock of the name itself.
    by_pair = Backoff(settings.login_attempts, settings.login_max_delay_s, settings.login_window_s)
    # One address, whatever the names (a spray of names): looser, a sliding window.
    by_address = RateLimiter(settings.login_address_attempts, settings.login_window_s)

    def keys_of(name: str) -> tuple[str, str]:
        address = client_address()
        return f"{name.strip().lower()[:64]}\n{address}", f"addr:{address}"

    def wait_for(keys: tuple[str, str]) -> float:
        now = clock().timestamp()
        return max(by_pair.retry_after(keys[0], now), by_address.retry_after(keys[1], now))

    def failed(keys: tuple[str, str]) -> float:
        """Count a failure; returns the wait it now imposes."""
        now = clock().timestamp()
        by_pair.failed(keys[0], now)
        by_address.failed(keys[1], now)
        return wait_for(keys)

    @bp.get("/login")
    def login_form() -> str | Response:
        """The login page; a logged-in user goes straight on."""
        next_url = safe_next(request.args.get("next"), "")
        if current_user() is not None:
            return redirect(next_url or url_for("models.models"))
        return render_template("login.html", next_url=next_url, username="", open_signup=settings.open_signup)

    @bp.post("/login")
    def login() -> tuple[str, int, dict[str, str]] | Response:
        """Check the name and password; a fresh session starts on success. Failures are rate-limited."""
        username = request.form.get("username", "").strip()
        password = request.form.get("password", "")
        next_url = safe_next(request.form.get("next"), "")
        keys = keys_of(username)
        wait = wait_for(keys)
        if wait > 0:  # refused before any hash is computed, the right password too
            log.warning("login of %r from %s refused: too many failures", username[:64], client_address())
            notify("error", f"Too many failed logins. Try again in {math.ceil(wait)} seconds.")
            page = render_template("login.html", next_url=next_url, username=username,
                                   open_signup=settings.open_signup)
            return page, 429, {"Retry-After": str(math.ceil(wait))}
        user = store.authenticate(username, password) if username and password else None
        if user is None:
            wait = failed(keys)
            log.info("failed login for %r from %s", username[:64], client_address())
            notify("error", "Wrong username or password." if wait <= 0
                   else f"Wrong username or password. Wait {math.ceil(wait)} seconds before the next try.")
            page = render_template("login.html", next_url=next_url, username=username,
                                   open_signup=settings.open_signup)
            return page, 200, {}
        by_pair.succeeded(keys[0])
        sessions.log_in(user)
        log.info("user %r logged in", user.username)
        return redirect(next_url or url_for("models.models"), 303)

    @bp.post("/logout")
    def logout() -> Response:
        """End the session, for good: a copy of the cookie does not work after."""
        sessions.log_out()
        notify("info", "You are logged out.")
        return redirect(url_for("auth.login_form"), 303)

    def invitation_role(token: str) -> Role | None:
        """The role a sign-up gets: the invitation's, else viewer when sign-up is open; None: no sign-up."""
        if token:
            found = store.invitation(token, clock())
            return found.role if found is not None else None
        return Role.VIEWER if settings.open_signup else None

    @bp.get("/signup")
    def signup_form() -> str:
        """Create an account: with an invitation link, or by anyone when open sign-up is enabled."""
        token = request.args.get("invite", "")[:128]
        role = invitation_role(token)
        if role is None:
            abort(404, "Sign-up is by invitation only. Ask an admin for an invitation link." if not token
                  else "This invitation is not valid any more. Ask an admin for a new one.")
        return render_template("signup.html", invite=token, role=role, username="")

    @bp.post("/signup")
    def signup() -> tuple[str, int] | Response:
        token = request.form.get("invite", "")[:128]
        username = request.form.get("username", "").strip()
        password = request.form.get("password", "")
        role = invitation_role(token)
        if role is None:
            abort(404, "Sign-up is by invitation only. Ask an admin for an invitation link.")
        address = f"signup:{client_address()}"
        if by_address.retry_after(address, clock().timestamp()) > 0:
            notify("error", "Too many sign-ups from this address. Try again later.")
            return render_template("signup.html", invite=token, role=role, username=username), 429
        problem = password_problem(password, request.form.get("confirm", ""))
        if problem is not None:
            notify("error", problem)
            return render_template("signup.html", invite=token, role=role, username=username), 400
        try:
            if token:
                user = store.redeem(token, username, password, clock())
            else:
                user = store.create_user(username, password, Role.VIEWER, clock())
        except MiaasError as exc:
            notify("error", exc.message)
            return render_template("signup.html", invite=token, role=role, username=username), exc.status
        by_address.failed(address, clock().timestamp())  # counts sign-ups per address, like failures
        log.info("user %r signed up as %s (%s)", user.username, user.role.value,
                 "invitation" if token else "open sign-up")
        sessions.log_in(user)
        notify("success", f"Welcome, {user.username}. Your role is {user.role.value}.")
        return redirect(url_for("models.models"), 303)

    def account_page(status: int = 200, new_token: str | None = None) -> tuple[str, int]:
        user = current_user()
        assert user is not None
        return render_template(
            "account.html", sessions=store.sessions_of(user.id, clock()), current_session=g.get("session"),
            tokens=store.tokens(user.id), new_token=new_token, now=clock(), max_token_days=MAX_TOKEN_DAYS,
        ), status

    @bp.get("/account")
    def account() -> tuple[str, int]:
        """One's own account: the password, the sessions, the personal API tokens."""
        return account_page()

    @bp.post("/account/password")
    def change_password() -> tuple[str, int] | Response:
        """Change one's password; every other session of the user ends (this one goes on)."""
        user = current_user()
        assert user is not None
        keys = keys_of(user.username)
        wait = wait_for(keys)
        if wait > 0:
            notify("error", f"Too many wrong passwords. Try again in {math.ceil(wait)} seconds.")
            return account_page(429)
        if store.authenticate(user.username, request.form.get("current", "")) is None:
            failed(keys)
            notify("error", "The current password is wrong.")
            return account_page(400)
        problem = password_problem(request.form.get("password", ""), request.form.get("confirm", ""))
        if problem is not None:
            notify("error", problem)
            return account_page(400)
        ended = store.set_password(user.id, request.form["password"], keep_session=current_session_id())
        log.info("user %r changed their password (%d other sessions ended)", user.username, ended)
        notify("success", "Your password is changed." + (f" {ended} other session(s) ended." if ended else ""))
        return redirect(url_for("auth.account"), 303)

    @bp.post("/account/sessions/end-others")
    def end_other_sessions() -> Response:
        """Log out everywhere else."""
        user = current_user()
        assert user is not None
        ended = store.end_sessions(user.id, keep_session=current_session_id())
        log.info("user %r ended %d other sessions", user.username, ended)
        notify("success", f"{ended} other session(s) ended." if ended else "There was no other session.")
        return redirect(url_for("auth.account"), 303)

    @bp.post("/account/tokens")
    def create_token() -> tuple[str, int]:
        """A personal API token (for /api/v1): shown once, only its sha256 is kept."""
        user = current_user()
        assert user is not None
        days = request.form.get("expires_days", "").strip()
        if days and (not days.isdigit() or not 1 <= int(days) <= MAX_TOKEN_DAYS):
            notify("error", f"The expiry is a number of days from 1 to {MAX_TOKEN_DAYS}, or empty for none.")
            return account_page(400)
        now = clock()
        try:
            token, listed = store.create_token(user.id, request.form.get("name", ""), now,
                                               now + timedelta(days=int(days)) if days else None)
        except MiaasError as exc:
            notify("error", exc.message)
            return account_page(exc.status)
        log.warning("user %r created API token %r (%s)", user.username, listed.name, listed.prefix)
        return account_page(201, token)

    @bp.post("/account/tokens/<int:token_id>/revoke")
    def revoke_token(token_id: int) -> Response:
        """Revoke one of one's own tokens (admins revoke anyone's on the Users page)."""
        user = current_user()
        assert user is not None
        try:
            listed = store.revoke_token(token_id, owner_id=user.id)
        except MiaasError as exc:
            notify("error", exc.message)
        else:
            log.warning("user %r revoked API token %r (%s)", user.username, listed.name, listed.prefix)
            notify("success", f"The token {listed.name} is revoked.")
        return redirect(url_for("auth.account"), 303)

    return bp
