"""Wheelhouses: the wheels of a requirements.txt, fetched on the host and shared read-only with the VMs.

A VM reaches no package index: the agent fetches every wheel a model needs here, once per requirements.txt (the
folder is named by its hash and the guest's Python), and the VM installs that set of wheels from the folder.

**Binary wheels only.** Nothing a package ships runs on the host: the agent never builds an sdist (no `pip wheel`,
no setup.py, no PEP 517 backend; even resolving an sdist's dependencies would run its build code). It runs
`pip download --only-binary=:all:` for the guest's Python and platform (cp311, manylinux up to the guest's glibc)
on a copy of requirements.txt that it checked line by line: plain requirements (with `--hash`), wheel files or
wheel URLs, and index options; never `--no-binary`, editable installs, other files, or sdist URLs. A requirement
that has no wheel fails the deployment with its name (`WheelsOnly`). The guest cannot build it either (no compiler,
no index, no build backend), and a wheel built by one model's code must not be handed to another.

Layout of `<root>/<key>/`:

    *.whl                 what `pip download` resolved (dependencies included)
    .miaas/installer.zip  pypa/installer (the agent's own copy, importable from the zip): the VM installs the
                          resolved wheels with it, twice as fast as pip under emulation (pip stays the fallback)
    .miaas/pycache/       bytecode of every module of those wheels as installed in the VM's virtualenv, laid out
                          like its site-packages (`<package>/__pycache__/<module>.cpython-311.pyc`), checked-hash
                          pycs: used only while the source has the same hash

Folders are built under `.builds/` and renamed into place, so a reader sees a complete wheelhouse or none; a file
lock per key makes the agents of one host build it once. Everything is world-readable: the NFS export squashes
the guest's root to an anonymous user.
"""

from __future__ import annotations

import hashlib
import os
import py_compile
import re
import shutil
import sys
import tempfile
import threading
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from agent.errors import ProvisionFailed
from agent.runtimes.buildlock import build_lock
from agent.runtimes.venvs import Run

LAYOUT = "4"
"""Changes when the layout above does: older wheelhouses are then built again under a new key."""
TOOLS = ".miaas"
GUEST_VENV = "/opt/miaas/venv"
GUEST_GLIBC = (2, 36)
"""The box's C library (Debian 12): manylinux wheels up to this glibc run in the guest."""
GUEST_ARCH = "x86_64"


class WheelsOnly(ProvisionFailed):
    """requirements.txt asks for something that is not a ready-made wheel (or a line that could build one)."""

    code = "wheels_only"


_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REQUIREMENT = re.compile(
    rf"^(?P<name>{_NAME})\s*(?:\[\s*(?:{_NAME}(?:\s*,\s*{_NAME})*)?\s*\])?"
    r"\s*(?:@\s*(?P<url>\S+)|\(?\s*(?:(?:===|==|!=|~=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+"
    r"(?:\s*,\s*(?:===|==|!=|~=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+)*)?\s*\)?)"
    r"\s*(?:;\s*(?P<marker>[^;]+))?$"
)
_MARKER = re.compile(r"""^[A-Za-z0-9_.'"<>=!~ ()-]+$""")
_HASH = re.compile(r"^--hash(?:=|\s+)\S+$")
_INDEX_OPTIONS = {"-i", "--index-url", "--extra-index-url", "-f", "--find-links"}
_HARMLESS_OPTIONS = {"--pre", "--prefer-binary", "--only-binary", "--no-index", "--trusted-host"}
"""Options that only choose where wheels come from or which wheels: none makes pip build anything."""


def has_requirements(content: bytes) -> bool:
    """True when requirements.txt asks for anything (not only blank lines and comments)."""
    return any(raw.split("#", 1)[0].strip() for raw in content.decode("utf-8", "replace").splitlines())


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of requirements.txt with continuations joined and comments removed."""
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if not pending:
            start = number
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        line = re.sub(r"(^|\s)#.*$", "", pending + raw).strip()
        pending = ""
        if line:
            yield start, line
    if pending.strip():
        yield start, re.sub(r"(^|\s)#.*$", "", pending).strip()


def _is_wheel(target: str) -> bool:
    path = urlsplit(target).path if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", target) else target
    return path.lower().endswith(".whl")


def line_problem(line: str) -> str | None:
    """Why pip could build (run package code) or read beyond the wheel index because of this line, or None."""
    if line.startswith("-"):
        match = re.match(r"^(--[A-Za-z][A-Za-z-]*|-[A-Za-z])(?:\s*=\s*|\s+)?(.*)$", line)
        option, value = (match.group(1), match.group(2).strip()) if match else (line, "")
        if option == "--no-binary":
            return "--no-binary asks pip to build packages from source, which the agent never does"
        if option in ("-e", "--editable"):
            return "editable installs build the package from its source"
        if option in _INDEX_OPTIONS:
            return None if re.match(r"^https?://\S+$", value) else f"{option} needs an http(s) URL"
        if option in _HARMLESS_OPTIONS:
            return None
        return f"option {option} is not accepted for a VM's wheelhouse"
    tokens = line.split()
    hashes = [t for t in tokens if t.startswith("--hash")]
    rest = [t for t in tokens if not t.startswith("--hash")]
    if any(t.startswith("-") for t in rest) or any(not _HASH.match(h) and h != "--hash" for h in hashes):
        return "only --hash may follow a requirement"
    spec = re.sub(r"--hash\s+\S+", "", line)
    spec = " ".join(t for t in spec.split() if not t.startswith("--hash"))
    if _is_wheel(spec.split(";", 1)[0].strip()) and " " not in spec.split(";", 1)[0].strip():
        return None  # a wheel file or a wheel URL: unpacked, never built
    match = _REQUIREMENT.match(spec)
    if match is None:
        return ("not a plain requirement (a name, extras, version specifiers, markers) nor a .whl: a source "
                "archive, folder or VCS link would be built")
    if match.group("marker") and not _MARKER.match(match.group("marker")):
        return "the environment marker has unexpected characters"
    if match.group("url") and not _is_wheel(match.group("url")):
        return f"{match.group('name')} @ {match.group('url')} is not a wheel: it would be built"
    return None


def checked_requirements(content: bytes) -> str:
    """requirements.txt as the agent hands it to pip: every logical line checked (line_problem), or WheelsOnly."""
    text = content.decode("utf-8", "replace")
    kept = []
    for number, line in logical_lines(text):
        problem = line_problem(line)
        if problem is not None:
            raise WheelsOnly(f"requirements.txt line {number} ({line!r}) is refused: {problem}. A VM's packages are "
                             "binary wheels only: no package's build code runs on the agent's host")
        kept.append(line)
    return "\n".join(kept) + "\n"


def missing_wheel(pip_log: str) -> str | None:
    """The requirement pip found no acceptable wheel for, from its log; None when it failed for another reason."""
    for pattern in (r"No matching distribution found for (\S+)",
                    r"Could not find a version that satisfies the requirement (\S+)"):
        found = re.findall(pattern, pip_log)
        if found:
            return str(found[-1])
    return None


class Wheelhouse:
    """Finds or builds the wheelhouse of a requirements.txt under `root`, for the guest's Python version."""

    def __init__(self, root: Path, *, guest_python: str = "3.11", python: str = sys.executable,
                 pip_options: Sequence[str] = ()) -> None:
        self.root = root
        self.guest_python = guest_python
        self.python = python
        self.pip_options = tuple(pip_options)
        """Extra options of `pip download` (a test points it at a local index with --no-index --find-links)."""

    @property
    def tag(self) -> str:
        return "cp" + self.guest_python.replace(".", "")

    def key(self, requirements: bytes) -> str:
        digest = hashlib.sha256(f"{self.tag}\0{LAYOUT}\0".encode() + requirements).hexdigest()[:24]
        return f"{digest}-{self.tag}"

    def ensure(
        self, requirements_file: Path, *, run: Run, deadline: float, cancelled: threading.Event
    ) -> tuple[str, bool] | None:
        """(key, built) of the wheelhouse of this requirements.txt, built if needed; None when it needs nothing."""
        content = requirements_file.read_bytes() if requirements_file.is_file() else b""
        if not has_requirements(content):
            return None
        requirements = checked_requirements(content)  # before anything runs: a refused line fetches nothing
        key = self.key(content)
        target = self.root / key
        if target.is_dir():
            return key, False
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        with build_lock(self.root / f".{key}.lock", "wheelhouse", deadline, cancelled):
            if target.is_dir():  # another agent built it while we waited
                return key, False
            builds = self.root / ".builds"
            builds.mkdir(exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=builds))
            checked = staging.with_name(staging.name + ".requirements.txt")
            pip_log = staging.with_name(staging.name + ".pip.log")
            try:
                checked.write_text(requirements)
                try:
                    run(self._command(checked, staging, pip_log), "fetching the wheels of requirements.txt "
                                                                    "(binary wheels only)")
                except ProvisionFailed as exc:
                    name = missing_wheel(pip_log.read_text(errors="replace") if pip_log.exists() else exc.message)
                    if name is None:
                        raise
                    raise WheelsOnly(
                        f"{name} has no binary wheel for {self.tag}/{self.platforms()[0]} (or no such version on the "
                        f"package index); ship a wheel or pin a version that has one. The agent never builds a "
                        f"package from source on its host, and the VM has no compiler.\n{exc.message}"
                    ) from exc
                foreign = sorted(p.name for p in staging.iterdir() if p.is_file() and not p.name.endswith(".whl"))
                if foreign:  # pip download does not build, but keep the promise whatever it fetched
                    raise WheelsOnly(f"pip fetched something else than wheels: {', '.join(foreign)}")
                vendor_installer(staging / TOOLS / "installer.zip")
                if self.same_python():
                    precompile(staging, staging / TOOLS / "pycache", guest_venv=GUEST_VENV)
                _publishable(staging)
                os.rename(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            finally:
                checked.unlink(missing_ok=True)
                pip_log.unlink(missing_ok=True)
            return key, True

    def _pip(self) -> list[str]:
        return [self.python, "-m", "pip", "--disable-pip-version-check", "--no-input"]

    def _command(self, requirements_file: Path, out: Path, log: Path) -> list[str]:
        """`pip download` of ready-made wheels for the guest's Python and platform, whatever Python runs here."""
        platforms = [arg for platform in self.platforms() for arg in ("--platform", platform)]
        return [*self._pip(), "download", "--quiet", "--only-binary=:all:", "--python-version", self.guest_python,
                "--implementation", "cp", *platforms, "--log", str(log), *self.pip_options, "--dest", str(out),
                "-r", str(requirements_file)]

    def platforms(self) -> list[str]:
        """The guest's platform tags, newest first: manylinux_2_36 … 2_17 (= manylinux2014), then the legacy names."""
        major, newest = GUEST_GLIBC
        tags = [f"manylinux_{major}_{minor}_{GUEST_ARCH}" for minor in range(newest, 16, -1)]
        return [*tags, f"manylinux2014_{GUEST_ARCH}", f"manylinux2010_{GUEST_ARCH}", f"manylinux1_{GUEST_ARCH}",
                f"linux_{GUEST_ARCH}"]

    def same_python(self) -> bool:
        return self.python == sys.executable and f"{sys.version_info.major}.{sys.version_info.minor}" == (
            self.guest_python
        )


def vendor_installer(target: Path) -> None:
    """The agent's pypa/installer package as a zip (pure Python: importable from it on PYTHONPATH)."""
    import installer

    package = Path(installer.__file__).parent
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(package.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                archive.write(path, f"installer/{path.relative_to(package).as_posix()}")


def guest_site_packages(guest_venv: str, python_version: str) -> str:
    return f"{guest_venv}/lib/python{python_version}/site-packages"


def precompile(wheels: Path, pycache: Path, *, guest_venv: str) -> int:
    """Bytecode of every module of the wheels as installed in the guest's venv, laid out like its site-packages.

    The wheels are unpacked (by pypa/installer, as the guest does) into a scratch copy of the venv's layout;
    each module is compiled with the guest's path as its file name, as a checked-hash pyc, which Python uses
    only while the source has the same hash. Only valid for the guest's Python version (the caller checks).
    Returns how many modules were compiled.
    """
    from installer import install
    from installer.destinations import SchemeDictionaryDestination
    from installer.sources import WheelFile

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    site = guest_site_packages(guest_venv, version)
    scratch = Path(tempfile.mkdtemp(prefix="unpacked-", dir=wheels.parent))
    try:
        root = scratch / site.lstrip("/")
        scheme = {"purelib": root, "platlib": root, "headers": scratch / "include", "scripts": scratch / "bin",
                  "data": scratch / "data"}
        destination = SchemeDictionaryDestination({k: str(v) for k, v in scheme.items()}, interpreter=sys.executable,
                                                  script_kind="posix")
        for wheel in sorted(wheels.glob("*.whl")):
            with WheelFile.open(wheel) as unpacked:
                install(unpacked, destination, {"INSTALLER": b"miaas\n"})
        tag = sys.implementation.cache_tag
        count = 0
        for source in root.rglob("*.py"):
            relative = source.relative_to(root)
            guest_path = f"{site}/{relative.as_posix()}"
            target = pycache / relative.parent / "__pycache__" / f"{source.stem}.{tag}.pyc"
            try:
                py_compile.compile(str(source), cfile=str(target), dfile=guest_path, doraise=True,
                                   invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
                count += 1
            except py_compile.PyCompileError:
                continue  # a module that does not compile here will not import there either: not our business
        return count
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _publishable(folder: Path) -> None:
    """Folders 0755 and files 0644: the VM reads them as an anonymous user."""
    os.chmod(folder, 0o755)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)

