"""How the vagrant runtime drives Vagrant and libvirt: `vagrant up` / `vagrant destroy` through python-vagrant,
domain states, addresses and the VMs' network through virsh. A test hands the runtime another VmDriver instead
(no VM needed)."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Protocol

import psutil

from agent.runtimes.vmfirewall import VmBinding

log = logging.getLogger(__name__)

# Never handed to vagrant: it runs the VM's tooling, not the cluster.
_SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PRIVATE_KEY", "CREDENTIAL")


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

    def address(self, domain: str, network: str) -> VmBinding | None:
        """The domain's interface on the network (CIDR): host tap device, MAC, address from libvirt's DHCP lease;
        None while it has none (or no such domain yet). Raises VmError when libvirt cannot be asked."""
        ...

    def ensure_network(self, name: str, network: str) -> str:
        """Make sure the libvirt network `name` (NAT, DHCP, the CIDR `network`, host at its first address) exists
        and runs, defining it when missing; returns its bridge's name. Raises VmError."""
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

    def address(self, domain: str, network: str) -> VmBinding | None:
        result = self._virsh("domifaddr", domain, "--source", "lease")
        if result.returncode != 0:
            return None  # no such domain yet (vagrant is still creating it), or not started
        return parse_domifaddr(result.stdout, ipaddress.IPv4Network(network))

    def ensure_network(self, name: str, network: str) -> str:
        info = self._virsh("net-dumpxml", name)
        if info.returncode != 0:
            net = ipaddress.IPv4Network(network)
            xml = network_xml(name, net)
            with tempfile_text(xml) as path:
                defined = self._virsh("net-define", path)
            if defined.returncode != 0 and "already exists" not in (defined.stderr or ""):
                raise VmError(f"virsh net-define {name}: {(defined.stderr or defined.stdout).strip()}")
            self._virsh("net-autostart", name)
            info = self._virsh("net-dumpxml", name)
            if info.returncode != 0:
                raise VmError(f"virsh net-dumpxml {name}: {(info.stderr or info.stdout).strip()}")
        active = self._virsh("net-info", name)
        if re.search(r"^Active:\s+no", active.stdout, re.M):
            started = self._virsh("net-start", name)
            if started.returncode != 0 and "already active" not in (started.stderr or ""):
                raise VmError(f"virsh net-start {name}: {(started.stderr or started.stdout).strip()}")
        bridge = re.search(r"<bridge\s+name=['\"]([^'\"]+)['\"]", info.stdout)
        if bridge is None:
            raise VmError(f"the libvirt network {name} has no bridge")
        return bridge[1]

    def _virsh(self, *args: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(["virsh", "-c", self.libvirt_uri, *args], capture_output=True, text=True,
                                  timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise VmError(f"virsh {args[0]} could not run: {exc}") from exc


def network_xml(name: str, network: ipaddress.IPv4Network) -> str:
    """A NAT network as vagrant-libvirt would make its management network (host at the first address, DHCP for
    the rest); libvirt picks the bridge's name."""
    if not re.match(r"^[A-Za-z0-9_.-]+$", name):
        raise VmError(f"not a libvirt network name: {name!r}")
    hosts = list(network.hosts())
    return (f"<network>\n  <name>{name}</name>\n  <forward mode='nat'/>\n"
            f"  <ip address='{hosts[0]}' netmask='{network.netmask}'>\n"
            f"    <dhcp><range start='{hosts[1]}' end='{hosts[-1]}'/></dhcp>\n  </ip>\n</network>\n")


def parse_domifaddr(text: str, network: ipaddress.IPv4Network) -> VmBinding | None:
    """The interface of `virsh domifaddr --source lease` output whose IPv4 address is in network."""
    for line in text.splitlines():
        found = re.match(r"^\s*(\S+)\s+([0-9a-fA-F:]{17})\s+ipv4\s+([0-9.]+)/\d+\s*$", line)
        if found and ipaddress.IPv4Address(found[3]) in network:
            return VmBinding.of(found[1], found[2], found[3])
    return None


@contextlib.contextmanager
def tempfile_text(text: str) -> Iterator[str]:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".xml") as handle:
        handle.write(text)
        handle.flush()
        yield handle.name


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
