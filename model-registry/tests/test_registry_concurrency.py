"""Concurrent uploads of one model over real HTTP: consecutive, distinct versions, each with its own zip."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from flask import Flask

from miaas.serve import Server
from model_registry.testing import good, make_zip

COUNT = 20


def test_twenty_concurrent_uploads_of_one_model_get_versions_1_to_20(
    app: Flask, serve: Callable[[Flask], Server], service_token: str
) -> None:
    server = serve(app)
    packages = [make_zip(good({"model.pth": f"weights of upload {i}".encode()})) for i in range(COUNT)]

    def send(data: bytes) -> requests.Response:
        return requests.post(
            f"{server.url}/registry/upload-and-validate", headers={"Authorization": f"Bearer {service_token}"},
            data={"model_name": "iris"}, files={"file": ("model.zip", data, "application/zip")}, timeout=30,
        )

    with ThreadPoolExecutor(max_workers=COUNT) as pool:
        answers = list(pool.map(send, packages))

    assert [a.status_code for a in answers] == [201] * COUNT
    models = [a.json()["model"] for a in answers]
    assert sorted(m["version"] for m in models) == list(range(1, COUNT + 1))
    assert len({m["model_id"] for m in models}) == 1
    for data, model in zip(packages, models, strict=True):  # each version holds the zip that was sent for it
        manifest = json.loads((Path(model["path"]) / "MANIFEST.json").read_text())
        assert manifest["zip_sha256"] == model["sha256"] == hashlib.sha256(data).hexdigest()
    listed = requests.get(f"{server.url}/registry/models", headers={"Authorization": f"Bearer {service_token}"},
                          timeout=10).json()["models"]
    assert [(m["name"], m["versions"]) for m in listed] == [("iris", list(range(1, COUNT + 1)))]
