"""Helpers for tests of the model registry and of its clients: model packages built as zips in memory."""

from __future__ import annotations

import io
import json
import stat
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from flask import Flask
from werkzeug.test import TestResponse

from model_registry.app import REGISTRY
from model_registry.registry import ModelRegistry


class Entry:
    """A zip entry with a chosen Unix mode (a symlink, a FIFO) or compression."""

    def __init__(self, data: bytes | str, mode: int = stat.S_IFREG | 0o644,
                 compression: int = zipfile.ZIP_DEFLATED) -> None:
        self.data = data.encode() if isinstance(data, str) else data
        self.mode = mode
        self.compression = compression


Content = bytes | str | Entry
Files = Mapping[str, Content] | Sequence[tuple[str, Content]]
"""Files by name; a list of pairs may repeat a name."""
Upload = Callable[..., TestResponse]
"""The `upload` fixture: (package, name="iris", user=None) -> response."""

META = {
    "setup_commands": ["pip install -r requirements.txt"],
    "start_commands": ["python3 app.py"],
    "description": "a test model",
    "ports": {"http": 5000},
    "resources": {"cpus": 0.5, "memory_mb": 256, "gpus": 0},
    "health_path": "/health",
}
GOOD: dict[str, Content] = {
    "meta.json": json.dumps(META),
    "app.py": "from flask import Flask\n\napp = Flask(__name__)\n",
    "requirements.txt": "# serving\nflask>=3.0\nnumpy==1.26.4\n",
    "model.pth": b"\x00\x01weights\x02" * 8,
}


def make_zip(files: Files, *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip holding `files` in order, each with the given mode and compression."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicates some tests want
        with zipfile.ZipFile(buf, "w", compression) as zf:
            for name, content in files.items() if isinstance(files, Mapping) else files:
                entry = content if isinstance(content, Entry) else Entry(content, compression=compression)
                info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
                info.create_system = 3
                info.external_attr = entry.mode << 16
                info.compress_type = entry.compression
                zf.writestr(info, entry.data)
    return buf.getvalue()


def good(changes: Mapping[str, Content | None] | None = None) -> dict[str, Content]:
    """The files of a valid package, with some replaced or added; None removes a file."""
    files = dict(GOOD)
    for name, content in (changes or {}).items():
        if content is None:
            files.pop(name, None)
        else:
            files[name] = content
    return files


def registry(app: Flask) -> ModelRegistry:
    found: ModelRegistry = app.extensions[REGISTRY]
    return found


def store_tree(root: Path) -> dict[str, tuple[str, bytes | None]]:
    """Every entry under `root` (a model store): its mode and, for a file, its bytes; to compare byte for byte."""
    return {
        p.relative_to(root).as_posix(): (stat.filemode(p.lstat().st_mode), p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
