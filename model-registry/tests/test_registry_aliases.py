"""Aliases: named pointers at versions of a model, set, listed, removed, announced and resolved by fetch-model."""
# mypy: disable-error-code="index"

from __future__ import annotations

import pytest
from flask.testing import FlaskClient

from miaas.bus import MODEL_EVENTS, MemoryBus
from miaas.schemas import ModelEvent
from model_registry.testing import GOOD, Upload, good


@pytest.fixture
def two_versions(upload: Upload) -> str:
    upload(GOOD)
    model_id: str = upload(good({"model.pth": b"v2 weights"})).json["model"]["model_id"]
    return model_id


def test_an_alias_is_set_listed_moved_and_removed(two_versions: str, client: FlaskClient) -> None:
    assert client.get("/registry/models/iris/aliases").json == {}
    put = client.put("/registry/models/iris/aliases/production", json={"version": 1})
    assert (put.status_code, put.json) == (200, {"production": 1})
    client.put(f"/registry/models/{two_versions}/aliases/staging", json={"version": 2})
    moved = client.put("/registry/models/iris/aliases/production", json={"version": 2})
    assert moved.json == {"production": 2, "staging": 2}
    assert client.get(f"/registry/models/{two_versions}/aliases").json == {"production": 2, "staging": 2}
    deleted = client.delete("/registry/models/iris/aliases/staging")
    assert (deleted.status_code, deleted.data) == (204, b"")
    assert client.get("/registry/models/iris/aliases").json == {"production": 2}
    assert client.delete("/registry/models/iris/aliases/staging").status_code == 404


def test_fetch_model_resolves_an_alias(two_versions: str, client: FlaskClient) -> None:
    client.put("/registry/models/iris/aliases/production", json={"version": 1})
    found = client.get("/registry/fetch-model", query_string={"model_id": "iris", "alias": "production"})
    assert found.status_code == 200
    assert (found.json["model_id"], found.json["version"]) == (two_versions, 1)
    assert found.json["download_url"].endswith(f"/registry/models/{two_versions}/versions/1/download")


def test_fetch_model_with_a_version_and_an_alias_is_a_400(two_versions: str, client: FlaskClient) -> None:
    client.put("/registry/models/iris/aliases/production", json={"version": 1})
    found = client.get("/registry/fetch-model", query_string={"model_id": "iris", "alias": "production", "version": 1})
    assert found.status_code == 400


def test_fetch_model_with_an_unknown_alias_is_a_404(two_versions: str, client: FlaskClient) -> None:
    found = client.get("/registry/fetch-model", query_string={"model_id": "iris", "alias": "production"})
    assert found.status_code == 404
    assert "production" in found.json["error"]["message"]


def test_an_alias_must_point_at_an_existing_version(two_versions: str, client: FlaskClient) -> None:
    found = client.put("/registry/models/iris/aliases/production", json={"version": 3})
    assert found.status_code == 404
    assert client.put("/registry/models/nope/aliases/production", json={"version": 1}).status_code == 404
    assert client.get("/registry/models/nope/aliases").status_code == 404
    assert client.get("/registry/models/iris/aliases").json == {}


@pytest.mark.parametrize("alias", ["Prod", "1st", "-x", "a" * 33, "a b", "a!b", "prod\u00e9"])
def test_a_bad_alias_is_a_400(two_versions: str, client: FlaskClient, alias: str) -> None:
    found = client.put(f"/registry/models/iris/aliases/{alias}", json={"version": 1})
    assert found.status_code == 400
    assert found.json["error"]["code"] == "invalid_alias"


@pytest.mark.parametrize("body", [{}, {"version": 0}, {"version": "x"}, {"version": 1, "extra": 1}])
def test_a_bad_alias_body_is_a_400(two_versions: str, client: FlaskClient, body: dict[str, object]) -> None:
    assert client.put("/registry/models/iris/aliases/production", json=body).status_code == 400


def test_the_longest_alias_is_accepted(two_versions: str, client: FlaskClient) -> None:
    alias = "a" + "b.-_9" * 6 + "c"
    assert len(alias) == 32
    assert client.put(f"/registry/models/iris/aliases/{alias}", json={"version": 2}).status_code == 200


def test_a_moved_alias_is_announced(two_versions: str, client: FlaskClient, bus: MemoryBus) -> None:
    client.put("/registry/models/iris/aliases/production", json={"version": 2}, headers={"X-MIaaS-User": "bob"})
    topic, key, event = bus.messages[-1]
    assert (topic, key) == (MODEL_EVENTS, two_versions)
    assert isinstance(event, ModelEvent)
    assert (event.kind, event.alias, event.version, event.name, event.created_by) == (
        "alias_moved", "production", 2, "iris", "bob")
    assert event.sha256 == client.get("/registry/fetch-model", query_string={"model_id": "iris"}).json["sha256"]
