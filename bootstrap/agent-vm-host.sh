#!/usr/bin/env bash
# Make a machine able to run the agent's vagrant runtime: libvirt + QEMU, Vagrant with vagrant-libvirt, the box,
# and the NFS export of the agent's wheelhouse to its VMs. Run it before bootstrap/install-service.sh agent.
#   usage: sudo bootstrap/agent-vm-host.sh [wheelhouse-folder]     (default /var/lib/miaas/wheelhouse)
# Then in /etc/miaas/miaas.env: AGENT_RUNTIMES=["process", "vagrant"], AGENT_WHEELHOUSE_DIR=<that folder>,
# AGENT_VAGRANT_HOME=/var/lib/miaas/.vagrant.d, AGENT_VAGRANT_NFS_SERVER / _EXPORT (bootstrap/nfs-server.sh says),
# and AGENT_VAGRANT_ACCELERATION=tcg only where KVM cannot be used.
set -euo pipefail

wheels=${1:-/var/lib/miaas/wheelhouse}
vm_network=192.168.121.0/24  # vagrant-libvirt's management network: the VMs reach this host at .1
[ "$(id -u)" -eq 0 ] || { echo "error: run as root (packages, services, the box, /etc/exports.d)" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)

packages="vagrant vagrant-libvirt libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86
  qemu-utils dnsmasq-base iptables debootstrap fdisk extlinux syslinux-common nfs-kernel-server"
DEBIAN_FRONTEND=noninteractive apt-get update -qq
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages

id miaas >/dev/null 2>&1 || useradd --system --home /var/lib/miaas --create-home --shell /usr/sbin/nologin miaas
usermod -aG libvirt miaas  # qemu:///system without root
[ -e /dev/kvm ] && usermod -aG kvm miaas
install -d -o miaas -g miaas -m 0755 "$wheels"
install -d -o miaas -g miaas -m 0755 /var/lib/miaas/.vagrant.d

if [ -d /run/systemd/system ]; then
  systemctl enable --now libvirtd virtlogd nfs-server
fi

# The box, added to the agent's Vagrant (its VAGRANT_HOME), built from Debian packages or taken from the cache.
VAGRANT_HOME=/var/lib/miaas/.vagrant.d bash "$here/build-box.sh"
chown -R miaas:miaas /var/lib/miaas/.vagrant.d

# The wheelhouse, read-only to this host's VMs (they reach no package index).
mkdir -p /etc/exports.d
echo "$wheels $vm_network(ro,sync,root_squash,no_subtree_check)" > /etc/exports.d/miaas-wheelhouse.exports
exportfs -ra
echo "ready: the VMs mount $wheels from 192.168.121.1:$wheels (AGENT_VAGRANT_WHEELS_NFS_EXPORT=$wheels)"
if ! grep -qE '(vmx|svm)' /proc/cpuinfo; then
  echo "note: this CPU shows no virtualisation extensions: set AGENT_VAGRANT_ACCELERATION=tcg (slow, but works)"
fi
