"""Uploading a package: a valid zip becomes an immutable version; anything else is refused and leaves nothing."""
# mypy: disable-error-code="index"
# (werkzeug types TestResponse.json as Any | None; these tests index it freely)

from __future__ import annotations

import hashlib
import io
import json
import random
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from miaas.bus import MODEL_EVENTS, MemoryBus
from miaas.schemas import ModelEvent
from miaas.testing import Pki
from model_registry.settings import ModelRegistrySettings
from model_registry.testing import GOOD, META, Entry, Files, Upload, files_under, good, make_zip


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- a valid package


def test_a_valid_upload_creates_version_1_with_its_folder(upload: Upload) -> None:
    data = make_zip(GOOD)
    resp = upload(data, name="iris", user="alice")
    assert resp.status_code == 201
    model = resp.json["model"]
    assert model["model_id"].startswith("m-") and model["name"] == "iris" and model["version"] == 1
    assert model["sha256"] == sha256(data) and model["size_bytes"] == len(data)
    assert model["created_by"] == "alice"
    assert model["meta"]["start_commands"] == META["start_commands"]
    folder = Path(model["path"])
    assert folder.is_absolute() and folder.name == "v1"
    stored = files_under(folder)
    assert stored.pop("MANIFEST.json")
    assert stored == {name: content.encode() if isinstance(content, str) else content for name, content in GOOD.items()}


def test_a_version_folder_is_read_only(upload: Upload) -> None:
    folder = Path(upload(good({"static/index.html": "<p>hi</p>"})).json["model"]["path"])
    assert stat.S_IMODE(folder.stat().st_mode) == 0o555
    assert stat.S_IMODE((folder / "static").stat().st_mode) == 0o555
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()} == {0o444}


def test_the_manifest_lists_every_file_with_its_checksum_and_the_zip(upload: Upload) -> None:
    data = make_zip(GOOD)
    folder = Path(upload(data).json["model"]["path"])
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert manifest["zip_sha256"] == sha256(data) and manifest["zip_size_bytes"] == len(data)
    on_disk = files_under(folder)
    assert [f["path"] for f in manifest["files"]] == sorted(GOOD)
    for f in manifest["files"]:
        assert f["sha256"] == sha256(on_disk[f["path"]]) and f["size_bytes"] == len(on_disk[f["path"]])


def test_a_second_upload_of_a_name_is_version_2_of_the_same_model(upload: Upload) -> None:
    first = upload(GOOD).json["model"]
    second = upload(good({"model.pth": b"better weights"})).json["model"]
    assert (second["model_id"], second["version"]) == (first["model_id"], 2)
    assert (Path(second["path"]) / "model.pth").read_bytes() == b"better weights"
    assert (Path(first["path"]) / "model.pth").read_bytes() == GOOD["model.pth"]


def test_a_wrapping_folder_is_stripped_and_the_uploader_is_told(upload: Upload) -> None:
    resp = upload({f"iris/{name}": content for name, content in GOOD.items()})
    assert resp.status_code == 201
    assert (Path(resp.json["model"]["path"]) / "app.py").is_file()
    assert any("stripped" in w for w in resp.json["warnings"])


def test_the_name_may_come_as_name_too(client: FlaskClient) -> None:
    resp = client.post("/registry/upload-and-validate",
                       data={"name": "iris", "file": (io.BytesIO(make_zip(GOOD)), "m.zip")})
    assert resp.status_code == 201 and resp.json["model"]["name"] == "iris"


def test_a_new_version_is_announced_on_model_events(upload: Upload, bus: MemoryBus) -> None:
    model = upload(GOOD, user="alice").json["model"]
    [(topic, key, event)] = bus.messages
    assert (topic, key) == (MODEL_EVENTS, model["model_id"])
    assert isinstance(event, ModelEvent)
    assert (event.kind, event.version, event.name, event.created_by) == ("version_created", 1, "iris", "alice")


def test_the_iris_example_packed_by_miaas_is_accepted(upload: Upload, tmp_path: Path) -> None:
    from miaas.package import pack_model

    example = Path(__file__).resolve().parents[2] / "examples" / "iris"
    resp = upload(pack_model(example, tmp_path / "iris.zip").read_bytes())
    assert resp.status_code == 201, resp.json


# --------------------------------------------------------------------------- refused, and nothing stored


@pytest.mark.parametrize("missing", ["meta.json", "app.py", "requirements.txt", "model.pth"])
def test_a_zip_missing_a_required_file_is_refused_naming_it(
    upload: Upload, nothing_stored: Callable[[], None], missing: str
) -> None:
    resp = upload(good({missing: None}))
    assert resp.status_code == 400
    assert resp.json["error"]["code"] == "invalid_package"
    assert f"missing required file: {missing}" in resp.json["error"]["message"]
    assert {"file": missing, "message": f"missing required file: {missing}"} in resp.json["error"]["details"]
    nothing_stored()


REFUSED: list[tuple[str, bytes | Files, str]] = [
    ("not-a-zip", b"hello, I am a text file", "not a zip file"),
    ("traversal", good({"../evil.py": "x"}), "'../evil.py': path goes up with '..'"),
    ("absolute", good({"/etc/cron.d/evil": "x"}), "'/etc/cron.d/evil': absolute path"),
    ("symlink", good({"link": Entry("/etc/passwd", mode=stat.S_IFLNK | 0o777)}), "symbolic links are not allowed"),
    ("duplicate", [*GOOD.items(), ("model.pth", b"other")], "'model.pth': duplicate of 'model.pth'"),
    ("meta-not-json", good({"meta.json": "{oops"}), "meta.json is not valid JSON"),
    ("start-not-list", good({"meta.json": json.dumps({**META, "start_commands": "go"})}),
     "meta.json: start_commands: Input should be a valid list"),
    ("negative-resources", good({"meta.json": json.dumps({**META, "resources": {"memory_mb": -5}})}),
     "meta.json: resources.memory_mb: Input should be greater than 0"),
    ("syntax-error", good({"app.py": "def f(:\n"}), "app.py does not compile"),
    ("editable-requirement", good({"requirements.txt": "-e .\n"}), "editable installs"),
    ("bomb", good({"model.pth": bytes(8 << 20)}), "inflates more than 200 times"),
]


@pytest.mark.parametrize("package, says", [(p, s) for _, p, s in REFUSED], ids=[i for i, _, _ in REFUSED])
def test_an_invalid_package_is_refused_saying_why_and_nothing_is_stored(
    upload: Upload, nothing_stored: Callable[[], None], package: bytes | Files, says: str
) -> None:
    resp = upload(package)
    assert resp.status_code == 400
    assert resp.json["error"]["code"] == "invalid_package"
    assert says in resp.json["error"]["message"]
    assert all(set(d) == {"file", "message"} for d in resp.json["error"]["details"])
    nothing_stored()


def test_an_upload_over_the_size_limit_is_a_413_and_nothing_is_stored(
    make_app: Callable[..., Flask], pki: Pki, settings: ModelRegistrySettings
) -> None:
    client = pki.client(make_app(max_upload_bytes=1000), "frontend")
    data = make_zip(good({"model.pth": random.Random(1).randbytes(4000)}))  # incompressible
    assert len(data) > 1000
    resp = client.post("/registry/upload-and-validate",
                       data={"model_name": "iris", "file": (io.BytesIO(data), "m.zip")})
    assert resp.status_code == 413
    assert resp.json["error"] == {"code": "payload_too_large", "message": "the upload is over the limit of 1000 bytes",
                                  "details": {"max_bytes": 1000}}
    assert list((settings.model_store / ".tmp").iterdir()) == []
    assert client.get("/registry/models").json == {"models": []}


def test_a_package_inflating_past_the_limit_is_refused(
    make_app: Callable[..., Flask], pki: Pki, settings: ModelRegistrySettings
) -> None:
    client = pki.client(make_app(max_unpacked_bytes=2000), "frontend")
    data = make_zip(good({"model.pth": bytes(range(256)) * 20}))
    resp = client.post("/registry/upload-and-validate",
                       data={"model_name": "iris", "file": (io.BytesIO(data), "m.zip")})
    assert resp.status_code == 400 and "inflates to more than 2000 bytes" in resp.json["error"]["message"]
    assert sorted(p.name for p in settings.model_store.iterdir()) == [".miaas-store.json", ".tmp"]


@pytest.mark.parametrize("name", ["Iris", "../iris", "", "a" * 65, "m-0123456789ab"])
def test_a_bad_model_name_is_refused(upload: Upload, nothing_stored: Callable[[], None], name: str) -> None:
    resp = upload(GOOD, name=name)
    assert resp.status_code == 400
    assert resp.json["error"]["code"] in ("invalid_model_name", "invalid_upload")
    nothing_stored()


def test_an_upload_without_a_file_is_refused(client: FlaskClient) -> None:
    resp = client.post("/registry/upload-and-validate", data={"model_name": "iris"},
                       content_type="multipart/form-data")
    assert resp.status_code == 400 and "file is required" in resp.json["error"]["message"]


def test_an_upload_that_is_not_multipart_is_refused(client: FlaskClient) -> None:
    resp = client.post("/registry/upload-and-validate", json={"model_name": "iris"})
    assert resp.status_code == 400 and "multipart/form-data" in resp.json["error"]["message"]


def test_a_failed_publish_uses_no_version_number(upload: Upload, settings: ModelRegistrySettings) -> None:
    first = upload(GOOD).json["model"]
    orphan = settings.model_store / first["model_id"] / "v2"
    orphan.mkdir()  # as if a crash had left v2 behind without its database row
    blocked = upload(GOOD)
    assert blocked.status_code == 409 and "left by a crash" in blocked.json["error"]["message"]
    assert list((settings.model_store / ".tmp").iterdir()) == []
    orphan.rmdir()
    assert upload(GOOD).json["model"]["version"] == 2
