"""Reading the registry: where a version lives, the models and their versions, downloads and 404s. (Who may call
what: test_registry_auth.py.)"""
# mypy: disable-error-code="index"
# (werkzeug types TestResponse.json as Any | None; these tests index it freely)

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from miaas.testing import Pki
from model_registry.testing import GOOD, Upload, good, make_zip


def test_fetch_model_gives_the_latest_version_by_default(upload: Upload, client: FlaskClient) -> None:
    upload(GOOD)
    second = upload(good({"model.pth": b"v2 weights"})).json["model"]
    found = client.get("/registry/fetch-model", query_string={"model_id": second["model_id"]})
    assert found.status_code == 200
    assert found.json["version"] == 2
    assert found.json["path"] == second["path"]
    assert found.json["meta"] == second["meta"]


def test_fetch_model_gives_a_chosen_version_by_model_name(upload: Upload, client: FlaskClient) -> None:
    first = upload(GOOD).json["model"]
    upload(GOOD)
    found = client.get("/registry/fetch-model", query_string={"model_id": "iris", "version": 1}).json
    assert (found["model_id"], found["version"], found["path"]) == (first["model_id"], 1, first["path"])


def test_fetch_model_gives_the_download_url_and_the_manifest_checksum(upload: Upload, client: FlaskClient) -> None:
    model = upload(GOOD).json["model"]
    found = client.get("/registry/fetch-model", query_string={"model_id": "iris"}).json
    manifest = (Path(model["path"]) / "MANIFEST.json").read_bytes()
    assert found["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert found["download_url"] == f"http://localhost/registry/models/{model['model_id']}/versions/1/download"


def test_the_download_url_uses_the_public_url(make_app: Callable[..., Flask], pki: Pki) -> None:
    client = pki.client(make_app(public_url="https://registry.example.org"), "frontend")
    client.post("/registry/upload-and-validate",
                data={"model_name": "iris", "file": (io.BytesIO(make_zip(GOOD)), "m.zip")})
    found = client.get("/registry/fetch-model", query_string={"model_id": "iris"}).json
    assert found["download_url"].startswith("https://registry.example.org/registry/models/m-")


def test_the_download_is_the_zip_as_uploaded(upload: Upload, client: FlaskClient) -> None:
    data = make_zip(GOOD)
    model_id = upload(data).json["model"]["model_id"]
    with client.get(f"/registry/models/{model_id}/versions/1/download") as resp:
        assert resp.status_code == 200
        assert resp.mimetype == "application/zip"
        assert resp.data == data


def test_the_download_supports_ranges(upload: Upload, client: FlaskClient) -> None:
    data = make_zip(GOOD)
    upload(data)
    with client.get("/registry/models/iris/versions/1/download", headers={"Range": "bytes=10-19"}) as resp:
        assert resp.status_code == 206
        assert resp.data == data[10:20]


def test_models_are_listed_by_name_with_their_versions(upload: Upload, client: FlaskClient) -> None:
    upload(GOOD, name="zebra")
    upload(GOOD, name="iris")
    upload(GOOD, name="iris")
    models = client.get("/registry/models").json["models"]
    assert [(m["name"], m["latest_version"], m["versions"]) for m in models] == [("iris", 2, [1, 2]), ("zebra", 1, [1])]


def test_one_model_comes_with_all_its_versions(upload: Upload, client: FlaskClient) -> None:
    model_id = upload(GOOD, user="alice").json["model"]["model_id"]
    upload(GOOD, user="bob")
    detail = client.get(f"/registry/models/{model_id}").json
    assert detail["model"]["name"] == "iris" and detail["model"]["versions"] == [1, 2]
    assert [(v["version"], v["created_by"]) for v in detail["versions"]] == [(1, "alice"), (2, "bob")]


@pytest.mark.parametrize(
    "path, says",
    [
        ("/registry/fetch-model?model_id=nope", "model 'nope' does not exist"),
        ("/registry/fetch-model?model_id=iris&version=7", "model 'iris' has no version 7 (the latest is 1)"),
        ("/registry/models/nope", "model 'nope' does not exist"),
        ("/registry/models/iris/versions/3/download", "model 'iris' has no version 3"),
    ],
)
def test_an_unknown_model_or_version_is_a_404_naming_it(
    upload: Upload, client: FlaskClient, path: str, says: str
) -> None:
    upload(GOOD)
    resp = client.get(path)
    assert resp.status_code == 404
    assert resp.json["error"]["code"] == "not_found"
    assert says in resp.json["error"]["message"]


def test_a_bad_version_is_a_400(client: FlaskClient) -> None:
    resp = client.get("/registry/fetch-model?model_id=iris&version=0")
    assert resp.status_code == 400 and resp.json["error"]["code"] == "validation_error"


def test_openapi_documents_the_routes(client: FlaskClient) -> None:
    doc = client.get("/openapi.json").json
    assert {
        "/registry/upload-and-validate", "/registry/fetch-model", "/registry/models", "/registry/models/{model_id}",
        "/registry/models/{model_id}/versions/{version}/download",
    } <= set(doc["paths"])
    assert "multipart/form-data" in doc["paths"]["/registry/upload-and-validate"]["post"]["requestBody"]["content"]
    assert "FetchedVersion" in doc["components"]["schemas"]
