"""Packing a model folder into the package format of seed 002: a zip with the files at its root."""

from __future__ import annotations

import fnmatch
import json
import zipfile
from pathlib import Path

REQUIRED = ("meta.json", "app.py", "requirements.txt")
IGNORE_FILE = ".miaasignore"
ALWAYS_IGNORED = ("__pycache__/", "*.pyc", ".*", "dist/")


class PackError(ValueError):
    """The folder cannot be packed; the message says why."""


def _ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    for pat in patterns:
        if pat.endswith("/"):
            if pat.rstrip("/") in parts[:-1] or any(fnmatch.fnmatch(p, pat.rstrip("/")) for p in parts[:-1]):
                return True
        elif any(fnmatch.fnmatch(p, pat) for p in parts) or fnmatch.fnmatch(rel, pat):
            return True
    return False


def pack_model(src: Path, out: Path) -> Path:
    """Zip `src` (meta.json, app.py, requirements.txt, artifacts, any other files) into `out`."""
    src = src.resolve()
    if not src.is_dir():
        raise PackError(f"{src} is not a folder")
    missing = [name for name in REQUIRED if not (src / name).is_file()]
    if missing:
        raise PackError(f"missing required file(s) in {src}: {', '.join(missing)}")
    try:
        meta = json.loads((src / "meta.json").read_text())
    except json.JSONDecodeError as exc:
        raise PackError(f"meta.json is not valid JSON: {exc}") from exc
    for artifact in meta.get("artifacts", ["model.pth"]) if isinstance(meta, dict) else []:
        if not (src / artifact).is_file():
            raise PackError(f"missing artifact named in meta.json: {artifact}")
    patterns = list(ALWAYS_IGNORED)
    if (src / IGNORE_FILE).is_file():
        lines = (src / IGNORE_FILE).read_text().splitlines()
        patterns += [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src).as_posix()
            if path.is_symlink() or not path.is_file() or path == out or _ignored(rel, patterns):
                continue
            zf.write(path, rel)
    tmp.replace(out)
    return out
