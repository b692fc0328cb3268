"""Editing a version: a copy with text files replaced or added goes through the upload pipeline as the next version."""
# mypy: disable-error-code="index"

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from miaas.bus import MemoryBus
from miaas.schemas import ModelEvent
from model_registry.settings import ModelRegistrySettings
from model_registry.testing import GOOD, META, Upload, files_under, good


def edit(client: FlaskClient, files: Any, model: str = "iris", version: int = 1, user: str | None = None) -> Any:
    headers = {"X-MIaaS-User": user} if user else {}
    return client.post(f"/registry/models/{model}/versions/{version}/edit", json={"files": files}, headers=headers)


def test_an_edit_makes_the_next_version_and_leaves_the_base_untouched(
    upload: Upload, client: FlaskClient, bus: MemoryBus,
) -> None:
    base = upload(GOOD).json["model"]
    before = files_under(Path(base["path"]))
    new_app = "from flask import Flask\n\napp = Flask('edited')\n"
    found = edit(client, {"app.py": new_app}, model=base["model_id"], user="alice")
    assert found.status_code == 201, found.json
    model = found.json["model"]
    assert (model["model_id"], model["version"], model["created_by"]) == (base["model_id"], 2, "alice")
    after = files_under(Path(model["path"]))
    assert after["app.py"] == new_app.encode()
    assert after["model.pth"] == GOOD["model.pth"]
    assert after["meta.json"] == before["meta.json"]
    assert files_under(Path(base["path"])) == before
    with client.get("/registry/models/iris/versions/2/files/app.py") as served:
        assert served.data == new_app.encode()
    events = [e for _, _, e in bus.messages if isinstance(e, ModelEvent)]
    assert [(e.kind, e.version) for e in events] == [("version_created", 1), ("version_created", 2)]


def test_an_edit_may_add_webapp_py_and_edit_other_text_files(upload: Upload, client: FlaskClient) -> None:
    upload(good({"config/labels.txt": "setosa\n", "config/data.bin": b"\x00\x01"}))
    meta = dict(META, description="edited")
    changes = {"webapp.py": "print('hi')\n", "config/labels.txt": "virginica\n", "meta.json": json.dumps(meta)}
    found = edit(client, changes)
    assert found.status_code == 201, found.json
    files = files_under(Path(found.json["model"]["path"]))
    assert files["webapp.py"] == b"print('hi')\n"
    assert files["config/labels.txt"] == b"virginica\n"
    assert files["config/data.bin"] == b"\x00\x01"
    assert found.json["model"]["meta"]["description"] == "edited"


def test_an_invalid_result_is_a_400_by_file_and_stores_nothing(
    upload: Upload, client: FlaskClient, settings: ModelRegistrySettings,
) -> None:
    upload(GOOD)
    found = edit(client, {"app.py": "def broken(:\n", "requirements.txt": "-e .\n"})
    assert found.status_code == 400
    assert found.json["error"]["code"] == "invalid_package"
    assert {d["file"] for d in found.json["error"]["details"]} == {"app.py", "requirements.txt"}
    assert client.get("/registry/models/iris").json["model"]["versions"] == [1]
    assert list((settings.model_store / ".tmp").iterdir()) == []


@pytest.mark.parametrize(("files", "file"), [
    ({"../app.py": "x"}, "../app.py"),
    ({"/etc/passwd": "x"}, "/etc/passwd"),
    ({"a%2e%2e/app.py": "x"}, "a%2e%2e/app.py"),
    ({"model.pth": "not weights"}, "model.pth"),
    ({"config/data.bin": "x"}, "config/data.bin"),
    ({"new.py": "x"}, "new.py"),
    ({"MANIFEST.json": "{}"}, "MANIFEST.json"),
    ({"app.py": "x" * ((1 << 20) + 1)}, "app.py"),
    ({"app.py": "\ud800"}, "app.py"),
])
def test_a_bad_edit_is_a_400_naming_the_file(
    upload: Upload, client: FlaskClient, settings: ModelRegistrySettings, files: dict[str, str], file: str,
) -> None:
    upload(good({"config/data.bin": b"\x00\x01"}))
    found = edit(client, files)
    assert found.status_code == 400
    assert found.json["error"]["code"] == "invalid_edit"
    assert [d["file"] for d in found.json["error"]["details"]] == [file]
    assert client.get("/registry/models/iris").json["model"]["versions"] == [1]
    assert list((settings.model_store / ".tmp").iterdir()) == []


@pytest.mark.parametrize("body", [{}, {"files": {}}, {"files": {"app.py": 3}}, {"files": {"app.py": "x"}, "x": 1}])
def test_a_malformed_body_is_a_400(upload: Upload, client: FlaskClient, body: dict[str, Any]) -> None:
    upload(GOOD)
    assert client.post("/registry/models/iris/versions/1/edit", json=body).status_code == 400


@pytest.mark.parametrize(("model", "version"), [("nope", 1), ("iris", 2)])
def test_editing_an_unknown_version_is_a_404(upload: Upload, client: FlaskClient, model: str, version: int) -> None:
    upload(GOOD)
    assert edit(client, {"app.py": "x = 1\n"}, model=model, version=version).status_code == 404
