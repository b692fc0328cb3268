"""Fixtures of the portal tests: settings, the portal, and minimal fakes of the model registry and the controller.

The fakes stand in for the HTTP contract of other services and are served over real HTTP; like the real ones they
check each request's signature against the test CA (`pki`), and they record what the portal sent them and who
signed it.

The portal's database is a SQLite file; the tests of the modules in `ON_BOTH_DATABASES` (those about what the store
keeps: accounts, sessions, tokens, hashes) run twice, on SQLite and on a fresh schema of the session's PostgreSQL
database.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, g, jsonify, request
from flask.testing import FlaskClient
from werkzeug.test import TestResponse
from werkzeug.wrappers import Response

from frontend.app import close_app, create_app
from frontend.settings import FrontendSettings
from miaas.identity import Certificate, Verifier, load_ca_public
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
from miaas.testing import Pki, postgres_schema
from miaas.web import ServiceAuth, install_errors

ADMIN = "admin"
PACKAGE_FILES = {
    "meta.json": b'{"setup_commands": ["pip install -r requirements.txt"], "start_commands": ["python app.py"]}\n',
    "app.py": b"import os\n\nprint('serving on', os.environ.get('PORT'))\n",
    "requirements.txt": b"flask>=3.0\n",
    "model.pth": b"\x00\x01binary weights",
    "data/labels.txt": b"setosa\nversicolor\nvirginica\n",
}
ADMIN_PASSWORD = "correct horse battery staple"
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
TEST_SCRYPT_N = 2**10
ON_BOTH_DATABASES = frozenset({"test_frontend_users", "test_frontend_api", "test_frontend_security",
                               "test_frontend_migrations"})
"""Test modules whose every test using the portal's database runs on SQLite and on PostgreSQL."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "database_url" in metafunc.fixturenames and metafunc.module.__name__.rpartition(".")[2] in ON_BOTH_DATABASES:
        metafunc.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)


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
    signer: Certificate | None
    json: Any = None
    form: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    content_length: int | None = None
    chunked: bool = False


def _record() -> Received:
    return Received(
        path=request.path,
        user=request.headers.get("X-MIaaS-User"),
        signer=g.get("identity"),
        json=request.get_json(silent=True),
        form=request.form.to_dict(),
        files={k: (f.filename or "", f.read()) for k, f in request.files.items()},
        content_length=request.content_length,
        chunked="chunked" in request.headers.get("Transfer-Encoding", "").lower(),
    )


def checking_signatures(app: Flask, auth: ServiceAuth | None, streamed: tuple[str, ...] = ()) -> Flask:
    """Refuse, as every service does, a request that is not signed by an identity of the cluster (401); the
    signer's certificate is recorded. Paths ending in `streamed` may sign their body as UNSIGNED-PAYLOAD."""
    if auth is None:
        return app
    install_errors(app)

    @app.before_request
    def _authenticate() -> None:
        g.identity = auth.authenticate(streamed=request.path.endswith(streamed))

    return app


def service_auth(pki: Pki) -> ServiceAuth:
    """How a service checks its callers, with the test CA and its own revocations (`auth.verifier.revoked`)."""
    return ServiceAuth(Verifier(load_ca_public(pki.ca_file)))


@dataclass
class FakeRegistry:
    """The model registry's HTTP contract, kept in memory."""

    versions: dict[str, list[ModelVersion]] = field(default_factory=dict)
    files: dict[tuple[str, int], dict[str, bytes]] = field(default_factory=dict)
    aliases: dict[str, dict[str, int]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    refuse_upload: tuple[int, dict[str, Any]] | None = None
    pages: bool = True  # answers ?q=&offset=&limit= with a total; False: the old contract, every model
    auth: ServiceAuth | None = None  # checks the signature of every request

    def add(self, v: ModelVersion, files: dict[str, bytes] | None = None) -> None:
        self.versions.setdefault(v.model_id, []).append(v)
        self.files[(v.model_id, v.version)] = dict(files or PACKAGE_FILES)

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
        app = checking_signatures(Flask("fake_model_registry"), self.auth, streamed=("/upload-and-validate",))

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
            every = sorted((self.summary(m) for m in self.versions), key=lambda m: m.name)
            if not self.pages:
                return jsonify({"models": [m.model_dump(mode="json") for m in every]})
            q = request.args.get("q", "").lower()
            offset, limit = int(request.args.get("offset", 0)), int(request.args.get("limit", 1000))
            found = [m for m in every if q in m.name.lower() or q in m.model_id.lower()]
            return jsonify({"models": [m.model_dump(mode="json") for m in found[offset:offset + limit]],
                            "total": len(found)})

        def version_of(model_id: str, version: int) -> ModelVersion | None:
            return next((v for v in self.versions.get(model_id, []) if v.version == version), None)

        @app.get("/registry/models/<model_id>/aliases")
        def aliases(model_id: str) -> Response:
            self.received.append(_record())
            return jsonify(self.aliases.get(model_id, {}))

        @app.put("/registry/models/<model_id>/aliases/<alias>")
        def set_alias(model_id: str, alias: str) -> tuple[Response, int]:
            got = _record()
            self.received.append(got)
            if version_of(model_id, got.json["version"]) is None:
                return jsonify(error_body("not_found", f"model '{model_id}' has no version {got.json['version']}")), 404
            self.aliases.setdefault(model_id, {})[alias] = got.json["version"]
            return jsonify(self.aliases[model_id]), 200

        @app.delete("/registry/models/<model_id>/aliases/<alias>")
        def delete_alias(model_id: str, alias: str) -> tuple[str, int]:
            self.received.append(_record())
            self.aliases.get(model_id, {}).pop(alias, None)
            return "", 204

        @app.delete("/registry/models/<model_id>/versions/<int:version>")
        def delete_version(model_id: str, version: int) -> tuple[Response | str, int]:
            self.received.append(_record())
            if version in self.aliases.get(model_id, {}).values():
                return jsonify(error_body("version_aliased", f"version {version} has aliases")), 409
            self.versions[model_id] = [v for v in self.versions[model_id] if v.version != version]
            return "", 204

        @app.get("/registry/models/<model_id>/versions/<int:version>/files")
        def files(model_id: str, version: int) -> tuple[Response, int]:
            self.received.append(_record())
            found = self.files.get((model_id, version))
            if found is None:
                return jsonify(error_body("not_found", f"model '{model_id}' has no version {version}")), 404
            listed = [{"path": p, "sha256": hashlib.sha256(b).hexdigest(), "size_bytes": len(b)}
                      for p, b in sorted(found.items())]
            return jsonify({"model_id": model_id, "version": version, "files": listed}), 200

        @app.get("/registry/models/<model_id>/versions/<int:version>/files/<path:path>")
        def file(model_id: str, version: int, path: str) -> Response:
            self.received.append(_record())
            data = self.files.get((model_id, version), {}).get(path)
            if data is None:
                return Response(json.dumps(error_body("not_found", f"no file {path!r}")), 404,
                                mimetype="application/json")
            text = b"\x00" not in data[:8192]
            return Response(data, mimetype="text/plain" if text else "application/octet-stream")

        @app.post("/registry/models/<model_id>/versions/<int:version>/edit")
        def edit(model_id: str, version: int) -> tuple[Response, int]:
            got = _record()
            self.received.append(got)
            base = version_of(model_id, version)
            if base is None:
                return jsonify(error_body("not_found", f"model '{model_id}' has no version {version}")), 404
            edits: dict[str, str] = got.json["files"]
            problems = []
            if "app.py" in edits:
                try:
                    compile(edits["app.py"], "app.py", "exec")
                except SyntaxError as exc:
                    problems.append({"file": "app.py", "message": f"does not compile: {exc.msg} (line {exc.lineno})"})
            if problems:
                return jsonify(error_body("invalid_package", "the package is not valid", problems)), 400
            new = model_version(model_id, base.name, max(v.version for v in self.versions[model_id]) + 1)
            self.add(new, {**self.files[(model_id, version)], **{p: t.encode() for p, t in edits.items()}})
            return jsonify({"model": new.model_dump(mode="json"), "warnings": []}), 201

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
    auth: ServiceAuth | None = None

    def add_deployment(self, deployment_id: str, status: DeploymentStatus, **kw: Any) -> None:
        self.deployments.append(deployment(deployment_id, status, **kw))

    def add_agent(self, agent_id: str, cpu: float, mem: float, deployments: int = 0, **kw: Any) -> None:
        self.agents.append(agent_view(agent_id, cpu, mem, deployments, **kw))

    def app(self) -> Flask:
        app = checking_signatures(Flask("fake_controller"), self.auth)

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

        @app.get("/controller/deployments/<deployment_id>")
        def one(deployment_id: str) -> tuple[Response, int]:
            self.received.append(_record())
            for d in self.deployments:
                if d.deployment_id == deployment_id:
                    return jsonify(d.model_dump(mode="json")), 200
            return jsonify(error_body("not_found", f"no deployment {deployment_id}")), 404

        @app.get("/controller/agents")
        def agents() -> Response:
            self.received.append(_record())
            return jsonify({"agents": [a.model_dump(mode="json") for a in self.agents]})

        return app


@dataclass
class FakeAgent:
    """The agent's logs route, kept in memory."""

    logs: dict[str, list[str]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    auth: ServiceAuth | None = None

    def app(self) -> Flask:
        app = checking_signatures(Flask("fake_agent"), self.auth)

        @app.get("/deployments/<deployment_id>/logs")
        def logs(deployment_id: str) -> Response:
            self.received.append(_record())
            if deployment_id not in self.logs:
                return Response(json.dumps(error_body("not_found", "no such deployment")), 404,
                                mimetype="application/json")
            tail = int(request.args.get("tail", 100))
            return Response("".join(f"{line}\n" for line in self.logs[deployment_id][-tail:]), mimetype="text/plain")

        return app


def agent_view(agent_id: str, cpu: float, mem: float, deployments: int = 0, url: str | None = None,
               state: str = "alive") -> AgentView:
    return AgentView(
        agent_id=agent_id, url=url or f"http://{agent_id}:9000", state=state, last_seen=T0, runtimes=["process"],
        capacity=AgentCapacity(cpus=4, memory_mb=8192), load=AgentLoad(cpu_percent=cpu, memory_percent=mem),
        score=0.7 * cpu + 0.3 * mem,
        deployments=[DeploymentReport(deployment_id=f"d{i}", status=DeploymentStatus.RUNNING)
                     for i in range(deployments)],
    )


@pytest.fixture
def registry(pki: Pki) -> FakeRegistry:
    return FakeRegistry(auth=service_auth(pki))


@pytest.fixture
def controller(pki: Pki) -> FakeController:
    return FakeController(auth=service_auth(pki))


@pytest.fixture
def agent(serve: Callable[[Flask], Server], pki: Pki) -> tuple[FakeAgent, str]:
    """A fake agent served over HTTP, and its URL."""
    fake = FakeAgent(auth=service_auth(pki))
    return fake, serve(fake.app()).url


@pytest.fixture
def locate(
    serve: Callable[[Flask], Server], registry: FakeRegistry, controller: FakeController
) -> Callable[[str], str]:
    """Where the portal finds the fakes, as the service registry would answer."""
    urls = {"model-registry": serve(registry.app()).url, "controller": serve(controller.app()).url}
    return urls.__getitem__


@pytest.fixture
def database_url(request: pytest.FixtureRequest, workdir: Path) -> Iterator[str]:
    """A fresh, empty database for the portal: a SQLite file, or (where the test is parametrized so) a new schema,
    first on the search path, of the session's PostgreSQL database."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield f"sqlite:///{workdir / 'frontend.db'}"
        return
    with postgres_schema(request.getfixturevalue("postgres_url"), "portal") as url:
        yield url


@pytest.fixture
def settings(pki: Pki, database_url: str) -> FrontendSettings:
    return FrontendSettings(
        **pki.settings("frontend"),
        secret_key=secrets.token_hex(32),
        admin_username=ADMIN,
        admin_password=ADMIN_PASSWORD,
        database_url=database_url,
        service_registry_url=None,
        consume_bus=False,
        # Cheap hashes keep the suite fast; test_frontend_security.py checks the real cost (N=2^17) once.
        password_scrypt_n=TEST_SCRYPT_N,
        weak_password_hashes_for_tests=True,
    )


@pytest.fixture
def make_portal(settings: FrontendSettings) -> Iterator[Callable[..., Flask]]:
    """Build portals (closing their databases afterwards); keyword arguments override settings."""
    apps: list[Flask] = []

    def make(locate: Callable[[str], str] | None = None, clock: Callable[[], datetime] | None = None,
             **overrides: Any) -> Flask:
        extra: dict[str, Any] = {"clock": clock} if clock else {}
        app = create_app(FrontendSettings(**{**dict(settings), **overrides}), locate, **extra)
        app.testing = True
        apps.append(app)
        return app

    yield make
    for app in apps:
        close_app(app)


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
