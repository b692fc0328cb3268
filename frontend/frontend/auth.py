"""Logging in and out, signing up (when open, or by invitation), and changing one's password."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from datetime import datetime

from flask import Blueprint, abort, redirect, render_template, request, url_for
from pydantic import SecretStr
from werkzeug.wrappers import Response

from frontend.notices import notify
from frontend.ratelimit import RateLimiter
from frontend.security import client_address, current_user, log_in, log_out, safe_next
from frontend.settings import MIN_PASSWORD_LENGTH, FrontendSettings
from frontend.store import Role, UserStore
from miaas.errors import MiaasError
from miaas.settings import check_secret

log = logging.getLogger(__name__)
ADDRESS_FACTOR = 4  # one address may fail this many times more than one name: a shared office NAT


def password_problem(password: str, confirm: str | None = None) -> str | None:
    """Why a new password is not acceptable, or None."""
    if confirm is not None and password != confirm:
        return "The two passwords differ."
    try:
        check_secret(SecretStr(password), "the password", MIN_PASSWORD_LENGTH)
    except ValueError as exc:
        return str(exc).replace("; generate one (e.g. `openssl rand -hex 32`)", "").capitalize() + "."
    return None


def build_auth(store: UserStore, settings: FrontendSettings, clock: Callable[[], datetime]) -> Blueprint:
    bp = Blueprint("auth", __name__)
    by_name = RateLimiter(settings.login_attempts, settings.login_window_s)
    by_address = RateLimiter(settings.login_attempts * ADDRESS_FACTOR, settings.login_window_s)

    def too_many(keys: tuple[str, str]) -> float:
        now = clock().timestamp()
        return max(by_name.retry_after(keys[0], now), by_address.retry_after(keys[1], now))

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
        keys = (f"name:{username.lower()[:64]}", f"addr:{client_address()}")
        wait = too_many(keys)
        if wait > 0:
            log.warning("login of %r from %s refused: too many failures", username[:64], client_address())
            notify("error", f"Too many failed logins. Try again in {math.ceil(wait)} seconds.")
            page = render_template("login.html", next_url=next_url, username=username,
                                   open_signup=settings.open_signup)
            return page, 429, {"Retry-After": str(math.ceil(wait))}
        user = store.authenticate(username, password) if username and password else None
        if user is None:
            now = clock().timestamp()
            by_name.failed(keys[0], now)
            by_address.failed(keys[1], now)
            log.info("failed login for %r from %s", username[:64], client_address())
            notify("error", "Wrong username or password.")
            page = render_template("login.html", next_url=next_url, username=username,
                                   open_signup=settings.open_signup)
            return page, 200, {}
        by_name.succeeded(keys[0])
        log_in(user)
        log.info("user %r logged in", user.username)
        return redirect(next_url or url_for("models.models"), 303)

    @bp.post("/logout")
    def logout() -> Response:
        """End the session."""
        log_out()
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
        log_in(user)
        notify("success", f"Welcome, {user.username}. Your role is {user.role.value}.")
        return redirect(url_for("models.models"), 303)

    @bp.get("/account")
    def account() -> str:
        """One's own account: change the password."""
        return render_template("account.html")

    @bp.post("/account/password")
    def change_password() -> tuple[str, int] | Response:
        user = current_user()
        assert user is not None
        current = request.form.get("current", "")
        if store.authenticate(user.username, current) is None:
            notify("error", "The current password is wrong.")
            return render_template("account.html"), 400
        problem = password_problem(request.form.get("password", ""), request.form.get("confirm", ""))
        if problem is not None:
            notify("error", problem)
            return render_template("account.html"), 400
        store.set_password(user.id, request.form["password"])
        log.info("user %r changed their password", user.username)
        notify("success", "Your password is changed.")
        return redirect(url_for("auth.account"), 303)

    return bp
