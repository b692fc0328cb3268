"""User management, for admins: roles, passwords, removal, invitations, everyone's API tokens."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from flask import Blueprint, redirect, render_template, request, url_for
from werkzeug.wrappers import Response

from frontend.auth import password_problem
from frontend.notices import notify, notify_failure
from frontend.security import current_session_id, require_admin
from frontend.settings import FrontendSettings
from frontend.store import Role, UserStore
from miaas.errors import MiaasError, NotFound

log = logging.getLogger(__name__)


def build_users(store: UserStore, settings: FrontendSettings, clock: Callable[[], datetime]) -> Blueprint:
    bp = Blueprint("users", __name__)

    def page(status: int = 200, invitation_url: str | None = None, invited_role: Role | None = None
             ) -> tuple[str, int]:
        return render_template(
            "users.html", users=store.users(), invitations=store.invitations(clock()), roles=list(Role),
            invitation_url=invitation_url, invited_role=invited_role, open_signup=settings.open_signup,
            tokens=store.tokens(), now=clock(),
        ), status

    @bp.get("/users")
    def users() -> tuple[str, int]:
        """Every user with their role; invitations still open."""
        require_admin()
        return page()

    @bp.post("/users/<int:user_id>/role")
    def set_role(user_id: int) -> Response | tuple[str, int]:
        admin = require_admin()
        try:
            role = Role(request.form.get("role", ""))
        except ValueError:
            notify("error", "Choose a role: admin, developer or viewer.")
            return page(400)
        try:
            user = store.set_role(user_id, role)
        except MiaasError as exc:
            return page(notify_failure(exc))
        log.warning("admin %r set the role of %r to %s", admin.username, user.username, role.value)
        notify("success", f"{user.username} is now {role.value}.")
        return _back()

    @bp.post("/users/<int:user_id>/password")
    def set_password(user_id: int) -> Response | tuple[str, int]:
        """Set someone's password (they forgot it, or it leaked): every session of theirs ends."""
        admin = require_admin()
        problem = password_problem(request.form.get("password", ""))
        if problem is not None:
            notify("error", problem)
            return page(400)
        try:
            target = store.get(user_id)
            if target is None:
                raise NotFound("no such user")
            keep = current_session_id() if target.id == admin.id else None  # one's own: this session goes on
            ended = store.set_password(user_id, request.form["password"], keep_session=keep)
        except MiaasError as exc:
            return page(notify_failure(exc))
        log.warning("admin %r set the password of %r (%d sessions ended)", admin.username, target.username, ended)
        notify("success", f"The password of {target.username} is set; {ended} session(s) of theirs ended.")
        return _back()

    @bp.post("/users/<int:user_id>/delete")
    def delete(user_id: int) -> Response | tuple[str, int]:
        """Remove a user: their sessions and API tokens go with them."""
        admin = require_admin()
        try:
            user = store.delete_user(user_id)
        except MiaasError as exc:
            return page(notify_failure(exc))
        log.warning("admin %r removed user %r", admin.username, user.username)
        notify("success", f"{user.username} is removed.")
        return _back()

    @bp.post("/users/tokens/<int:token_id>/revoke")
    def revoke_token(token_id: int) -> Response | tuple[str, int]:
        """Revoke anyone's personal API token."""
        admin = require_admin()
        try:
            listed = store.revoke_token(token_id, owner_id=None)
        except MiaasError as exc:
            return page(notify_failure(exc))
        log.warning("admin %r revoked API token %r (%s) of %r", admin.username, listed.name, listed.prefix,
                    listed.username)
        notify("success", f"The token {listed.name} of {listed.username} is revoked.")
        return _back()

    @bp.post("/users/invitations")
    def invite() -> tuple[str, int]:
        """A one-time link that creates an account with the chosen role; shown once, only its hash is kept."""
        admin = require_admin()
        try:
            role = Role(request.form.get("role", ""))
        except ValueError:
            notify("error", "Choose the role the invited person gets.")
            return page(400)
        token, invitation = store.create_invitation(role, admin.username, clock(), settings.invitation_hours)
        log.warning("admin %r created an invitation for a %s", admin.username, role.value)
        path = url_for("auth.signup_form", invite=token)
        link = settings.public_url.rstrip("/") + path if settings.public_url else request.host_url.rstrip("/") + path
        return page(201, link, invitation.role)

    @bp.post("/users/invitations/<int:invitation_id>/revoke")
    def revoke(invitation_id: int) -> Response:
        admin = require_admin()
        store.revoke_invitation(invitation_id)
        log.warning("admin %r revoked invitation %d", admin.username, invitation_id)
        notify("success", "The invitation is revoked.")
        return _back()

    return bp


def _back() -> Response:
    return redirect(url_for("users.users"), 303)
