"""Concurrent uploads of one model over real HTTP: consecutive, distinct versions, each with its own zip."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from flask import Flask

from miaas.client import ServiceClient
from miaas.serve import Server
from miaas.testing import Pki
from model_registry.testing import good, make_zip

COUNT = 20


def test_twenty_concurrent_uploads_of_one_model_get_versions_1_to_20(
    app: Flask, serve: Callable[[Flask], Server], pki: Pki
) -> None:
    server = serve(app)
    portal = pki.credential("frontend")
    packages = [make_zip(good({"model.pth": f"weights of upload {i}".encode()})) for i in range(COUNT)]

    def send(data: bytes) -> Any:
        client = ServiceClient(server.url, portal, timeout=30)  # a session of its own per thread
        try:
            return client.post("/registry/upload-and-validate", data={"model_name": "iris"},
                               files={"file": ("model.zip", data, "application/zip")})
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=COUNT) as pool:
        answers = list(pool.map(send, packages))  # a refused upload raises here, naming its status and error

    models = [a["model"] for a in answers]
    assert sorted(m["version"] for m in models) == list(range(1, COUNT + 1))
    assert len({m["model_id"] for m in models}) == 1
    for data, model in zip(packages, models, strict=True):  # each version holds the zip that was sent for it
        manifest = json.loads((Path(model["path"]) / "MANIFEST.json").read_text())
        assert manifest["zip_sha256"] == model["sha256"] == hashlib.sha256(data).hexdigest()
    lister = ServiceClient(server.url, portal)
    listed = lister.get("/registry/models")["models"]
    lister.close()
    assert [(m["name"], m["versions"]) for m in listed] == [("iris", list(range(1, COUNT + 1)))]
