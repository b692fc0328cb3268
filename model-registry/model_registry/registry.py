"""Models and versions: an upload is validated, extracted, sealed, published, recorded, then announced."""

from __future__ import annotations

import codecs
import hashlib
import logging
import re
import shutil
import stat
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from miaas.bus import MODEL_EVENTS, EventBus
from miaas.errors import BadRequest, Conflict, NotFound, Unavailable
from miaas.schemas import Manifest, ManifestFile, ModelEvent, ModelSummary, ModelVersion, PackageMeta
from model_registry.storage import ModelStorage, Stage, VersionFacts, new_model_id, remove, space_checked
from model_registry.store import ModelRecord, Store, VersionRecord
from model_registry.usage import UsageCheck
from model_registry.validation import (
    APP,
    MANIFEST,
    META,
    REQUIREMENTS,
    Limits,
    Package,
    Problem,
    model_name_problem,
    path_problem,
    show,
    validate_package,
)

log = logging.getLogger(__name__)

ALIAS_RE = re.compile(r"^[a-z][a-z0-9._-]{0,31}$")
EDITABLE = (META, APP, REQUIREMENTS, "webapp.py")
"""Text files an edit may always write (replace or add); other text files only when the base version has them."""
MAX_EDIT_BYTES = 1 << 20
SNIFF_BYTES = 8192
ZIP64_FROM = 1 << 31


@dataclass(frozen=True)
class ReceivedZip:
    """An uploaded zip, already on disk in the store's temp folder."""

    path: Path
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class Published:
    version: VersionRecord
    warnings: tuple[str, ...]


@dataclass
class KeyedLocks:
    """One lock per key (a model name), created on first use."""

    _locks: dict[str, threading.Lock] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            yield


class ModelRegistry:
    """Owns models and versions: the database rows and the version folders agree at every moment."""

    def __init__(
        self,
        store: Store,
        storage: ModelStorage,
        limits: Limits,
        *,
        clock: Callable[[], datetime],
        bus: EventBus | None = None,
        usage: UsageCheck | None = None,
    ) -> None:
        self.store = store
        self.usage = usage
        self.storage = storage
        self.limits = limits
        self.clock = clock
        self.bus = bus
        self._locks = KeyedLocks()

    # ------------------------------------------------------------------ writing

    def upload(self, name: str, upload: ReceivedZip, created_by: str | None) -> Published:
        """Make `upload` the next version of model `name` (created when new). Raises and leaves nothing on failure.

        Validation and extraction run unlocked; only numbering, the renames and the insert hold the model's lock,
        so versions of one model are consecutive and a failure never uses up a number.
        """
        bad = model_name_problem(name)
        if bad:
            raise BadRequest(bad, code="invalid_model_name")
        with space_checked(self.storage.root):  # a full store is a 507, and leaves nothing behind either
            stage = self.storage.stage()
            started = time.perf_counter()
            try:
                package = validate_package(upload.path, self.limits, stage.open)
                for folder in package.folders:
                    stage.make_folder(folder)
                manifest_sha256 = stage.write_manifest(_manifest(package, upload))
                validated = time.perf_counter()
                stage.seal()
                sealed = time.perf_counter()
                with self._locks.hold(name):
                    record = self._commit(name, stage, upload, manifest_sha256, package.meta, created_by)
            finally:
                remove(stage.path)  # already gone when it was published
        self._announce(record)
        log.info("stored %s (%s) v%d from %s: %d bytes, validated and extracted in %.2f s, flushed in %.2f s, "
                 "published in %.2f s", record.model_id, name, record.version, created_by, upload.size_bytes,
                 validated - started, sealed - validated, time.perf_counter() - sealed)
        return Published(record, package.warnings)

    def edit(self, ref: str, version: int, edits: dict[str, str], created_by: str | None) -> Published:
        """A copy of a version with some text files replaced or added, uploaded as the model's next version.

        The copy is written as a zip into the store's temp folder and goes through `upload`, exactly like a zip
        sent by a user: same validation, same storage, same numbering and events. The base version is untouched.
        """
        base = self.fetch(ref, version)
        manifest = self.manifest(base)
        folder = self.path_of(base)
        problems = _edit_problems(edits, manifest, base.meta, folder)
        if problems:
            raise BadRequest(
                "invalid edit: " + "; ".join(p.message for p in problems),
                code="invalid_edit", details=[p.to_dict() for p in problems],
            )
        with space_checked(self.storage.root):
            path, out = self.storage.spool()
            try:
                with out, zipfile.ZipFile(out, "w") as zf:
                    for entry in manifest.files:
                        if entry.path in edits:
                            continue
                        info = _zip_info(entry.path, zipfile.ZIP_STORED)
                        with open(_inside(folder, entry.path), "rb") as src, \
                                zf.open(info, "w", force_zip64=entry.size_bytes >= ZIP64_FROM) as dst:
                            shutil.copyfileobj(src, dst, 1 << 20)
                    for name in sorted(edits):
                        zf.writestr(_zip_info(name, zipfile.ZIP_DEFLATED), edits[name].encode())
                digest = hashlib.sha256()
                with open(path, "rb") as done:
                    while chunk := done.read(1 << 20):
                        digest.update(chunk)
                received = ReceivedZip(path, path.stat().st_size, digest.hexdigest())
                published = self.upload(base.name, received, created_by)
            finally:
                remove(path)  # already gone when it was published
        log.info("%s v%d edited from v%d by %s (%s)", base.model_id, published.version.version, base.version,
                 created_by, ", ".join(sorted(edits)))
        return published

    def set_alias(self, ref: str, alias: str, version: int, by: str | None) -> dict[str, int]:
        """Point `alias` at an existing version (created or moved) and announce it; returns all the aliases."""
        _check_alias(alias)
        model = self.model(ref)
        with self._locks.hold(model.name):
            record = self.fetch(model.model_id, version)
            at = self.clock()
            self.store.set_alias(model.model_id, alias, version, by=by, at=at)
            aliases = self.store.aliases(model.model_id)
        self._publish(ModelEvent(
            kind="alias_moved", model_id=record.model_id, name=record.name, version=record.version,
            sha256=record.sha256, path=str(self.path_of(record)), created_by=by, at=at, alias=alias,
        ))
        log.info("alias %s of %s now points at v%d (%s)", alias, model.model_id, version, by)
        return aliases

    def delete_alias(self, ref: str, alias: str) -> None:
        _check_alias(alias)
        model = self.model(ref)
        with self._locks.hold(model.name):
            if not self.store.delete_alias(model.model_id, alias):
                raise NotFound(f"model '{ref}' has no alias '{alias}'")

    def aliases(self, ref: str) -> dict[str, int]:
        return self.store.aliases(self.model(ref).model_id)

    def delete_version(self, ref: str, version: int, by: str | None) -> VersionRecord:
        """Delete a version for good: refused (409) while an alias points at it or a deployment uses it, and
        (503) when the controller cannot say. Its number is never given again.

        The database row goes first, then the files (renamed away, then removed): a crash in between leaves
        files no row records, which the next start moves to the quarantine; never a row without its files. The
        version's record stays in the store as a tombstone.
        """
        model = self.model(ref)
        with self._locks.hold(model.name):
            record = self.fetch(model.model_id, version)
            aliases = self.store.aliases_of(model.model_id, version)
            if aliases:
                raise Conflict(
                    f"{record.name} v{version} is what {', '.join(repr(a) for a in aliases)} points at; "
                    "move or delete those aliases first", code="version_aliased", details={"aliases": aliases},
                )
            if self.usage is None:
                raise Unavailable("cannot check whether the version is deployed: no controller is configured "
                                  "(MODEL_REGISTRY_CONTROLLER_URL or MIAAS_SERVICE_REGISTRY_URL)",
                                  code="controller_unavailable")
            deployments = self.usage.deployments_of(model.model_id, version)
            if deployments:
                raise Conflict(
                    f"{record.name} v{version} is in use by {len(deployments)} deployment(s) "
                    f"({', '.join(deployments[:10])}); stop them first", code="version_in_use",
                    details={"deployments": deployments},
                )
            if not self.store.delete_version(model.model_id, version):
                raise NotFound(f"model '{ref}' has no version {version}")
            self.storage.unpublish(model.model_id, version)
        self._publish(ModelEvent(
            kind="version_deleted", model_id=record.model_id, name=record.name, version=record.version,
            sha256=record.sha256, path=str(self.path_of(record)), created_by=by, at=self.clock(),
        ))
        log.info("deleted %s (%s) v%d (%s)", record.model_id, record.name, version, by)
        return record

    def _commit(
        self, name: str, stage: Stage, upload: ReceivedZip, manifest_sha256: str, meta: PackageMeta,
        created_by: str | None,
    ) -> VersionRecord:
        """Number, publish and record a sealed stage; the caller holds the model's lock."""
        model = self.store.find_model_by_name(name)
        model_id = model.model_id if model is not None else new_model_id()
        version = self.store.next_version(model_id)
        facts = VersionFacts(
            model_id=model_id, name=name, version=version, sha256=upload.sha256, size_bytes=upload.size_bytes,
            manifest_sha256=manifest_sha256, created_by=created_by, created_at=self.clock(),
        )
        folder = self.storage.publish(stage, upload.path, facts)
        record = VersionRecord(
            model_id=model_id, name=name, version=version, path=folder.relative_to(self.storage.root).as_posix(),
            sha256=upload.sha256, size_bytes=upload.size_bytes, manifest_sha256=manifest_sha256, meta=meta,
            created_by=created_by, created_at=facts.created_at,
        )
        try:
            return self.store.add_version(record, new_model=model is None)
        except BaseException:
            self.storage.retract(model_id, version)
            raise

    def _announce(self, record: VersionRecord) -> None:
        self._publish(ModelEvent(
            model_id=record.model_id, name=record.name, version=record.version, sha256=record.sha256,
            path=str(self.path_of(record)), created_by=record.created_by, at=record.created_at,
        ))

    def _publish(self, event: ModelEvent) -> None:
        if self.bus is None:
            return
        try:
            self.bus.publish(MODEL_EVENTS, event.model_id, event)
        except Exception:  # noqa: BLE001 - the change is stored; a lost event must not turn it into an error
            log.exception("could not publish %s of %s v%d to %s", event.kind, event.model_id, event.version,
                          MODEL_EVENTS)

    # ------------------------------------------------------------------ reading

    def model(self, ref: str) -> ModelRecord:
        """A model by id or by name; 404 when neither."""
        found = self.store.find_model(ref)
        if found is None:
            raise NotFound(f"model '{ref}' does not exist")
        return found

    def fetch(self, ref: str, version: int | None = None) -> VersionRecord:
        """One version of a model (by id or name); the latest when `version` is None."""
        model = self.model(ref)
        found = self.store.get_version(model.model_id, version)
        if found is None:
            latest = self.store.latest_version(model.model_id)
            raise NotFound(f"model '{ref}' has no version {version} (the latest is {latest})")
        return found

    def resolve(self, ref: str, version: int | None = None, alias: str | None = None) -> VersionRecord:
        """A version by number, by alias, or the latest; a version and an alias together are a 400."""
        if alias is None:
            return self.fetch(ref, version)
        if version is not None:
            raise BadRequest("give a version or an alias, not both", code="invalid_query")
        _check_alias(alias)
        model = self.model(ref)
        number = self.store.get_alias(model.model_id, alias)
        if number is None:
            raise NotFound(f"model '{ref}' has no alias '{alias}'")
        return self.fetch(model.model_id, number)

    def manifest(self, record: VersionRecord) -> Manifest:
        """The MANIFEST.json of a version folder."""
        return Manifest.model_validate_json((self.path_of(record) / MANIFEST).read_bytes())

    def file_of(self, record: VersionRecord, path: str) -> tuple[Path, ManifestFile, bool]:
        """A file of a version, looked up in its manifest (never joined from `path`); 404 when not listed.

        Returns the file's absolute path, its manifest entry, and whether it is UTF-8 text.
        """
        for entry in self.manifest(record).files:
            if entry.path == path:
                target = _inside(self.path_of(record), entry.path)
                return target, entry, _is_text(target)
        raise NotFound(f"{record.name} v{record.version} has no file {show(path[:300])!r}",
                       details={"path": show(path[:300])})

    def versions(self, ref: str) -> tuple[ModelSummary, list[ModelVersion]]:
        model = self.model(ref)
        records = self.store.versions(model.model_id)
        numbers = [r.version for r in records]
        summary = ModelSummary(model_id=model.model_id, name=model.name, latest_version=max(numbers, default=0),
                               versions=numbers, created_at=model.created_at)
        return summary, [self.to_wire(r) for r in records]

    def summaries(self) -> list[ModelSummary]:
        """Every model, by name."""
        return [
            ModelSummary(model_id=m.model.model_id, name=m.model.name, latest_version=max(m.versions, default=0),
                         versions=m.versions, created_at=m.model.created_at)
            for m in self.store.models()
        ]

    def search(self, q: str = "", offset: int = 0, limit: int | None = None) -> tuple[list[ModelSummary], int]:
        """A page of the models whose name or id contains `q`, by name, and how many match in all."""
        found, total = self.store.models_page(q, offset, limit)
        return [
            ModelSummary(model_id=m.model.model_id, name=m.model.name, latest_version=max(m.versions, default=0),
                         versions=m.versions, created_at=m.model.created_at)
            for m in found
        ], total

    def path_of(self, record: VersionRecord) -> Path:
        """The absolute path of a version folder."""
        return self.storage.root / record.path

    def zip_of(self, record: VersionRecord) -> Path:
        return self.storage.zip_path(record.model_id, record.version)

    def to_wire(self, record: VersionRecord) -> ModelVersion:
        return ModelVersion(
            model_id=record.model_id, name=record.name, version=record.version, path=str(self.path_of(record)),
            meta=record.meta, sha256=record.sha256, size_bytes=record.size_bytes, created_at=record.created_at,
            created_by=record.created_by,
        )


def _manifest(package: Package, upload: ReceivedZip) -> Manifest:
    files = sorted(package.files, key=lambda f: f.name)
    return Manifest(
        zip_sha256=upload.sha256, zip_size_bytes=upload.size_bytes,
        files=[ManifestFile(path=f.name, sha256=f.sha256, size_bytes=f.size_bytes) for f in files],
    )


def _check_alias(alias: str) -> None:
    if not ALIAS_RE.match(alias):
        raise BadRequest(
            f"alias {show(alias[:40])!r} is invalid: use a lowercase letter, then up to 31 lowercase letters, "
            "digits, '.', '_' or '-'", code="invalid_alias",
        )


def _inside(folder: Path, path: str) -> Path:
    """The file at manifest path `path` in a version folder; the manifest's names were validated at upload."""
    target = folder.joinpath(*path.split("/"))
    if path_problem(path) or not target.is_relative_to(folder) or not stat.S_ISREG(target.lstat().st_mode):
        raise NotFound(f"no file {show(path[:300])!r} in the version")
    return target


def _is_text(path: Path) -> bool:
    """Whether a file looks like UTF-8 text: its first bytes decode and hold no NUL."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if b"\x00" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < SNIFF_BYTES)
    except UnicodeDecodeError:
        return False
    return True


def _is_artifact(name: str, meta: PackageMeta) -> bool:
    return any(name == a.rstrip("/") or name.startswith(a.rstrip("/") + "/") for a in meta.artifacts)


def _edit_problems(edits: dict[str, str], manifest: Manifest, meta: PackageMeta, folder: Path) -> list[Problem]:
    """Why these edits cannot be applied to a version, by file."""
    existing = {f.path for f in manifest.files}
    problems: list[Problem] = []
    for name, text in edits.items():
        bad = path_problem(name)
        if bad or name.endswith("/"):
            problems.append(Problem(show(name), f"{show(name)!r}: {bad or 'not a file name'}"))
            continue
        if name not in EDITABLE:
            if name not in existing:
                problems.append(Problem(name, f"{name} is not a file of the version; only {', '.join(EDITABLE)} "
                                              "may be added"))
                continue
            if _is_artifact(name, meta) or not _is_text(_inside(folder, name)):
                problems.append(Problem(name, f"{name} is an artifact or not a text file; only text files can be "
                                              "edited"))
                continue
        elif _is_artifact(name, meta):
            problems.append(Problem(name, f"{name} is an artifact; only text files can be edited"))
            continue
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            problems.append(Problem(name, f"{name} is not valid Unicode text (lone surrogate)"))
            continue
        if size > MAX_EDIT_BYTES:
            problems.append(Problem(name, f"{name} is over {MAX_EDIT_BYTES} bytes"))
    return problems


def _zip_info(name: str, compression: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.create_system = 3
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    info.compress_type = compression
    return info
