"""Logging in and out."""

from __future__ import annotations

import logging

from flask import Blueprint, redirect, render_template, request, url_for
from werkzeug.wrappers import Response

from frontend.notices import notify
from frontend.security import current_user, log_in, log_out, safe_next
from frontend.store import UserStore

log = logging.getLogger(__name__)


def build_auth(store: UserStore) -> Blueprint:
    bp = Blueprint("auth", __name__)

    @bp.get("/login")
    def login_form() -> str | Response:
        """The login page; a logged-in user goes straight on."""
        next_url = safe_next(request.args.get("next"), "")
        if current_user() is not None:
            return redirect(next_url or url_for("pages.models"))
        return render_template("login.html", next_url=next_url, username="")

    @bp.post("/login")
    def login() -> tuple[str, int] | Response:
        """Check the name and password; a fresh session starts on success."""
        username = request.form.get("username", "").strip()
        password = request.form.get("password", "")
        next_url = safe_next(request.form.get("next"), "")
        user = store.authenticate(username, password) if username and password else None
        if user is None:
            log.info("failed login for %r from %s", username[:64], request.remote_addr)
            notify("error", "Wrong username or password.")
            return render_template("login.html", next_url=next_url, username=username), 200
        log_in(user)
        log.info("user %r logged in", user.username)
        return redirect(next_url or url_for("pages.models"), 303)

    @bp.post("/logout")
    def logout() -> Response:
        """End the session."""
        log_out()
        notify("info", "You are logged out.")
        return redirect(url_for("auth.login_form"), 303)

    return bp
