"""Fixtures of the portal tests: settings, the portal, and minimal fakes of the model registry and the controller.

The fakes stand in for the HTTP contract of other services and are served over real HTTP; they record what the
portal sent them.
"""

from __future__ import annotations

import re
import secrets
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, jsonify, request
from flask.testing import FlaskClient
from werkzeug.test import TestResponse
from werkzeug.wrappers import Response

from frontend.app import create_app
from frontend.settings import FrontendSettings
from miaas.schemas import (
    AgentCapacity,
    AgentLoad,
    AgentView,
    Deployment,
    DeploymentReport,
    DeploymentStatus,
    ModelSummary,
    ModelVersion,
    PackageMeta,
)
from miaas.serve import Server

ADMIN = "admin"
ADMIN_PASSWORD = "correct horse battery staple"
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def model_version(model_id: str, name: str, version: int, description: str = "") -> ModelVersion:
    return ModelVersion(
        model_id=model_id, name=name, version=version, path=f"/models/{model_id}/v{version}",
        meta=PackageMeta(setup_commands=["pip install -r requirements.txt"], start_commands=["python app.py"],
                         description=description),
        sha256="ab" * 32, size_bytes=2048 * version, created_at=T0, created_by=ADMIN,
    )


def deployment(deployment_id: str, status: DeploymentStatus, **kw: Any) -> Deployment:
    base: dict[str, Any] = {
        "deployment_id": deployment_id, "model_id": "m-iris", "model_name": "iris", "version": 1,
        "status": status, "created_at": T0, "updated_at": T0,
    }
    return Deployment(**{**base, **kw})


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


@dataclass
class Received:
    """One request a fake received."""

    path: str
    user: str | None
    authorization: str | None
    json: Any = None
    form: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    content_length: int | None = None
    chunked: bool = False


def _record() -> Received:
    return Received(
        path=request.path,
        user=request.headers.get("X-MIaaS-User"),
        authorization=request.headers.get("Authorization"),
        json=request.get_json(silent=True),
        form=request.form.to_dict(),
        files={k: (f.filename or "", f.read()) for k, f in request.files.items()},
        content_length=request.content_length,
        chunked="chunked" in request.headers.get("Transfer-Encoding", "").lower(),
    )


@dataclass
class FakeRegistry:
    """The model registry's HTTP contract, kept in memory."""

    versions: dict[str, list[ModelVersion]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    refuse_upload: tuple[int, dict[str, Any]] | None = None

    def add(self, v: ModelVersion) -> None:
        self.versions.setdefault(v.model_id, []).append(v)

    def add_model(self, name: str, versions: int = 1, description: str = "") -> str:
        """Given: a model with some versions; returns its id."""
        model_id = f"m-{name}"
        for n in range(1, versions + 1):
            self.add(model_version(model_id, name, n, f"{description} v{n}".strip()))
        return model_id

    def refuse(self, status: int, code: str, message: str, details: Any = None) -> None:
        """Given: the next uploads are refused with this error."""
        self.refuse_upload = (status, error_body(code, message, details))

    def summary(self, model_id: str) -> ModelSummary:
        vs = self.versions[model_id]
        return ModelSummary(model_id=model_id, name=vs[0].name, latest_version=max(v.version for v in vs),
                            versions=[v.version for v in vs], created_at=vs[0].created_at)

    def app(self) -> Flask:
        app = Flask("fake_model_registry")

        @app.post("/registry/upload-and-validate")
        def upload() -> tuple[Response, int]:
            got = _record()
            self.received.append(got)
            if self.refuse_upload is not None:
                status, body = self.refuse_upload
                return jsonify(body), status
            name = got.form["model_name"]
            model_id = f"m-{name}"
            v = model_version(model_id, name, len(self.versions.get(model_id, [])) + 1)
            self.add(v)
            return jsonify({"model": v.model_dump(mode="json"), "warnings": ["no webapp.py: only the API runs"]}), 201

        @app.get("/registry/models")
        def models() -> Response:
            self.received.append(_record())
            return jsonify({"models": [self.summary(m).model_dump(mode="json") for m in self.versions]})

        @app.get("/registry/models/<model_id>")
        def model(model_id: str) -> tuple[Response, int]:
            self.received.append(_record())
            if model_id not in self.versions:
                return jsonify(error_body("not_found", f"model '{model_id}' does not exist")), 404
            return jsonify({
                "model": self.summary(model_id).model_dump(mode="json"),
                "versions": [v.model_dump(mode="json") for v in self.versions[model_id]],
            }), 200

        return app


@dataclass
class FakeController:
    """The controller's HTTP contract, kept in memory."""

    deployments: list[Deployment] = field(default_factory=list)
    agents: list[AgentView] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)

    def add_deployment(self, deployment_id: str, status: DeploymentStatus, **kw: Any) -> None:
        self.deployments.append(deployment(deployment_id, status, **kw))

    def add_agent(self, agent_id: str, cpu: float, mem: float, deployments: int = 0) -> None:
        self.agents.append(agent_view(agent_id, cpu, mem, deployments))

    def app(self) -> Flask:
        app = Flask("fake_controller")

        @app.post("/controller/deploy")
        def deploy() -> tuple[Response, int]:
            got = _record()
            self.received.append(got)
            d = deployment(f"d{len(self.deployments) + 1}", DeploymentStatus.PENDING,
                           model_id=got.json["model_id"], version=got.json["version"])
            self.deployments.append(d)
            return jsonify(d.model_dump(mode="json")), 202

        @app.post("/controller/stop")
        def stop() -> tuple[Response, int]:
            got = _record()
            self.received.append(got)
            for i, d in enumerate(self.deployments):
                if d.deployment_id == got.json["deployment_id"]:
                    self.deployments[i] = d.model_copy(update={"status": DeploymentStatus.STOPPING})
                    return jsonify(self.deployments[i].model_dump(mode="json")), 200
            return jsonify(error_body("not_found", "no such deployment")), 404

        @app.get("/controller/deployments")
        def deployments() -> Response:
            self.received.append(_record())
            return jsonify({"deployments": [d.model_dump(mode="json") for d in self.deployments]})

        @app.get("/controller/agents")
        def agents() -> Response:
            self.received.append(_record())
            return jsonify({"agents": [a.model_dump(mode="json") for a in self.agents]})

        return app


def agent_view(agent_id: str, cpu: float, mem: float, deployments: int = 0) -> AgentView:
    return AgentView(
        agent_id=agent_id, url=f"http://{agent_id}:9000", state="alive", last_seen=T0, runtimes=["process"],
        capacity=AgentCapacity(cpus=4, memory_mb=8192), load=AgentLoad(cpu_percent=cpu, memory_percent=mem),
        score=0.7 * cpu + 0.3 * mem,
        deployments=[DeploymentReport(deployment_id=f"d{i}", status=DeploymentStatus.RUNNING)
                     for i in range(deployments)],
    )


@pytest.fixture
def registry() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
def controller() -> FakeController:
    return FakeController()


@pytest.fixture
def locate(
    serve: Callable[[Flask], Server], registry: FakeRegistry, controller: FakeController
) -> Callable[[str], str]:
    """Where the portal finds the fakes, as the service registry would answer."""
    urls = {"model-registry": serve(registry.app()).url, "controller": serve(controller.app()).url}
    return urls.__getitem__


@pytest.fixture
def settings(workdir: Path, service_token: str) -> FrontendSettings:
    return FrontendSettings(
        service_token=service_token,
        secret_key=secrets.token_hex(32),
        admin_username=ADMIN,
        admin_password=ADMIN_PASSWORD,
        database_url=f"sqlite:///{workdir / 'frontend.db'}",
        service_registry_url=None,
    )


@pytest.fixture
def make_portal(settings: FrontendSettings) -> Iterator[Callable[..., Flask]]:
    """Build portals (closing their databases afterwards); keyword arguments override settings."""
    apps: list[Flask] = []

    def make(locate: Callable[[str], str] | None = None, **overrides: Any) -> Flask:
        app = create_app(FrontendSettings(**{**dict(settings), **overrides}), locate)
        app.testing = True
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["frontend.store"].close()


@pytest.fixture
def portal(make_portal: Callable[..., Flask], locate: Callable[[str], str]) -> Flask:
    return make_portal(locate)


class Browser:
    """A person's browser on the portal: keeps cookies and fills in the CSRF field of the forms it posts."""

    def __init__(self, client: FlaskClient, admin_password: str) -> None:
        self.client = client
        self.admin_password = admin_password

    def get(self, path: str, **kw: Any) -> TestResponse:
        return self.client.get(path, **kw)

    def csrf(self, page: str = "/login") -> str:
        """The CSRF token in the forms of `page`."""
        found = re.search(r'name="csrf_token" value="([^"]+)"', self.client.get(page).text)
        assert found, f"{page} has no CSRF field"
        return found.group(1)

    def post(self, path: str, data: dict[str, Any] | None = None, *, page: str = "/login", **kw: Any) -> TestResponse:
        """Submit a form found on `page`, with its CSRF token."""
        return self.client.post(path, data={**(data or {}), "csrf_token": self.csrf(page)}, **kw)

    def login(self, username: str = ADMIN, password: str | None = None) -> TestResponse:
        return self.post("/login", {"username": username, "password": password or self.admin_password})


@pytest.fixture
def browser(portal: Flask, settings: FrontendSettings) -> Browser:
    return Browser(portal.test_client(), settings.admin_password.get_secret_value())


@pytest.fixture
def admin(browser: Browser) -> Browser:
    """A browser logged in as the admin from the settings."""
    answer = browser.login()
    assert answer.status_code == 303, answer.text
    return browser


@pytest.fixture
def dead_url() -> str:
    """A URL on which nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
