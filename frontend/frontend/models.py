"""Models: the searchable, paged list; one model with its versions and aliases; upload; deploy."""

from __future__ import annotations

import math
import re
from pathlib import PurePosixPath
from typing import Any

from flask import Blueprint, abort, jsonify, redirect, render_template, request, url_for
from werkzeug.wrappers import Response

from frontend.backends import Backends, ModelDetail, ModelPage
from frontend.notices import detail_lines, notify, notify_failure
from frontend.security import require_change_rights, username
from miaas.errors import MiaasError
from miaas.schemas import PRIORITIES, PriorityName

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ALIAS_RE = re.compile(r"^[a-z][a-z0-9._-]{0,31}$")
PAGE_SIZE = 50
MAX_QUERY = 64
Page = str | tuple[str, int]


def check_id(value: str, pattern: re.Pattern[str] = MODEL_ID_RE) -> str:
    if not pattern.fullmatch(value) or set(value) == {"."}:
        abort(404)
    return value


def wants_json() -> bool:
    """The upload script asks for JSON; a plain form post gets pages."""
    return request.accept_mimetypes.best == "application/json"


def by_file(details: Any) -> list[tuple[str, list[str]]]:
    """An error's details grouped by the file (or field) they concern, in the order they came."""
    grouped: dict[str, list[str]] = {}
    for where, what in detail_lines(details):
        grouped.setdefault(where, []).append(what)
    return list(grouped.items())


def read_priority() -> PriorityName | None:
    """The priority chosen in a deploy form (low, normal, high, critical); None: the controller's default."""
    raw = request.form.get("priority", "").strip().lower()
    return next((p for p in PRIORITIES if p == raw), None)


def build_models(backends: Backends) -> Blueprint:
    bp = Blueprint("models", __name__)

    @bp.get("/")
    def home() -> Response:
        return redirect(url_for("models.models"))

    @bp.get("/models")
    def models() -> Page:
        """Models whose name or id contains `q`, a page at a time, by name."""
        q = request.args.get("q", "").strip()[:MAX_QUERY]
        number = request.args.get("page", "1")
        page_no = int(number) if number.isdigit() and 0 < int(number) < 1_000_000 else 1
        found: ModelPage | None = None
        status = 200
        try:
            found = backends.list_models(username(), q, (page_no - 1) * PAGE_SIZE, PAGE_SIZE)
        except MiaasError as exc:
            status = notify_failure(exc)
        pages = max(1, math.ceil(found.total / PAGE_SIZE)) if found else 1
        return render_template("models.html", found=found, models=found.models if found else [], q=q,
                               page=page_no, pages=pages, page_size=PAGE_SIZE), status

    @bp.get("/models/<model_id>")
    def model(model_id: str) -> Page:
        """One model: its versions (files, edit, deploy, delete) and its aliases."""
        check_id(model_id)
        detail: ModelDetail | None = None
        aliases: dict[str, int] = {}
        status = 200
        try:
            detail = backends.get_model(username(), model_id)
            aliases = backends.aliases(username(), detail.model_id)
        except MiaasError as exc:
            status = notify_failure(exc)
        versions = sorted(detail.versions, key=lambda v: v.version, reverse=True) if detail else []
        aliased: dict[int, list[str]] = {}
        for alias, number in sorted(aliases.items()):
            aliased.setdefault(number, []).append(alias)
        return render_template("model.html", model_id=model_id, model=detail, versions=versions, aliases=aliases,
                               aliased=aliased, priorities=PRIORITIES), status

    @bp.post("/models/<model_id>/deploy")
    def deploy(model_id: str) -> Response:
        """Ask the controller to deploy a version (or an alias), then watch it live on its page."""
        check_id(model_id)
        user = require_change_rights()
        version = request.form.get("version", "").strip()
        alias = request.form.get("alias", "").strip()
        back = redirect(url_for("models.model", model_id=model_id), 303)
        if alias and not ALIAS_RE.fullmatch(alias):
            notify("error", "That is not an alias of this model.")
            return back
        if not alias and (not version.isdigit() or int(version) < 1):
            notify("error", "Choose a version to deploy.")
            return back
        try:
            d = backends.deploy(user.username, model_id, int(version) if not alias else None, alias or None,
                                read_priority())
        except MiaasError as exc:
            notify_failure(exc)
            return back
        notify("success", f"Deploying {d.model_name} version {d.version} (deployment {d.deployment_id}).")
        return redirect(url_for("deployments.deployment", deployment_id=d.deployment_id), 303)

    @bp.post("/models/<model_id>/aliases")
    def set_alias(model_id: str) -> Response:
        """Create or move an alias (such as `production`) to a version."""
        check_id(model_id)
        user = require_change_rights()
        alias = request.form.get("alias", "").strip().lower()
        version = request.form.get("version", "")
        if not ALIAS_RE.fullmatch(alias) or not version.isdigit():
            notify("error", "An alias is a lower-case name such as production (letters, digits, . _ -), "
                            "and needs a version.")
        else:
            try:
                backends.set_alias(user.username, model_id, alias, int(version))
                notify("success", f"{alias} now points at version {version}.")
            except MiaasError as exc:
                notify_failure(exc)
        return redirect(url_for("models.model", model_id=model_id), 303)

    @bp.post("/models/<model_id>/aliases/<alias>/delete")
    def delete_alias(model_id: str, alias: str) -> Response:
        check_id(model_id)
        check_id(alias, ALIAS_RE)
        user = require_change_rights()
        try:
            backends.delete_alias(user.username, model_id, alias)
            notify("success", f"Alias {alias} is removed.")
        except MiaasError as exc:
            notify_failure(exc)
        return redirect(url_for("models.model", model_id=model_id), 303)

    @bp.post("/models/<model_id>/versions/<int:version>/delete")
    def delete_version(model_id: str, version: int) -> Response:
        """Delete a version for good (the registry refuses while an alias or a deployment uses it)."""
        check_id(model_id)
        user = require_change_rights()
        try:
            backends.delete_version(user.username, model_id, version)
            notify("success", f"Version {version} is deleted.")
        except MiaasError as exc:
            notify_failure(exc)
        return redirect(url_for("models.model", model_id=model_id), 303)

    @bp.get("/upload")
    def upload_form() -> str:
        """The upload form: a model name and a zip."""
        return render_template("upload.html", model_name=request.args.get("model_name", "")[:MAX_QUERY],
                               problems=[])

    @bp.post("/upload")
    def upload() -> Page | Response | tuple[Response, int]:
        """Pass the zip on to the model registry, which validates it and stores a new version.

        The upload script (progress bar) asks for JSON and shows the answer itself; a plain form gets pages.
        """
        user = require_change_rights()
        model_name = request.form.get("model_name", "").strip()
        upload = request.files.get("file")
        if not model_name or upload is None or not upload.filename:
            return _refused(model_name, "Give the model a name and choose a zip file.", None, 400)
        filename = PurePosixPath(upload.filename.replace("\\", "/")).name or "model.zip"
        try:
            result = backends.upload(user.username, model_name, filename, upload.stream)
        except MiaasError as exc:
            status = exc.status if 400 <= exc.status < 600 else 502
            return _refused(model_name, exc.message, exc.details, status)
        finally:
            upload.close()
        m = result.model
        notify("success", f"Uploaded {m.name} version {m.version}.", result.warnings)
        location = url_for("models.model", model_id=m.model_id)
        if wants_json():
            return jsonify({"ok": True, "location": location, "model_id": m.model_id, "version": m.version}), 201
        return redirect(location, 303)

    return bp


def _refused(model_name: str, message: str, details: Any, status: int) -> tuple[str, int] | tuple[Response, int]:
    problems = by_file(details)
    if wants_json():
        return jsonify({"ok": False, "message": message,
                        "problems": [{"file": f, "messages": m} for f, m in problems]}), status
    notify("error", message)
    return render_template("upload.html", model_name=model_name, problems=problems), status
