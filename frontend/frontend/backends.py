"""Calls to the other services (model registry, controller), made on behalf of the logged-in user."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from frontend.upload_stream import MultipartStream, size_of
from miaas.client import ServiceClient
from miaas.discovery import Discovery
from miaas.errors import MiaasError, RemoteError, Unavailable, UpstreamError
from miaas.schemas import AgentList, AgentView, Deployment, DeploymentList, ModelList, ModelSummary, UploadResult

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

MODEL_REGISTRY = "model-registry"
CONTROLLER = "controller"
TITLES = {MODEL_REGISTRY: "model registry", CONTROLLER: "controller"}

Locate = Callable[[str], str]
"""How the portal reaches a service: its name in, the base URL of a live instance out."""


def discover(registry_url: str | None, token: str) -> Locate:
    """The usual `Locate`: ask the service registry (answers are cached for a moment)."""
    if not registry_url:

        def nowhere(name: str) -> str:
            raise Unavailable(f"no service registry is configured (MIAAS_SERVICE_REGISTRY_URL) to find '{name}'")

        return nowhere
    return Discovery(registry_url, token).lookup


class BackendDown(UpstreamError):
    """A service could not be found, could not be reached, failed, or answered nonsense."""

    def __init__(self, service: str, message: str) -> None:
        super().__init__(message, code="backend_unavailable")
        self.service = service


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class VersionRow(_Tolerant):
    """One version as the model page shows it; every field but the number is optional."""

    version: int
    created_at: datetime | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    created_by: str | None = None
    description: str = ""


class ModelDetail(_Tolerant):
    model_id: str
    name: str
    versions: list[VersionRow] = Field(default_factory=list)


@dataclass(frozen=True)
class Backends:
    """Typed calls to the model registry and the controller; errors come back as `MiaasError`s."""

    locate: Locate
    token: str
    timeout_s: float = 10.0
    upload_timeout_s: float = 600.0

    # ------------------------------------------------------------------ model registry

    def list_models(self, user: str) -> list[ModelSummary]:
        body = self._call(MODEL_REGISTRY, user, "GET", "/registry/models")
        return self._parse(MODEL_REGISTRY, ModelList, body).models

    def get_model(self, user: str, model_id: str) -> ModelDetail:
        body = self._call(MODEL_REGISTRY, user, "GET", f"/registry/models/{quote(model_id, safe='')}")
        return self._parse(MODEL_REGISTRY, ModelDetail, _flatten_model(body, model_id))

    def upload(self, user: str, model_name: str, filename: str, stream: IO[bytes]) -> UploadResult:
        """Stream one zip to the registry, which validates it and stores it as a new version."""
        size = size_of(stream)
        body = MultipartStream({"model_name": model_name}, "file", filename, stream, size, "application/zip")
        answer = self._call(
            MODEL_REGISTRY, user, "POST", "/registry/upload-and-validate",
            data=body, headers={"Content-Type": body.content_type},
            timeout=(self.timeout_s, self.upload_timeout_s),
        )
        return self._parse(MODEL_REGISTRY, UploadResult, answer)

    # ------------------------------------------------------------------ controller

    def deploy(self, user: str, model_id: str, version: int) -> Deployment:
        request = {"model_id": model_id, "version": version}
        body = self._call(CONTROLLER, user, "POST", "/controller/deploy", json=request)
        return self._parse(CONTROLLER, Deployment, body)

    def stop(self, user: str, deployment_id: str) -> Deployment:
        body = self._call(CONTROLLER, user, "POST", "/controller/stop", json={"deployment_id": deployment_id})
        return self._parse(CONTROLLER, Deployment, body)

    def list_deployments(self, user: str) -> list[Deployment]:
        body = self._call(CONTROLLER, user, "GET", "/controller/deployments")
        return self._parse(CONTROLLER, DeploymentList, body).deployments

    def list_agents(self, user: str) -> list[AgentView]:
        body = self._call(CONTROLLER, user, "GET", "/controller/agents")
        return self._parse(CONTROLLER, AgentList, body).agents

    # ------------------------------------------------------------------ plumbing

    def _call(self, service: str, user: str, method: str, path: str, **kw: Any) -> Any:
        """One request; a refusal by the service stays a `RemoteError`, anything else becomes `BackendDown`."""
        title = TITLES.get(service, service)
        try:
            client = ServiceClient(self.locate(service), self.token, timeout=self.timeout_s, user=user)
            try:
                return client.request(method, path, **kw)
            finally:
                client.close()
        except RemoteError:
            raise
        except MiaasError as exc:
            log.warning("%s %s on %s failed: %s", method, path, service, exc.message)
            raise BackendDown(service, f"The {title} cannot be reached right now. Try again in a moment.") from exc

    def _parse(self, service: str, model: type[M], body: Any) -> M:
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            log.warning("%s answered a body that is not a %s: %s", service, model.__name__, exc)
            title = TITLES.get(service, service)
            raise BackendDown(service, f"The {title} gave an answer the portal does not understand.") from exc


def _flatten_model(body: Any, model_id: str) -> Any:
    """Accept `{"model": {...}, "versions": [...]}` with each version's description inside its `meta`."""
    if not isinstance(body, dict):
        return body
    inner = body.get("model")
    model: dict[str, Any] = inner if isinstance(inner, dict) else body
    versions = body.get("versions", model.get("versions", []))
    rows = []
    for v in versions if isinstance(versions, list) else []:
        if isinstance(v, dict):
            meta = v["meta"] if isinstance(v.get("meta"), dict) else {}
            rows.append({**v, "description": v.get("description") or meta.get("description") or ""})
        else:  # a bare version number, as ModelSummary lists them
            rows.append({"version": v})
    return {"model_id": model.get("model_id", model_id), "name": model.get("name", model_id), "versions": rows}
