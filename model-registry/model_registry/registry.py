"""Models and versions: an upload is validated, extracted, sealed, published, recorded, then announced."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from miaas.bus import MODEL_EVENTS, EventBus
from miaas.errors import BadRequest, NotFound
from miaas.schemas import Manifest, ManifestFile, ModelEvent, ModelSummary, ModelVersion, PackageMeta
from model_registry.storage import ModelStorage, Stage, new_model_id, remove
from model_registry.store import ModelRecord, Store, VersionRecord
from model_registry.validation import Limits, Package, model_name_problem, validate_package

log = logging.getLogger(__name__)


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
    ) -> None:
        self.store = store
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
        stage = self.storage.stage()
        try:
            package = validate_package(upload.path, self.limits, stage.open)
            for folder in package.folders:
                stage.make_folder(folder)
            manifest_sha256 = stage.write_manifest(_manifest(package, upload))
            stage.seal()
            with self._locks.hold(name):
                record = self._commit(name, stage, upload, manifest_sha256, package.meta, created_by)
        finally:
            remove(stage.path)  # already gone when it was published
        self._announce(record)
        log.info("stored %s (%s) v%d from %s", record.model_id, name, record.version, created_by)
        return Published(record, package.warnings)

    def _commit(
        self, name: str, stage: Stage, upload: ReceivedZip, manifest_sha256: str, meta: PackageMeta,
        created_by: str | None,
    ) -> VersionRecord:
        """Number, publish and record a sealed stage; the caller holds the model's lock."""
        model = self.store.find_model_by_name(name)
        model_id = model.model_id if model is not None else new_model_id()
        version = self.store.latest_version(model_id) + 1
        folder = self.storage.publish(stage, upload.path, model_id, version)
        record = VersionRecord(
            model_id=model_id, name=name, version=version, path=folder.relative_to(self.storage.root).as_posix(),
            sha256=upload.sha256, size_bytes=upload.size_bytes, manifest_sha256=manifest_sha256, meta=meta,
            created_by=created_by, created_at=self.clock(),
        )
        try:
            return self.store.add_version(record, new_model=model is None)
        except BaseException:
            self.storage.unpublish(model_id, version)
            raise

    def _announce(self, record: VersionRecord) -> None:
        if self.bus is None:
            return
        event = ModelEvent(
            model_id=record.model_id, name=record.name, version=record.version, sha256=record.sha256,
            path=str(self.path_of(record)), created_by=record.created_by, at=record.created_at,
        )
        try:
            self.bus.publish(MODEL_EVENTS, record.model_id, event)
        except Exception:  # noqa: BLE001 - the version is stored; a lost event must not turn it into an error
            log.exception("could not publish %s v%d to %s", record.model_id, record.version, MODEL_EVENTS)

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
