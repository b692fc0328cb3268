#!/usr/bin/env bash
# Make a machine able to run the agent's vagrant runtime: libvirt + QEMU, Vagrant with vagrant-libvirt, the box,
# nfs-ganesha serving each VM its own folders, and what the agent needs to firewall its VMs. Run it before
# bootstrap/install-service.sh agent (and again after it: it adds the agent's capabilities to its unit).
#   usage: sudo bootstrap/agent-vm-host.sh [wheelhouse-folder]     (default /var/lib/miaas/wheelhouse)
# Then in /etc/miaas/miaas.env: AGENT_RUNTIMES=["process", "vagrant"], AGENT_WHEELHOUSE_DIR=<that folder>,
# AGENT_VAGRANT_HOME=/var/lib/miaas/.vagrant.d, AGENT_VAGRANT_NFS_EXPORTS_FILE=/var/lib/miaas/nfs/vm-exports.conf,
# AGENT_VAGRANT_NFS_PID_FILE=/run/ganesha/ganesha.pid, and AGENT_VAGRANT_ACCELERATION=tcg only where KVM cannot be
# used. The model store (MODEL_STORE) is this host's read-only mount of the cluster's (bootstrap/nfs-client.sh).
#
# How the VMs are isolated (agent/README.md, "The vagrant runtime"):
#   - NFS: nfs-ganesha on this host exports nothing of its own; it %includes the file the agent writes, one export
#     per deployment and folder (its version folder, its wheelhouse) to that VM's address alone, and rereads it on
#     SIGHUP. No VM can mount the store's root, the wheelhouse's root or another deployment's folder.
#   - Network: the agent installs nftables tables `miaas_vms` at start (a VM reaches only NFS on this host and
#     DHCP; no other VM, no other port of this host, nothing beyond it) and removes them when no VM is left.
#   - The agent runs as `miaas`: its unit gets CAP_NET_ADMIN (nft) and CAP_KILL (SIGHUP to root's ganesha) as
#     ambient capabilities, nothing else.
set -euo pipefail

wheels=${1:-/var/lib/miaas/wheelhouse}
exports=/var/lib/miaas/nfs/vm-exports.conf
[ "$(id -u)" -eq 0 ] || { echo "error: run as root (packages, services, the box, the NFS server)" >&2; exit 1; }
case "$wheels" in /*) ;; *) echo "error: the wheelhouse folder must be an absolute path" >&2; exit 1 ;; esac
here=$(cd "$(dirname "$0")" && pwd)

packages="vagrant vagrant-libvirt libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86
  qemu-utils dnsmasq-base iptables nftables debootstrap fdisk extlinux syslinux-common nfs-ganesha nfs-ganesha-vfs
  rpcbind"
DEBIAN_FRONTEND=noninteractive apt-get update -qq
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages

id miaas >/dev/null 2>&1 || useradd --system --home /var/lib/miaas --create-home --shell /usr/sbin/nologin miaas
usermod -aG libvirt miaas  # qemu:///system without root
[ -e /dev/kvm ] && usermod -aG kvm miaas
install -d -o miaas -g miaas -m 0755 "$wheels" /var/lib/miaas/.vagrant.d "$(dirname "$exports")"
[ -f "$exports" ] || install -o miaas -g miaas -m 0644 /dev/null "$exports"

# nfs-ganesha (it replaces the kernel's NFS server, which its unit conflicts with): only the agent's exports.
mkdir -p /etc/ganesha
cat > /etc/ganesha/ganesha.conf <<CONF
# Written by bootstrap/agent-vm-host.sh: this host serves its MIaaS VMs, each its own folders only.
NFS_CORE_PARAM { Protocols = 4; NFS_Port = 2049; Enable_NLM = false; Enable_RQUOTA = false; }
NFSv4 { Graceless = true; Minor_Versions = 1, 2; }
LOG { Default_Log_Level = EVENT; }
# One EXPORT per deployment and folder, to the VM's address alone, written by the agent; reread on SIGHUP.
%include "$exports"
CONF
chmod 0644 /etc/ganesha/ganesha.conf
rm -f /etc/exports.d/miaas-wheelhouse.exports  # older setups exported the whole wheelhouse to the VM network
command -v exportfs >/dev/null && exportfs -ra || true

if [ -d /run/systemd/system ]; then
  systemctl enable --now libvirtd virtlogd
  systemctl disable --now nfs-server 2>/dev/null || true
  systemctl enable --now rpcbind nfs-ganesha
  # The agent's unit (bootstrap/install-service.sh agent): the two capabilities it needs for the VMs.
  install -d /etc/systemd/system/miaas-agent.service.d
  cat > /etc/systemd/system/miaas-agent.service.d/vm-host.conf <<'UNIT'
[Service]
# nft (the VMs' firewall) and SIGHUP to nfs-ganesha (the VMs' exports); written by bootstrap/agent-vm-host.sh
AmbientCapabilities=CAP_NET_ADMIN CAP_KILL
UNIT
  systemctl daemon-reload
  systemctl try-restart miaas-agent.service || true
fi

# The box, added to the agent's Vagrant (its VAGRANT_HOME), built from Debian packages or taken from the cache.
VAGRANT_HOME=/var/lib/miaas/.vagrant.d bash "$here/build-box.sh"
chown -R miaas:miaas /var/lib/miaas/.vagrant.d

echo "ready: nfs-ganesha serves the agent's per-deployment exports ($exports) to the VMs at 192.168.121.1"
echo "agent's .env: AGENT_WHEELHOUSE_DIR=$wheels AGENT_VAGRANT_NFS_EXPORTS_FILE=$exports" \
     "AGENT_VAGRANT_NFS_PID_FILE=/run/ganesha/ganesha.pid AGENT_VAGRANT_HOME=/var/lib/miaas/.vagrant.d"
echo "note: ganesha's VFS exports need file handles (open_by_handle_at) on MODEL_STORE's file system"
if ! grep -qE '(vmx|svm)' /proc/cpuinfo; then
  echo "note: this CPU shows no virtualisation extensions: set AGENT_VAGRANT_ACCELERATION=tcg (slow, but works)"
fi
