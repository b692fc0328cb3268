"""At start-up, what the store holds and the database does not record is moved to `.quarantine`, never deleted; only
the registry's own unfinished temp files are removed. Runs on SQLite and PostgreSQL (the `database_url` fixture)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

from flask import Flask
from flask.testing import FlaskClient

from miaas.testing import Pki
from model_registry.settings import ModelRegistrySettings
from model_registry.testing import Files, good, make_zip, registry, store_tree


def _upload(client: FlaskClient, files: Files, name: str = "iris") -> dict[str, object]:
    sent = client.post("/registry/upload-and-validate", data={
        "model_name": name, "file": (io.BytesIO(make_zip(files)), "m.zip", "application/zip")})
    assert sent.status_code == 201, sent.json
    model: dict[str, object] = sent.json["model"]
    return model


def _crash_leftovers(model_dir: Path) -> None:
    """What a crash between an upload's renames and its commit leaves: v2's folder, zip and record, with no row."""
    (model_dir / "v2").mkdir()
    (model_dir / "v2" / "app.py").write_text("print('v2')\n")
    (model_dir / "v2" / "MANIFEST.json").write_text("{}\n")
    (model_dir / "v2").chmod(0o555)
    (model_dir / ".zips" / "v2.zip").write_bytes(b"PK\x05\x06" + bytes(18))
    (model_dir / ".records" / "v2.json").write_text('{"name": "iris"}\n')


def test_an_unrecorded_version_is_quarantined_with_every_byte_and_nothing_else_is_touched(
    make_app: Callable[..., Flask], settings: ModelRegistrySettings, pki: Pki
) -> None:
    # given: a stored v1, then what crashes and strangers left in the store
    root = settings.model_store
    client = pki.client(make_app(), "frontend")
    kept = Path(str(_upload(client, good({"model.pth": b"one"}))["path"]))
    model_dir = kept.parent
    _crash_leftovers(model_dir)
    (root / "m-0123456789ab" / "v1").mkdir(parents=True)  # a model the database never heard of
    (root / "m-0123456789ab" / "v1" / "weights.bin").write_bytes(b"\x00\x01" * 100)
    (root / "README").write_text("not ours")
    (model_dir / "notes.txt").write_text("not a version")
    (root / ".tmp" / "somebody-elses.bin").write_bytes(b"foreign")  # not a name the registry gives its temp files
    (root / ".tmp" / "upload-crashed.zip").write_bytes(b"PK")  # the registry's own half-received upload
    before = store_tree(root)

    # when: the registry starts again
    app = make_app()

    # then: the unrecorded entries moved, byte for byte and with their modes, under .quarantine/<stamp>/
    batches = list((root / ".quarantine").iterdir())
    assert len(batches) == 1
    batch = batches[0]
    moved = {
        f"{model_dir.name}/v2", f"{model_dir.name}/v2/app.py", f"{model_dir.name}/v2/MANIFEST.json",
        f"{model_dir.name}/.zips/v2.zip", f"{model_dir.name}/.records/v2.json",
        "m-0123456789ab/v1", "m-0123456789ab/v1/weights.bin", ".tmp/somebody-elses.bin",
    }
    after = store_tree(root)
    prefix = batch.relative_to(root).as_posix()
    for path in moved:
        assert path not in after
        assert after[f"{prefix}/{path}"] == before[path], path
    # the recorded version, the stranger's files and the folders stay exactly as they were
    for path, entry in before.items():
        if path not in moved and path != ".tmp/upload-crashed.zip":
            assert after[path] == entry, path
    # only the registry's own unfinished upload is gone
    assert ".tmp/upload-crashed.zip" not in after
    assert sorted(p.name for p in (root / ".tmp").iterdir()) == []
    listing = json.loads((batch / "QUARANTINE.json").read_text())
    assert {e["from"] for e in listing["entries"]} == {
        f"{model_dir.name}/v2", f"{model_dir.name}/.zips/v2.zip", f"{model_dir.name}/.records/v2.json",
        "m-0123456789ab/v1", ".tmp/somebody-elses.bin",
    }
    # and /health counts them and says where they are
    health = app.test_client().get("/health").json
    assert health["status"] == "ok"
    assert health["quarantined"] == 5
    assert health["quarantine"] == str(root / ".quarantine")
    # the registry serves v1 as before and the next upload is v2
    client = pki.client(app, "frontend")
    assert client.get("/registry/models/iris").json["model"]["versions"] == [1]
    assert _upload(client, good({"model.pth": b"two"}))["version"] == 2


def test_a_store_in_order_quarantines_nothing_and_health_says_zero(
    make_app: Callable[..., Flask], settings: ModelRegistrySettings, pki: Pki
) -> None:
    client = pki.client(make_app(), "frontend")
    _upload(client, good())
    before = store_tree(settings.model_store)

    app = make_app()

    assert store_tree(settings.model_store) == before
    assert not (settings.model_store / ".quarantine").exists()
    health = app.test_client().get("/health").json
    assert health["quarantined"] == 0
    assert health["store_id"] == json.loads((settings.model_store / ".miaas-store.json").read_text())["store_id"]


def test_the_health_count_follows_what_is_left_in_the_quarantine(
    make_app: Callable[..., Flask], settings: ModelRegistrySettings, pki: Pki
) -> None:
    client = pki.client(make_app(), "frontend")
    model_dir = Path(str(_upload(client, good())["path"])).parent
    _crash_leftovers(model_dir)
    app = make_app()
    assert app.test_client().get("/health").json["quarantined"] == 3

    # when: an operator has looked at the zip and removed it from the quarantine
    (batch,) = (settings.model_store / ".quarantine").iterdir()
    (batch / model_dir.name / ".zips" / "v2.zip").unlink()

    assert app.test_client().get("/health").json["quarantined"] == 2


def test_a_deleted_version_keeps_its_record_as_a_tombstone_and_is_not_quarantined(
    make_app: Callable[..., Flask], settings: ModelRegistrySettings, pki: Pki
) -> None:
    app = make_app()
    client = pki.client(app, "frontend")
    for weights in (b"one", b"two"):
        _upload(client, good({"model.pth": weights}))
    registry(app).usage = _NoDeployments()
    registry(app).delete_version("iris", 2, by="ann")
    model_id = client.get("/registry/models/iris").json["model"]["model_id"]
    record = settings.model_store / model_id / ".records" / "v2.json"
    assert json.loads(record.read_text())["version"] == 2
    assert not (settings.model_store / model_id / "v2").exists()

    make_app()

    assert record.is_file()
    assert not (settings.model_store / ".quarantine").exists()


class _NoDeployments:
    def deployments_of(self, model_id: str, version: int) -> list[str]:
        return []
