"""Checks a version folder against its MANIFEST.json before the agent runs it (DESIGN §4, Uploads).

The model registry writes MANIFEST.json (sha256 and size of every other file) into each version folder and
gives the manifest's own sha256 in its /registry/fetch-model answer. A folder that differs in any way (a file
changed, missing or added, a symlink) is refused.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pydantic import ValidationError

from agent.errors import ProvisionFailed
from miaas.schemas import Manifest

MANIFEST = "MANIFEST.json"
_CHUNK = 1024 * 1024


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_version(folder: Path, manifest_sha256: str | None) -> bool:
    """Raise ProvisionFailed unless the folder is exactly what its manifest says.

    Returns False (nothing checked) only when the registry gave no manifest hash and the folder has no
    manifest: a store written before manifests existed, or a local folder in development.
    """
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file() or manifest_path.is_symlink():
        if manifest_sha256 is None:
            return False
        raise ProvisionFailed(f"the version folder {folder} has no {MANIFEST}: refusing to run it")
    data = manifest_path.read_bytes()
    if manifest_sha256 is not None and hashlib.sha256(data).hexdigest() != manifest_sha256:
        raise ProvisionFailed(f"{MANIFEST} of {folder} is not the one the model registry recorded")
    try:
        manifest = Manifest.model_validate_json(data)
    except ValidationError as exc:
        raise ProvisionFailed(f"{MANIFEST} of {folder} is malformed: {exc.error_count()} error(s)") from exc
    expected = {entry.path: entry for entry in manifest.files}
    found = set()
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root, name)
            if path.is_symlink():
                raise ProvisionFailed(f"the version folder holds a symlink: {path.relative_to(folder)}")
        for name in files:
            relative = Path(root, name).relative_to(folder).as_posix()
            if relative != MANIFEST:
                found.add(relative)
    if extra := sorted(found - expected.keys()):
        raise ProvisionFailed(f"files not in {MANIFEST}: {', '.join(extra[:10])}")
    if missing := sorted(expected.keys() - found):
        raise ProvisionFailed(f"files of {MANIFEST} missing from the version folder: {', '.join(missing[:10])}")
    for relative, entry in sorted(expected.items()):
        path = folder.joinpath(*relative.split("/"))
        if path.stat().st_size != entry.size_bytes or sha256_of(path) != entry.sha256:
            raise ProvisionFailed(f"{relative} does not match its {MANIFEST} entry (changed since upload)")
    return True
