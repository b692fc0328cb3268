"""The version folder is checked against its MANIFEST.json before anything runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from agent.errors import ProvisionFailed
from agent.verify import verify_version


@pytest.fixture
def folder(store) -> tuple[Path, str]:  # type: ignore[no-untyped-def]
    path = store.add("sealed", manifest=True)
    (path / "data").mkdir()
    return path, store.models.versions[("sealed", 1)][1]


def test_an_intact_folder_passes(folder: tuple[Path, str]) -> None:
    path, sha = folder
    assert verify_version(path, sha) is True


def test_a_folder_without_manifest_is_accepted_only_when_none_was_recorded(tmp_path: Path) -> None:
    assert verify_version(tmp_path, None) is False
    with pytest.raises(ProvisionFailed, match="no MANIFEST.json"):
        verify_version(tmp_path, "0" * 64)


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda p: (p / "app.py").write_text("print('evil')"), "app.py does not match"),
        (lambda p: (p / "extra.py").write_text("x"), "files not in MANIFEST.json: extra.py"),
        (lambda p: (p / "model.pth").unlink(), "missing from the version folder: model.pth"),
        (lambda p: (p / "data" / "link").symlink_to("/etc/passwd"), "symlink: data/link"),
        (lambda p: (p / "MANIFEST.json").write_text('{"files": []}'), "not the one the model registry recorded"),
    ],
)
def test_a_changed_folder_is_refused(folder: tuple[Path, str], tamper, message: str) -> None:  # type: ignore[no-untyped-def]
    path, sha = folder
    tamper(path)
    with pytest.raises(ProvisionFailed, match=message):
        verify_version(path, sha)


def test_a_tampered_version_is_never_run(client, bus, store, eventually) -> None:  # type: ignore[no-untyped-def]
    path = store.add("tampered", manifest=True)
    (path / "app.py").write_text("print('not what was uploaded')")
    assert hashlib.sha256((path / "MANIFEST.json").read_bytes()).hexdigest() == store.models.versions[
        ("tampered", 1)][1]

    client.post("/create-vm", json={"deployment_id": "dep-t", "model_id": "tampered", "version": 1})
    failed = eventually(lambda: (d := client.get("/deployments/dep-t").json)["status"] != "provisioning" and d, 30,
                        "dep-t to fail")

    assert failed["status"] == "failed"
    assert "app.py does not match its MANIFEST.json entry" in failed["reason"]
    assert client.get("/deployments/dep-t/logs").text == ""
