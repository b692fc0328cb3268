"""The service around the registry: settings from the environment, the start-up clean-up of its own temp files, the
entry point. (What a start does with files the database does not record: test_registry_quarantine.py.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask

from miaas.testing import Pki
from model_registry.settings import ModelRegistrySettings


def test_settings_read_the_cluster_wide_model_store_and_their_own_prefix(
    monkeypatch: pytest.MonkeyPatch, pki: Pki, tmp_path: Path
) -> None:
    monkeypatch.setenv("MIAAS_CA_FILE", str(pki.ca_file))
    monkeypatch.setenv("MODEL_REGISTRY_CREDENTIAL_FILE", str(pki.credential_file("model-registry")))
    monkeypatch.setenv("MODEL_STORE", str(tmp_path / "nfs"))
    monkeypatch.setenv("MODEL_REGISTRY_MAX_UPLOAD_BYTES", "1234")
    monkeypatch.chdir(tmp_path)  # so that no .env of the developer leaks in
    settings = ModelRegistrySettings()  # type: ignore[call-arg]
    assert settings.model_store == tmp_path / "nfs"
    assert settings.max_upload_bytes == 1234
    assert settings.port == 8510
    assert settings.database_url == "sqlite:///.miaas/model-registry.db"
    assert (settings.ca_file, settings.credential_file) == (pki.ca_file, pki.credential_file("model-registry"))


def test_start_up_removes_the_unfinished_temp_files_a_crashed_upload_left_in_tmp(
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
