"""Deleting a version: refused while deployed (asked of a real controller) or aliased, else gone for good."""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from controller.store import DeploymentRow
from miaas.bus import MODEL_EVENTS, MemoryBus
from miaas.schemas import ModelEvent
from miaas.testing import Pki
from model_registry.testing import Upload, good


@pytest.fixture
def client(make_app: Callable[..., Flask], controller: Any, pki: Pki) -> FlaskClient:
    return pki.client(make_app(controller_url=controller.url), "frontend")


@pytest.fixture
def two_versions(upload: Upload) -> str:
    for weights in (b"one", b"two"):
        assert upload(good({"model.pth": weights})).status_code == 201
    return "iris"


def _deploy(controller: Any, model_id: str, version: int, status: str) -> None:
    """A deployment as the controller records it (the controller's own store, as its deploy would write it)."""
    now = datetime.now(UTC)
    controller.store.add(DeploymentRow(
        id=f"d-{model_id}-{version}-{status}", model_id=model_id, model_name="iris", version=version, status=status,
        agent_id="agent-1", url=None, reason=None, runtime="process", cpus=0.5, memory_mb=256, gpus=0, placement=[],
        created_by="test", created_at=now, updated_at=now,
    ))


def _model(client: FlaskClient) -> dict[str, Any]:
    answer = client.get("/registry/models/iris")
    assert answer.status_code == 200
    return answer.json  # type: ignore[no-any-return]


def test_a_version_nobody_uses_is_deleted_with_its_files_and_announced(
    two_versions: str, client: FlaskClient, bus: MemoryBus
) -> None:
    model = _model(client)
    model_id = model["model"]["model_id"]
    folder = Path(model["versions"][0]["path"])
    zip_path = folder.parent / ".zips" / "v1.zip"
    assert folder.is_dir() and zip_path.is_file()

    answer = client.delete("/registry/models/iris/versions/1")

    assert answer.status_code == 204, answer.json
    assert not folder.exists() and not zip_path.exists()
    assert _model(client)["model"]["versions"] == [2]
    assert client.get("/registry/fetch-model?model_id=iris&version=1").status_code == 404
    assert client.get(f"/registry/models/{model_id}/versions/1/download").status_code == 404
    assert list((folder.parent.parent / ".tmp").iterdir()) == []
    topic, key, event = bus.messages[-1]
    assert (topic, key) == (MODEL_EVENTS, model_id)
    assert isinstance(event, ModelEvent)
    assert (event.kind, event.model_id, event.version) == ("version_deleted", model_id, 1)


def test_a_version_number_is_never_given_again(upload: Upload, client: FlaskClient) -> None:
    assert upload(good()).status_code == 201
    assert upload(good({"model.pth": b"two"})).status_code == 201
    assert client.delete("/registry/models/iris/versions/2").status_code == 204

    third = upload(good({"model.pth": b"three"}))

    assert third.status_code == 201
    assert third.json["model"]["version"] == 3
    assert client.delete("/registry/models/iris/versions/1").status_code == 204
    assert client.delete("/registry/models/iris/versions/3").status_code == 204
    assert _model(client)["model"]["versions"] == []
    assert upload(good({"model.pth": b"four"})).json["model"]["version"] == 4


@pytest.mark.parametrize("status", ["pending", "provisioning", "running", "stopping", "lost"])
def test_a_version_in_use_by_a_deployment_is_a_409_naming_it_and_stays(
    two_versions: str, client: FlaskClient, controller: Any, status: str
) -> None:
    model = _model(client)
    model_id, folder = model["model"]["model_id"], Path(model["versions"][0]["path"])
    _deploy(controller, model_id, 1, status)

    answer = client.delete("/registry/models/iris/versions/1")

    assert answer.status_code == 409
    assert answer.json["error"]["code"] == "version_in_use"
    assert f"d-{model_id}-1-{status}" in answer.json["error"]["message"]
    assert folder.is_dir()
    assert _model(client)["model"]["versions"] == [1, 2]


@pytest.mark.parametrize("status", ["stopped", "failed"])
def test_finished_deployments_do_not_keep_a_version(
    two_versions: str, client: FlaskClient, controller: Any, status: str
) -> None:
    model_id = _model(client)["model"]["model_id"]
    _deploy(controller, model_id, 1, status)
    _deploy(controller, model_id, 2, "running")  # another version's deployment does not count

    assert client.delete("/registry/models/iris/versions/1").status_code == 204
    assert client.delete("/registry/models/iris/versions/2").status_code == 409


def test_a_version_an_alias_points_at_is_a_409_naming_the_alias(two_versions: str, client: FlaskClient) -> None:
    assert client.put("/registry/models/iris/aliases/production", json={"version": 1}).status_code == 200

    answer = client.delete("/registry/models/iris/versions/1")

    assert answer.status_code == 409
    assert answer.json["error"]["code"] == "version_aliased"
    assert "'production'" in answer.json["error"]["message"]
    assert client.delete("/registry/models/iris/aliases/production").status_code == 204
    assert client.delete("/registry/models/iris/versions/1").status_code == 204


def test_without_an_answer_from_the_controller_nothing_is_deleted(
    make_app: Callable[..., Flask], pki: Pki, upload: Upload
) -> None:
    assert upload(good()).status_code == 201
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    silent = pki.client(make_app(controller_url=f"http://127.0.0.1:{port}"), "frontend")

    answer = silent.delete("/registry/models/iris/versions/1")

    assert answer.status_code == 503
    assert answer.json["error"]["code"] == "controller_unavailable"
    assert _model(silent)["model"]["versions"] == [1]


@pytest.mark.parametrize("url", ["/registry/models/nope/versions/1", "/registry/models/iris/versions/9"])
def test_deleting_an_unknown_version_is_a_404(two_versions: str, client: FlaskClient, url: str) -> None:
    assert client.delete(url).status_code == 404
