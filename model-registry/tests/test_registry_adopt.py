"""`python -m model_registry adopt-store`: a lost database is rebuilt from the store's verified versions (numbers
kept, deleted numbers never given again), and the registry serves them; anything that does not verify, or a database
with records, refuses it and nothing changes. Runs on SQLite and PostgreSQL (the `database_url` fixture)."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

from miaas.bus import MemoryBus
from miaas.testing import Pki
from model_registry.__main__ import main
from model_registry.adopt import AdoptionRefused, adopt_store
from model_registry.settings import ModelRegistrySettings
from model_registry.store import Store
from model_registry.testing import good, make_zip, registry, store_tree

MARKER = ".miaas-store.json"


class _NoDeployments:
    def deployments_of(self, model_id: str, version: int) -> list[str]:
        return []


def _upload(client: FlaskClient, weights: bytes, name: str = "iris", user: str = "ann") -> dict[str, Any]:
    sent = client.post("/registry/upload-and-validate", headers={"X-MIaaS-User": user}, data={
        "model_name": name, "file": (io.BytesIO(make_zip(good({"model.pth": weights}))), "m.zip", "application/zip")})
    assert sent.status_code == 201, sent.json
    model: dict[str, Any] = sent.json["model"]
    return model


@pytest.fixture
def lost(make_app: Callable[..., Flask], pki: Pki) -> dict[str, Any]:
    """Given: a registry stored iris v1..v3 and resnet v1, then deleted iris v3 (the latest); then its database was
    lost. Returns what it answered for each version before."""
    app = make_app()
    client = pki.client(app, "frontend")
    for weights in (b"one", b"two", b"three"):
        _upload(client, weights)
    _upload(client, b"resnet", name="resnet", user="bob")
    registry(app).usage = _NoDeployments()
    registry(app).delete_version("iris", 3, by="ann")
    return {name: client.get(f"/registry/models/{name}").json for name in ("iris", "resnet")}


def _rows(url: str) -> dict[str, list[tuple[str, ...]]]:
    store = Store(url)
    try:
        store.create_schema()
        with store.engine.connect() as conn:
            return {t: sorted(tuple(str(v) for v in r) for r in conn.execute(text(f"SELECT * FROM {t}")))
                    for t in ("models", "versions", "aliases", "store_owner")}
    finally:
        store.close()


def test_adopt_store_rebuilds_the_database_and_the_registry_serves_the_same_versions(
    lost: dict[str, Any], make_app: Callable[..., Flask], settings: ModelRegistrySettings, fresh_database_url: str,
    pki: Pki, capsys: pytest.CaptureFixture[str],
) -> None:
    fresh = settings.model_copy(update={"database_url": fresh_database_url})
    before = store_tree(settings.model_store)

    # when: the operator runs the command with the registry's settings, pointed at an empty database
    main(["adopt-store"], settings=fresh)

    # then: it says what it did, and the store is exactly as it was
    out = capsys.readouterr().out
    assert "2 models, 3 versions" in out
    assert store_tree(settings.model_store) == before
    # and the registry starts normally on the new database and serves the same models and versions
    client = pki.client(make_app(database_url=fresh_database_url), "frontend")
    for name, answer in lost.items():
        assert client.get(f"/registry/models/{name}").json == answer
    iris = lost["iris"]["versions"][0]
    fetched = client.get("/registry/fetch-model", query_string={"model_id": "iris", "version": 1}).json
    assert fetched["sha256"] == iris["sha256"] and fetched["created_by"] == "ann"
    with client.get("/registry/models/iris/versions/1/download") as download:
        assert download.status_code == 200
        assert download.data == (Path(iris["path"]).parent / ".zips" / "v1.zip").read_bytes()
    with client.get("/registry/models/iris/versions/2/files/model.pth") as weights:
        assert weights.data == b"two"
    # the deleted v3's number is not given again: its record stayed behind
    assert _upload(client, b"four")["version"] == 4
    assert _upload(client, b"resnet2", name="resnet")["version"] == 2


def test_adopt_store_keeps_the_store_id_of_the_marker(
    lost: dict[str, Any], settings: ModelRegistrySettings, fresh_database_url: str
) -> None:
    marker = json.loads((settings.model_store / MARKER).read_text())

    done = adopt_store(settings.model_copy(update={"database_url": fresh_database_url}))

    assert done.store_id == marker["store_id"]
    assert [r[1] for r in _rows(fresh_database_url)["store_owner"]] == [marker["store_id"]]


def test_adopt_store_refuses_a_database_that_has_records_and_changes_nothing(
    lost: dict[str, Any], settings: ModelRegistrySettings, database_url: str
) -> None:
    before_rows, before_tree = _rows(database_url), store_tree(settings.model_store)

    with pytest.raises(AdoptionRefused, match="records models already"):
        adopt_store(settings)

    assert _rows(database_url) == before_rows
    assert store_tree(settings.model_store) == before_tree


def _tamper_file(version: Path) -> str:
    target = version / "model.pth"
    version.chmod(0o755)
    target.chmod(0o644)
    target.write_bytes(b"evil")
    return "model.pth does not match its MANIFEST.json"


def _extra_file(version: Path) -> str:
    version.chmod(0o755)
    (version / "backdoor.py").write_text("import os\n")
    return "not listed: backdoor.py"


def _missing_zip(version: Path) -> str:
    (version.parent / ".zips" / f"{version.name}.zip").unlink()
    return "its zip (.zips/v1.zip) is missing"


def _bad_manifest(version: Path) -> str:
    version.chmod(0o755)
    (version / "MANIFEST.json").chmod(0o644)
    (version / "MANIFEST.json").write_text("{}")
    return "its MANIFEST.json cannot be read"


def _changed_zip(version: Path) -> str:
    archive = version.parent / ".zips" / f"{version.name}.zip"
    archive.chmod(0o644)
    archive.write_bytes(archive.read_bytes() + b"\x00")
    return "its zip does not match its MANIFEST.json"


@pytest.mark.parametrize("damage", [_tamper_file, _extra_file, _missing_zip, _bad_manifest, _changed_zip],
                         ids=["changed-file", "extra-file", "missing-zip", "bad-manifest", "changed-zip"])
def test_adopt_store_refuses_a_version_that_does_not_verify_and_changes_nothing(
    lost: dict[str, Any], settings: ModelRegistrySettings, fresh_database_url: str,
    damage: Callable[[Path], str],
) -> None:
    says = damage(Path(lost["iris"]["versions"][0]["path"]))
    (settings.model_store / MARKER).unlink()  # so that a marker written too early would show
    before = store_tree(settings.model_store)

    with pytest.raises(AdoptionRefused) as refused:
        adopt_store(settings.model_copy(update={"database_url": fresh_database_url}))

    assert says in str(refused.value) and "nothing was changed" in str(refused.value)
    assert "/v1" in str(refused.value)
    assert store_tree(settings.model_store) == before
    assert _rows(fresh_database_url) == {"models": [], "versions": [], "aliases": [], "store_owner": []}


def test_a_store_from_before_records_is_adopted_with_the_names_given(
    lost: dict[str, Any], make_app: Callable[..., Flask], settings: ModelRegistrySettings, fresh_database_url: str,
    pki: Pki, capsys: pytest.CaptureFixture[str],
) -> None:
    # given: a store written before version records (and markers) existed
    iris_id, resnet_id = lost["iris"]["model"]["model_id"], lost["resnet"]["model"]["model_id"]
    for model_id in (iris_id, resnet_id):
        shutil.rmtree(settings.model_store / model_id / ".records")
    (settings.model_store / MARKER).unlink()

    main(["adopt-store", "--name", f"{iris_id}=iris"], settings=settings.model_copy(
        update={"database_url": fresh_database_url}))

    out = capsys.readouterr().out
    assert f"--name {resnet_id}=<name>" in out  # the model without a name is named after its id, and said so
    client = pki.client(make_app(database_url=fresh_database_url), "frontend")
    names = {m["name"]: m["versions"] for m in client.get("/registry/models").json["models"]}
    assert names == {"iris": [1, 2], resnet_id: [1]}
    with client.get("/registry/models/iris/versions/2/files/model.pth") as weights:
        assert weights.data == b"two"


def test_the_command_exits_2_with_the_reason_when_adoption_is_refused(
    lost: dict[str, Any], settings: ModelRegistrySettings, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["adopt-store"], settings=settings)

    assert exited.value.code == 2
    assert "records models already" in capsys.readouterr().err


def test_the_entry_point_exits_2_with_the_reason_when_the_store_is_refused(
    lost: dict[str, Any], settings: ModelRegistrySettings, fresh_database_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([], settings=settings.model_copy(update={"database_url": fresh_database_url}), bus=MemoryBus())

    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "refusing to start" in err and "adopt-store" in err
