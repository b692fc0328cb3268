"""Wheelhouses: built once per requirements.txt, complete or absent, world-readable, installable with no index.

The test model's requirement is a wheel file next to requirements.txt, so nothing here needs a package index.
"""

from __future__ import annotations

import base64
import hashlib
import stat
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from agent.errors import ProvisionFailed
from agent.runtimes.vagrantfile import INSTALL_WHEELS
from agent.runtimes.wheelhouse import TOOLS, Wheelhouse, has_requirements

MODULE = b'GREETING = "hello from a wheel"\n'


def make_wheel(folder: Path, name: str = "tinywheel", version: str = "1.0") -> Path:
    """A minimal pure-Python wheel: one module, its dist-info, a RECORD."""
    files = {
        f"{name}.py": MODULE,
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                            b"Tag: py3-none-any\n",
    }
    record = "".join(
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for path, data in files.items()
    ) + f"{name}-{version}.dist-info/RECORD,,\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
        archive.writestr(f"{name}-{version}.dist-info/RECORD", record)
    return wheel


def run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise ProvisionFailed(f"{what} failed: {result.stderr[-2000:]}")


@pytest.mark.parametrize("text, wanted", [("", False), ("# nothing\n\n", False), ("numpy>=1.26  # fast\n", True)])
def test_comments_and_blank_lines_ask_for_nothing(text: str, wanted: bool) -> None:
    assert has_requirements(text.encode()) is wanted


def test_a_wheelhouse_is_built_once_readable_by_all_and_installs_without_an_index(tmp_path: Path) -> None:
    # given a model whose requirements.txt names a wheel next to it
    model = tmp_path / "model"
    model.mkdir()
    wheel = make_wheel(model)
    (model / "requirements.txt").write_text(f"{wheel}\n")
    house = Wheelhouse(tmp_path / "wheels", guest_python=f"{sys.version_info.major}.{sys.version_info.minor}")

    # when its wheelhouse is asked for, twice
    key, built = house.ensure(model / "requirements.txt", run=run, deadline=time.monotonic() + 300,
                              cancelled=threading.Event()) or ("", False)
    again = house.ensure(model / "requirements.txt", run=run, deadline=time.monotonic() + 300,
                         cancelled=threading.Event())

    # then it is built the first time only, under the key of the requirements and the guest's Python
    assert built and again == (key, False)
    folder = house.root / key
    assert key.endswith(f"-cp{sys.version_info.major}{sys.version_info.minor}")
    assert (folder / wheel.name).is_file()
    assert (folder / TOOLS / "installer.zip").is_file()
    assert list((house.root / ".builds").iterdir()) == []
    # with the module's bytecode for its path in the VM's venv, and everything readable by an anonymous NFS user
    pyc = folder / TOOLS / "pycache" / "__pycache__" / f"tinywheel.{sys.implementation.cache_tag}.pyc"
    assert pyc.is_file()
    for path in [folder, *folder.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), path

    # and the VM's install step (pypa/installer from the wheelhouse) installs it into a fresh venv, no index
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-", str(folder)], input=INSTALL_WHEELS, text=True, check=True,
                   env={"PYTHONPATH": str(folder / TOOLS / "installer.zip"), "PATH": "/usr/bin:/bin"})
    out = subprocess.run([str(venv / "bin" / "python"), "-c", "import tinywheel; print(tinywheel.GREETING)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "hello from a wheel"


def test_nothing_to_install_is_no_wheelhouse(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("# the standard library is enough\n")
    house = Wheelhouse(tmp_path / "wheels")
    assert house.ensure(tmp_path / "requirements.txt", run=run, deadline=time.monotonic() + 10,
                        cancelled=threading.Event()) is None
    assert house.ensure(tmp_path / "missing.txt", run=run, deadline=time.monotonic() + 10,
                        cancelled=threading.Event()) is None


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text(f"{tmp_path / 'no-such-1.0-py3-none-any.whl'}\n")
    house = Wheelhouse(tmp_path / "wheels")
    with pytest.raises(ProvisionFailed):
        house.ensure(tmp_path / "requirements.txt", run=run, deadline=time.monotonic() + 120,
                     cancelled=threading.Event())
    assert [p.name for p in house.root.iterdir() if not p.name.startswith(".")] == []
    assert list((house.root / ".builds").iterdir()) == []


def test_the_key_depends_on_the_requirements_and_the_guest_python(tmp_path: Path) -> None:
    a, b = Wheelhouse(tmp_path, guest_python="3.11"), Wheelhouse(tmp_path, guest_python="3.12")
    assert a.key(b"numpy\n") != a.key(b"numpy==2.0\n")
    assert a.key(b"numpy\n") != b.key(b"numpy\n")
    assert a.key(b"numpy\n").endswith("-cp311") and b.key(b"numpy\n").endswith("-cp312")
