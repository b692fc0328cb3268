"""A full model store, for real: the store is a small tmpfs mounted for the test. An upload or an edit that runs out
of space is a 507 with the one JSON error shape, leaves nothing behind (no temp file, no folder, no row, no number
used), and the next one works once there is space. Runs on SQLite and PostgreSQL (the `database_url` fixture; the
database is not on the small filesystem)."""

from __future__ import annotations

import io
import os
import random
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import TestResponse, encode_multipart

from miaas.testing import Pki
from model_registry.settings import ModelRegistrySettings
from model_registry.testing import Files, good, make_zip, store_tree

SIZE = 2 << 20


@pytest.fixture
def small_store(settings: ModelRegistrySettings) -> Iterator[Path]:
    """The test's model store on a 2 MiB tmpfs, unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the tests as root; a skip there counts as a failure)")
    root = settings.model_store
    root.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0755", "tmpfs", str(root)], check=True,
                   capture_output=True)
    try:
        yield root
    finally:
        if subprocess.run(["umount", str(root)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(root)], check=True, capture_output=True)


@pytest.fixture
def client(small_store: Path, make_app: Callable[..., Flask], pki: Pki) -> FlaskClient:
    """Given: a registry on the small store, holding iris v1."""
    client = pki.client(make_app(), "frontend")
    assert _post(client, good({"model.pth": b"one"})).status_code == 201
    return client


def _post(client: FlaskClient, files: Files | bytes) -> TestResponse:
    """The multipart body is encoded here, in memory: the test client would spool a big one to a temp file of its
    own that it never closes."""
    package = files if isinstance(files, bytes) else make_zip(files)
    boundary, body = encode_multipart(MultiDict([
        ("model_name", "iris"), ("file", FileStorage(io.BytesIO(package), "m.zip", content_type="application/zip"))]))
    return client.post("/registry/upload-and-validate", data=body,
                       content_type=f"multipart/form-data; boundary={boundary}")


def _fill(root: Path) -> Path:
    """Fill the filesystem with a file of somebody else's until no byte fits."""
    filler = root / "somebody-elses.bin"
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\xff" * 65536)
        except OSError as exc:
            assert exc.errno == 28  # ENOSPC
    with open(filler, "ab", buffering=0) as out:  # what is left is less than a block: take it too
        try:
            while True:
                out.write(b"\xff")
        except OSError:
            pass
    return filler


def _assert_507(answer: TestResponse) -> None:
    assert answer.status_code == 507, answer.json
    assert answer.json is not None and set(answer.json) == {"error"}
    error = answer.json["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == "insufficient_storage"
    assert "the model store is full" in error["message"] and "retry" in error["message"]


def _versions(client: FlaskClient) -> list[int]:
    versions: list[int] = client.get("/registry/models/iris").json["model"]["versions"]
    return versions


def test_an_upload_bigger_than_the_free_space_is_a_507_that_leaves_nothing(
    client: FlaskClient, small_store: Path
) -> None:
    before = store_tree(small_store)
    weights = random.Random(1).randbytes(3 << 20)  # incompressible: the zip itself does not fit

    answer = _post(client, good({"model.pth": weights}))

    _assert_507(answer)
    assert store_tree(small_store) == before
    assert list((small_store / ".tmp").iterdir()) == []
    assert _versions(client) == [1]
    # the next upload that fits works, and gets the next number: the failed one used none
    assert _post(client, good({"model.pth": b"two"})).json["model"]["version"] == 2


def test_a_package_that_inflates_past_the_free_space_is_a_507_that_leaves_nothing(
    client: FlaskClient, small_store: Path
) -> None:
    before = store_tree(small_store)
    rnd = random.Random(2)
    weights = bytes(rnd.choice(b"acgt") for _ in range(5 << 19))  # 2.5 MiB that zips to about 0.7 MiB
    package = make_zip(good({"model.pth": weights}))
    assert len(package) < SIZE // 2  # received whole: it is the extraction that runs out of space

    answer = _post(client, package)

    _assert_507(answer)
    assert store_tree(small_store) == before
    assert list((small_store / ".tmp").iterdir()) == []
    assert _post(client, good({"model.pth": b"two"})).json["model"]["version"] == 2


def test_a_store_filled_by_something_else_refuses_uploads_until_space_is_freed(
    client: FlaskClient, small_store: Path
) -> None:
    filler = _fill(small_store)
    before = store_tree(small_store)

    answer = _post(client, good({"model.pth": b"two"}))

    _assert_507(answer)
    assert store_tree(small_store) == before
    assert list((small_store / ".tmp").iterdir()) == []
    assert _versions(client) == [1]

    # when: the space is freed, the same upload works and is v2
    filler.unlink()
    sent = _post(client, good({"model.pth": b"two"}))
    assert sent.status_code == 201, sent.json
    assert sent.json["model"]["version"] == 2
    assert _versions(client) == [1, 2]


def test_an_edit_on_a_full_store_is_a_507_that_leaves_nothing(client: FlaskClient, small_store: Path) -> None:
    filler = _fill(small_store)
    before = store_tree(small_store)
    edit = {"files": {"app.py": "print('edited')\n"}}

    answer = client.post("/registry/models/iris/versions/1/edit", json=edit)

    _assert_507(answer)
    assert store_tree(small_store) == before
    assert list((small_store / ".tmp").iterdir()) == []

    filler.unlink()
    sent = client.post("/registry/models/iris/versions/1/edit", json=edit)
    assert sent.status_code == 201, sent.json
    assert sent.json["model"]["version"] == 2
