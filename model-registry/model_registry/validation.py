"""Validation of a model package: a pure check of one zip, safe against traversal, links and compression bombs.

It reads only the zip it is given. Every entry is inflated once, counted and hashed as it inflates (header sizes
are never trusted); the bytes go to the caller's `write` callback, if any, so that the pass which catches a bomb
is also the pass which extracts the package. Problems are collected and raised together as `InvalidPackage`.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import stat
import struct
import threading
import unicodedata
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, BinaryIO

from pydantic import ValidationError

from miaas.errors import BadRequest
from miaas.schemas import MODEL_NAME_RE, PackageMeta, Resources
from model_registry.requirements import logical_lines, requirement_problem

META, APP, REQUIREMENTS = "meta.json", "app.py", "requirements.txt"
MANIFEST = "MANIFEST.json"
TEXT_FILES = (META, APP, REQUIREMENTS)
CHUNK = 4 << 20
LOCAL_HEADER_BYTES = 30
UTF8_NAME_FLAG = 0x800
MODEL_ID_RE = re.compile(r"^m-[0-9a-f]{12}$")
MAX_PROBLEMS_IN_MESSAGE = 10
SUPPORTED_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)

Writer = Callable[[str], IO[bytes]]
"""Opens the destination of one extracted file, named by its path inside the version folder."""


@dataclass(frozen=True)
class Limits:
    """What one package may cost to unpack."""

    max_entries: int = 10_000
    max_unpacked_bytes: int = 4 << 30
    max_ratio: float = 200.0
    # Small files may compress very well (zeros, repeated text) without being a bomb.
    ratio_grace_bytes: int = 1 << 20
    # meta.json, app.py and requirements.txt are held in memory to check them.
    max_text_bytes: int = 4 << 20
    # Python's zipfile parses the whole central directory at once: bound it before it does.
    max_directory_bytes_per_entry: int = 1024
    # Direct URLs, VCS links and other indexes in requirements.txt.
    allow_requirement_urls: bool = False


@dataclass(frozen=True)
class Problem:
    """One reason a package is refused; `file` is None when it is about the package as a whole."""

    file: str | None
    message: str

    def to_dict(self) -> dict[str, str | None]:
        return {"file": self.file, "message": self.message}


class InvalidPackage(BadRequest):
    """A package that cannot become a version; `details` lists every problem found."""

    code = "invalid_package"

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = tuple(problems)
        shown = "; ".join(p.message for p in self.problems[:MAX_PROBLEMS_IN_MESSAGE])
        more = len(self.problems) - MAX_PROBLEMS_IN_MESSAGE
        super().__init__(
            f"invalid package: {shown}" + (f"; and {more} more (see details)" if more > 0 else ""),
            details=[p.to_dict() for p in self.problems],
        )


@dataclass(frozen=True)
class PackageFile:
    """One file of a package, named by its path inside the version folder."""

    name: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class Package:
    """A valid package: its meta.json, its files with their checksums, and what the uploader should know."""

    meta: PackageMeta
    files: tuple[PackageFile, ...]
    folders: tuple[str, ...]
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class _Entry:
    info: zipfile.ZipInfo
    name: str


# --------------------------------------------------------------------------- names


_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_ENCODED_RE = re.compile(r"%(2e|2f|5c|00)", re.IGNORECASE)
MAX_NAME_BYTES, MAX_PART_BYTES = 1024, 255


def model_name_problem(name: str) -> str | None:
    """Why `name` cannot name a model, or None. A name is never used as a path."""
    if not MODEL_NAME_RE.match(name):
        return (
            f"model name {show(name[:80])!r} is invalid: use 1 to 64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if MODEL_ID_RE.match(name):
        return f"model name {name!r} is reserved: names of the form m-<12 hex digits> are model ids"
    return None


def path_problem(name: str) -> str | None:
    """Why `name` cannot be a path inside a version folder, or None; a trailing '/' marks a folder."""
    if not name:
        return "empty file name"
    if "\x00" in name:
        return "file name contains a NUL byte"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "file name contains a control character"
    if "\\" in name:
        return "file name contains a backslash (use '/')"
    if name.startswith("/"):
        return "absolute path"
    if _DRIVE_RE.match(name):
        return "path starts with a drive letter"
    if _ENCODED_RE.search(name):
        return "file name contains a percent-encoded '.', '/', '\\' or NUL"
    parts = (name[:-1] if name.endswith("/") else name).split("/")
    if ".." in parts:
        return "path goes up with '..'"
    if any(p in ("", ".") for p in parts):
        return "path has an empty or '.' component"
    if len(name.encode()) > MAX_NAME_BYTES or any(len(p.encode()) > MAX_PART_BYTES for p in parts):
        return f"file name is too long (at most {MAX_NAME_BYTES} bytes, {MAX_PART_BYTES} per component)"
    return None


def show(name: str) -> str:
    """A name as it may be printed: control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)


def _fold(name: str) -> str:
    """The key under which two names count as the same file (on case-insensitive or normalising filesystems)."""
    return unicodedata.normalize("NFC", name).casefold()


def _entry_problem(info: zipfile.ZipInfo) -> str | None:
    if "\x00" in info.orig_filename:  # zipfile cuts the name at the NUL; the raw name still has it
        return "file name contains a NUL byte"
    bad = path_problem(info.filename)
    if bad:
        return bad
    if info.flag_bits & 0x1:
        return "encrypted entries are not supported"
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        return "symbolic links are not allowed"
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "only regular files and folders are allowed"
    if kind == stat.S_IFDIR and not info.is_dir():
        return "folder entry without a trailing '/'"
    if info.compress_type not in SUPPORTED_METHODS:
        return f"compression method {info.compress_type} is not supported"
    return None


def _is_junk(name: str) -> bool:
    """macOS metadata that Finder adds to every zip it makes."""
    return name.startswith("__MACOSX/") or name.rsplit("/", 1)[-1] == ".DS_Store"


# --------------------------------------------------------------------------- the zip


def validate_package(source: str | os.PathLike[str] | BinaryIO, limits: Limits, write: Writer | None = None) -> Package:
    """Check a package zip; extract it through `write` while checking. Raises `InvalidPackage`."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fp:
            return _validate(fp, limits, write)
    return _validate(source, limits, write)


def _validate(fp: BinaryIO, limits: Limits, write: Writer | None) -> Package:
    _check_directory_size(fp, limits)
    try:
        zf = zipfile.ZipFile(fp)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, struct.error) as exc:
        why = "" if "not a zip file" in str(exc).lower() else f" ({exc})"
        raise InvalidPackage([Problem(None, f"not a zip file{why}")]) from exc
    with zf:
        notes: list[str] = []
        entries, folders = _plan(zf.infolist(), limits, notes)
        _check_no_overlap(zf)
        files, texts = _extract(zf, entries, limits, write)
    meta = _check_contents(files, folders, texts, limits, notes)
    return Package(meta=meta, files=tuple(files), folders=tuple(folders), warnings=tuple(notes))


def _check_directory_size(fp: BinaryIO, limits: Limits) -> None:
    """Refuse a central directory too big for `max_entries`, read from the end record without parsing it."""
    declared = _declared_directory(fp)
    fp.seek(0)
    if declared is None:
        return  # not a zip: zipfile says so with its own words
    entries, size = declared
    if entries > limits.max_entries or size > limits.max_entries * limits.max_directory_bytes_per_entry:
        raise InvalidPackage([Problem(None, f"too many entries: the zip declares {entries} "
                                            f"(the limit is {limits.max_entries})")])


def _declared_directory(fp: BinaryIO) -> tuple[int, int] | None:
    """(entries, central directory bytes) of the end-of-central-directory record (zip64 too), or None."""
    fp.seek(0, os.SEEK_END)
    size = fp.tell()
    tail_len = min(size, 22 + 0xFFFF)
    fp.seek(size - tail_len)
    tail = fp.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return None
    entries, cd_size = struct.unpack_from("<HI", tail, at + 10)
    if entries != 0xFFFF and cd_size != 0xFFFFFFFF:
        return entries, cd_size
    locator_at = size - tail_len + at - 20
    if locator_at < 0:
        return entries, cd_size
    fp.seek(locator_at)
    locator = fp.read(20)
    if locator[:4] != b"PK\x06\x07":
        return entries, cd_size
    (record_at,) = struct.unpack_from("<Q", locator, 8)
    fp.seek(record_at)
    record = fp.read(56)
    if len(record) < 56 or record[:4] != b"PK\x06\x06":
        return entries, cd_size
    entries64, cd_size64 = struct.unpack_from("<QQ", record, 32)
    return int(entries64), int(cd_size64)


def _plan(infos: list[zipfile.ZipInfo], limits: Limits, notes: list[str]) -> tuple[list[_Entry], list[str]]:
    """Which entries become which files: every name checked, junk skipped, a wrapping folder stripped."""
    if len(infos) > limits.max_entries:
        raise InvalidPackage([Problem(None, f"too many entries: {len(infos)} (the limit is {limits.max_entries})")])
    problems: list[Problem] = []
    files: list[zipfile.ZipInfo] = []
    folders: list[str] = []
    junk = 0
    for info in infos:
        bad = _entry_problem(info)
        if bad:
            problems.append(Problem(show(info.filename), f"{show(info.filename)!r}: {bad}"))
        elif _is_junk(info.filename):
            junk += 1
        elif info.is_dir():
            folders.append(info.filename[:-1])
        else:
            files.append(info)
    problems += _clashes([i.filename for i in files], folders)
    if problems:
        raise InvalidPackage(problems)
    if junk:
        notes.append(f"ignored {junk} macOS metadata entries (__MACOSX/, .DS_Store)")

    names = [i.filename for i in files]
    prefix = _wrapping_folder(names)
    if prefix:
        notes.append(f"the files were inside the folder '{prefix}'; it was stripped (put files at the zip root)")
        folders = [f[len(prefix):] for f in folders if f.startswith(prefix)]
    entries: list[_Entry] = []
    for info in files:
        name = info.filename[len(prefix):]
        if name == MANIFEST:
            notes.append(f"{MANIFEST} in the package was ignored: the registry writes its own")
            continue
        entries.append(_Entry(info, name))
    return entries, sorted(set(folders))


def _check_no_overlap(zf: zipfile.ZipFile) -> None:
    """Refuse entries whose data overlap (one local header reached from two directory records, or an entry
    starting inside another's compressed bytes: the trick of the "overlapping" zip bombs), or run into the
    central directory. Each entry takes at least its 30-byte local header, its name and its compressed size.
    """
    infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
    if not infos:
        return
    ends = [i.header_offset for i in infos[1:]] + [zf.start_dir]
    for info, limit in zip(infos, ends, strict=True):
        name_bytes = len(info.orig_filename.encode("utf-8" if info.flag_bits & UTF8_NAME_FLAG else "cp437"))
        end = info.header_offset + LOCAL_HEADER_BYTES + name_bytes + info.compress_size
        if end > limit:
            raise InvalidPackage([Problem(show(info.filename), f"{show(info.filename)!r} overlaps the next entry "
                                                               "or the central directory (a crafted zip?)")])


def _clashes(files: list[str], folders: list[str]) -> list[Problem]:
    """Two names for one file: duplicates (ignoring case and Unicode form), or a file that is also a folder."""
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for name in files:
        key = _fold(name)
        if key in seen:
            problems.append(Problem(show(name), f"{show(name)!r}: duplicate of {show(seen[key])!r} "
                                                "(names are compared ignoring case)"))
        else:
            seen[key] = name
    folder_keys = {_fold(f) for f in folders}
    for name in files:
        parts = name.split("/")
        folder_keys.update(_fold("/".join(parts[:i])) for i in range(1, len(parts)))
    for key, name in seen.items():
        if key in folder_keys:
            problems.append(Problem(show(name), f"{show(name)!r} is both a file and a folder"))
    return problems


def _wrapping_folder(names: list[str]) -> str:
    """'top/' when every file is inside the one folder 'top', else ''."""
    if not names or any("/" not in n for n in names):
        return ""
    tops = {n.split("/", 1)[0] for n in names}
    return f"{tops.pop()}/" if len(tops) == 1 else ""


def _extract(
    zf: zipfile.ZipFile, entries: list[_Entry], limits: Limits, write: Writer | None
) -> tuple[list[PackageFile], dict[str, bytes | None]]:
    """Inflate every entry once: count, hash, hand the bytes to `write`, keep the small text files.

    The sha256 of a chunk runs on a helper thread while this one writes it and inflates the next (both release
    the GIL), so a big artifact costs about the slower of the two instead of their sum; at most two chunks live.
    """
    total = 0
    files: list[PackageFile] = []
    texts: dict[str, bytes | None] = {}  # None: too big to check
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as hasher:
        for entry in entries:
            digest, size = hashlib.sha256(), 0
            keep, kept = entry.name in TEXT_FILES, bytearray()
            out = write(entry.name) if write is not None else None
            hashing: Future[None] | None = None
            try:
                for chunk in _inflate(zf, entry):
                    size += len(chunk)
                    total += len(chunk)
                    if total > limits.max_unpacked_bytes:
                        raise InvalidPackage([Problem(None, f"the package inflates to more than "
                                                            f"{limits.max_unpacked_bytes} bytes (the limit)")])
                    if size > limits.ratio_grace_bytes and size > limits.max_ratio * max(entry.info.compress_size, 1):
                        raise InvalidPackage([Problem(entry.name, f"{show(entry.name)!r} inflates more than "
                                                                  f"{limits.max_ratio:g} times (a compression bomb?)")])
                    if hashing is not None:
                        hashing.result()
                    hashing = hasher.submit(digest.update, chunk)
                    if out is not None:
                        out.write(chunk)
                    if keep and len(kept) <= limits.max_text_bytes:
                        kept += chunk
            finally:
                if hashing is not None:
                    hashing.result()
                if out is not None:
                    out.close()
            if keep:
                texts[entry.name] = bytes(kept) if len(kept) <= limits.max_text_bytes else None
            files.append(PackageFile(entry.name, size, digest.hexdigest()))
    return files, texts


def _inflate(zf: zipfile.ZipFile, entry: _Entry) -> Iterator[bytes]:
    """The bytes of one entry; a damaged entry is a problem of the package, not of the server."""
    try:
        with zf.open(entry.info) as src:
            while chunk := src.read(CHUNK):
                yield chunk
    except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, NotImplementedError, ValueError) as exc:
        raise InvalidPackage([Problem(entry.name, f"{show(entry.name)!r} cannot be read: {exc}")]) from exc


# --------------------------------------------------------------------------- contents


def _check_contents(
    files: list[PackageFile], folders: list[str], texts: dict[str, bytes | None], limits: Limits, notes: list[str]
) -> PackageMeta:
    present = {f.name: f for f in files}
    problems: list[Problem] = []
    for name in TEXT_FILES:
        if name not in present:
            problems.append(_missing(name, present))
        elif texts.get(name) is None:
            problems.append(Problem(name, f"{name} is over {limits.max_text_bytes} bytes"))
    meta, raw = None, None
    if texts.get(META) is not None:
        meta, raw = _check_meta(texts[META] or b"", problems, notes)
    if texts.get(APP) is not None:
        _check_app(texts[APP] or b"", problems, notes)
    if texts.get(REQUIREMENTS) is not None:
        _check_requirements(texts[REQUIREMENTS] or b"", problems, allow_urls=limits.allow_requirement_urls)
    artifacts = meta.artifacts if meta is not None else _raw_artifacts(raw)
    _check_artifacts(artifacts, present, folders, problems)
    if problems or meta is None:
        raise InvalidPackage(problems)
    return meta


def _missing(name: str, present: dict[str, PackageFile]) -> Problem:
    """'missing required file: NAME', with a hint when the file is there under another case or in a folder."""
    hint = ""
    near = sorted(n for n in present if _fold(n) == _fold(name) or n.rsplit("/", 1)[-1] == name)
    if near:
        hint = f" (found {show(near[0])!r}: names are case-sensitive and files must be at the zip root)"
    return Problem(name, f"missing required file: {name}{hint}")


def _check_meta(data: bytes, problems: list[Problem], notes: list[str]) -> tuple[PackageMeta | None, Any]:
    try:
        raw = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        problems.append(Problem(META, f"{META} is not valid JSON: {exc}"))
        return None, None
    if not isinstance(raw, dict):
        problems.append(Problem(META, f"{META} must be a JSON object"))
        return None, raw
    notes += [f"{META}: unknown key {k!r} is ignored" for k in raw if k not in PackageMeta.model_fields]
    resources = raw.get("resources")
    if isinstance(resources, dict):
        known = Resources.model_fields
        notes += [f"{META}: unknown key 'resources.{k}' is ignored" for k in resources if k not in known]
    try:
        meta = PackageMeta.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors(include_url=False, include_input=False):
            where = ".".join(str(p) for p in err["loc"]) or "(root)"
            problems.append(Problem(META, f"{META}: {where}: {err['msg']}"))
        return None, raw
    if not meta.artifacts:
        notes.append(f"{META} names no artifacts: the model must fetch its weights itself")
    return meta, raw


def _raw_artifacts(raw: Any) -> list[str]:
    """The artifacts a meta.json that failed validation asks for, to report them too."""
    value = raw.get("artifacts") if isinstance(raw, dict) else None
    if isinstance(value, list) and all(isinstance(a, str) for a in value):
        return list(value)
    return list(PackageMeta.model_fields["artifacts"].get_default(call_default_factory=True))


_COMPILE_LOCK = threading.Lock()  # warnings.catch_warnings swaps process-wide state


def _check_app(source: bytes, problems: list[Problem], notes: list[str]) -> None:
    """app.py must compile; it is never run here."""
    with _COMPILE_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            compile(source, APP, "exec", dont_inherit=True)
        except SyntaxError as exc:
            problems.append(Problem(APP, f"{APP} does not compile: {exc.msg} (line {exc.lineno})"))
        except (ValueError, RecursionError, MemoryError) as exc:
            problems.append(Problem(APP, f"{APP} does not compile: {exc}"))
    notes += [f"{APP} line {w.lineno}: {w.message}" for w in caught]


# --------------------------------------------------------------------------- requirements.txt


def _check_requirements(data: bytes, problems: list[Problem], *, allow_urls: bool) -> None:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problems.append(Problem(REQUIREMENTS, f"{REQUIREMENTS} is not UTF-8 text: {exc}"))
        return
    for number, line in logical_lines(text):
        why = requirement_problem(line, allow_urls=allow_urls)
        if why:
            problems.append(Problem(REQUIREMENTS, f"{REQUIREMENTS} line {number}: {show(line[:120])!r}: {why}"))


# --------------------------------------------------------------------------- artifacts


def _check_artifacts(
    artifacts: list[str], present: dict[str, PackageFile], folders: list[str], problems: list[Problem]
) -> None:
    """Each artifact is a non-empty file, or a folder holding at least one non-empty file."""
    for name in artifacts:
        bad = path_problem(name)
        if bad:
            problems.append(Problem(META, f"{META}: artifact {show(name)!r}: {bad}"))
            continue
        if name in present:
            if present[name].size_bytes == 0:
                problems.append(Problem(name, f"artifact {name} is empty"))
            continue
        folder = name.rstrip("/") + "/"
        inside = [f for n, f in present.items() if n.startswith(folder)]
        if inside or folder[:-1] in folders:
            if not any(f.size_bytes for f in inside):
                problems.append(Problem(name, f"artifact folder {name} holds no non-empty file"))
            continue
        problems.append(_missing(name, present))
