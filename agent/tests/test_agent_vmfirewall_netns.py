"""The VMs' firewall applied for real, without a VM: network namespaces stand for VMs on a bridge of their own.

Marker `vm` (root, nftables and `ip netns`, like the VM test's host), about a second. The rules live in a table of
a name of the test's own, on a bridge of the test's own, and are removed after it, whatever happens.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from agent.runtimes.vmfirewall import NftFirewall, VmBinding, firewall_config

pytestmark = pytest.mark.vm
HOST_IP, NETWORK = "10.77.0.1", "10.77.0.0/24"
NFS_TEST_PORT = 2049


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class FakeVm:
    name: str
    port: str
    mac: str
    address: str

    def connect(self, host: str, port: int, source: str | None = None, timeout: float = 1.5) -> int:
        """0 when a TCP connection from inside the namespace succeeds, else its errno (ETIMEDOUT for a drop)."""
        code = (f"import socket,errno\ns=socket.socket()\ns.settimeout({timeout})\n"
                + (f"s.bind(({source!r},0))\n" if source else "")
                + f"try:\n s.connect(({host!r},{port})); print(0)\nexcept socket.timeout: print(errno.ETIMEDOUT)\n"
                  "except OSError as e: print(e.errno)\n")
        out = subprocess.run(["ip", "netns", "exec", self.name, sys.executable, "-c", code], capture_output=True,
                             text=True, timeout=30)
        return int(out.stdout.strip())

    @property
    def binding(self) -> VmBinding:
        return VmBinding.of(self.port, self.mac, self.address)


def listen(address: str, port: int, netns: str | None = None) -> subprocess.Popen[str] | socket.socket:
    """A TCP listener that accepts and closes connections (in a namespace: a child process)."""
    if netns is not None:
        code = (f"import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
                f"s.bind(({address!r},{port}))\ns.listen()\nprint('ready',flush=True)\n"
                "while True:\n c,_=s.accept(); c.close()\n")
        proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", code], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return proc
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, port))
    server.listen()

    def serve(conn: socket.socket) -> None:
        # the client closes first: no TIME_WAIT on this port of the host, which an NFS server binds after this test
        with conn:
            conn.settimeout(10)
            with contextlib.suppress(OSError):
                conn.recv(1)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server


@pytest.fixture
def bridge() -> Iterator[tuple[str, list[FakeVm]]]:
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.skip("needs root and nftables (apt-get install -y nftables)")
    tag = secrets.token_hex(2)
    name, vms = f"mtbr{tag}", []
    ip("link", "add", name, "type", "bridge")
    try:
        ip("addr", "add", f"{HOST_IP}/24", "dev", name)
        ip("link", "set", name, "up")
        for number, address in ((1, "10.77.0.57"), (2, "10.77.0.58")):
            vm = FakeVm(f"mt{tag}-{number}", f"mt{tag}h{number}", f"52:54:00:77:00:{number:02x}", address)
            ip("netns", "add", vm.name)
            vms.append(vm)
            ip("link", "add", vm.port, "type", "veth", "peer", "name", "eth0", "netns", vm.name)
            ip("link", "set", vm.port, "master", name, "up")
            ip("-n", vm.name, "link", "set", "eth0", "address", vm.mac)
            ip("-n", vm.name, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", vm.name, "link", "set", "eth0", "up")
            ip("-n", vm.name, "link", "set", "lo", "up")
            ip("-n", vm.name, "route", "add", "default", "via", HOST_IP)
        yield name, vms
    finally:
        for vm in vms:
            subprocess.run(["ip", "netns", "del", vm.name], capture_output=True)
            subprocess.run(["ip", "link", "del", vm.port], capture_output=True)
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def test_vms_reach_only_nfs_on_the_host_nothing_else_and_cannot_take_anothers_address(
    bridge: tuple[str, list[FakeVm]]
) -> None:
    name, (a, b) = bridge
    table = f"miaas_test_{secrets.token_hex(3)}"
    config = firewall_config(name, NETWORK, [HOST_IP], table=table)
    firewall = NftFirewall()
    controller = listen(HOST_IP, 0)  # stands for the controller (or the broker) listening on the host
    controller_port = controller.getsockname()[1]  # type: ignore[union-attr]
    try:
        nfs: socket.socket | None = listen(HOST_IP, NFS_TEST_PORT)  # type: ignore[assignment]
    except OSError:  # an NFS server of this host listens there already: it accepts connections just as well
        nfs = None
    other_vm = listen(b.address, 9000, netns=b.name)  # a model of another VM
    in_a = listen(a.address, 8000, netns=a.name)  # the model of VM a, reached by the host (its port forwarder)
    try:
        # without the firewall everything answers: the checks below are not vacuous
        assert a.connect(HOST_IP, controller_port) == 0
        assert a.connect(b.address, 9000) == 0

        # when the firewall is installed (twice: it is idempotent) with both VMs bound to their ports
        firewall.apply(config, [a.binding])
        firewall.apply(config, [a.binding, b.binding])

        # then a VM reaches the NFS port of the host and nothing else of it, nor the other VM
        assert a.connect(HOST_IP, NFS_TEST_PORT) == 0
        assert a.connect(HOST_IP, controller_port) == errno.EHOSTUNREACH  # rejected: admin-prohibited
        assert a.connect(b.address, 9000) in (errno.EHOSTUNREACH, errno.ETIMEDOUT)
        # (169.254.169.254 is checked from a real VM, behind libvirt's NAT, in tests/test_vm_deploy.py)
        # while the host still reaches into a VM (vagrant-libvirt's ssh port forwarders go that way)
        with socket.create_connection((a.address, 8000), timeout=3):
            pass
        # and a VM that takes the other's address reaches nothing with it, not even NFS (its exports are bound to it)
        ip("-n", a.name, "addr", "add", f"{b.address}/32", "dev", "eth0")
        assert a.connect(HOST_IP, NFS_TEST_PORT, source=b.address) in (errno.ETIMEDOUT, errno.EHOSTUNREACH)
        assert b.connect(HOST_IP, NFS_TEST_PORT) == 0

        # when the firewall is removed, the tables are gone
        firewall.remove(table)
        assert not firewall.installed(table)
        firewall.remove(table)  # harmless twice
    finally:
        firewall.remove(table)
        for server in (controller, nfs):
            if server is not None:
                with contextlib.suppress(OSError):  # wakes the accepting thread: the port is free after the test
                    server.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
                server.close()  # type: ignore[union-attr]
        for proc in (other_vm, in_a):
            proc.kill()  # type: ignore[union-attr]
            proc.wait()  # type: ignore[union-attr]
            proc.stdout.close()  # type: ignore[union-attr]
