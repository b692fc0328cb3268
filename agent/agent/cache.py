"""The agent's local cache of model versions pulled over HTTP from the model registry, for agents that do not
mount the model store (issue 11; KServe's LocalModelCache is the anchor).

A version is pulled once (a lock per version: concurrent gets wait for the first), checked as hostile input, and
kept read-only until it is evicted, least recently used first, under a byte limit. A version in use by a
deployment of this agent (the manager says which) is never evicted.

Pulling a version, in order; a failure at any step leaves nothing behind:

1. its MANIFEST.json from the registry, whose sha256 must be fetch-model's `manifest_sha256`;
2. its zip as uploaded, streamed into `.tmp/`, refused past the manifest's `zip_size_bytes`, whose size and
   sha256 must be the manifest's;
3. extraction as the registry did it (one wrapping folder stripped, macOS metadata and a packaged MANIFEST.json
   skipped), refusing any file the manifest does not list or that is missing, any name that could leave the
   folder, links, devices, encrypted entries, and a file that inflates past its listed size; each file's size
   and sha256 are checked as it is written;
4. the folder made read-only (files 0444, folders 0555) and renamed into place.

A cached version is verified again (every file) each time it is used; a damaged one is moved aside and pulled
anew. The registry's fetch-model answer is kept beside the files, so a cached version can start while the
registry is unreachable.

Layout of AGENT_MODEL_CACHE_DIR:

    index.json                          the entries with their size and last use (written whole, atomically)
    .tmp/                               pulls in progress and evictions being removed; emptied at start
    .damaged/                           entries found damaged or outdated while a deployment may still use them;
                                        emptied at start
    <model_id>/<version>/answer.json    the registry's fetch-model answer
    <model_id>/<version>/model/         the version folder, with its MANIFEST.json

Glossary: *entry*, one cached version; *in use*, held by a deployment of this agent that is not finished;
*pinned*, being got right now.
"""

from __future__ import annotations

import hashlib
import logging
import lzma
import os
import re
import shutil
import stat
import threading
import time
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO, Literal, Protocol, TypeVar

from pydantic import ValidationError

from agent.errors import ProvisionFailed
from agent.verify import MANIFEST, verify_version
from miaas.errors import MiaasError
from miaas.schemas import FetchedVersion, Manifest, Wire

log = logging.getLogger(__name__)

INDEX, ANSWER, MODEL, TMP, DAMAGED = "index.json", "answer.json", "model", ".tmp", ".damaged"
FILE_MODE, DIR_MODE = 0o444, 0o555
MAX_MANIFEST_BYTES = 64 << 20
MAX_ENTRIES = 10_000  # the registry's limit on an upload's entries
CHUNK = 1 << 20
SUPPORTED_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DRIVE = re.compile(r"^[A-Za-z]:")
_ENCODED = re.compile(r"%(2e|2f|5c|00)", re.IGNORECASE)

Key = tuple[str, int]
"""(model_id, version) of an entry."""


class PullFailed(ProvisionFailed):
    """A version could not be pulled into the cache, or what was pulled is not what the registry recorded."""

    code = "model_pull_failed"


class CacheFull(ProvisionFailed):
    """No room in the cache for a version without evicting one in use."""

    code = "model_cache_full"


class VersionSource(Protocol):
    """Where versions are pulled from: the model registry, signed as the agent (agent.fetch.RegistryFetcher)."""

    def read_manifest(self, answer: FetchedVersion, limit: int) -> bytes:
        """The version's MANIFEST.json; raises when it is longer than `limit` bytes."""
        ...

    def download_zip(self, answer: FetchedVersion, out: BinaryIO, limit: int) -> None:
        """Write the version's zip into `out`; raises when it is longer than `limit` bytes."""
        ...


class CacheEntry(Wire):
    """One cached version, as the index keeps it."""

    model_id: str
    name: str
    version: int
    manifest_sha256: str
    size_bytes: int
    last_used: float
    pulled_at: float


class CacheIndex(Wire):
    schema_version: Literal[1] = 1
    entries: list[CacheEntry]


class CacheUsage(Wire):
    """What the cache holds and has done since the agent started (GET /model-cache)."""

    root: str
    max_bytes: int
    used_bytes: int
    entries: int
    pulls: int
    hits: int
    evictions: int
    versions: list[CacheEntry]


def _nothing_in_use() -> Iterable[Key]:
    return ()


class ModelCache:
    """Versions pulled from `source` into `root`, at most `max_bytes` of them. Thread-safe. `open()` it first.

    `in_use` names the (model id or name, version) held by unfinished deployments: they are never evicted."""

    def __init__(self, root: Path, *, max_bytes: int, source: VersionSource | None = None,
                 clock: Callable[[], float] = time.time,
                 in_use: Callable[[], Iterable[Key]] = _nothing_in_use) -> None:
        self.root = root.absolute()
        self.max_bytes = max_bytes
        self.source = source
        self.clock = clock
        self.in_use = in_use
        self.pulls = self.hits = self.evictions = 0
        self._entries: dict[Key, CacheEntry] = {}
        self._reserved = 0
        self._pins: dict[Key, int] = {}
        self._gates: dict[Key, threading.Lock] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ start

    def open(self) -> ModelCache:
        """Read the index and check every entry on disk: a partial or corrupt one is removed, an intact one the
        index lost (a crash between the rename and the index write) is kept. Nothing is evicted here: which
        versions are in use is known only once the agent has adopted what it still runs."""
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in (TMP, DAMAGED):
            if (self.root / leftover).exists():
                _remove_tree(self.root / leftover)
        (self.root / TMP).mkdir()
        for stale in self.root.glob(f"{INDEX}.*.tmp"):
            stale.unlink()
        indexed = self._read_index()
        kept: dict[Key, CacheEntry] = {}
        for model_dir in sorted(self.root.iterdir()):
            if model_dir.name in (TMP, INDEX) or not model_dir.is_dir() or model_dir.is_symlink():
                continue
            for folder in sorted(model_dir.iterdir()):
                entry = self._check_on_disk(model_dir.name, folder, indexed)
                if entry is None:
                    log.warning("model cache: removing %s, a partial or damaged entry", folder)
                    _remove_tree(folder)
                else:
                    kept[entry.model_id, entry.version] = entry
            if not any(model_dir.iterdir()):
                model_dir.rmdir()
        for key in sorted(indexed.keys() - kept.keys()):
            log.warning("model cache: %s v%d was in the index but is not on disk", *key)
        with self._lock:
            self._entries = kept
            self._save()
        log.info("model cache %s: %d version(s), %d of %d bytes", self.root, len(kept), self._used(), self.max_bytes)
        return self

    def _read_index(self) -> dict[Key, CacheEntry]:
        path = self.root / INDEX
        if not path.exists():
            return {}
        try:
            index = CacheIndex.model_validate_json(path.read_bytes())
        except (ValidationError, OSError, ValueError) as exc:
            log.warning("model cache: the index %s is unreadable (%s); rebuilding it from the entries", path, exc)
            return {}
        return {(e.model_id, e.version): e for e in index.entries}

    def _check_on_disk(self, model_id: str, folder: Path, indexed: dict[Key, CacheEntry]) -> CacheEntry | None:
        """The entry of `folder` when it is whole (its answer, its manifest, every file at its size), else None."""
        if not folder.name.isdigit() or folder.is_symlink() or not folder.is_dir():
            return None
        try:
            answer = FetchedVersion.model_validate_json((folder / ANSWER).read_bytes())
            if (answer.model_id, str(answer.version)) != (model_id, folder.name):
                return None
            size = _check_structure(folder / MODEL, answer.manifest_sha256)
        except (OSError, ValidationError, ValueError, ProvisionFailed):
            return None
        size += (folder / ANSWER).stat().st_size
        known = indexed.get((answer.model_id, answer.version))
        now = self.clock()
        return CacheEntry(
            model_id=answer.model_id, name=answer.name, version=answer.version,
            manifest_sha256=answer.manifest_sha256, size_bytes=size,
            last_used=known.last_used if known else folder.stat().st_mtime,
            pulled_at=known.pulled_at if known else now,
        )

    # ------------------------------------------------------------------ use

    def get(self, model_id: str, version: int, fetch_answer: FetchedVersion) -> Path:
        """The verified, read-only folder of a version (`model_id` as asked: an id or a name), pulled when it is
        not cached or no longer intact. Raises PullFailed or CacheFull naming the problem."""
        answer = _checked_answer(model_id, version, fetch_answer)
        key = (answer.model_id, answer.version)
        with self._lock:
            gate = self._gates.setdefault(key, threading.Lock())
            self._pins[key] = self._pins.get(key, 0) + 1
        try:
            with gate:
                return self._hit(key, answer) or self._pull(key, answer)
        finally:
            with self._lock:
                self._pins[key] -= 1
                if not self._pins[key]:
                    del self._pins[key], self._gates[key]

    def cached_answer(self, model_id: str, version: int) -> FetchedVersion | None:
        """The fetch-model answer kept with a cached version (`model_id`: an id or a name), or None."""
        with self._lock:
            found = [k for k, e in self._entries.items() if version == e.version and model_id in (e.model_id, e.name)]
        for key in found:
            try:
                return FetchedVersion.model_validate_json((self._folder(key) / ANSWER).read_bytes())
            except (OSError, ValidationError, ValueError) as exc:
                log.warning("model cache: the answer kept for %s v%d is unreadable: %s", *key, exc)
        return None

    def folder_of(self, answer: FetchedVersion) -> Path:
        """Where the version folder of `answer` is (or will be) once got."""
        return self._folder((_safe_model_id(answer.model_id), answer.version)) / MODEL

    def usage(self) -> CacheUsage:
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: e.last_used, reverse=True)
            return CacheUsage(root=str(self.root), max_bytes=self.max_bytes, used_bytes=self._used(),
                              entries=len(entries), pulls=self.pulls, hits=self.hits, evictions=self.evictions,
                              versions=entries)

    # ------------------------------------------------------------------ internals

    def _folder(self, key: Key) -> Path:
        return self.root / key[0] / str(key[1])

    def _used(self) -> int:
        return sum(e.size_bytes for e in self._entries.values())

    def _save(self) -> None:
        """Write the index whole (tmp file, fsync, rename); called with the lock held."""
        body = CacheIndex(entries=sorted(self._entries.values(), key=lambda e: (e.model_id, e.version)))
        tmp = self.root / f"{INDEX}.{uuid.uuid4().hex}.tmp"
        with tmp.open("xb") as out:
            out.write(body.model_dump_json(indent=2).encode() + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.root / INDEX)
        _fsync_dir(self.root)

    def _hit(self, key: Key, answer: FetchedVersion) -> Path | None:
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            return None
        folder = self._folder(key) / MODEL
        if entry.manifest_sha256 != answer.manifest_sha256:
            self._set_aside(key, "its MANIFEST.json is not the one the model registry records now")
            return None
        try:
            verify_version(folder, entry.manifest_sha256)
        except ProvisionFailed as exc:
            self._set_aside(key, exc.message)
            return None
        with self._lock:
            self._entries[key] = entry.model_copy(update={"last_used": self.clock()})
            self.hits += 1
            self._save()
        log.info("model cache: %s v%d served from %s", key[0], key[1], folder)
        return folder

    def _set_aside(self, key: Key, why: str) -> None:
        """Forget an entry and move it into .damaged/ (a deployment may still run from it; emptied at start)."""
        log.warning("model cache: %s v%d is set aside and pulled again: %s", key[0], key[1], why)
        with self._lock:
            self._entries.pop(key, None)
            self._save()
        aside = self.root / DAMAGED / f"{key[0]}-v{key[1]}-{uuid.uuid4().hex[:8]}"
        aside.parent.mkdir(exist_ok=True)
        folder = self._folder(key)
        os.chmod(folder, 0o755)  # a folder's '..' changes when it moves to another parent
        os.rename(folder, aside)

    def _pull(self, key: Key, answer: FetchedVersion) -> Path:
        what = f"model {answer.name} ({answer.model_id}) v{answer.version}"
        source = self.source
        if source is None:
            raise PullFailed(f"{what} is not in the model cache and no model registry is configured to pull it from")
        started = time.monotonic()
        staging = self.root / TMP / f"pull-{uuid.uuid4().hex}"
        reserved = 0
        try:
            staging.mkdir()
            raw = _ask(what, lambda: source.read_manifest(answer, MAX_MANIFEST_BYTES))
            found = hashlib.sha256(raw).hexdigest()
            if found != answer.manifest_sha256:
                raise PullFailed(f"{what}: the MANIFEST.json served by the model registry is not the one it recorded "
                                 f"(sha256 {found[:12]}…, recorded {answer.manifest_sha256[:12]}…): refusing it")
            try:
                manifest = Manifest.model_validate_json(raw)
            except ValidationError as exc:
                raise PullFailed(f"{what}: its MANIFEST.json is malformed ({exc.error_count()} error(s))") from exc
            files_bytes = sum(f.size_bytes for f in manifest.files)
            answer_bytes = answer.model_dump_json(indent=2).encode() + b"\n"
            entry_bytes = files_bytes + len(raw) + len(answer_bytes)
            reserved = self._reserve(key, what, entry_bytes + manifest.zip_size_bytes)
            archive = staging / "version.zip"
            with archive.open("xb") as out:
                _ask(what, lambda: source.download_zip(answer, out, manifest.zip_size_bytes))
            size, digest = _digest(archive)
            if (size, digest) != (manifest.zip_size_bytes, manifest.zip_sha256):
                raise PullFailed(f"{what}: the zip downloaded ({size} bytes, sha256 {digest[:12]}…) is not the one its "
                                 f"MANIFEST.json records ({manifest.zip_size_bytes} bytes, sha256 "
                                 f"{manifest.zip_sha256[:12]}…): refusing it")
            model = staging / MODEL
            try:
                extract_version(archive, manifest, model)
            except PullFailed as exc:
                raise PullFailed(f"{what}: its zip is refused: {exc.message}") from exc
            archive.unlink()
            _write_new(model / MANIFEST, raw)
            _write_new(staging / ANSWER, answer_bytes)
            seal(model)
            os.chmod(staging / ANSWER, FILE_MODE)
            target = self._folder(key)
            target.parent.mkdir(exist_ok=True)
            if target.exists():  # a leftover the index does not hold: never run from it, never delete it blind
                self._set_aside(key, "a folder the index did not hold was in its place")
            os.rename(staging, target)
            os.chmod(target, DIR_MODE)
            _fsync_dir(target.parent)
            now = self.clock()
            entry = CacheEntry(model_id=answer.model_id, name=answer.name, version=answer.version,
                               manifest_sha256=answer.manifest_sha256, size_bytes=entry_bytes, last_used=now,
                               pulled_at=now)
            with self._lock:
                self._entries[key] = entry
                self.pulls += 1
                self._save()
        except ProvisionFailed:
            raise
        except MiaasError as exc:
            raise PullFailed(f"pulling {what} from the model registry failed: {exc.message}") from exc
        except OSError as exc:
            raise PullFailed(f"pulling {what} into the model cache {self.root} failed: {exc}") from exc
        finally:
            if reserved:
                with self._lock:
                    self._reserved -= reserved
            if staging.exists():
                _remove_tree(staging)
        log.info("model cache: pulled %s from the model registry: %d bytes (%d files) in %.2f s", what,
                 files_bytes, len(manifest.files), time.monotonic() - started)
        return target / MODEL

    def _reserve(self, key: Key, what: str, need: int) -> int:
        """Make room for `need` bytes, evicting the least recently used entries not in use, and hold it."""
        if need > self.max_bytes:
            raise CacheFull(f"{what} needs {need} bytes in the model cache, more than it may hold "
                            f"(AGENT_MODEL_CACHE_MAX_BYTES={self.max_bytes})")
        in_use = set(self.in_use())
        victims: list[Key] = []
        trash: list[Path] = []
        with self._lock:
            while self._used() + self._reserved + need > self.max_bytes:
                free = [e for k, e in self._entries.items() if k != key and k not in self._pins
                        and (e.model_id, e.version) not in in_use and (e.name, e.version) not in in_use]
                if not free:
                    held = ", ".join(f"{e.name} v{e.version}" for e in self._entries.values())
                    raise CacheFull(f"no room in the model cache for {what} ({need} bytes): {self._used()} of "
                                    f"{self.max_bytes} bytes are held by versions in use or being pulled ({held}); "
                                    "stop a deployment or raise AGENT_MODEL_CACHE_MAX_BYTES")
                victim = min(free, key=lambda e: (e.last_used, e.pulled_at))
                victims.append((victim.model_id, victim.version))
                del self._entries[victims[-1]]
                self.evictions += 1
            self._reserved += need
            if victims:
                self._save()
            for victim_key in victims:  # under the lock: a pull of the same version cannot rename into it meanwhile
                trash.append(self.root / TMP / f"evicted-{uuid.uuid4().hex}")
                folder = self._folder(victim_key)
                os.chmod(folder, 0o755)
                os.rename(folder, trash[-1])
                log.info("model cache: evicted %s v%d (least recently used) to make room for %s", *victim_key, what)
        for path in trash:
            _remove_tree(path)
        return need


T = TypeVar("T")


def _ask(what: str, call: Callable[[], T]) -> T:
    """A call to the version source, its refusals and failures named as the pull of `what`."""
    try:
        return call()
    except MiaasError as exc:
        raise PullFailed(f"pulling {what} from the model registry failed: {exc.message}") from exc


# --------------------------------------------------------------------------- the zip, as hostile input


def extract_version(archive: Path, manifest: Manifest, dest: Path, *, max_entries: int = MAX_ENTRIES) -> None:
    """Extract the zip of a version into `dest` (made here) as the registry stored it, accepting nothing the
    manifest does not list exactly. Raises PullFailed naming the first problem; the caller removes `dest`."""
    expected = {f.path: f for f in manifest.files}
    for name in expected:
        if bad := _name_problem(name):
            raise PullFailed(f"MANIFEST.json lists {_show(name)!r}, which cannot be a file of a version: {bad}")
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
        raise PullFailed(f"not a zip file ({exc})") from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > max_entries:
            raise PullFailed(f"too many entries: {len(infos)} (the limit is {max_entries})")
        files = []
        for info in infos:
            if bad := _entry_problem(info):
                raise PullFailed(f"{_show(info.filename)!r}: {bad}")
            if not (_is_junk(info.filename) or info.is_dir()):
                files.append(info)
        prefix = _wrapping_folder([i.filename for i in files])
        plan: dict[str, zipfile.ZipInfo] = {}
        for info in files:
            name = info.filename[len(prefix):]
            if name == MANIFEST:
                continue  # the registry ignores a packaged one and writes its own
            if name not in expected:
                raise PullFailed(f"the zip holds {_show(name)!r}, which MANIFEST.json does not list")
            if name in plan:
                raise PullFailed(f"the zip holds {_show(name)!r} twice")
            plan[name] = info
        if missing := sorted(expected.keys() - plan.keys()):
            raise PullFailed(f"files of MANIFEST.json missing from the zip: {', '.join(missing[:10])}")
        dest.mkdir()
        for name, info in sorted(plan.items()):
            _extract_one(zf, info, name, expected[name].size_bytes, expected[name].sha256, dest)


def _extract_one(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, size_bytes: int, sha256: str,
                 dest: Path) -> None:
    parts = name.split("/")
    parent = dest
    for part in parts[:-1]:  # made here, one by one: no link can be on the way
        parent = parent / part
        if not parent.is_dir():
            parent.mkdir()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(os.open(parent / parts[-1], flags, 0o644), "wb") as out, zf.open(info) as src:
            while chunk := src.read(CHUNK):
                size += len(chunk)
                if size > size_bytes:
                    raise PullFailed(f"{_show(name)!r} inflates past the {size_bytes} bytes MANIFEST.json lists "
                                     "(a compression bomb?)")
                digest.update(chunk)
                out.write(chunk)
    except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, NotImplementedError, ValueError) as exc:
        raise PullFailed(f"{_show(name)!r} cannot be read: {exc}") from exc
    if size != size_bytes or digest.hexdigest() != sha256:
        raise PullFailed(f"{_show(name)!r} does not match its MANIFEST.json entry (size {size}, listed "
                         f"{size_bytes}; or its sha256): the version was changed")


def _name_problem(name: str) -> str | None:
    """Why `name` cannot be a path inside a version folder (the registry's rules), or None."""
    if not name:
        return "empty file name"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "file name contains a control character or NUL"
    if "\\" in name:
        return "file name contains a backslash"
    if name.startswith("/"):
        return "absolute path"
    if _DRIVE.match(name):
        return "path starts with a drive letter"
    if _ENCODED.search(name):
        return "file name contains a percent-encoded '.', '/', '\\' or NUL"
    parts = (name[:-1] if name.endswith("/") else name).split("/")
    if ".." in parts:
        return "path goes up with '..'"
    if any(p in ("", ".") for p in parts):
        return "path has an empty or '.' component"
    if len(name.encode()) > 1024 or any(len(p.encode()) > 255 for p in parts):
        return "file name is too long"
    return None


def _entry_problem(info: zipfile.ZipInfo) -> str | None:
    if "\x00" in info.orig_filename:
        return "file name contains a NUL byte"
    if bad := _name_problem(info.filename):
        return bad
    if info.flag_bits & 0x1:
        return "encrypted entries are not supported"
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        return "symbolic links are not allowed"
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "only regular files and folders are allowed"
    if info.compress_type not in SUPPORTED_METHODS:
        return f"compression method {info.compress_type} is not supported"
    return None


def _is_junk(name: str) -> bool:
    """macOS metadata, which the registry skips too."""
    return name.startswith("__MACOSX/") or name.rsplit("/", 1)[-1] == ".DS_Store"


def _wrapping_folder(names: list[str]) -> str:
    """'top/' when every file is inside the one folder 'top' (the registry strips it), else ''."""
    if not names or any("/" not in n for n in names):
        return ""
    tops = {n.split("/", 1)[0] for n in names}
    return f"{tops.pop()}/" if len(tops) == 1 else ""


def _show(name: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)[:200]


# --------------------------------------------------------------------------- files


def _checked_answer(model_id: str, version: int, answer: FetchedVersion) -> FetchedVersion:
    if answer.version != version or model_id not in (answer.model_id, answer.name):
        raise PullFailed(f"the model registry answered for {answer.name} ({answer.model_id}) v{answer.version} "
                         f"when asked for {model_id} v{version}")
    _safe_model_id(answer.model_id)
    return answer


def _safe_model_id(model_id: str) -> str:
    """A model id fit to name a folder; a model id is never used as a path unchecked."""
    if not _MODEL_ID.match(model_id) or model_id in (TMP, DAMAGED) or set(model_id) == {"."}:
        raise PullFailed(f"the model registry gave a model id that cannot name a folder: {_show(model_id)!r}")
    return model_id


def _check_structure(folder: Path, manifest_sha256: str) -> int:
    """The bytes of a version folder whose manifest is the recorded one and whose files are all there at their
    listed sizes (cheap: nothing hashed but the manifest); raises ProvisionFailed or OSError otherwise."""
    raw = (folder / MANIFEST).read_bytes()
    if hashlib.sha256(raw).hexdigest() != manifest_sha256:
        raise ProvisionFailed(f"{folder / MANIFEST} is not the recorded one")
    manifest = Manifest.model_validate_json(raw)
    found: dict[str, int] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            if Path(root, name).is_symlink():
                raise ProvisionFailed(f"{Path(root, name)} is a symlink")
        for name in files:
            found[Path(root, name).relative_to(folder).as_posix()] = Path(root, name).stat().st_size
    found.pop(MANIFEST, None)
    if found != {f.path: f.size_bytes for f in manifest.files}:
        raise ProvisionFailed(f"{folder} does not hold the files of its manifest")
    return sum(found.values()) + len(raw)


def seal(folder: Path) -> None:
    """Make every file 0444 and every folder 0555, the top one included."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            os.chmod(os.path.join(root, name), FILE_MODE)
        for name in dirs:
            os.chmod(os.path.join(root, name), DIR_MODE)
    os.chmod(folder, DIR_MODE)


def _remove_tree(path: Path) -> None:
    """Remove a (possibly read-only) tree."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    os.chmod(path, 0o755)
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            sub = os.path.join(root, name)
            if not os.path.islink(sub):
                os.chmod(sub, 0o755)
    shutil.rmtree(path)


def _write_new(path: Path, data: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(path, flags, 0o644), "wb") as out:
        out.write(data)


def _digest(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as src:
        while chunk := src.read(CHUNK):
            size += len(chunk)
            digest.update(chunk)
    return size, digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

