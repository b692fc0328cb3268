"""Fixtures of the model registry tests: settings on a temp store, the app with a memory bus, packages as zips.

The registry's identity comes from the session's test CA (`pki`); `client` signs as the portal (role frontend),
which is the one identity that may name a person in X-MIaaS-User.

Every test that uses the registry's database runs twice: on SQLite and on PostgreSQL (a fresh schema each time).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from controller.app import create_app as create_controller
from controller.settings import ControllerSettings
from miaas.bus import MemoryBus
from miaas.serve import Server
from miaas.testing import Pki, postgres_schema
from model_registry.app import create_app
from model_registry.settings import ModelRegistrySettings
from model_registry.testing import Files, Upload, make_zip, registry


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, workdir: Path) -> Iterator[str]:
    """A fresh, empty database for the test: a SQLite file, or a new schema (first on the search path) of the
    session's PostgreSQL database; a schema costs well under a millisecond where a new database costs 200 ms."""
    if request.param == "sqlite":
        yield f"sqlite:///{workdir / 'registry.db'}"
        return
    with postgres_schema(request.getfixturevalue("postgres_url"), "registry") as url:
        yield url


@pytest.fixture
def fresh_database_url(request: pytest.FixtureRequest, database_url: str, workdir: Path) -> Iterator[str]:
    """Another fresh, empty database of the same kind as `database_url`: what a registry that lost its database, or
    that was started with a wrong database URL, meets."""
    if database_url.startswith("sqlite"):
        yield f"sqlite:///{workdir / 'fresh-registry.db'}"
        return
    with postgres_schema(request.getfixturevalue("postgres_url"), "fresh") as url:
        yield url


@pytest.fixture
def settings(pki: Pki, workdir: Path, database_url: str) -> ModelRegistrySettings:
    return ModelRegistrySettings(**pki.settings("model-registry"), model_store=workdir / "models",
                                 database_url=database_url)


@pytest.fixture
def controller(pki: Pki, workdir: Path, serve: Callable[[Flask], Server]) -> Iterator[Any]:
    """A real controller app (not consuming the bus) on its own SQLite database, served over HTTP."""
    app = create_controller(ControllerSettings(**pki.settings("controller"),
                                               database_url=f"sqlite:///{workdir / 'controller.db'}"))
    server = serve(app)
    controller = app.extensions["controller"]
    controller.url = server.url
    yield controller
    controller.store.engine.dispose()


@pytest.fixture
def bus() -> MemoryBus:
    return MemoryBus()


@pytest.fixture
def make_app(settings: ModelRegistrySettings, bus: MemoryBus) -> Iterator[Callable[..., Flask]]:
    """Build apps on the test's store; `make_app(max_upload_bytes=...)` changes settings. All are closed after."""
    apps: list[Flask] = []

    def build(**overrides: Any) -> Flask:
        app = create_app(settings.model_copy(update=overrides), bus)
        apps.append(app)
        return app

    yield build
    for app in apps:
        registry(app).store.close()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask, pki: Pki) -> FlaskClient:
    """A test client signing as the portal."""
    return pki.client(app, "frontend")


@pytest.fixture
def upload(client: FlaskClient) -> Upload:
    """POST a zip (bytes, or files to zip) as model `name` through the test client."""

    def send(package: bytes | Files, name: str = "iris", user: str | None = None) -> TestResponse:
        data = package if isinstance(package, bytes) else make_zip(package)
        headers = {"X-MIaaS-User": user} if user else {}
        return client.post(
            "/registry/upload-and-validate", headers=headers,
            data={"model_name": name, "file": (io.BytesIO(data), "model.zip", "application/zip")},
        )

    return send


@pytest.fixture
def nothing_stored(settings: ModelRegistrySettings, client: FlaskClient) -> Callable[[], None]:
    """Then: no version folder, no zip, no database row, and `.tmp` empty (the store's ownership marker only)."""

    def check() -> None:
        root = settings.model_store
        assert sorted(p.name for p in root.iterdir()) == [".miaas-store.json", ".tmp"]
        assert list((root / ".tmp").iterdir()) == []
        assert client.get("/registry/models").json == {"models": []}

    return check
