"""The service around the registry: settings from the environment, the start-up sweep, the entry point."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask

from model_registry.settings import ModelRegistrySettings
from model_registry.testing import authenticated, good, make_zip


def test_settings_read_the_cluster_wide_model_store_and_their_own_prefix(
    monkeypatch: pytest.MonkeyPatch, service_token: str, tmp_path: Path
) -> None:
    monkeypatch.setenv("MIAAS_SERVICE_TOKEN", service_token)
    monkeypatch.setenv("MODEL_STORE", str(tmp_path / "nfs"))
    monkeypatch.setenv("MODEL_REGISTRY_MAX_UPLOAD_BYTES", "1234")
    monkeypatch.chdir(tmp_path)  # so that no .env of the developer leaks in
    settings = ModelRegistrySettings()  # type: ignore[call-arg]
    assert settings.model_store == tmp_path / "nfs"
    assert settings.max_upload_bytes == 1234
    assert settings.port == 8510
    assert settings.database_url == "sqlite:///.miaas/model-registry.db"


def test_start_up_removes_what_a_crashed_upload_left_in_tmp(
    make_app: Callable[..., Flask], settings: ModelRegistrySettings
) -> None:
    tmp = settings.model_store / ".tmp"
    (tmp / "stage-crashed" / "sub").mkdir(parents=True)
    (tmp / "stage-crashed" / "sub" / "app.py").write_text("x")
    (tmp / "stage-crashed" / "sub").chmod(0o555)
    (tmp / "upload-crashed.zip").write_bytes(b"PK")
    make_app()
    assert list(tmp.iterdir()) == []
    assert tmp.stat().st_mode & 0o777 == 0o700


def test_the_entry_point_imports_without_touching_the_network() -> None:
    import model_registry.__main__ as main

    assert callable(main.main)


def test_start_up_removes_version_files_the_database_does_not_record(
    make_app: Callable[..., Flask], settings: ModelRegistrySettings, service_token: str
) -> None:
    client = authenticated(make_app(), service_token)
    sent = client.post("/registry/upload-and-validate", data={
        "model_name": "iris", "file": (io.BytesIO(make_zip(good())), "m.zip", "application/zip")})
    assert sent.status_code == 201
    kept = Path(sent.json["model"]["path"])
    model_dir = kept.parent
    # what a crash between the rename and the commit leaves: a version folder and a zip with no row
    (model_dir / "v2").mkdir(mode=0o555)
    (model_dir / ".zips" / "v2.zip").write_bytes(b"PK")
    (settings.model_store / "m-0123456789ab" / "v1").mkdir(parents=True)
    (settings.model_store / "README").write_text("not ours")
    (model_dir / "notes.txt").write_text("not a version")

    make_app()

    assert sorted(p.name for p in model_dir.iterdir()) == [".zips", "notes.txt", "v1"]
    assert sorted(p.name for p in (model_dir / ".zips").iterdir()) == ["v1.zip"]
    assert list((settings.model_store / "m-0123456789ab").iterdir()) == []
    assert (settings.model_store / "README").read_text() == "not ours"
    assert (kept / "MANIFEST.json").is_file()
