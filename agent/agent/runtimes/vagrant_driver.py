"""How the vagrant runtime drives Vagrant and libvirt: `vagrant up` / `vagrant destroy` through python-vagrant,
domain states through virsh. A test hands the runtime another VmDriver instead (no VM needed)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Protocol

import psutil

log = logging.getLogger(__name__)

# Never handed to vagrant: it runs the VM's tooling, not the cluster.
_SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PRIVATE_KEY")


class VmError(Exception):
    """Vagrant or libvirt could not do what was asked; the message says what, the log says why."""


class VmDriver(Protocol):
    """The few VM operations the runtime needs, each on one deployment's folder (its Vagrantfile) or domain."""

    def up(self, folder: Path, log_path: Path) -> None:
        """Create, boot and provision the VM; output appended to log_path. Raises VmError."""
        ...

    def cancel(self, folder: Path) -> None:
        """Kill a `vagrant` command working in folder (an `up` past its deadline or stopped)."""
        ...

    def destroy(self, folder: Path, domain: str, log_path: Path) -> None:
        """Destroy the VM whatever its state (nothing to destroy is fine). Raises VmError if it survives."""
        ...

    def state(self, domain: str) -> str | None:
        """libvirt's state of the domain ('running', 'shut off', ...), None when there is no such domain.
        Raises VmError when libvirt cannot be asked."""
        ...


def vagrant_env(vagrant_home: Path | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of vagrant commands: the agent's, minus its secrets, plus Vagrant's own switches."""
    source = dict(os.environ if base is None else base)
    env = {k: v for k, v in source.items() if not any(word in k.upper() for word in _SECRET_WORDS)}
    env.update({
        "VAGRANT_DEFAULT_PROVIDER": "libvirt",
        "VAGRANT_CHECKPOINT_DISABLE": "1",  # no call home for version checks
        "VAGRANT_NO_COLOR": "1",
        "VAGRANT_SUPPRESS_BOX_VERSION_WARNING": "1",
    })
    if vagrant_home is not None:
        env["VAGRANT_HOME"] = str(vagrant_home)
    return env


class VagrantDriver:
    """The real thing: python-vagrant for `up` and `destroy`, virsh for states and leftovers."""

    def __init__(self, *, libvirt_uri: str = "qemu:///system", vagrant_home: Path | None = None,
                 kill_grace_s: float = 5.0) -> None:
        self.libvirt_uri = libvirt_uri
        self.vagrant_home = vagrant_home
        self.kill_grace_s = kill_grace_s

    def _vagrant(self, folder: Path, log_path: Path):  # type: ignore[no-untyped-def]
        import vagrant  # python-vagrant: imported on use (it looks for the vagrant command when imported)

        @contextlib.contextmanager
        def to_log() -> Iterator[IO[str]]:
            with timestamped(log_path) as handle:
                yield handle

        return vagrant.Vagrant(root=str(folder), env=vagrant_env(self.vagrant_home), out_cm=to_log, err_cm=to_log)

    def up(self, folder: Path, log_path: Path) -> None:
        try:
            self._vagrant(folder, log_path).up(provider="libvirt")
        except subprocess.CalledProcessError as exc:
            raise VmError(f"vagrant up failed with exit code {exc.returncode}") from exc
        except (OSError, RuntimeError) as exc:
            raise VmError(f"vagrant up could not run: {exc}") from exc

    def cancel(self, folder: Path) -> None:
        _kill_working_in(folder, self.kill_grace_s)

    def destroy(self, folder: Path, domain: str, log_path: Path) -> None:
        problem = None
        if (folder / "Vagrantfile").is_file():
            try:
                self._vagrant(folder, log_path).destroy()
            except (subprocess.CalledProcessError, OSError, RuntimeError) as exc:
                problem = f"vagrant destroy failed: {exc}"
        _kill_working_in(folder, self.kill_grace_s)  # port forwarders of a machine vagrant lost track of
        if self.state(domain) is not None:
            # Vagrant may not know the domain (an `up` killed before it noted the id): ask libvirt directly.
            self._virsh("destroy", domain)
            self._virsh("undefine", domain, "--remove-all-storage", "--nvram")
            if self.state(domain) is not None:
                raise VmError(problem or f"domain {domain} survived virsh destroy and undefine")

    def state(self, domain: str) -> str | None:
        result = self._virsh("domstate", domain)
        if result.returncode == 0:
            return result.stdout.strip() or "unknown"
        text = (result.stderr or result.stdout).lower()
        if "failed to get domain" in text or "domain not found" in text:
            return None
        raise VmError(f"virsh domstate {domain}: {(result.stderr or result.stdout).strip()}")

    def _virsh(self, *args: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(["virsh", "-c", self.libvirt_uri, *args], capture_output=True, text=True,
                                  timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise VmError(f"virsh {args[0]} could not run: {exc}") from exc


@contextlib.contextmanager
def timestamped(log_path: Path) -> Iterator[IO[str]]:
    """A file to hand to a child as its stdout: each line it writes reaches log_path with the time in front."""
    read_fd, write_fd = os.pipe()

    def copy() -> None:
        with os.fdopen(read_fd, "rb") as source, log_path.open("ab") as out:
            for line in source:
                out.write(time.strftime("[%H:%M:%S] ", time.gmtime()).encode() + line)
                out.flush()

    thread = threading.Thread(target=copy, name=f"log-{log_path.parent.name}", daemon=True)
    thread.start()
    with os.fdopen(write_fd, "w", encoding="utf-8") as handle:
        yield handle
    thread.join(10)  # a grandchild may hold the pipe open longer: its later lines still reach the log


def _kill_working_in(folder: Path, grace_s: float) -> None:
    """SIGTERM, then SIGKILL, to the processes of this host working in folder (vagrant, its ssh forwarders)."""
    target = str(folder.resolve())
    found = []
    for proc in psutil.process_iter(["cwd"]):
        try:
            if proc.info["cwd"] == target and proc.pid != os.getpid():
                found.append(proc)
        except psutil.Error:
            continue
    for proc in found:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    _, alive = psutil.wait_procs(found, timeout=max(0.0, deadline - time.monotonic()))
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    if found:
        log.info("killed %d process(es) working in %s", len(found), folder)
