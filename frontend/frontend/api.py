"""The portal's JSON API under /api/v1, for scripts: a personal API token acts for its owner as the pages do.

Authentication (in `app._guard`) is `Authorization: Bearer <token>` only; the session cookie is ignored here, so
there is no CSRF to guard against. Role checks are the pages' own (`require_change_rights`), with the owner's role
at the time of the call. Every call goes through the same `Backends` methods as the pages.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from flask import Blueprint, Request, jsonify, request, url_for
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from werkzeug.wrappers import Response

from frontend.backends import Backends
from frontend.deployments import check_deployment_id
from frontend.models import ALIAS_RE, MODEL_ID_RE, check_id
from frontend.security import current_token, current_user, require_change_rights, username
from miaas.errors import BadRequest
from miaas.schemas import PriorityName

PREFIX = "/api/v1"
MAX_PAGE = 200


def is_api_request(req: Request | None = None) -> bool:
    path = (req or request).path
    return path == PREFIX or path.startswith(f"{PREFIX}/")


def bearer_token() -> str | None:
    """The token of `Authorization: Bearer <token>`, if the request has one."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def api_error(status: int, code: str, message: str, details: Any = None) -> Response:
    """The platform's one error shape: {"error": {"code", "message", "details"}}."""
    response = jsonify({"error": {"code": code, "message": message, "details": details}})
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="miaas-portal"'
    return response


class DeployRequest(BaseModel):
    """What to deploy: a version or an alias of a model, with an optional priority."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_id: str = Field(pattern=MODEL_ID_RE.pattern)
    version: int | None = Field(None, ge=1)
    alias: str | None = Field(None, pattern=ALIAS_RE.pattern)
    priority: PriorityName | None = None

    @model_validator(mode="after")
    def _version_or_alias(self) -> DeployRequest:
        if (self.version is None) == (self.alias is None):
            raise ValueError("give either a version or an alias")
        return self


def _body(model: type[DeployRequest]) -> DeployRequest:
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object (Content-Type: application/json)")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [{"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]}
                    for e in exc.errors(include_url=False, include_input=False)]
        raise BadRequest("invalid request body", details=problems, code="validation_error") from exc


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name, "")
    if raw == "":
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise BadRequest(f"{name} must be a whole number from {low} to {high}", code="validation_error")
    return int(raw)


def build_api(backends: Backends) -> Blueprint:
    bp = Blueprint("api", __name__, url_prefix=PREFIX)

    @bp.get("/whoami")
    def whoami() -> Response:
        """Who the token acts for, with which role (the owner's current one), and the token itself."""
        token = current_token()
        user = current_user()
        assert user is not None  # the guard lets no /api/v1 request through without a token's owner
        return jsonify({
            "username": user.username, "role": user.role.value, "can_change": user.role.can_change,
            "token": None if token is None else {
                "id": token.id, "name": token.name, "prefix": token.prefix,
                "created_at": token.created_at.isoformat(),
                "expires_at": token.expires_at.isoformat() if token.expires_at else None,
            },
        })

    @bp.get("/models")
    def models() -> Response:
        """Models whose name or id contains `q`, by name: `?q=&offset=&limit=` (at most 200)."""
        q = request.args.get("q", "").strip()[:64]
        found = backends.list_models(username(), q, _int_arg("offset", 0, 0, 10**9), _int_arg("limit", 50, 1, MAX_PAGE))
        return jsonify(found.model_dump(mode="json"))

    @bp.get("/models/<model_id>")
    def model(model_id: str) -> Response:
        """One model: its versions and aliases."""
        check_id(model_id)
        detail = backends.get_model(username(), model_id)
        aliases = backends.aliases(username(), detail.model_id)
        return jsonify({**detail.model_dump(mode="json"), "aliases": aliases})

    @bp.post("/models")
    def upload() -> tuple[Response, int, dict[str, str]]:
        """Upload a zip (multipart: `model_name`, `file`), streamed to the model registry like the upload page."""
        user = require_change_rights()
        model_name = request.form.get("model_name", "").strip()
        upload = request.files.get("file")
        if not model_name or upload is None or not upload.filename:
            raise BadRequest("give the model a name (model_name) and a zip file (file)", code="validation_error")
        filename = PurePosixPath(upload.filename.replace("\\", "/")).name or "model.zip"
        try:
            result = backends.upload(user.username, model_name, filename, upload.stream)
        finally:
            upload.close()
        location = url_for("api.model", model_id=result.model.model_id)
        return jsonify(result.model_dump(mode="json")), 201, {"Location": location}

    @bp.post("/deployments")
    def deploy() -> tuple[Response, int, dict[str, str]]:
        """Deploy a version or an alias: `{"model_id", "version" | "alias", "priority"?}`."""
        user = require_change_rights()
        asked = _body(DeployRequest)
        d = backends.deploy(user.username, asked.model_id, asked.version, asked.alias, asked.priority)
        location = url_for("api.deployment", deployment_id=d.deployment_id)
        return jsonify(d.model_dump(mode="json")), 202, {"Location": location}

    @bp.get("/deployments")
    def deployments() -> Response:
        """Every deployment, newest first."""
        items = sorted(backends.list_deployments(username()), key=lambda d: d.created_at, reverse=True)
        return jsonify({"deployments": [d.model_dump(mode="json") for d in items]})

    @bp.get("/deployments/<deployment_id>")
    def deployment(deployment_id: str) -> Response:
        check_deployment_id(deployment_id)
        return jsonify(backends.get_deployment(username(), deployment_id).model_dump(mode="json"))

    @bp.post("/deployments/<deployment_id>/stop")
    def stop(deployment_id: str) -> Response:
        check_deployment_id(deployment_id)
        user = require_change_rights()
        return jsonify(backends.stop(user.username, deployment_id).model_dump(mode="json"))

    @bp.get("/agents")
    def agents() -> Response:
        """Every agent with its capacity, load and state, as the controller sees them."""
        return jsonify({"agents": [a.model_dump(mode="json") for a in backends.list_agents(username())]})

    return bp

