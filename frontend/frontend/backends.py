"""Calls to the other services (model registry, controller, agents), made on behalf of the logged-in user.

Every call is signed by the portal's own credential (`miaas.identity`) and names the person it acts for in
`X-MIaaS-User`, which the services accept from the portal's identity only. A service that refuses the portal's
credential (revoked, expired, not of this cluster) or its role is not "down": the page says the portal itself was
refused, so an operator knows to issue it a new credential.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any, TypeVar
from urllib.parse import quote

import requests
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from frontend.upload_stream import MultipartStream, size_of
from miaas.client import ServiceClient, _remote_error
from miaas.discovery import Discovery
from miaas.errors import MiaasError, RemoteError, Unavailable, UpstreamError
from miaas.identity import REFUSAL_REASONS, STALE, CredentialSource
from miaas.schemas import (
    AgentList,
    AgentView,
    Deployment,
    DeploymentList,
    ModelSummary,
    PriorityName,
    UploadResult,
    VersionFiles,
)
from miaas.web import USER_HEADER

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

MODEL_REGISTRY = "model-registry"
CONTROLLER = "controller"
AGENT = "agent"
TITLES = {MODEL_REGISTRY: "model registry", CONTROLLER: "controller", AGENT: "agent"}
AGENT_URLS_TTL_S = 10.0
SAFE_METHODS = ("GET", "HEAD")  # sent again on another instance after a broken connection
MAX_FILE_BYTES = 2 << 20  # the viewer shows at most this much of one file

Locate = Callable[[str], str]
"""How the portal reaches a service: its name in, the base URL of a live instance out. A `Discovered` one also
retries a call on another instance (after a controller takeover)."""


class Discovered:
    """The `Locate` of the service registry: `discovery.lookup`, and `call` (`Discovery.call`), which forgets an
    instance that does not answer or is a standby and tries once more on another."""

    def __init__(self, discovery: Discovery) -> None:
        self.discovery = discovery

    def __call__(self, name: str) -> str:
        return self.discovery.lookup(name)

    def call(self, name: str, fn: Callable[[str], T], *, resend: bool = True) -> T:
        return self.discovery.call(name, fn, resend=resend)


def discover(registry_url: str | None, credential: CredentialSource) -> Locate:
    """The usual `Locate`: ask the service registry, as the portal (answers are cached for a moment)."""
    if not registry_url:

        def nowhere(name: str) -> str:
            raise Unavailable(f"no service registry is configured (MIAAS_SERVICE_REGISTRY_URL) to find '{name}'")

        return nowhere
    return Discovered(Discovery(registry_url, credential))


class BackendDown(UpstreamError):
    """A service could not be found, could not be reached, failed, or answered nonsense."""

    def __init__(self, service: str, message: str) -> None:
        super().__init__(message, code="backend_unavailable")
        self.service = service


class PortalRefused(BackendDown):
    """A service refused the portal itself: its credential (401: revoked, expired, not of this cluster, a clock
    too far off) or its role (403). Nothing a person can fix by trying again."""

    def __init__(self, service: str, message: str, reason: str) -> None:
        super().__init__(service, message)
        self.code = "portal_refused"
        self.reason = reason


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


class ModelPage(_Tolerant):
    """One page of the model list: the models on it and how many match in all."""

    models: list[ModelSummary]
    total: int
    offset: int
    limit: int


@dataclass(frozen=True)
class FileContent:
    """One file of a version: its text when it is text (and not too large to show)."""

    path: str
    size_bytes: int
    text: str | None
    truncated: bool = False


@dataclass
class Backends:
    """Typed calls to the model registry, the controller and agents; errors come back as `MiaasError`s.

    Connections are kept alive per thread and per service URL; each request is signed with the portal's current
    `credential` (read again when its file changes) and names the person it is made for.
    """

    locate: Locate
    credential: CredentialSource
    timeout_s: float = 10.0
    upload_timeout_s: float = 600.0
    agents_fresh_s: float = 2.0
    agents_stale_s: float = 30.0
    _local: threading.local = field(default_factory=threading.local, repr=False)
    _agent_urls: tuple[float, dict[str, str]] = field(default=(0.0, {}), repr=False)
    _agents: tuple[float, list[dict[str, Any]]] | None = field(default=None, repr=False)
    _agents_refreshing: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ------------------------------------------------------------------ model registry

    def list_models(self, user: str, q: str = "", offset: int = 0, limit: int = 50) -> ModelPage:
        """One page of the models whose name or id contains `q`, by name."""
        params = {"q": q, "offset": offset, "limit": limit}
        body = self._call(MODEL_REGISTRY, user, "GET", "/registry/models", params=params)
        if isinstance(body, dict) and "total" not in body:  # a registry that does not page: page here
            body = _page_locally(body, q, offset, limit)
        return self._parse(MODEL_REGISTRY, ModelPage, {"offset": offset, "limit": limit, **body})

    def get_model(self, user: str, model_id: str) -> ModelDetail:
        body = self._call(MODEL_REGISTRY, user, "GET", f"/registry/models/{_seg(model_id)}")
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

    def list_files(self, user: str, model_id: str, version: int) -> VersionFiles:
        body = self._call(MODEL_REGISTRY, user, "GET", f"/registry/models/{_seg(model_id)}/versions/{version}/files")
        return self._parse(MODEL_REGISTRY, VersionFiles, body)

    def read_file(self, user: str, model_id: str, version: int, path: str) -> FileContent:
        """One file's bytes, as text when the registry says it is text."""
        url = f"/registry/models/{_seg(model_id)}/versions/{version}/files/{quote(path, safe='/')}"
        resp = self._raw(MODEL_REGISTRY, user, "GET", url, stream=True)
        try:
            data = resp.raw.read(MAX_FILE_BYTES + 1, decode_content=True)
            size = int(resp.headers.get("Content-Length") or len(data))
            is_text = resp.headers.get("Content-Type", "").startswith("text/")
        finally:
            resp.close()
        truncated = len(data) > MAX_FILE_BYTES
        text = data[:MAX_FILE_BYTES].decode("utf-8", "replace") if is_text else None
        return FileContent(path, size, text, truncated)

    def edit(self, user: str, model_id: str, version: int, files: dict[str, str]) -> UploadResult:
        """A new version: this one with some text files replaced, validated by the registry like an upload."""
        body = self._call(MODEL_REGISTRY, user, "POST", f"/registry/models/{_seg(model_id)}/versions/{version}/edit",
                          json={"files": files}, timeout=(self.timeout_s, self.upload_timeout_s))
        return self._parse(MODEL_REGISTRY, UploadResult, body)

    def aliases(self, user: str, model_id: str) -> dict[str, int]:
        body = self._call(MODEL_REGISTRY, user, "GET", f"/registry/models/{_seg(model_id)}/aliases")
        return self._parse(MODEL_REGISTRY, _Aliases, {"aliases": body}).aliases

    def set_alias(self, user: str, model_id: str, alias: str, version: int) -> dict[str, int]:
        body = self._call(MODEL_REGISTRY, user, "PUT", f"/registry/models/{_seg(model_id)}/aliases/{_seg(alias)}",
                          json={"version": version})
        return self._parse(MODEL_REGISTRY, _Aliases, {"aliases": body}).aliases

    def delete_alias(self, user: str, model_id: str, alias: str) -> None:
        self._call(MODEL_REGISTRY, user, "DELETE", f"/registry/models/{_seg(model_id)}/aliases/{_seg(alias)}")

    def delete_version(self, user: str, model_id: str, version: int) -> None:
        self._call(MODEL_REGISTRY, user, "DELETE", f"/registry/models/{_seg(model_id)}/versions/{version}")

    # ------------------------------------------------------------------ controller

    def deploy(self, user: str, model_id: str, version: int | None = None, alias: str | None = None,
               priority: PriorityName | None = None) -> Deployment:
        request: dict[str, Any] = {"model_id": model_id}
        if alias:
            request["alias"] = alias
        else:
            request["version"] = version
        if priority is not None:
            request["priority"] = priority
        body = self._call(CONTROLLER, user, "POST", "/controller/deploy", json=request)
        return self._parse(CONTROLLER, Deployment, body)

    def stop(self, user: str, deployment_id: str) -> Deployment:
        body = self._call(CONTROLLER, user, "POST", "/controller/stop", json={"deployment_id": deployment_id})
        return self._parse(CONTROLLER, Deployment, body)

    def list_deployments(self, user: str, **filters: Any) -> list[Deployment]:
        params = {k: v for k, v in filters.items() if v is not None}
        body = self._call(CONTROLLER, user, "GET", "/controller/deployments", params=params or None)
        return self._parse(CONTROLLER, DeploymentList, body).deployments

    def get_deployment(self, user: str, deployment_id: str) -> Deployment:
        body = self._call(CONTROLLER, user, "GET", f"/controller/deployments/{_seg(deployment_id)}")
        return self._parse(CONTROLLER, Deployment, body)

    def list_agents(self, user: str) -> list[AgentView]:
        return self.to_views(self.agents_raw(user))

    def agents_raw(self, user: str) -> list[dict[str, Any]]:
        """Every agent as the controller's JSON, checked only for an id and a state: a page of 1,000 agents sorts
        and filters these and validates just the rows it shows (`to_views`).

        The list is shared by every page for `agents_fresh_s`; older than that (up to `agents_stale_s`) it is
        served as it is while one background call fetches the next, so no page waits on the controller's answer
        for every agent (agents report every few seconds anyway).
        """
        cached = self._agents
        if cached is not None:
            age = time.monotonic() - cached[0]
            if age < self.agents_fresh_s:
                return cached[1]
            if age < self.agents_stale_s:
                self._refresh_agents(user)
                return cached[1]
        return self._fetch_agents(user)

    def _refresh_agents(self, user: str) -> None:
        if not self._agents_refreshing.acquire(blocking=False):
            return  # one refresh at a time

        def refresh() -> None:
            try:
                self._fetch_agents(user)
            except MiaasError as exc:
                log.warning("refreshing the agent list failed: %s", exc.message)
            finally:
                self._agents_refreshing.release()

        threading.Thread(target=refresh, name="refresh-agents", daemon=True).start()

    def _fetch_agents(self, user: str) -> list[dict[str, Any]]:
        body = self._call(CONTROLLER, user, "GET", "/controller/agents")
        agents = body.get("agents") if isinstance(body, dict) else None
        if not isinstance(agents, list) or not all(
            isinstance(a, dict) and isinstance(a.get("agent_id"), str) and isinstance(a.get("state"), str)
            and isinstance(a.get("url"), str) for a in agents
        ):
            log.warning("controller answered an agent list the portal cannot read")
            raise BackendDown(CONTROLLER, "The controller gave an answer the portal does not understand.")
        now = time.monotonic()
        self._agent_urls = (now, {a["agent_id"]: a["url"] for a in agents})
        self._agents = (now, agents)
        return agents

    def to_views(self, agents: list[dict[str, Any]]) -> list[AgentView]:
        return self._parse(CONTROLLER, AgentList, {"agents": agents}).agents

    # ------------------------------------------------------------------ agents

    def logs(self, user: str, agent_id: str, deployment_id: str, tail: int = 200) -> str:
        """The last lines of a deployment's log, from the agent that runs it."""
        base = self._agent_url(user, agent_id)
        resp = self._raw(AGENT, user, "GET", f"/deployments/{_seg(deployment_id)}/logs", base=base,
                         params={"tail": tail})
        try:
            return resp.text
        finally:
            resp.close()

    def _agent_url(self, user: str, agent_id: str) -> str:
        # The agent's URL comes from the controller's view (its metrics), as the controller itself reaches it.
        at, urls = self._agent_urls
        if agent_id not in urls or time.monotonic() - at > AGENT_URLS_TTL_S:
            self._fetch_agents(user)
            urls = self._agent_urls[1]
        if agent_id not in urls:
            raise BackendDown(AGENT, f"Agent {agent_id} is not known to the controller right now.")
        return urls[agent_id]

    # ------------------------------------------------------------------ plumbing

    def _client(self, base: str) -> ServiceClient:
        clients: dict[str, ServiceClient] | None = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        client = clients.get(base)
        if client is None:
            # One client per URL for every person: the person is a header of each request (`_send`), so the
            # connection is kept alive across users.
            client = clients[base] = ServiceClient(base, self.credential, timeout=self.timeout_s)
        return client

    def _call(self, service: str, user: str, method: str, path: str, **kw: Any) -> Any:
        """One request answered with JSON; a refusal by the service stays a `RemoteError`, a refusal of the portal
        is `PortalRefused`, anything else becomes `BackendDown`."""
        resp = self._send(service, user, method, path, **kw)
        try:
            if not resp.content:
                return None
            return resp.json()
        except requests.RequestException as exc:  # the connection broke while the body was read
            log.warning("%s %s on %s failed while reading the answer: %s", method, path, service, exc)
            raise self._down(service) from exc
        except ValueError as exc:
            log.warning("%s %s on %s answered a body that is not JSON", method, path, service)
            title = TITLES.get(service, service)
            raise BackendDown(service, f"The {title} gave an answer the portal does not understand.") from exc
        finally:
            resp.close()

    def _raw(self, service: str, user: str, method: str, path: str, *, base: str | None = None,
             **kw: Any) -> requests.Response:
        """A request whose body is not JSON (files, logs); errors as in `_call`. The caller closes the answer."""
        return self._send(service, user, method, path, base=base, **kw)

    def _send(self, service: str, user: str, method: str, path: str, *, base: str | None = None,
              headers: dict[str, str] | None = None, timeout: Any = None, **kw: Any) -> requests.Response:
        """Send one signed request for `user`; an answer of 400 or more raises (see `_call`)."""
        try:
            self.credential()  # a credential file the portal cannot read is its own problem, said as such
        except (OSError, ValueError) as exc:
            log.error("the portal cannot read its credential: %s", exc)
            raise PortalRefused(service, "The portal cannot read its own credential (FRONTEND_CREDENTIAL_FILE), so "
                                "it cannot call the other services. An operator must fix the portal's credential.",
                                "credential_unreadable") from exc

        def send(url: str) -> requests.Response:
            return self._send_to(url, service, user, method, path, headers=headers, timeout=timeout, **kw)

        if base is not None:
            return send(base)
        try:
            if isinstance(self.locate, Discovered):
                # Once more on another instance when this one does not answer or is a standby (a takeover); a
                # request whose body may have reached it is not sent twice (a deploy, an upload's stream).
                return self.locate.call(service, send, resend=method in SAFE_METHODS)
            url = self.locate(service)
        except (BackendDown, RemoteError):  # the service's own answer (or its absence), said by `_send_to`
            raise
        except MiaasError as exc:  # the service registry could not be asked, or lists no instance
            log.warning("%s %s on %s failed: %s", method, path, service, exc.message)
            raise self._down(service) from exc
        return send(url)

    def _send_to(self, url: str, service: str, user: str, method: str, path: str, *,
                 headers: dict[str, str] | None, timeout: Any, **kw: Any) -> requests.Response:
        try:
            client = self._client(url)
            resp = client.session.request(method, f"{client.base_url}{path}", timeout=timeout or self.timeout_s,
                                          headers={USER_HEADER: user, **(headers or {})}, **kw)
        except requests.RequestException as exc:
            log.warning("%s %s on %s failed: %s", method, path, service, exc)
            raise self._down(service) from exc
        if resp.status_code >= 400:
            if resp.status_code in (401, 403):
                refused = self._refused(service, resp, method, path)
                resp.close()
                raise refused
            error = _remote_error(resp, f"{method} {path}")
            resp.close()
            if isinstance(error, RemoteError):
                raise error
            log.warning("%s %s on %s failed: %s", method, path, service, error)
            raise self._down(service) from error
        return resp

    def _refused(self, service: str, resp: requests.Response, method: str, path: str) -> PortalRefused:
        """The service refused the portal's request (401) or its role (403): an operator's problem, said so."""
        code, reason = _refusal_of(resp)
        log.error("%s refused the portal's %s %s (%s %s): %s", service, method, path, resp.status_code,
                  reason or code, resp.text[:300])
        title = TITLES.get(service, service)
        if resp.status_code == 403:
            message = (f"The {title} does not let the portal do this ({code or 'forbidden'}). "
                       "An operator must check the portal's certificate and role.")
        elif reason == STALE:
            message = (f"The {title} refused the portal's request as stale: the clocks of the portal and the "
                       f"{title} differ by more than a minute. An operator must set them right.")
        else:
            message = (f"The {title} refused the portal's credential ({reason or code or 'unauthenticated'}). The "
                       "portal cannot act for anyone there until an operator issues it a new credential.")
        return PortalRefused(service, message, reason or code or "refused")

    def _down(self, service: str) -> BackendDown:
        title = TITLES.get(service, service)
        return BackendDown(service, f"The {title} cannot be reached right now. Try again in a moment.")

    def _parse(self, service: str, model: type[M], body: Any) -> M:
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            log.warning("%s answered a body that is not a %s: %s", service, model.__name__, exc)
            title = TITLES.get(service, service)
            raise BackendDown(service, f"The {title} gave an answer the portal does not understand.") from exc


class _Aliases(_Tolerant):
    aliases: dict[str, int]


def _refusal_of(resp: requests.Response) -> tuple[str | None, str | None]:
    """The error code of a refusal and, for a refused signature, its reason (one of REFUSAL_REASONS)."""
    try:
        error = resp.json()["error"]
        code, details = str(error["code"]), error.get("details")
    except (ValueError, KeyError, TypeError):
        return None, None
    reason = details.get("reason") if isinstance(details, dict) else None
    return code, reason if reason in REFUSAL_REASONS else None


def _seg(value: str) -> str:
    """One URL path segment."""
    return quote(value, safe="")


def _page_locally(body: dict[str, Any], q: str, offset: int, limit: int) -> dict[str, Any]:
    models = body.get("models")
    if not isinstance(models, list):
        return body
    needle = q.lower()
    found = [m for m in models if isinstance(m, dict)
             and (needle in str(m.get("name", "")).lower() or needle in str(m.get("model_id", "")).lower())]
    return {"models": found[offset:offset + limit], "total": len(found)}


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
