"""The portal's pages: models, one model with its versions, upload, deployments, agents."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from flask import Blueprint, abort, redirect, render_template, request, url_for
from werkzeug.wrappers import Response

from frontend.backends import Backends, ModelDetail
from frontend.notices import notify, notify_failure
from frontend.security import current_user, require_change_rights
from miaas.errors import MiaasError
from miaas.schemas import AgentView, Deployment, DeploymentStatus, ModelSummary

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEPLOYMENT_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A deployment in one of these states can still be stopped.
STOPPABLE = {
    DeploymentStatus.PENDING, DeploymentStatus.SCHEDULED, DeploymentStatus.PROVISIONING,
    DeploymentStatus.RUNNING, DeploymentStatus.LOST,
}
Page = str | tuple[str, int]


def _username() -> str:
    user = current_user()
    assert user is not None  # every page but /login and /health requires a session
    return user.username


def _check_id(value: str, pattern: re.Pattern[str]) -> str:
    if not pattern.fullmatch(value) or set(value) == {"."}:
        abort(404)
    return value


def build_pages(backends: Backends) -> Blueprint:
    bp = Blueprint("pages", __name__)

    @bp.get("/")
    def home() -> Response:
        return redirect(url_for("pages.models"))

    @bp.get("/models")
    def models() -> Page:
        """Every model with its latest version."""
        items: list[ModelSummary] = []
        status = 200
        try:
            items = sorted(backends.list_models(_username()), key=lambda m: m.name)
        except MiaasError as exc:
            status = notify_failure(exc)
        return render_template("models.html", models=items), status

    @bp.get("/models/<model_id>")
    def model(model_id: str) -> Page:
        """One model and its versions, each with a Deploy button."""
        _check_id(model_id, MODEL_ID_RE)
        detail: ModelDetail | None = None
        status = 200
        try:
            detail = backends.get_model(_username(), model_id)
        except MiaasError as exc:
            status = notify_failure(exc)
        versions = sorted(detail.versions, key=lambda v: v.version, reverse=True) if detail else []
        return render_template("model.html", model_id=model_id, model=detail, versions=versions), status

    @bp.post("/models/<model_id>/deploy")
    def deploy(model_id: str) -> Response:
        """Ask the controller to deploy one version, then watch it on the deployments page."""
        _check_id(model_id, MODEL_ID_RE)
        user = require_change_rights()
        version = request.form.get("version", "")
        if not version.isdigit() or int(version) < 1:
            notify("error", "Choose a version to deploy.")
            return redirect(url_for("pages.model", model_id=model_id), 303)
        try:
            d = backends.deploy(user.username, model_id, int(version))
        except MiaasError as exc:
            notify_failure(exc)
            return redirect(url_for("pages.model", model_id=model_id), 303)
        notify("success", f"Deploying {d.model_name} version {d.version} (deployment {d.deployment_id}).")
        return redirect(url_for("pages.deployments"), 303)

    @bp.get("/upload")
    def upload_form() -> str:
        """The upload form: a model name and a zip."""
        return render_template("upload.html", model_name=request.args.get("model_name", ""))

    @bp.post("/upload")
    def upload() -> Page | Response:
        """Pass the zip on to the model registry, which validates it and stores a new version."""
        user = require_change_rights()
        model_name = request.form.get("model_name", "").strip()
        upload = request.files.get("file")
        if not model_name or upload is None or not upload.filename:
            notify("error", "Give the model a name and choose a zip file.")
            return render_template("upload.html", model_name=model_name), 400
        filename = PurePosixPath(upload.filename.replace("\\", "/")).name or "model.zip"
        try:
            result = backends.upload(user.username, model_name, filename, upload.stream)
        except MiaasError as exc:
            status = notify_failure(exc)
            return render_template("upload.html", model_name=model_name), status
        finally:
            upload.close()
        m = result.model
        notify("success", f"Uploaded {m.name} version {m.version}.", result.warnings)
        return redirect(url_for("pages.model", model_id=m.model_id), 303)

    @bp.get("/deployments")
    def deployments() -> Page:
        """Every deployment with its state and URL; the page refreshes itself."""
        items: list[Deployment] = []
        status = 200
        try:
            items = sorted(backends.list_deployments(_username()), key=lambda d: d.created_at, reverse=True)
        except MiaasError as exc:
            status = notify_failure(exc)
        return render_template("deployments.html", deployments=items, stoppable=STOPPABLE), status

    @bp.post("/deployments/<deployment_id>/stop")
    def stop(deployment_id: str) -> Response:
        """Ask the controller to stop one deployment."""
        _check_id(deployment_id, DEPLOYMENT_ID_RE)
        user = require_change_rights()
        try:
            d = backends.stop(user.username, deployment_id)
            notify("success", f"Stopping deployment {d.deployment_id} of {d.model_name} version {d.version}.")
        except MiaasError as exc:
            notify_failure(exc)
        return redirect(url_for("pages.deployments"), 303)

    @bp.get("/agents")
    def agents() -> Page:
        """Every agent with its state and load."""
        items: list[AgentView] = []
        status = 200
        try:
            items = sorted(backends.list_agents(_username()), key=lambda a: a.agent_id)
        except MiaasError as exc:
            status = notify_failure(exc)
        return render_template("agents.html", agents=items), status

    return bp
