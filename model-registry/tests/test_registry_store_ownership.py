"""A store records which database owns it (`.miaas-store.json` and the `store_owner` row); a registry starts only
when the two agree, and every refusal changes nothing. Runs on SQLite and PostgreSQL (the `database_url` fixture)."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

from miaas.testing import Pki
from model_registry.ownership import StoreRefused
from model_registry.settings import ModelRegistrySettings
from model_registry.store import Store
from model_registry.testing import good, make_zip, registry, store_tree

MARKER = ".miaas-store.json"


def _upload(client: FlaskClient, weights: bytes, name: str = "iris") -> int:
    sent = client.post("/registry/upload-and-validate", data={
        "model_name": name, "file": (io.BytesIO(make_zip(good({"model.pth": weights}))), "m.zip", "application/zip")})
    assert sent.status_code == 201, sent.json
    version: int = sent.json["model"]["version"]
    return version


@pytest.fixture
def populated(make_app: Callable[..., Flask], pki: Pki) -> Flask:
    """Given: a registry that stored two models, three versions, and an alias."""
    app = make_app()
    client = pki.client(app, "frontend")
    _upload(client, b"one")
    _upload(client, b"two")
    _upload(client, b"resnet", name="resnet")
    assert client.put("/registry/models/iris/aliases/production", json={"version": 1}).status_code == 200
    return app


def _rows(url: str) -> dict[str, list[tuple[str, ...]]]:
    store = Store(url)
    try:
        with store.engine.connect() as conn:
            return {t: sorted(tuple(str(v) for v in r) for r in conn.execute(text(f"SELECT * FROM {t}")))
                    for t in ("models", "versions", "aliases", "store_owner")}
    finally:
        store.close()


def test_the_first_start_claims_an_empty_store_for_its_database(
    make_app: Callable[..., Flask], settings: ModelRegistrySettings
) -> None:
    app = make_app()

    marker = json.loads((settings.model_store / MARKER).read_text())
    owner = registry(app).store.owner()
    assert owner is not None and marker["store_id"] == owner.store_id
    assert marker["store_id"].startswith("s-") and len(marker["store_id"]) == 34
    assert owner.root == str(settings.model_store.absolute())
    assert app.test_client().get("/health").json["store_id"] == owner.store_id
    # and the next start finds them agreeing
    assert registry(make_app()).store.owner() == owner


@pytest.mark.parametrize("marker", ["with-marker", "without-marker"])
def test_a_fresh_database_meeting_a_populated_store_refuses_to_start_and_loses_nothing(
    populated: Flask, make_app: Callable[..., Flask], settings: ModelRegistrySettings, fresh_database_url: str,
    marker: str,
) -> None:
    root = settings.model_store
    if marker == "without-marker":  # a store from before markers, or one whose marker was removed
        (root / MARKER).unlink()
    (root / ".tmp" / "upload-in-flight.zip").write_bytes(b"PK")  # even the temp files are not the fresh one's to clean
    before = store_tree(root)

    with pytest.raises(StoreRefused) as refused:
        make_app(database_url=fresh_database_url)

    message = str(refused.value)
    assert "python -m model_registry adopt-store" in message
    assert "Nothing was changed" in message
    assert store_tree(root) == before  # every file of the store, byte for byte, modes too; nothing added
    assert _rows(fresh_database_url)["store_owner"] == []
    if marker == "with-marker":  # and the registry on the right database still serves everything
        assert registry(make_app()).fetch("resnet").version == 1


def test_a_relative_sqlite_path_read_from_another_working_folder_is_refused_naming_the_file(
    populated: Flask, make_app: Callable[..., Flask], settings: ModelRegistrySettings, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the default database URL is relative: sqlite:///.miaas/model-registry.db
    before = store_tree(settings.model_store)

    with pytest.raises(StoreRefused) as refused:
        make_app(database_url="sqlite:///.miaas/model-registry.db")

    assert str(elsewhere / ".miaas" / "model-registry.db") in str(refused.value)
    assert store_tree(settings.model_store) == before


@pytest.mark.parametrize("how", ["empty-mount-point", "missing-folder"])
def test_a_database_that_owns_a_store_refuses_a_store_that_seems_not_mounted(
    populated: Flask, make_app: Callable[..., Flask], settings: ModelRegistrySettings, workdir: Path, how: str
) -> None:
    # given: the store is somewhere else now (an NFS mount that did not come up)
    shutil.move(settings.model_store, workdir / "the-real-store")
    if how == "empty-mount-point":
        settings.model_store.mkdir()

    with pytest.raises(StoreRefused, match="seems not mounted"):
        make_app()

    # then: nothing was created in its place
    if how == "empty-mount-point":
        assert list(settings.model_store.iterdir()) == []
    else:
        assert not settings.model_store.exists()


def test_a_store_of_another_database_is_refused(
    populated: Flask, make_app: Callable[..., Flask], settings: ModelRegistrySettings, workdir: Path,
    fresh_database_url: str,
) -> None:
    # given: a second store claimed by a second database
    other = workdir / "other-store"
    make_app(model_store=other, database_url=fresh_database_url)
    before = store_tree(other)

    with pytest.raises(StoreRefused, match="belongs to another database"):
        make_app(model_store=other)  # the first database on the second store

    assert store_tree(other) == before


def test_a_lost_marker_on_a_store_with_versions_is_refused_saying_how_to_put_it_back(
    populated: Flask, make_app: Callable[..., Flask], settings: ModelRegistrySettings
) -> None:
    owner = registry(populated).store.owner()
    assert owner is not None
    (settings.model_store / MARKER).unlink()
    before = store_tree(settings.model_store)

    with pytest.raises(StoreRefused) as refused:
        make_app()

    assert f'"store_id": "{owner.store_id}"' in str(refused.value)
    assert store_tree(settings.model_store) == before


def test_an_unreadable_marker_is_refused_never_guessed_around(
    populated: Flask, make_app: Callable[..., Flask], settings: ModelRegistrySettings
) -> None:
    marker = settings.model_store / MARKER
    marker.chmod(0o644)
    marker.write_text("{not json")

    with pytest.raises(StoreRefused, match="cannot be read"):
        make_app()

    assert marker.read_text() == "{not json"


def test_a_database_and_store_from_before_markers_are_claimed_when_they_share_versions(
    populated: Flask, make_app: Callable[..., Flask], settings: ModelRegistrySettings, database_url: str
) -> None:
    # given: what an older registry left: versions in the store and in the database, no marker, no owner row
    (settings.model_store / MARKER).unlink()
    with registry(populated).store.engine.begin() as conn:
        conn.execute(text("DELETE FROM store_owner"))
    before = store_tree(settings.model_store)

    app = make_app()

    owner = registry(app).store.owner()
    assert owner is not None
    assert json.loads((settings.model_store / MARKER).read_text())["store_id"] == owner.store_id
    after = store_tree(settings.model_store)
    assert {k: v for k, v in after.items() if k != MARKER} == before
    assert [m.name for m in registry(app).summaries()] == ["iris", "resnet"]


def test_a_database_and_store_from_before_markers_sharing_no_version_are_refused(
    populated: Flask, make_app: Callable[..., Flask], settings: ModelRegistrySettings, workdir: Path,
    fresh_database_url: str, pki: Pki,
) -> None:
    # given: an older database whose versions are not in this store (another store's database)
    other = workdir / "other-store"
    other_app = make_app(model_store=other, database_url=fresh_database_url)
    _upload(pki.client(other_app, "frontend"), b"other", name="other")
    with registry(other_app).store.engine.begin() as conn:
        conn.execute(text("DELETE FROM store_owner"))
    (settings.model_store / MARKER).unlink()
    before = store_tree(settings.model_store)

    with pytest.raises(StoreRefused, match="do not belong together"):
        make_app(database_url=fresh_database_url)

    assert store_tree(settings.model_store) == before
