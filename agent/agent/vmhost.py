"""The host side of the vagrant runtime in development and CI: what must be installed, and the libvirt daemons
started by hand where no init system runs them (production hosts run them as services: bootstrap/agent-vm-host.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

VM_PACKAGES = (
    "vagrant vagrant-libvirt libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 "
    "qemu-utils dnsmasq-base iptables nftables debootstrap fdisk extlinux syslinux-common nfs-ganesha "
    "nfs-ganesha-vfs rpcbind libnfs-utils"
)
"""nftables: the VMs' firewall (runtimes/vmfirewall.py); libnfs-utils: nfs-cat, a user-space NFS client the export
test reads with (this kernel may have no NFS client)."""
INSTALL = f"apt-get install -y {VM_PACKAGES}"

# command (or file) → the Debian package that brings it
_NEEDED = {
    "vagrant": "vagrant",
    "virsh": "libvirt-clients",
    "libvirtd": "libvirt-daemon-system",
    "virtlogd": "libvirt-daemon-system",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "dnsmasq": "dnsmasq-base",
    "iptables": "iptables",
    "nft": "nftables",
    "nfs-cat": "libnfs-utils",
    "debootstrap": "debootstrap",
    "sfdisk": "fdisk",
    "extlinux": "extlinux",
    "ganesha.nfsd": "nfs-ganesha",
    "rpcbind": "rpcbind",
}
_FILES = {
    "/usr/lib/syslinux/mbr/mbr.bin": "syslinux-common",
    "/usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so": "nfs-ganesha-vfs",
}
_PLUGIN_GLOBS = ("/usr/share/rubygems-integration/all/gems/vagrant-libvirt-*",)


def missing_packages() -> list[str]:
    """The Debian packages the vagrant runtime needs on this host and that are not installed."""
    missing = {pkg for cmd, pkg in _NEEDED.items() if shutil.which(cmd) is None and not Path("/usr/sbin", cmd).exists()}
    missing |= {pkg for path, pkg in _FILES.items() if not Path(path).exists()}
    if not any(Path("/").glob(pattern.lstrip("/")) for pattern in _PLUGIN_GLOBS):
        missing.add("vagrant-libvirt")
    return sorted(missing)


def libvirt_answers(uri: str = "qemu:///system") -> bool:
    try:
        return subprocess.run(["virsh", "-c", uri, "list"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class LibvirtDaemons:
    """virtlogd and libvirtd as child processes when libvirt does not answer already; stopped in reverse order."""

    def __init__(self, state_dir: Path, *, uri: str = "qemu:///system") -> None:
        self.state_dir = state_dir
        self.uri = uri
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, timeout: float = 60.0) -> LibvirtDaemons:
        if libvirt_answers(self.uri):
            return self
        if os.geteuid() != 0:
            raise RuntimeError("libvirt does not answer and starting its daemons needs root")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for daemon in ("virtlogd", "libvirtd"):
            path = shutil.which(daemon) or f"/usr/sbin/{daemon}"
            with (self.state_dir / f"{daemon}.log").open("ab") as out:
                self.started.append(subprocess.Popen([path], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                                     start_new_session=True))
            time.sleep(0.5)
        deadline = time.monotonic() + timeout
        while not libvirt_answers(self.uri):
            for proc in self.started:
                if proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{proc.args!r} exited with code {proc.returncode}; see {self.state_dir}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"libvirt did not answer within {timeout:.0f} s; see {self.state_dir}")
            time.sleep(0.5)
        return self

    def stop(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.started.clear()

    def __enter__(self) -> LibvirtDaemons:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def main() -> None:
    """`python -m agent.vmhost`: say what the vagrant runtime (and its test) still needs on this host."""
    missing = missing_packages()
    if missing:
        print(f"the vagrant runtime and the VM test (pytest -m vm) need: {' '.join(missing)}\n"
              f"  install them with: {INSTALL}")
    if os.geteuid() != 0:
        print("the VM test needs root: without it, it is skipped (a failure in CI)")
    if not missing and os.geteuid() == 0:
        print("this host can run VMs (the VM test builds or reuses the box: bootstrap/build-box.sh)")


if __name__ == "__main__":
    main()
