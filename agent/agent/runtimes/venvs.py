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
            return Venv(link.resolve(), built=False)
        self.root.mkdir(parents=True, exist_ok=True)
        with build_lock(self.root / f"{key}.lock", "virtualenv", deadline, cancelled):
            if link.exists():  # another agent built it while we waited
                return Venv(link.resolve(), built=False)
            builds = self.root / ".builds"
            builds.mkdir(exist_ok=True)
            target = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=builds))
            try:
                run([self.python, "-m", "venv", str(target)], "creating the virtualenv")
                if content.strip():
                    pip = [str(target / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                           "--no-input", "-r", str(requirements_file)]
                    run(pip, "installing requirements.txt")
                staged = self.root / f".{key}.{uuid.uuid4().hex}.link"
                os.symlink(os.path.relpath(target, self.root), staged)
                os.replace(staged, link)
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)
                raise
            return Venv(link.resolve(), built=True)
