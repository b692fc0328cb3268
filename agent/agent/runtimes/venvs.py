"""Virtualenvs cached by the hash of a requirements.txt, shared by every agent of a host.

A venv is not relocatable (its scripts name their own absolute path), so it is built in place under
`.builds/` and then published by atomically replacing a symlink `<key>` → `.builds/<key>-<random>`:
a reader sees either no venv or a complete one. A file lock per key makes agents (and threads) of one host
build a given venv once; the others wait and reuse it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.runtimes.buildlock import build_lock

Run = Callable[[list[str], str], None]
"""Runs one command of a build (argv, what it is for); raises ProvisionFailed/ProvisionCancelled."""


@dataclass(frozen=True)
class Venv:
    path: Path
    built: bool
    """True when this call built it, False when it was reused."""

    @property
    def bin(self) -> Path:
        return self.path / "bin"


class VenvCache:
    """Finds or builds the virtualenv of a requirements.txt under `root`."""

    def __init__(self, root: Path, *, python: str = sys.executable) -> None:
        self.root = root
        self.python = python

    def key(self, requirements: bytes) -> str:
        """Name of the venv of these requirements for this Python (a venv is tied to its interpreter)."""
        tag = f"py{sys.version_info.major}{sys.version_info.minor}"
        digest = hashlib.sha256(self.python.encode() + b"\0" + requirements).hexdigest()[:24]
        return f"{digest}-{tag}"

    def ensure(
        self,
        requirements_file: Path,
        *,
        run: Run,
        deadline: float,
        cancelled: threading.Event,
    ) -> Venv:
        """The venv for this requirements.txt (missing file = no requirements), built if needed."""
        content = requirements_file.read_bytes() if requirements_file.is_file() else b""
        key = self.key(content)
        link = self.root / key
        if link.exists():
            return Venv(_readable_venv(link.resolve()), built=False)
        self.root.mkdir(parents=True, exist_ok=True)
        with build_lock(self.root / f"{key}.lock", "virtualenv", deadline, cancelled):
            if link.exists():  # another agent built it while we waited
                return Venv(_readable_venv(link.resolve()), built=False)
            builds = self.root / ".builds"
            builds.mkdir(exist_ok=True)
            target = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=builds))
            try:
                run([self.python, "-m", "venv", str(target)], "creating the virtualenv")
                if content.strip():
                    pip = [str(target / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                           "--no-input", "-r", str(requirements_file)]
                    run(pip, "installing requirements.txt")
                make_readable(target)  # sandboxed models run as other uids: they read it, never write it
                staged = self.root / f".{key}.{uuid.uuid4().hex}.link"
                os.symlink(os.path.relpath(target, self.root), staged)
                os.replace(staged, link)
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)
                raise
            return Venv(link.resolve(), built=True)


def _readable_venv(path: Path) -> Path:
    """A cached venv, made readable by every user if an older agent built it private (mkdtemp's 0700)."""
    if stat.S_IMODE(path.stat().st_mode) & 0o005 != 0o005:
        make_readable(path)
    return path


def make_readable(root: Path) -> None:
    """Let every user read (never write) a tree the agent built for its models: a venv made under the agent's
    umask, or in a 0700 mkdtemp folder. Symlinks are left alone and never followed."""
    for folder, _dirs, files in os.walk(root):
        _readable(Path(folder), folder=True)
        for name in files:
            _readable(Path(folder) / name, folder=False)


def _readable(path: Path, *, folder: bool) -> None:
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return
    mode = stat.S_IMODE(st.st_mode)
    wanted = (mode | 0o444 | (0o111 if folder or mode & 0o100 else 0)) & ~0o022
    if wanted != mode:
        os.chmod(path, wanted)
