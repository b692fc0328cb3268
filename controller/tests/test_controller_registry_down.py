"""Deploys while the model registry is down: a version by number this controller resolved before is deployed from
what the registry answered then (versions are immutable); one it has not, an alias or the latest is refused with
an error that says the model registry cannot be reached. A real model registry over HTTP, found through a real
service registry, then stopped (its process gone with or without deregistering) or answering 503."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from controller.app import create_app as create_controller
from controller.service import Controller, FetchedVersions
from controller.settings import ControllerSettings
from miaas import identity
from miaas.bus import MemoryBus
from miaas.client import ServiceClient
from miaas.discovery import Discovery
from miaas.serve import Server
from miaas.testing import Pki
from model_registry.app import create_app as create_registry
from model_registry.settings import ModelRegistrySettings
from model_registry.testing import good, make_zip
from service_registry.app import create_app as create_service_registry
from service_registry.settings import ServiceRegistrySettings

UNREACHABLE = "the model registry cannot be reached"


@dataclass
class Setup:
    """A model registry (two versions of one model, uploaded through its API) registered with a service registry,
    and a controller that finds it there and is called as an operator."""

    pki: Pki
    serve: Callable[[Flask], Server]
    workdir: Path
    models: Server
    book: ServiceClient  # the service registry, as the model registry registers itself
    instance_id: str
    model_id: str
    controller: Controller
    operator: FlaskClient

    def deploy(self, **request: Any) -> Any:
        return self.operator.post("/controller/deploy", json={"model_id": self.model_id, **request})

    def stop_registry(self, deregister: bool) -> None:
        """The model registry's process is gone; with `deregister`, as a clean stop does (the service registry
        then lists none), else as a crash does (still listed until its registration expires)."""
        self.models.close()
        if deregister:
            self.book.delete(f"/register/{self.instance_id}")

    def registry_elsewhere(self) -> None:
        """Another model registry, empty, takes the name (a registry restored from nothing)."""
        self.stop_registry(deregister=True)
        self.models, self.instance_id = serve_registry(self.pki, self.serve, self.workdir / "second", self.book)


def serve_registry(pki: Pki, serve: Callable[[Flask], Server], folder: Path, book: ServiceClient,
                   ) -> tuple[Server, str]:
    app = create_registry(ModelRegistrySettings(**pki.settings(identity.MODEL_REGISTRY), model_store=folder / "m",
                                                database_url=f"sqlite:///{folder / 'registry.db'}"), MemoryBus())
    server = serve(app)
    answer = book.post("/register", json={"name": "model-registry", "url": server.url})
    return server, str(answer["instance_id"])


def upload(server: Server, pki: Pki, name: str = "iris") -> str:
    portal = ServiceClient(server.url, pki.credential(identity.FRONTEND))
    try:
        answer = portal.post("/registry/upload-and-validate", data={"model_name": name},
                             files={"file": ("model.zip", io.BytesIO(make_zip(good())), "application/zip")})
    finally:
        portal.close()
    return str(answer["model"]["model_id"])


@pytest.fixture
def setup(pki: Pki, tmp_path: Path, serve: Callable[[Flask], Server]) -> Iterator[Setup]:
    services = serve(create_service_registry(ServiceRegistrySettings(**pki.settings("service-registry"),
                                                                     ttl_s=60)))
    book = ServiceClient(services.url, pki.credential(identity.MODEL_REGISTRY))
    (tmp_path / "first").mkdir()
    models, instance_id = serve_registry(pki, serve, tmp_path / "first", book)
    model_id = upload(models, pki)
    assert upload(models, pki) == model_id  # version 2
    settings = ControllerSettings(**pki.settings(identity.CONTROLLER), database_url=f"sqlite:///{tmp_path / 'c.db'}")
    discovery = Discovery(services.url, pki.credential(identity.CONTROLLER), cache_s=0)
    app = create_controller(settings, locate=discovery.lookup, bus=MemoryBus())
    yield Setup(pki, serve, tmp_path, models, book, instance_id, model_id, app.extensions["controller"],
                pki.client(app, identity.ADMIN))
    book.close()


def _deployed(resp: Any, model_id: str, version: int) -> None:
    assert resp.status_code == 202, resp.json
    assert (resp.json["model_id"], resp.json["model_name"], resp.json["version"]) == (model_id, "iris", version)
    assert resp.json["status"] == "pending"  # no agent here: queued, which needs the version's resources


def _unreachable(resp: Any, *names: str) -> None:
    assert resp.status_code == 502, resp.json
    error = resp.json["error"]
    assert error["code"] == "model_registry_unreachable" and UNREACHABLE in error["message"], error
    for name in names:
        assert name in error["message"], error


@pytest.mark.parametrize("deregister", [True, False], ids=["stopped cleanly", "crashed, still listed"])
def test_a_version_resolved_before_is_deployed_while_the_registry_is_down(setup: Setup, deregister: bool) -> None:
    # given version 1 deployed once while the registry answered
    _deployed(setup.deploy(version=1), setup.model_id, 1)
    # when the registry stops
    setup.stop_registry(deregister)
    # then version 1 deploys again, as the registry answered then
    _deployed(setup.deploy(version=1), setup.model_id, 1)
    # and version 2, never resolved here, is refused saying why, naming the version
    _unreachable(setup.deploy(version=2), setup.model_id, "version 2", "has not resolved")


def test_an_alias_or_the_latest_is_never_served_from_memory(setup: Setup) -> None:
    # given the latest (2) and an alias (on 1) deployed while the registry answered, and both versions by number
    writer = ServiceClient(setup.models.url, setup.pki.credential(identity.FRONTEND))
    writer.request("PUT", f"/registry/models/{setup.model_id}/aliases/prod", json={"version": 1})
    writer.close()
    _deployed(setup.deploy(), setup.model_id, 2)
    _deployed(setup.deploy(alias="prod"), setup.model_id, 1)
    _deployed(setup.deploy(version=1), setup.model_id, 1)
    _deployed(setup.deploy(version=2), setup.model_id, 2)
    # when the registry stops
    setup.stop_registry(deregister=False)
    # then the latest and the alias, which may have moved meanwhile, are refused; the numbers are deployed
    _unreachable(setup.deploy(), "latest version", setup.model_id)
    _unreachable(setup.deploy(alias="prod"), "alias 'prod'", setup.model_id)
    _deployed(setup.deploy(version=2), setup.model_id, 2)


def test_a_registry_answering_503_is_down_too(setup: Setup) -> None:
    _deployed(setup.deploy(version=1), setup.model_id, 1)
    # a registry whose every answer is now 503 (overloaded, its database away), in our error shape
    app = setup.models.app
    inner = app.wsgi_app

    def overloaded(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("503 Service Unavailable", [("Content-Type", "application/json")])
        return [b'{"error": {"code": "unavailable", "message": "the database is away", "details": null}}']

    app.wsgi_app = overloaded  # type: ignore[method-assign]
    try:
        _deployed(setup.deploy(version=1), setup.model_id, 1)
        _unreachable(setup.deploy(version=2), "503", "the database is away")
    finally:
        app.wsgi_app = inner  # type: ignore[method-assign]


def test_a_version_the_registry_says_is_gone_is_not_deployed_from_memory(setup: Setup) -> None:
    # given version 1 resolved while the registry answered
    _deployed(setup.deploy(version=1), setup.model_id, 1)
    # when a registry that does not have it answers in its place: its 404 is passed on, not masked
    setup.registry_elsewhere()
    gone = setup.deploy(version=1)
    assert gone.status_code == 404 and gone.json["error"]["code"] == "not_found", gone.json
    # and what the first registry said is forgotten: with this one down too, version 1 is refused
    setup.stop_registry(deregister=False)
    _unreachable(setup.deploy(version=1), "version 1")


def test_the_registry_refusing_the_controller_is_not_down(setup: Setup) -> None:
    _deployed(setup.deploy(version=1), setup.model_id, 1)
    # when the registry refuses the controller's credential (revoked there): that is said, not hidden by memory
    setup.models.app.extensions["miaas_trust"].revocations.update([setup.controller.credential().cert.serial])
    refused = setup.deploy(version=1)
    assert refused.status_code == 502 and refused.json["error"]["code"] == "upstream_error", refused.json
    assert "401" in refused.json["error"]["message"], refused.json


def test_the_memory_keeps_the_most_recently_used_answers() -> None:
    kept = FetchedVersions(2)
    kept.put(("m-a", 1), {"version": 1, "meta": {"x": [1]}})
    kept.put(("m-a", 2), {"version": 2, "meta": {}})
    assert kept.get(("m-a", 1)) is not None  # now the most recently used
    kept.put(("m-b", 1), {"version": 1, "meta": {}})
    assert len(kept) == 2 and kept.get(("m-a", 2)) is None and kept.get(("m-b", 1)) is not None
    # an answer handed out is a copy: a caller changing it does not change what is kept
    answer = kept.get(("m-a", 1))
    assert answer is not None
    answer["meta"]["x"].append(2)
    assert kept.get(("m-a", 1)) == {"version": 1, "meta": {"x": [1]}}
