"""Fixtures of the agent's tests: tiny model folders, a local model source, a shared venv cache, agent apps."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from agent_kit import REQUIREMENTS, TINY_APP  # noqa: F401 - re-exported for the tests
from flask import Flask

from agent.app import create_app, parts
from agent.fetch import ModelSource
from agent.runtimes.venvs import VenvCache
from agent.settings import AgentSettings
from miaas.bus import EventBus, MemoryBus
from miaas.client import Signer
from miaas.errors import NotFound
from miaas.identity import AGENT, CONTROLLER, CredentialSource, fixed
from miaas.schemas import PackageMeta
from miaas.testing import Pki, SigningClient
from miaas.testing import wait_for as poll

T = TypeVar("T")


def build_model(
    root: Path,
    *,
    setup: list[str] | None = None,
    start: list[str] | None = None,
    health_path: str | None = "/health",
    ports: dict[str, int] | None = None,
    requirements: str = REQUIREMENTS,
    resources: dict[str, Any] | None = None,
) -> Path:
    """A model version folder as the model registry stores it: meta.json, app.py, requirements.txt."""
    root.mkdir(parents=True)
    meta: dict[str, Any] = {
        "setup_commands": setup or ["echo setting up in $(pwd)", "python -c 'import sys; print(sys.prefix)'"],
        "start_commands": start or ["python app.py"],
        "description": "tiny test model",
        "ports": ports or {},
    }
    if health_path is not None:
        meta["health_path"] = health_path
    if resources is not None:
        meta["resources"] = resources
    (root / "meta.json").write_text(json.dumps(meta))
    (root / "app.py").write_text(TINY_APP)
    (root / "requirements.txt").write_text(requirements)
    (root / "model.pth").write_bytes(b"not really weights")
    return root


class LocalModels:
    """The agent's "fetch model" step pointed at folders a test built (the store as the agent would see it)."""

    def __init__(self) -> None:
        self.versions: dict[tuple[str, int], tuple[Path, str | None]] = {}

    def add(self, model_id: str, version: int, folder: Path, manifest_sha256: str | None = None) -> None:
        self.versions[(model_id, version)] = (folder, manifest_sha256)

    def __call__(self, model_id: str, version: int) -> ModelSource:
        found = self.versions.get((model_id, version))
        if found is None:
            raise NotFound(f"model {model_id} v{version} not found")
        folder, manifest_sha256 = found
        meta = PackageMeta.model_validate_json((folder / "meta.json").read_text())
        return ModelSource(folder, meta, manifest_sha256)


def write_manifest(folder: Path) -> str:
    """MANIFEST.json as the model registry writes it; returns its sha256."""
    files = [
        {"path": p.relative_to(folder).as_posix(), "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
         "size_bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*")) if p.is_file()
    ]
    data = json.dumps({"schema_version": 1, "zip_sha256": "0" * 64, "zip_size_bytes": 1, "files": files},
                      indent=2).encode() + b"\n"
    (folder / "MANIFEST.json").write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def wait_for(check: Callable[[], T | None], timeout: float = 60.0, what: str = "condition") -> T:
    return poll(check, timeout, what, interval=0.05)


@pytest.fixture(scope="session")
def venv_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One venv cache for the session, with the tiny model's venv built once up front."""
    root = tmp_path_factory.mktemp("venvs")
    requirements = tmp_path_factory.mktemp("req") / "requirements.txt"
    requirements.write_text(REQUIREMENTS)
    cache = VenvCache(root)

    def run(argv: list[str], what: str) -> None:
        import subprocess

        subprocess.run(argv, check=True, capture_output=True)

    cache.ensure(requirements, run=run, deadline=time.monotonic() + 300, cancelled=threading.Event())
    return root


class Store:
    """Model versions built by a test, registered with the agent's local model source."""

    def __init__(self, root: Path, models: LocalModels) -> None:
        self.root = root
        self.models = models

    def add(self, model_id: str, version: int = 1, *, manifest: bool = False, **meta: Any) -> Path:
        folder = build_model(self.root / model_id / f"v{version}", **meta)
        self.models.add(model_id, version, folder, write_manifest(folder) if manifest else None)
        return folder


@pytest.fixture
def models() -> LocalModels:
    return LocalModels()


@pytest.fixture
def store(workdir: Path, models: LocalModels) -> Store:
    return Store(workdir / "store", models)


@pytest.fixture
def eventually() -> Callable[..., Any]:
    """wait_for(check, timeout, what): poll until check() is truthy, failing after the timeout."""
    return wait_for


@pytest.fixture
def settings(pki: Pki, workdir: Path, venv_cache: Path) -> AgentSettings:
    return AgentSettings(
        ca_file=pki.ca_file,
        agent_id="agent-test-1",
        state_dir=workdir / "state",
        venv_cache_dir=venv_cache,
        metrics_interval_s=0.2,
        provision_timeout_s=60,
        stop_grace_s=5,
    )


@pytest.fixture
def make_agent(models: LocalModels, pki: Pki) -> Iterator[Callable[..., Flask]]:
    """Build agent apps, each with a credential of its own (agent id, role agent) unless given one; every
    deployment they still run is stopped after the test."""
    apps: list[Flask] = []

    def make(settings: AgentSettings, bus: EventBus | None = None, *,
             credential: CredentialSource | None = None, **kw: Any) -> Flask:
        if credential is None:
            cred = pki.credential(settings.agent_id, AGENT)
            credential = lambda: cred  # noqa: E731
        app = create_app(settings, bus if bus is not None else MemoryBus(), credential=credential,
                         fetch_model=kw.pop("fetch_model", models), **kw)
        apps.append(app)
        return app

    yield make
    for app in apps:
        parts(app).shutdown()


@pytest.fixture
def bus() -> MemoryBus:
    return MemoryBus()


@pytest.fixture
def agent_app(make_agent: Callable[..., Flask], settings: AgentSettings, bus: MemoryBus) -> Flask:
    return make_agent(settings, bus)


@pytest.fixture
def client(agent_app: Flask, pki: Pki) -> SigningClient:
    """A test client of the agent signing as the controller (the only role that commands agents)."""
    return pki.client(agent_app, CONTROLLER)


@pytest.fixture
def signed_session(pki: Pki) -> Iterator[Callable[..., requests.Session]]:
    """signed_session(role="controller"): a requests session whose every request is signed by a new identity of
    `role`, as ServiceClient signs; closed after the test."""
    made: list[requests.Session] = []

    def make(role: str = CONTROLLER) -> requests.Session:
        session = requests.Session()
        session.auth = Signer(fixed(pki.credential(role)))
        session.trust_env = False
        made.append(session)
        return session

    yield make
    for session in made:
        session.close()
