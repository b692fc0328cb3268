"""Hostile uploads over the HTTP route, one test per attack: each gets a clear 4xx naming the problem, and the
model store and the database are exactly as before (an existing version untouched, no version number used up).

Runs on SQLite and on PostgreSQL (the `database_url` fixture).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import stat
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

from miaas.testing import Pki
from model_registry.settings import ModelRegistrySettings
from model_registry.testing import GOOD, META, Entry, good, make_zip, registry


def _patch_central(data: bytes, name: bytes, offset: int, fmt: str, value: int) -> bytes:
    """Overwrite a field of the central directory record of entry `name`."""
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46:at + 46 + name_len] == name:
            out = bytearray(data)
            struct.pack_into(fmt, out, at + offset, value)
            return bytes(out)
        at = data.find(b"PK\x01\x02", at + 46)
    raise AssertionError(f"no central record for {name!r}")


def _overlapping() -> bytes:
    """app.py's directory record points at the local header of the first entry (the overlapping-bomb trick)."""
    return _patch_central(make_zip(GOOD), b"app.py", 42, "<I", 0)


def _lying_size() -> bytes:
    """model.pth claims to inflate to 4 bytes in both of its headers; it really holds 1 KiB."""
    data = _patch_central(make_zip(good({"model.pth": bytes(range(256)) * 4})), b"model.pth", 24, "<I", 4)
    local = data.index(b"model.pth") - 30  # the first occurrence is in the local header, before the directory
    assert data[local:local + 4] == b"PK\x03\x04"
    out = bytearray(data)
    struct.pack_into("<I", out, local + 22, 4)
    return bytes(out)


def _with_nul_in_name() -> bytes:
    return make_zip(good({"evil#.py": "x = 1\n"})).replace(b"evil#.py", b"evil\x00.py")


def _meta(**changes: Any) -> dict[str, str]:
    return good({"meta.json": json.dumps({**META, **changes})})  # type: ignore[dict-item]


def _damaged() -> bytes:
    data = bytearray(make_zip(good({"model.pth": bytes(range(256)) * 64})))
    at = data.index(b"model.pth") + len("model.pth") + 10
    data[at:at + 8] = b"\xff" * 8
    return bytes(data)


@dataclass(frozen=True)
class Attack:
    id: str
    package: bytes | Any
    says: str
    status: int = 400
    code: str = "invalid_package"
    settings: dict[str, Any] = field(default_factory=dict)
    name: str = "iris"


INCOMPRESSIBLE = random.Random(7).randbytes(64 << 10)
ATTACKS = [
    Attack("not-a-zip", b"hello, I am a text file", "not a zip file"),
    Attack("empty-body", b"", "not a zip file"),
    Attack("truncated", make_zip(GOOD)[:-40], "not a zip file"),
    Attack("corrupt-entry", _damaged(), "'model.pth' cannot be read"),
    Attack("empty-zip", make_zip({}), "missing required file: meta.json"),
    Attack("over-max-upload", make_zip(good({"model.pth": INCOMPRESSIBLE})), "over the limit of 4096 bytes",
           status=413, code="payload_too_large", settings={"max_upload_bytes": 4096}),
    Attack("dot-dot", good({"../evil.py": "x"}), "'../evil.py': path goes up with '..'"),
    Attack("dot-dot-deep", good({"lib/../../evil.py": "x"}), "'..'"),
    Attack("absolute", good({"/etc/cron.d/evil": "x"}), "'/etc/cron.d/evil': absolute path"),
    Attack("backslash", good({"lib\\..\\evil.py": "x"}), "backslash"),
    Attack("drive-letter", good({"C:/evil.py": "x"}), "drive letter"),
    Attack("nul-byte", _with_nul_in_name(), "NUL byte"),
    Attack("encoded-traversal", good({"%2e%2e/evil.py": "x"}), "percent-encoded"),
    Attack("symlink", good({"link": Entry("/etc/passwd", mode=stat.S_IFLNK | 0o777)}), "symbolic links"),
    Attack("fifo", good({"pipe": Entry("", mode=stat.S_IFIFO | 0o644)}), "only regular files"),
    Attack("duplicate", [*GOOD.items(), ("model.pth", b"other")], "'model.pth': duplicate of 'model.pth'"),
    Attack("duplicate-case", good({"App.py": "x = 1\n"}), "'App.py': duplicate of 'app.py'"),
    Attack("too-many-entries", good({f"data/{i}.txt": "x" for i in range(20)}), "too many entries",
           settings={"max_entries": 10}),
    Attack("unpacked-too-big", good({"model.pth": INCOMPRESSIBLE}), "inflates to more than 16384 bytes",
           settings={"max_unpacked_bytes": 16384}),
    Attack("ratio-bomb", good({"model.pth": bytes(8 << 20)}), "'model.pth' inflates more than 200 times"),
    Attack("overlapping-entries", _overlapping(), "overlaps the next entry"),
    Attack("lying-size", _lying_size(), "'model.pth' cannot be read"),
    Attack("not-at-root", {f"{top}/{n}": c for top in ("a", "b") for n, c in GOOD.items()},
           "missing required file: meta.json"),
    Attack("meta-not-object", good({"meta.json": "[1, 2]"}), "meta.json must be a JSON object"),
    Attack("meta-not-json", good({"meta.json": "{oops"}), "meta.json is not valid JSON"),
    Attack("setup-empty", _meta(setup_commands=[]), "setup_commands"),
    Attack("start-not-strings", _meta(start_commands=[1, 2]), "start_commands"),
    Attack("port-out-of-range", _meta(ports={"http": 70000}), "ports"),
    Attack("cpus-zero", _meta(resources={"cpus": 0, "memory_mb": 256}), "resources.cpus"),
    Attack("gpus-negative", _meta(resources={"cpus": 1, "memory_mb": 256, "gpus": -1}), "resources.gpus"),
    Attack("app-does-not-compile", good({"app.py": "def f(:\n"}), "app.py does not compile"),
    Attack("requirements-editable", good({"requirements.txt": "-e .\n"}), "editable installs"),
    Attack("requirements-local-path", good({"requirements.txt": "./wheels/evil.whl\n"}), "local paths"),
    Attack("requirements-url", good({"requirements.txt": "evil @ https://example.org/evil.whl\n"}),
           "URLs are not allowed"),
    Attack("empty-artifact", good({"model.pth": b""}), "artifact model.pth is empty"),
    Attack("bad-model-name", GOOD, "model name", code="invalid_model_name", name="../iris"),
]


def _snapshot(settings: ModelRegistrySettings, app: Flask) -> dict[str, Any]:
    """Every path under the store (mode, size, sha256) and every row of every table."""
    root = settings.model_store
    tree = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        tree[path.relative_to(root).as_posix()] = (stat.filemode(info.st_mode), info.st_size if digest else 0, digest)
    rows = {}
    with registry(app).store.engine.connect() as conn:
        for table in ("models", "versions", "aliases"):
            rows[table] = sorted(tuple(str(v) for v in r) for r in conn.execute(text(f"SELECT * FROM {table}")))
    return {"tree": tree, "rows": rows}


def _post(client: FlaskClient, package: bytes | Any, name: str) -> Any:
    data = package if isinstance(package, bytes) else make_zip(package)
    return client.post("/registry/upload-and-validate",
                       data={"model_name": name, "file": (io.BytesIO(data), "model.zip", "application/zip")})


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.id for a in ATTACKS])
def test_a_hostile_upload_is_refused_and_changes_nothing(
    attack: Attack, make_app: Callable[..., Flask], settings: ModelRegistrySettings, pki: Pki
) -> None:
    app = make_app(**attack.settings)
    client = pki.client(app, "frontend")
    assert _post(client, good({"model.pth": b"v1"}), "iris").status_code == 201
    assert client.put("/registry/models/iris/aliases/production", json={"version": 1}).status_code == 200
    before = _snapshot(settings, app)

    answer = _post(client, attack.package, attack.name)

    assert answer.status_code == attack.status, answer.json
    assert answer.json["error"]["code"] == attack.code
    assert attack.says in answer.json["error"]["message"]
    assert _snapshot(settings, app) == before
    assert list((settings.model_store / ".tmp").iterdir()) == []
    if attack.status != 413:  # the next good upload is v2: the refused one used no number
        assert _post(client, good({"model.pth": b"v2"}), "iris").json["model"]["version"] == 2


def test_the_crafted_zips_are_what_they_claim() -> None:
    """Guards the builders above: the overlap points app.py at offset 0, the lying size is 4 in both headers."""
    with zipfile.ZipFile(io.BytesIO(_overlapping())) as zf:
        assert zf.getinfo("app.py").header_offset == 0
    with zipfile.ZipFile(io.BytesIO(_lying_size())) as zf:
        assert zf.getinfo("model.pth").file_size == 4
