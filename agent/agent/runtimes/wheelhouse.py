"""Wheelhouses: the wheels of a requirements.txt, built on the host and shared read-only with the VMs.

A VM reaches no package index: the agent downloads and builds every wheel a model needs here, once per
requirements.txt (the folder is named by its hash and the guest's Python), and the VM installs that set of wheels
from the folder. Layout of `<root>/<key>/`:

    *.whl                 what `pip wheel -r requirements.txt` resolved (dependencies included)
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
import shutil
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

from agent.runtimes.buildlock import build_lock
from agent.runtimes.venvs import Run

LAYOUT = "3"
"""Changes when the layout above does: older wheelhouses are then built again under a new key."""
TOOLS = ".miaas"
GUEST_VENV = "/opt/miaas/venv"


def has_requirements(content: bytes) -> bool:
    """True when requirements.txt asks for anything (not only blank lines and comments)."""
    return any(raw.split("#", 1)[0].strip() for raw in content.decode("utf-8", "replace").splitlines())


class Wheelhouse:
    """Finds or builds the wheelhouse of a requirements.txt under `root`, for the guest's Python version."""

    def __init__(self, root: Path, *, guest_python: str = "3.11", python: str = sys.executable) -> None:
        self.root = root
        self.guest_python = guest_python
        self.python = python

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
            try:
                run(self._command(requirements_file, staging), "building the wheelhouse of requirements.txt")
                vendor_installer(staging / TOOLS / "installer.zip")
                if self.same_python():
                    precompile(staging, staging / TOOLS / "pycache", guest_venv=GUEST_VENV)
                _publishable(staging)
                os.rename(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            return key, True

    def _pip(self) -> list[str]:
        return [self.python, "-m", "pip", "--disable-pip-version-check", "--no-input"]

    def _command(self, requirements_file: Path, out: Path) -> list[str]:
        if self.same_python():
            # Same interpreter version as the guest: wheels for what has none are built here too.
            return [*self._pip(), "wheel", "--quiet", "--wheel-dir", str(out), "-r", str(requirements_file)]
        # Another version here: only ready-made wheels for the guest's Python and platform will do.
        return [*self._pip(), "download", "--quiet", "--only-binary=:all:", *self._guest_platform(),
                "--dest", str(out), "-r", str(requirements_file)]

    def _guest_platform(self) -> list[str]:
        return ["--python-version", self.guest_python, "--implementation", "cp", "--platform", "manylinux2014_x86_64",
                "--platform", "manylinux_2_28_x86_64", "--platform", "linux_x86_64"]

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

