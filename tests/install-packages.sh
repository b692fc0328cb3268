#!/usr/bin/env bash
# The Debian packages the tests need, installed when missing (run by `make test`; needs root, else it only says
# what is missing). Every test that needs a real part (a database, a browser, a sandbox, a VM) then runs.
set -euo pipefail
PACKAGES=(
    postgresql   # the PostgreSQL tests start their own throwaway server from Debian's binaries
    chromium     # the portal's browser tests drive it with Playwright (no browser is downloaded)
    bubblewrap   # the process runtime's sandbox
    iptables     # the sandbox's per-user firewall rules
    nftables libnfs-utils  # the VMs' firewall; reading the per-VM NFS exports in the tests
    caddy        # the endpoints' data plane (miaas/gateway.py), driven through its admin API
    openssh-server openssh-client  # the cluster test (pytest -m cluster): one sshd per test host (namespace)
    # the VM test (pytest -m vm): libvirt + QEMU, Vagrant with vagrant-libvirt, the box build, nfs-ganesha
    vagrant vagrant-libvirt libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86
    qemu-utils dnsmasq-base debootstrap fdisk extlinux syslinux-common nfs-ganesha nfs-ganesha-vfs rpcbind
)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "not root: cannot install ${missing[*]}; the tests that need them will be skipped (apt-get install -y ${missing[*]})" >&2
    exit 0
fi
echo "installing the test packages: ${missing[*]}"
# Debian's packages start no daemon here (no systemd); the tests start and stop the ones they need.
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
