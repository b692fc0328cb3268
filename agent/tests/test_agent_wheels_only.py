"""The host wheelhouse fetches binary wheels only: no package's build code (setup.py, a PEP 517 backend) ever runs
on the agent's host, and a requirement without a wheel refuses the deployment with its name.

The trap: a hand-made sdist whose setup.py writes a marker file when anything runs it, on a local index (a folder
handed to pip with --no-index --find-links), alone or as the dependency of a wheel.
"""

from __future__ import annotations

import base64
import hashlib
import io
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

from agent.errors import ProvisionFailed
from agent.runtimes.wheelhouse import Wheelhouse, WheelsOnly, checked_requirements, line_problem, missing_wheel

SETUP_PY = """\
from pathlib import Path
Path({marker!r}).write_text("setup.py of trapped ran on the host")
from setuptools import setup
setup(name="trapped", version="1.0", py_modules=[])
"""


def make_sdist(index: Path, marker: Path, name: str = "trapped", version: str = "1.0") -> Path:
    """An sdist whose setup.py writes `marker` when run (metadata, build, install: anything)."""
    files = {
        f"{name}-{version}/PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{name}-{version}/setup.py": SETUP_PY.format(marker=str(marker)).encode(),
    }
    sdist = index / f"{name}-{version}.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return sdist


def make_wheel(index: Path, name: str, version: str = "1.0", requires: tuple[str, ...] = ()) -> Path:
    """A pure-Python wheel of one module, with Requires-Dist lines."""
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    files = {
        f"{name}.py": b"VALUE = 1\n",
        f"{name}-{version}.dist-info/METADATA": meta.encode(),
        f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                            b"Tag: py3-none-any\n",
    }
    record = "".join(
        f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}\n"
        for p, d in files.items()) + f"{name}-{version}.dist-info/RECORD,,\n"
    wheel = index / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
        archive.writestr(f"{name}-{version}.dist-info/RECORD", record)
    return wheel


def run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise ProvisionFailed(f"{what} failed with exit code {result.returncode}: {result.stderr[-2000:]}")


@pytest.fixture
def index(tmp_path: Path) -> tuple[Path, Path]:
    """(local index folder, marker path): the index holds the trapped sdist, a wheel needing it, a plain wheel."""
    folder = tmp_path / "index"
    folder.mkdir()
    marker = tmp_path / "MARKER-setup-py-ran"
    make_sdist(folder, marker)
    make_wheel(folder, "needs_trapped", requires=("trapped",))
    make_wheel(folder, "plain")
    return folder, marker


def house(root: Path, index: Path) -> Wheelhouse:
    return Wheelhouse(root / "wheels", guest_python="3.11", pip_options=("--no-index", "--find-links", str(index)))


def test_the_trap_is_real_setup_py_writes_the_marker_when_run(tmp_path: Path, index: tuple[Path, Path]) -> None:
    folder, _ = index
    marker = tmp_path / "control-marker"
    with tarfile.open(make_sdist(tmp_path, marker, name="control")) as archive:
        setup = archive.extractfile("control-1.0/setup.py").read()  # type: ignore[union-attr]
    subprocess.run([sys.executable, "-c", setup.decode().replace("from setuptools import setup\n", "")
                    .replace('setup(name="trapped", version="1.0", py_modules=[])', "")], check=True)
    assert marker.exists()


@pytest.mark.parametrize("requirement", ["trapped==1.0", "needs_trapped"])
def test_an_sdist_only_requirement_is_refused_by_name_and_its_setup_py_never_runs(
    tmp_path: Path, index: tuple[Path, Path], requirement: str
) -> None:
    # given a model whose requirement (or a dependency of it) exists only as an sdist on the index
    folder, marker = index
    (tmp_path / "requirements.txt").write_text(f"{requirement}\n")
    wheels = house(tmp_path, folder)

    # when the agent makes its wheelhouse
    with pytest.raises(WheelsOnly) as refused:
        wheels.ensure(tmp_path / "requirements.txt", run=run, deadline=time.monotonic() + 120,
                      cancelled=threading.Event())

    # then it is refused, naming the requirement with no wheel, and no build code ran: no marker, nothing left
    message = refused.value.message
    assert message.split(" ", 1)[0] in ("trapped", "trapped==1.0"), message
    assert " has no binary wheel for cp311/manylinux_2_36_x86_64" in message.splitlines()[0]
    assert "ship a wheel or pin a version that has one" in message
    assert not marker.exists()
    assert [p.name for p in wheels.root.iterdir() if not p.name.startswith(".")] == []
    assert list((wheels.root / ".builds").iterdir()) == []


def test_wheels_of_the_index_are_fetched_for_the_guest(tmp_path: Path, index: tuple[Path, Path]) -> None:
    folder, marker = index
    (tmp_path / "requirements.txt").write_text("plain==1.0\n")
    wheels = house(tmp_path, folder)
    key, built = wheels.ensure(tmp_path / "requirements.txt", run=run, deadline=time.monotonic() + 120,
                               cancelled=threading.Event()) or ("", False)
    assert built and (wheels.root / key / "plain-1.0-py3-none-any.whl").is_file()
    assert not marker.exists()


def test_pip_is_asked_for_wheels_only_for_the_guests_python_and_platform(tmp_path: Path) -> None:
    command = Wheelhouse(tmp_path, guest_python="3.11")._command(tmp_path / "r.txt", tmp_path / "out",
                                                                  tmp_path / "pip.log")
    assert command[command.index("download") - 1:][:2] == ["--no-input", "download"]
    assert "wheel" not in command and "--only-binary=:all:" in command
    assert command[command.index("--python-version") + 1] == "3.11"
    platforms = [command[i + 1] for i, arg in enumerate(command) if arg == "--platform"]
    assert platforms[0] == "manylinux_2_36_x86_64" and "manylinux2014_x86_64" in platforms
    assert "manylinux_2_37_x86_64" not in platforms  # newer than the guest's glibc


@pytest.mark.parametrize("line", [
    "--no-binary :all:", "--no-binary=numpy", "-e .", "--editable=git+https://example.org/x.git#egg=x",
    "-r other.txt", "-c constraints.txt", "./trapped-1.0.tar.gz", "trapped @ https://example.org/trapped-1.0.tar.gz",
    "git+https://example.org/trapped.git", "https://example.org/trapped-1.0.zip", "/srv/pkgs/trapped",
    "numpy==2.0 --no-binary numpy", "numpy --global-option=build_ext", "--find-links /local/folder",
    "--use-pep517", "--config-settings=x=y",
])
def test_lines_that_could_build_a_package_are_refused(line: str) -> None:
    assert line_problem(line) is not None
    with pytest.raises(WheelsOnly, match="line 2"):
        checked_requirements(f"numpy==2.0\n{line}\n".encode())


@pytest.mark.parametrize("line", [
    "numpy==2.0", "numpy>=1.26,<3", "scikit-learn[alldeps]~=1.5", 'numpy; python_version >= "3.10"',
    "numpy==2.0 --hash=sha256:" + "0" * 64, "plain @ https://example.org/plain-1.0-py3-none-any.whl",
    "https://example.org/plain-1.0-py3-none-any.whl", "/tmp/x/plain-1.0-py3-none-any.whl",
    "--index-url https://pypi.example.org/simple", "--extra-index-url=https://x.example.org/simple",
    "--prefer-binary", "--pre", "--only-binary :all:",
])
def test_plain_requirements_wheels_and_index_options_are_accepted(line: str) -> None:
    assert line_problem(line) is None


def test_comments_and_continuations_are_joined_before_checking() -> None:
    text = b"# a comment\nnumpy==2.0 \\\n  --hash=sha256:abc  # pinned\n\nplain\n"
    assert checked_requirements(text) == "numpy==2.0    --hash=sha256:abc\nplain\n"


def test_the_missing_wheel_is_read_from_pips_log() -> None:
    log = ("ERROR: Could not find a version that satisfies the requirement trapped (from versions: none)\n"
           "ERROR: No matching distribution found for trapped\n")
    assert missing_wheel(log) == "trapped"
    assert missing_wheel("ERROR: HTTP error 503 while getting https://x\n") is None
