"""The model store on disk (`MODEL_STORE`): immutable version folders, the zips as uploaded, a private temp folder.

    <root>/.miaas-store.json                 which database owns this store (its store id), written once
    <root>/.tmp/                             private (0700): uploads being received, versions being staged
    <root>/.quarantine/<stamp>/...           what a start found and could not account for, moved aside (never deleted)
    <root>/<model_id>/v<N>/                  one version, read-only (files 0444, folders 0555), with MANIFEST.json
    <root>/<model_id>/.zips/v<N>.zip         the zip of that version as it was uploaded, read-only
    <root>/<model_id>/.records/v<N>.json     what the database knows of that version and the manifest does not
                                             (the model's name, who, when): what `adopt-store` rebuilds from

Everything is written under `.tmp` on the same filesystem and renamed into place, so a version appears whole
or not at all. Paths are built from generated model ids and version numbers only, never from user input.

Two kinds of leftovers, kept apart on purpose: entries of `.tmp` whose names carry one of the registry's own
temp prefixes (`OWN_TEMP_PREFIXES`) are its own unfinished work (an upload being received, a stage, a delete
being finished) and are removed at start-up; anything else the store holds and the database does not record is
moved to `.quarantine`, never removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

from pydantic import BaseModel, ConfigDict, ValidationError

from miaas.errors import Conflict, InsufficientStorage
from miaas.schemas import Manifest
from model_registry.validation import MANIFEST, MODEL_ID_RE

log = logging.getLogger(__name__)

FILE_MODE, FOLDER_MODE = 0o444, 0o555
MARKER = ".miaas-store.json"
TMP, QUARANTINE, ZIPS, RECORDS = ".tmp", ".quarantine", ".zips", ".records"
QUARANTINE_LIST = "QUARANTINE.json"
OWN_TEMP_PREFIXES = ("upload-", "stage-", "deleted-", "record-", "marker-")
"""Every name the registry itself gives to what it creates in `.tmp`: only these are removed at start-up."""
FULL = (errno.ENOSPC, errno.EDQUOT)


class StoreMarker(BaseModel):
    """`.miaas-store.json`: the store's id, which the owning database records too."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: int = 1
    store_id: str
    created_at: datetime
    database: str = ""  # informative: the owning database's URL (password hidden) when the store was claimed


class VersionFacts(BaseModel):
    """`<model_id>/.records/v<N>.json`: a version's row as the database has it, less what MANIFEST.json says.

    Written with the version and kept when it is deleted (a tombstone: its number is never given again, even to
    a database rebuilt by `adopt-store`)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: int = 1
    model_id: str
    name: str
    version: int
    sha256: str
    size_bytes: int
    manifest_sha256: str
    created_by: str | None
    created_at: datetime


@dataclass(frozen=True)
class Quarantined:
    """What one start moved aside: the batch folder and the moved entries, relative to the store root."""

    folder: Path
    entries: tuple[str, ...]


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in FULL


@contextmanager
def space_checked(root: Path) -> Iterator[None]:
    """Turn "no space left on device" (or a quota) while writing into the store into a 507."""
    try:
        yield
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise InsufficientStorage(
            f"the model store is full ({os.strerror(exc.errno or errno.ENOSPC).lower()}): nothing was stored; "
            "retry once space is freed", details={"store": str(root)},
        ) from exc


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
        self.tmp = self.root / TMP
        self.quarantine_root = self.root / QUARANTINE
        self.marker = self.root / MARKER

    # ------------------------------------------------------------------ start-up

    def prepare(self) -> int:
        """Create the root and the private temp folder; remove the registry's own unfinished work from it (names
        with an `OWN_TEMP_PREFIXES` prefix); anything else there is left for `quarantine_strays`. Returns the count
        removed."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.tmp, 0o700)
        leftovers = [p for p in self.tmp.iterdir() if p.name.startswith(OWN_TEMP_PREFIXES)]
        for path in leftovers:
            remove(path)
        if leftovers:
            log.warning("removed %d unfinished temporary entries of this registry from %s (%s)", len(leftovers),
                        self.tmp, ", ".join(sorted(p.name for p in leftovers)))
        return len(leftovers)

    def holdings(self) -> list[str]:
        """What shows that the store holds or held versions: its model folders and a non-empty quarantine."""
        if not self.root.is_dir():
            return []
        found = sorted(p.name for p in self.root.iterdir() if MODEL_ID_RE.match(p.name) and p.is_dir())
        if self.quarantine_root.is_dir() and any(self.quarantine_root.iterdir()):
            found.append(QUARANTINE)
        return found

    def read_marker(self) -> StoreMarker | None:
        """The store's ownership marker; None when there is none. An unreadable marker is an error, never guessed
        around."""
        try:
            data = self.marker.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return StoreMarker.model_validate_json(data)
        except ValidationError as exc:
            raise ValueError(f"the ownership marker {self.marker} cannot be read ({exc.error_count()} problems: "
                             f"{exc.errors()[0]['msg']}); repair it by hand, never remove it to get past this") from exc

    def write_marker(self, marker: StoreMarker) -> None:
        """Write the ownership marker atomically (temp file, fsync, hard link into place); an existing marker is
        never replaced (FileExistsError)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(mode=0o700, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="marker-", suffix=".json")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(marker.model_dump_json(indent=2).encode() + b"\n")
                out.flush()
                os.fsync(out.fileno())
            os.chmod(name, FILE_MODE)
            os.link(name, self.marker)  # fails when a marker is there: two claims never both win
        finally:
            Path(name).unlink(missing_ok=True)
        _fsync(str(self.root))

    def remove_marker(self, marker: StoreMarker) -> None:
        """Undo `write_marker` of a claim that could not be recorded in the database (only when it is ours)."""
        with suppress(ValueError):
            if self.read_marker() == marker:
                self.marker.unlink()

    def quarantine_strays(self, recorded: set[tuple[str, int]], at: datetime) -> Quarantined | None:
        """Move to `.quarantine/<stamp>/` (a rename, same filesystem) every version folder and zip the database
        does not record, with its record, and every entry of `.tmp` that is not the registry's own temp work.
        Nothing is deleted. Returns what was moved, or None when the store was in order.

        Version entries come from a crash between the rename and the commit of an upload, between a delete's commit
        and its removal, or from a database that does not know this store's versions. Only model folders (generated
        ids) are looked at; anything else under the root is left alone.
        """
        strays: list[tuple[Path, str]] = []
        for model_dir in sorted(self.root.iterdir()):
            if not MODEL_ID_RE.match(model_dir.name) or not model_dir.is_dir():
                continue
            numbers: set[int] = set()
            for path, version in self._version_entries(model_dir):
                if (model_dir.name, version) not in recorded:
                    strays.append((path, "not recorded in the database"))
                    numbers.add(version)
            for version in sorted(numbers):  # its record goes with it; a record alone is a deleted version's
                record = self.record_path(model_dir.name, version)
                if record.exists():
                    strays.append((record, "the record of a version not recorded in the database"))
        if self.tmp.is_dir():
            strays += [(p, "not a temporary file of this registry") for p in sorted(self.tmp.iterdir())
                       if not p.name.startswith(OWN_TEMP_PREFIXES)]
        if not strays:
            return None
        batch = self._new_batch(at)
        moved: list[dict[str, str]] = []
        try:
            for path, why in strays:
                relative = path.relative_to(self.root)
                target = batch / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                _move(path, target)
                moved.append({"from": relative.as_posix(), "to": target.relative_to(self.root).as_posix(),
                              "why": why})
        finally:
            listing = {"schema_version": 1, "at": at.isoformat(), "entries": moved,
                       "note": "moved aside at start-up by the model registry, never deleted; each zip can be "
                               "uploaded again, or the entries moved back and the store adopted"}
            (batch / QUARANTINE_LIST).write_text(json.dumps(listing, indent=2) + "\n")
            _fsync(str(batch))
        entries = tuple(m["from"] for m in moved)
        log.warning("moved %d entries the database does not account for to %s: %s", len(entries), batch,
                    ", ".join(entries))
        return Quarantined(batch, entries)

    def quarantined_count(self) -> int:
        """How many quarantined entries are still in `.quarantine` (every batch, as listed in its QUARANTINE.json)."""
        if not self.quarantine_root.is_dir():
            return 0
        count = 0
        for batch in self.quarantine_root.iterdir():
            try:
                listing = json.loads((batch / QUARANTINE_LIST).read_text())
                count += sum(1 for e in listing["entries"] if os.path.lexists(self.root / e["to"]))
            except (OSError, ValueError, KeyError, TypeError):
                count += 1 if batch.is_dir() and any(batch.iterdir()) else 0  # a batch put there by hand
        return count

    def _new_batch(self, at: datetime) -> Path:
        self.quarantine_root.mkdir(mode=0o700, exist_ok=True)
        stamp = at.strftime("%Y%m%dT%H%M%S.%fZ")
        for n in range(1000):
            batch = self.quarantine_root / (stamp if n == 0 else f"{stamp}-{n}")
            try:
                batch.mkdir(mode=0o700)
                return batch
            except FileExistsError:
                continue
        raise RuntimeError(f"cannot make a new quarantine folder in {self.quarantine_root}")

    def _version_entries(self, model_dir: Path) -> list[tuple[Path, int]]:
        """The version folders and zips of a model folder, with their numbers."""
        found = [(p, _version_number(p.name, "")) for p in model_dir.iterdir()]
        zips = model_dir / ZIPS
        if zips.is_dir():
            found += [(p, _version_number(p.name, ".zip")) for p in zips.iterdir()]
        return [(p, v) for p, v in found if v is not None]

    # ------------------------------------------------------------------ uploads

    def spool(self) -> tuple[Path, IO[bytes]]:
        """A new private file for an upload being received."""
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="upload-", suffix=".zip")
        return Path(name), os.fdopen(fd, "w+b")

    def stage(self) -> Stage:
        return Stage(Path(tempfile.mkdtemp(dir=self.tmp, prefix="stage-")))

    def version_dir(self, model_id: str, version: int) -> Path:
        return self._model_dir(model_id, version) / f"v{version}"

    def zip_path(self, model_id: str, version: int) -> Path:
        return self._model_dir(model_id, version) / ZIPS / f"v{version}.zip"

    def record_path(self, model_id: str, version: int) -> Path:
        return self._model_dir(model_id, version) / RECORDS / f"v{version}.json"

    def model_ids(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if MODEL_ID_RE.match(p.name) and p.is_dir())

    def version_numbers(self, model_id: str) -> tuple[set[int], set[int], set[int]]:
        """The numbers of a model's version folders, zips and records."""
        model_dir = self._model_dir(model_id, 1)
        folders = {v for p, v in self._version_entries(model_dir) if p.parent == model_dir}
        zips = {v for p, v in self._version_entries(model_dir) if p.parent != model_dir}
        records_dir = model_dir / RECORDS
        records = ({v for p in records_dir.iterdir() if (v := _version_number(p.name, ".json")) is not None}
                   if records_dir.is_dir() else set())
        return folders, zips, records

    def read_record(self, model_id: str, version: int) -> VersionFacts | None:
        try:
            return VersionFacts.model_validate_json(self.record_path(model_id, version).read_bytes())
        except FileNotFoundError:
            return None

    def publish(self, stage: Stage, upload: Path, facts: VersionFacts) -> Path:
        """Rename a sealed stage, its zip and its record into place as `facts.version` of `facts.model_id` (the
        caller holds the lock)."""
        model_id, version = facts.model_id, facts.version
        folder, archive, record = (self.version_dir(model_id, version), self.zip_path(model_id, version),
                                   self.record_path(model_id, version))
        if folder.exists() or archive.exists():
            raise Conflict(f"{model_id} v{version} already exists in the model store but not in the database; "
                           "it was left by a crash: restart the registry to move it to the quarantine")
        if record.exists():
            raise Conflict(f"the model store already recorded a {model_id} v{version} (a deleted version's record "
                           f"in {record.parent}): the database is older than the store; refusing to reuse the number")
        fd, staged_record = tempfile.mkstemp(dir=self.tmp, prefix="record-", suffix=".json")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(facts.model_dump_json(indent=2).encode() + b"\n")
                out.flush()
                os.fsync(out.fileno())
            os.chmod(staged_record, FILE_MODE)
            archive.parent.mkdir(parents=True, exist_ok=True)
            record.parent.mkdir(parents=True, exist_ok=True)
            os.rename(upload, archive)
            try:
                os.rename(staged_record, record)
                os.rename(stage.path, folder)
            except BaseException:
                record.unlink(missing_ok=True)
                remove(archive)
                raise
        finally:
            Path(staged_record).unlink(missing_ok=True)
        os.chmod(folder, FOLDER_MODE)
        os.chmod(archive, FILE_MODE)
        _fsync(str(archive))
        for parent in (folder.parent, archive.parent, record.parent):
            _fsync(str(parent))
        return folder

    def retract(self, model_id: str, version: int) -> None:
        """Undo a `publish` whose row could not be committed: its folder, zip and record are removed in place (no
        reader can know of it yet; nothing new is created, so it works on a full disk too)."""
        for path in (self.version_dir(model_id, version), self.zip_path(model_id, version),
                     self.record_path(model_id, version)):
            remove(path)
        _fsync(str(self.root / model_id))

    def unpublish(self, model_id: str, version: int) -> None:
        """Remove a deleted version: its folder and its zip are first renamed into `.tmp` (each disappears from its
        place at once, so a reader finds the whole version or nothing), then deleted. A crash in between leaves only
        `.tmp/deleted-*` entries, which the next start removes (the delete was committed). Its record stays, as a
        tombstone: the number is never given again."""
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


def _move(path: Path, target: Path) -> None:
    """Rename `path` to `target` keeping its modes (a folder is made writable for the move, as "..", changes)."""
    mode = path.lstat().st_mode
    if stat.S_ISDIR(mode):
        os.chmod(path, stat.S_IMODE(mode) | stat.S_IWUSR)
    try:
        os.rename(path, target)
    finally:
        if stat.S_ISDIR(mode):
            os.chmod(target if target.exists() else path, stat.S_IMODE(mode))


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
