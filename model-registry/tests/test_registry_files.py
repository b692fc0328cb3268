"""The files of a version: the manifest's list, and each file's bytes looked up in the manifest, never joined raw."""
# mypy: disable-error-code="index"

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit

import pytest
from flask.testing import FlaskClient

from model_registry.testing import GOOD, Upload, good


def test_the_files_of_a_version_are_the_manifest_list(upload: Upload, client: FlaskClient) -> None:
    model_id = upload(GOOD).json["model"]["model_id"]
    found = client.get(f"/registry/models/{model_id}/versions/1/files")
    assert found.status_code == 200
    assert found.json["model_id"] == model_id and found.json["version"] == 1
    files = {f["path"]: f for f in found.json["files"]}
    assert sorted(files) == sorted(GOOD)
    weights = GOOD["model.pth"]
    assert isinstance(weights, bytes)
    assert files["model.pth"] == {"path": "model.pth", "size_bytes": len(weights),
                                  "sha256": hashlib.sha256(weights).hexdigest()}


def test_a_text_file_is_served_as_text_plain_by_model_name(upload: Upload, client: FlaskClient) -> None:
    upload(GOOD)
    with client.get("/registry/models/iris/versions/1/files/app.py") as found:
        assert found.status_code == 200
        assert found.mimetype == "text/plain"
        assert found.data == str(GOOD["app.py"]).encode()


def test_a_binary_file_is_served_as_octet_stream(upload: Upload, client: FlaskClient) -> None:
    upload(good({"sub/data.bin": b"\x00\xffbinary"}))
    with client.get("/registry/models/iris/versions/1/files/model.pth") as weights:
        assert (weights.status_code, weights.mimetype) == (200, "application/octet-stream")
        assert weights.data == GOOD["model.pth"]
    with client.get("/registry/models/iris/versions/1/files/sub/data.bin") as nested:
        assert (nested.status_code, nested.data) == (200, b"\x00\xffbinary")


@pytest.mark.parametrize("path", [
    "../meta.json", "%2e%2e/meta.json", "sub/../app.py", "./app.py", "MANIFEST.json", "nope.txt", "APP.PY",
    "..%2f..%2fetc%2fpasswd",
])
def test_a_path_not_in_the_manifest_is_a_404_naming_it(upload: Upload, client: FlaskClient, path: str) -> None:
    upload(GOOD)
    found = client.get(f"/registry/models/iris/versions/1/files/{path}")
    assert found.status_code == 404
    assert found.json["error"]["code"] == "not_found"
    assert "has no file" in found.json["error"]["message"]


@pytest.mark.parametrize("path", ["/etc/passwd", "%2fetc%2fpasswd", "%2F..%2F..%2Fapp.py"])
def test_an_absolute_path_is_not_served(upload: Upload, client: FlaskClient, path: str) -> None:
    upload(GOOD)
    # Werkzeug merges the double slash with a redirect; the merged path is then looked up in the manifest.
    found = client.get(f"/registry/models/iris/versions/1/files/{path}")
    while found.status_code == 308:  # a redirect is a new request, signed anew: a signature names its target
        found = client.get(urlsplit(found.headers["Location"])._replace(scheme="", netloc="").geturl())
    assert found.status_code == 404
    assert "has no file" in found.json["error"]["message"]


@pytest.mark.parametrize("url", [
    "/registry/models/nope/versions/1/files", "/registry/models/iris/versions/2/files",
    "/registry/models/nope/versions/1/files/app.py", "/registry/models/iris/versions/2/files/app.py",
])
def test_an_unknown_model_or_version_is_a_404(upload: Upload, client: FlaskClient, url: str) -> None:
    upload(GOOD)
    found = client.get(url)
    assert found.status_code == 404
    assert found.json["error"]["code"] == "not_found"


def test_the_manifest_is_served_byte_for_byte_with_its_recorded_sha256(upload: Upload, client: FlaskClient) -> None:
    model_id = upload(GOOD).json["model"]["model_id"]
    recorded = client.get("/registry/fetch-model", query_string={"model_id": model_id}).json["manifest_sha256"]
    with client.get(f"/registry/models/{model_id}/versions/1/manifest") as found:
        assert (found.status_code, found.mimetype) == (200, "application/json")
        assert hashlib.sha256(found.data).hexdigest() == recorded
        assert sorted(f["path"] for f in found.json["files"]) == sorted(GOOD)
    with client.get(f"/registry/models/{model_id}/versions/1/download") as zipped:
        assert found.json["zip_sha256"] == hashlib.sha256(zipped.data).hexdigest()


def test_the_manifest_of_a_version_that_does_not_exist_is_a_404(upload: Upload, client: FlaskClient) -> None:
    upload(GOOD)
    found = client.get("/registry/models/iris/versions/2/manifest")
    assert (found.status_code, found.json["error"]["code"]) == (404, "not_found")
