"""`python -m model_registry adopt-store`: rebuild an empty database from the model store it is to own.

Every version folder is verified against its MANIFEST.json (every file's size and sha256, no file more or less,
the zip's size and sha256) and its record (`.records/v<N>.json`: the model's name, who uploaded it and when).
Version numbers are kept, and so is each model's count of numbers ever given (deleted versions leave their record
behind), so no number is given twice. Anything that does not verify refuses the whole adoption, and then nothing
is changed: neither the database nor the store. Aliases are not in the store: set them again afterwards.
The quarantine (`.quarantine/`) is not adopted. Run it while no registry uses the store or the database.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy.engine import make_url

from miaas.schemas import Manifest, PackageMeta
from model_registry.ownership import describe_database, new_store_id
from model_registry.settings import ModelRegistrySettings
from model_registry.storage import MARKER, ModelStorage, StoreMarker, VersionFacts
from model_registry.store import AdoptedModel, Store, StoreOwner, VersionRecord
from model_registry.validation import MANIFEST, META, model_name_problem

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class AdoptionRefused(RuntimeError):
    """The store cannot be adopted as it is; nothing was changed. `problems` lists every reason."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = problems or []
        listed = "".join(f"\n  - {p}" for p in self.problems)
        super().__init__(message + listed)


@dataclass(frozen=True)
class Adopted:
    store_id: str
    models: int
    versions: int
    warnings: list[str] = field(default_factory=list)


def adopt_store(
    settings: ModelRegistrySettings, *, names: dict[str, str] | None = None,
    clock: Callable[[], datetime] | None = None,
) -> Adopted:
    """Rebuild the (empty) database of `settings` from its model store; raises `AdoptionRefused`, changing nothing,
    when the database records models or any version does not verify. `names` names models whose versions have no
    record (stores written before records existed); such a model is otherwise named after its id."""
    now = (clock or (lambda: datetime.now(UTC)))()
    storage = ModelStorage(settings.model_store)
    root, db = storage.root, describe_database(settings.database_url)
    if not root.is_dir():
        raise AdoptionRefused(f"there is no model store at {root} (MODEL_STORE): nothing to adopt")
    store = Store(settings.database_url)
    try:
        store.create_schema()
        if store.has_records():
            raise AdoptionRefused(f"the database {db} records models already; a store is adopted only into an "
                                  "empty database. Nothing was changed.")
        try:
            marker = storage.read_marker()
        except ValueError as exc:
            raise AdoptionRefused(str(exc)) from exc
        models, versions, warnings = _read_store(storage, names or {})
        if marker is None:
            marker = StoreMarker(store_id=new_store_id(), created_at=now, database=_hidden(settings.database_url))
            storage.write_marker(marker)
            warnings.append(f"the store had no {MARKER}: wrote one, store id {marker.store_id}")
        previous = store.owner()
        store.adopt(StoreOwner(marker.store_id, str(root), now), models, versions)
        if previous is not None and previous.store_id != marker.store_id:
            warnings.append(f"the database owned store {previous.store_id} (at {previous.root}), which held nothing "
                            "it recorded; it owns this one now")
    finally:
        store.close()
    for warning in warnings:
        log.warning("adopt-store: %s", warning)
    log.info("adopted the model store %s (%s) into %s: %d models, %d versions", root, marker.store_id, db,
             len(models), len(versions))
    return Adopted(marker.store_id, len(models), len(versions), warnings)


def _read_store(storage: ModelStorage, names: dict[str, str]) -> tuple[list[AdoptedModel], list[VersionRecord],
                                                                      list[str]]:
    """Every model and version of the store, verified; `AdoptionRefused` with every problem found otherwise."""
    problems: list[str] = []
    warnings: list[str] = []
    models: list[AdoptedModel] = []
    versions: list[VersionRecord] = []
    unknown = sorted(set(names) - set(storage.model_ids()))
    problems += [f"--name {m}=...: the store has no model {m}" for m in unknown]
    for model_id in storage.model_ids():
        folders, zips, records = storage.version_numbers(model_id)
        found: list[VersionRecord] = []
        facts: list[VersionFacts] = []
        for version in sorted(folders | zips):
            where = f"{model_id}/v{version}"
            if version not in folders or version not in zips:
                missing = "folder" if version not in folders else f"zip (.zips/v{version}.zip)"
                problems.append(f"{where}: its {missing} is missing")
                continue
            try:
                record, fact = _verify(storage, model_id, version)
            except _Bad as exc:
                problems.append(f"{where}: {exc}")
                continue
            found.append(record)
            if fact is not None:
                facts.append(fact)
        for version in sorted(records - folders - zips):  # tombstones of deleted versions
            try:
                fact = storage.read_record(model_id, version)
            except (OSError, ValidationError) as exc:
                problems.append(f"{model_id}/.records/v{version}.json cannot be read: {_short(exc)}")
                continue
            if fact is not None:
                facts.append(fact)
        if not found and not facts:
            warnings.append(f"{model_id}: holds no version and no record; left out")
            continue
        name = _name_of(model_id, facts, names, problems, warnings)
        if name is None:
            continue
        numbers = [r.version for r in found] + [f.version for f in facts]
        created = [r.created_at for r in found] + [f.created_at for f in facts]
        models.append(AdoptedModel(model_id, name, min(created), max(numbers)))
        versions += [replace(r, name=name) for r in found]
    taken: dict[str, str] = {}
    for m in models:
        if m.name in taken:
            problems.append(f"{taken[m.name]} and {m.model_id} are both named {m.name!r}")
        taken[m.name] = m.model_id
    if problems:
        raise AdoptionRefused(f"the model store {storage.root} cannot be adopted; nothing was changed:", problems)
    return models, versions, warnings


def _name_of(model_id: str, facts: list[VersionFacts], names: dict[str, str], problems: list[str],
             warnings: list[str]) -> str | None:
    recorded = {f.name for f in facts}
    given = names.get(model_id)
    if len(recorded) > 1:
        problems.append(f"{model_id}: its records disagree on its name ({', '.join(sorted(recorded))})")
        return None
    if recorded:
        name = recorded.pop()
        if given is not None and given != name:
            problems.append(f"{model_id}: its records name it {name!r}, not {given!r}")
            return None
        return name
    if given is not None:
        bad = model_name_problem(given)
        if bad:
            problems.append(f"{model_id}: --name {given!r}: {bad}")
            return None
        return given
    warnings.append(f"{model_id}: its versions have no record of the model's name; named {model_id} "
                    f"(give --name {model_id}=<name> to name it)")
    return model_id


class _Bad(Exception):
    """A version that does not verify."""


def _verify(storage: ModelStorage, model_id: str, version: int) -> tuple[VersionRecord, VersionFacts | None]:
    folder, archive = storage.version_dir(model_id, version), storage.zip_path(model_id, version)
    if folder.is_symlink() or not folder.is_dir() or archive.is_symlink() or not archive.is_file():
        raise _Bad("its folder or its zip is not a plain folder / file")
    try:
        raw = (folder / MANIFEST).read_bytes()
        manifest = Manifest.model_validate_json(raw)
    except FileNotFoundError as exc:
        raise _Bad(f"it has no {MANIFEST}") from exc
    except (OSError, ValidationError) as exc:
        raise _Bad(f"its {MANIFEST} cannot be read: {_short(exc)}") from exc
    on_disk = _files(folder)
    listed = {f.path: f for f in manifest.files}
    if set(on_disk) != set(listed):
        more, less = sorted(set(on_disk) - set(listed)), sorted(set(listed) - set(on_disk))
        raise _Bad(f"its files are not those of its {MANIFEST}" + (f"; not listed: {', '.join(more[:5])}" if more
                                                                   else "") + (f"; missing: {', '.join(less[:5])}"
                                                                               if less else ""))
    for path, entry in sorted(listed.items()):
        size, digest = _digest(on_disk[path])
        if size != entry.size_bytes or digest != entry.sha256:
            raise _Bad(f"{path} does not match its {MANIFEST} (size {size}, sha256 {digest[:12]}…; "
                       f"listed: {entry.size_bytes}, {entry.sha256[:12]}…)")
    zip_size, zip_sha256 = _digest(archive)
    if zip_size != manifest.zip_size_bytes or zip_sha256 != manifest.zip_sha256:
        raise _Bad(f"its zip does not match its {MANIFEST}")
    if META not in listed:
        raise _Bad(f"it has no {META}")
    try:
        meta = PackageMeta.model_validate(json.loads((folder / META).read_bytes().decode("utf-8-sig")))
    except (UnicodeDecodeError, ValueError, ValidationError) as exc:
        raise _Bad(f"its {META} is not valid: {_short(exc)}") from exc
    manifest_sha256 = hashlib.sha256(raw).hexdigest()
    try:
        fact = storage.read_record(model_id, version)
    except (OSError, ValidationError) as exc:
        raise _Bad(f"its record (.records/v{version}.json) cannot be read: {_short(exc)}") from exc
    if fact is not None and (fact.model_id, fact.version, fact.sha256, fact.size_bytes, fact.manifest_sha256) != (
            model_id, version, zip_sha256, zip_size, manifest_sha256):
        raise _Bad(f"its record (.records/v{version}.json) does not match the version")
    created_at = fact.created_at if fact is not None else datetime.fromtimestamp(
        (folder / MANIFEST).stat().st_mtime, UTC)
    record = VersionRecord(
        model_id=model_id, name=fact.name if fact is not None else model_id, version=version,
        path=folder.relative_to(storage.root).as_posix(), sha256=zip_sha256, size_bytes=zip_size,
        manifest_sha256=manifest_sha256, meta=meta, created_by=fact.created_by if fact is not None else None,
        created_at=created_at,
    )
    return record, fact


def _files(folder: Path) -> dict[str, Path]:
    """The regular files of a version folder but MANIFEST.json, by '/'-path; anything else is not a version's."""
    found: dict[str, Path] = {}
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(parent) / name
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise _Bad(f"{path.relative_to(folder).as_posix()} is not a regular file")
            relative = path.relative_to(folder).as_posix()
            if relative != MANIFEST:
                found[relative] = path
    return found


def _digest(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _hidden(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
