"""Test hosts on one machine: each a network namespace on a bridge, with its own IP, its own sshd and its own
`/etc/miaas`, `/opt/miaas` and `/var/lib/miaas` (a private mount namespace: no host sees another's files).

Needs root, iproute2, util-linux's `unshare` and openssh-server. Used by the cluster test and `bench/cluster.py`:
`bootstrap.sh` installs MIaaS into these hosts over SSH exactly as into real machines. Everything made here is
removed by `teardown()`; only processes living in the namespaces made here are ever killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MOUNTS = ("/etc/miaas", "/opt/miaas", "/var/lib/miaas")


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done


def missing_tools() -> list[str]:
    """What this machine lacks to make test hosts (empty: it can)."""
    missing = [t for t in ("ip", "unshare", "iptables", "ssh", "ssh-keygen") if shutil.which(t) is None]
    if not Path("/usr/sbin/sshd").is_file():
        missing.append("sshd (apt-get install -y openssh-server)")
    if os.geteuid() != 0:
        missing.append("root")
    return missing


@dataclass
class NetnsHost:
    name: str
    address: str
    netns: str
    root: Path  # its private folders, bind-mounted in its mount namespace
    sshd: subprocess.Popen[bytes] | None = None

    def pids(self) -> list[int]:
        """Every process in this host's network namespace (what it runs)."""
        done = _sh("ip", "netns", "pids", self.netns, check=False)
        return [int(p) for p in done.stdout.split()]

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command in this host's network namespace (not its mount namespace: for iptables and the like)."""
        return _sh("ip", "netns", "exec", self.netns, *argv, check=check)


@dataclass
class NetnsHosts:
    """`count` hosts `h1`... on 10.<net>.0.0/24 (the root namespace is .1, host i is .(10+i))."""

    count: int = 6
    net: int = 231
    tag: str = field(default_factory=lambda: f"{os.getpid() % 10000}")
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="miaas-hosts-")))
    hosts: dict[str, NetnsHost] = field(default_factory=dict)
    made_mount_points: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"mbr{self.tag}"

    @property
    def key(self) -> Path:
        return self.base / "operator_key"

    def setup(self) -> NetnsHosts:
        try:
            self._setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def _setup(self) -> None:
        self.base.chmod(0o755)  # the hosts' service users walk into their folders
        for m in MOUNTS:
            if not Path(m).exists():
                Path(m).mkdir(parents=True)
                self.made_mount_points.append(m)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "miaas-test-operator", "-f", str(self.key))
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"10.{self.net}.0.1/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for i in range(1, self.count + 1):
            self._add_host(i)
        for h in self.hosts.values():
            self._wait_ssh(h)

    def _add_host(self, i: int) -> None:
        name, ns = f"h{i}", f"miaas-{self.tag}-h{i}"
        address = f"10.{self.net}.0.{10 + i}"
        root = self.base / name
        for m in MOUNTS:
            (root / m.strip("/").replace("/", "-")).mkdir(parents=True)
        host = NetnsHost(name, address, ns, root)
        self.hosts[name] = host
        outside, inside = f"mv{self.tag}h{i}", f"mp{self.tag}h{i}"
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        _sh("ip", "link", "set", inside, "netns", ns)
        _sh("ip", "link", "set", outside, "master", self.bridge)
        _sh("ip", "link", "set", outside, "up")
        host.exec("ip", "link", "set", "lo", "up")
        host.exec("ip", "link", "set", inside, "name", "eth0")
        host.exec("ip", "addr", "add", f"{address}/24", "dev", "eth0")
        host.exec("ip", "link", "set", "eth0", "up")
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "ssh_host_ed25519_key"))
        shutil.copy(self.key.with_suffix(".pub"), root / "authorized_keys")
        (root / "sshd_config").write_text("\n".join([
            f"ListenAddress {address}", "Port 22", f"HostKey {root / 'ssh_host_ed25519_key'}",
            f"PidFile {root / 'sshd.pid'}", f"AuthorizedKeysFile {root / 'authorized_keys'}",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "PermitRootLogin prohibit-password", "StrictModes no", "MaxStartups 100:30:200", "MaxSessions 100",
            "AcceptEnv LANG LC_*", "",
        ]))
        self.start(name)

    def start(self, name: str) -> None:
        """(Re)start the host: its sshd in a fresh private mount namespace with the host's own folders."""
        h = self.hosts[name]
        binds = " && ".join(f"mount --bind {h.root / m.strip('/').replace('/', '-')} {m}" for m in MOUNTS)
        with open(h.root / "sshd.log", "ab") as log:
            h.sshd = subprocess.Popen(
                ["ip", "netns", "exec", h.netns, "unshare", "-m", "--propagation", "private", "sh", "-c",
                 f"{binds} && exec /usr/sbin/sshd -D -e -f {h.root / 'sshd_config'}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_ssh(self, h: NetnsHost, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), socket.create_connection((h.address, 22), timeout=0.5):
                return
            if h.sshd is not None and h.sshd.poll() is not None:
                raise RuntimeError(f"sshd of {h.name} exited: {(h.root / 'sshd.log').read_text()[-500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd of {h.name} does not answer on {h.address}:22")
            time.sleep(0.05)

    def restart(self, name: str) -> None:
        self.start(name)
        self._wait_ssh(self.hosts[name])

    def stop(self, name: str) -> None:
        """The host dies at once: SIGKILL to everything it runs (its files stay, as on a machine's disk)."""
        h = self.hosts[name]
        for _ in range(5):
            pids = h.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        if h.sshd is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                h.sshd.wait(timeout=5)

    def cut(self, name: str) -> None:
        """A partition: the host's traffic to and from every other host is dropped (its processes keep running)."""
        h = self.hosts[name]
        h.exec("iptables", "-I", "INPUT", "1", "-i", "eth0", "-j", "DROP")
        h.exec("iptables", "-I", "OUTPUT", "1", "-o", "eth0", "-j", "DROP")

    def heal(self, name: str) -> None:
        h = self.hosts[name]
        h.exec("iptables", "-D", "INPUT", "-i", "eth0", "-j", "DROP", check=False)
        h.exec("iptables", "-D", "OUTPUT", "-o", "eth0", "-j", "DROP", check=False)

    def cluster_file(self, path: Path, roles: dict[str, str], extra: dict[str, str] | None = None) -> Path:
        lines = [f"# test hosts of {self.base}", f"SSH_KEY={self.key}", "SSH_USER=root"]
        for name, r in roles.items():
            lines += [f"HOST_{name}={self.hosts[name].address}", f"ROLES_{name}={r}"]
        lines += [f"{k}={v}" for k, v in (extra or {}).items()]
        path.write_text("\n".join(lines) + "\n")
        return path

    def teardown(self) -> None:
        for name in list(self.hosts):
            with contextlib.suppress(Exception):
                self.stop(name)
        for h in self.hosts.values():
            _sh("ip", "netns", "del", h.netns, check=False)
        _sh("ip", "link", "del", self.bridge, check=False)
        for m in self.made_mount_points:
            with contextlib.suppress(OSError):
                Path(m).rmdir()
        shutil.rmtree(self.base, ignore_errors=True)
