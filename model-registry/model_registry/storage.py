"""The model store on disk (`MODEL_STORE`): immutable version folders, the zips as uploaded, a private temp folder.

    <root>/.tmp/                        private (0700): uploads being received, versions being staged
    <root>/<model_id>/v<N>/             one version, read-only (files 0444, folders 0555), with MANIFEST.json
    <root>/<model_id>/.zips/v<N>.zip    the zip of that version as it was uploaded, read-only

Everything is written under `.tmp` on the same filesystem and renamed into place, so a version appears whole
or not at all. Paths are built from generated model ids and version numbers only, never from user input.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path
from typing import IO

from miaas.errors import Conflict
from miaas.schemas import Manifest
from model_registry.validation import MANIFEST, MODEL_ID_RE

log = logging.getLogger(__name__)

FILE_MODE, FOLDER_MODE = 0o444, 0o555


def new_model_id() -> str:
    return "m-" + uuid.uuid4().hex[:12]


class Stage:
    """A private folder that one version is extracted into before it is published."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def open(self, name: str) -> IO[bytes]:
        """A new file at `name` (a validated relative path); never follows or replaces anything."""
        target = self._target(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.fdopen(os.open(target, flags, 0o644), "wb")

    def make_folder(self, name: str) -> None:
        self._target(name).mkdir(parents=True, exist_ok=True)

    def write_manifest(self, manifest: Manifest) -> str:
        """Write MANIFEST.json; returns its sha256."""
        data = manifest.model_dump_json(indent=2).encode() + b"\n"
        with self.open(MANIFEST) as out:
            out.write(data)
        return hashlib.sha256(data).hexdigest()

    def seal(self) -> None:
        """Make every file 0444 and every folder but the root 0555, and flush it all to disk."""
        for folder, dirs, files in os.walk(self.path, topdown=False):
            for name in files:
                path = os.path.join(folder, name)
                _fsync(path)
                os.chmod(path, FILE_MODE)
            for name in dirs:
                os.chmod(os.path.join(folder, name), FOLDER_MODE)
            _fsync(folder)

    def _target(self, name: str) -> Path:
        # Names were validated already; this is the last line of defence against escaping the stage.
        parts = name.split("/")
        if not name or "\\" in name or "\x00" in name or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"unsafe path inside a version: {name!r}")
        return self.path.joinpath(*parts)


class ModelStorage:
    """The folders under the model store root."""

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self.tmp = self.root / ".tmp"

    def prepare(self) -> int:
        """Create the root and the private temp folder; remove what a previous run left in it. Returns that count."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.tmp, 0o700)
        leftovers = list(self.tmp.iterdir())
        for path in leftovers:
            remove(path)
        if leftovers:
            log.warning("removed %d leftover temporary entries from %s", len(leftovers), self.tmp)
        return len(leftovers)

    def spool(self) -> tuple[Path, IO[bytes]]:
        """A new private file for an upload being received."""
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="upload-", suffix=".zip")
        return Path(name), os.fdopen(fd, "w+b")

    def stage(self) -> Stage:
        return Stage(Path(tempfile.mkdtemp(dir=self.tmp, prefix="stage-")))

    def version_dir(self, model_id: str, version: int) -> Path:
        return self._model_dir(model_id, version) / f"v{version}"

    def zip_path(self, model_id: str, version: int) -> Path:
        return self._model_dir(model_id, version) / ".zips" / f"v{version}.zip"

    def publish(self, stage: Stage, upload: Path, model_id: str, version: int) -> Path:
        """Rename a sealed stage and its zip into place as `version` of `model_id` (the caller holds the lock)."""
        folder, archive = self.version_dir(model_id, version), self.zip_path(model_id, version)
        if folder.exists() or archive.exists():
            raise Conflict(f"{model_id} v{version} already exists in the model store but not in the database; "
                           "it was left by a crash: remove it by hand")
        archive.parent.mkdir(parents=True, exist_ok=True)
        os.rename(upload, archive)
        try:
            os.rename(stage.path, folder)
        except BaseException:
            remove(archive)
            raise
        os.chmod(folder, FOLDER_MODE)
        os.chmod(archive, FILE_MODE)
        _fsync(str(archive))
        _fsync(str(folder.parent))
        _fsync(str(archive.parent))
        return folder

    def unpublish(self, model_id: str, version: int) -> None:
        """Remove a version: its folder and its zip are first renamed into `.tmp` (each disappears from its place
        at once, so a reader finds the whole version or nothing), then deleted. A crash in between leaves only
        `.tmp` entries, which the next start removes."""
        trash = Path(tempfile.mkdtemp(dir=self.tmp, prefix="deleted-"))
        for path, name in ((self.version_dir(model_id, version), "folder"), (self.zip_path(model_id, version), "zip")):
            try:
                if path.is_dir():  # moving a folder to another parent rewrites its "..": it must be writable
                    os.chmod(path, 0o700)
                os.rename(path, trash / name)
            except FileNotFoundError:
                continue
        _fsync(str(self.root / model_id))
        remove(trash)

    def sweep(self, recorded: set[tuple[str, int]]) -> list[str]:
        """Remove version folders and zips the database does not record (left by a crash between the rename and
        the commit, or between a delete's commit and its removal). Returns what was removed, relative to the root.

        Only model folders (generated ids) are looked at; anything else under the root is left alone.
        """
        removed: list[str] = []
        for model_dir in sorted(self.root.iterdir()):
            if not MODEL_ID_RE.match(model_dir.name) or not model_dir.is_dir():
                continue
            found = [(p, _version_number(p.name, "")) for p in model_dir.iterdir()]
            zips = model_dir / ".zips"
            if zips.is_dir():
                found += [(p, _version_number(p.name, ".zip")) for p in zips.iterdir()]
            for path, version in found:
                if version is not None and (model_dir.name, version) not in recorded:
                    remove(path)
                    removed.append(path.relative_to(self.root).as_posix())
        if removed:
            log.warning("removed %d version entries the database does not record: %s", len(removed),
                        ", ".join(removed))
        return removed

    def _model_dir(self, model_id: str, version: int) -> Path:
        if not MODEL_ID_RE.match(model_id) or version < 1:
            raise ValueError(f"not a model id and version: {model_id!r} v{version!r}")
        return self.root / model_id


def _version_number(name: str, suffix: str) -> int | None:
    """N of `v<N><suffix>`, else None."""
    if not (name.startswith("v") and name.endswith(suffix)):
        return None
    digits = name[1:len(name) - len(suffix)]
    return int(digits) if digits.isdigit() and digits[0] != "0" else None


def remove(path: Path) -> None:
    """Remove a file or a folder tree, read-only parts included; a missing path is fine."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(mode):
        path.unlink(missing_ok=True)
        return
    for folder, _, _ in os.walk(path):
        os.chmod(folder, 0o700)
    shutil.rmtree(path)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
