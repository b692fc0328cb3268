#!/usr/bin/env bash
# The cluster's NFS server of the model store (kernel NFS, nfs-kernel-server).
#   usage: sudo bootstrap/nfs-server.sh <store-folder> <registry-host> <agent-host-or-network>...
#   e.g.   sudo bootstrap/nfs-server.sh /srv/miaas/models 10.0.0.5 10.0.1.0/24
# Exports:
#   - to the model registry: read-write, every client user squashed to the local `miaas` user (all_squash), so
#     the registry's files belong to one owner whatever its uid on its own machine;
#   - to the agents' hosts: read-only, root squashed. VMs never mount this server: each agent host serves its VMs
#     their own version folders with nfs-ganesha (bootstrap/agent-vm-host.sh), from its mount of this store.
# The store is owned by `miaas` with mode 0755: never 0777, never no_root_squash.
set -euo pipefail

usage() { echo "usage: $0 <store-folder> <registry-host> <agent-host-or-network>..." >&2; exit 2; }
[ $# -ge 3 ] || usage
store=$1
registry=$2
shift 2
[ "$(id -u)" -eq 0 ] || { echo "error: run as root (it installs packages and writes /etc/exports.d)" >&2; exit 1; }
case "$store" in /*) ;; *) echo "error: the store folder must be an absolute path" >&2; exit 1 ;; esac
for client in "$registry" "$@"; do
  [[ "$client" =~ ^[A-Za-z0-9.:/_-]+$ ]] || { echo "error: not a host or network: $client" >&2; exit 1; }
done

command -v exportfs >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nfs-kernel-server; }
id miaas >/dev/null 2>&1 || useradd --system --home /var/lib/miaas --create-home --shell /usr/sbin/nologin miaas
uid=$(id -u miaas)
gid=$(id -g miaas)
install -d -o miaas -g miaas -m 0755 "$store"

exports=/etc/exports.d/miaas.exports
mkdir -p /etc/exports.d
{
  echo "# Written by bootstrap/nfs-server.sh: the MIaaS model store."
  echo "$store $registry(rw,sync,all_squash,anonuid=$uid,anongid=$gid,no_subtree_check)"
  for agent in "$@"; do
    echo "$store $agent(ro,sync,root_squash,no_subtree_check)"
  done
} > "$exports"
chmod 0644 "$exports"

if [ -d /run/systemd/system ]; then
  systemctl enable --now nfs-server
fi
exportfs -ra
echo "exported $store (see $exports):"
exportfs -v | grep -F "$store" || true
echo "on the registry:  sudo bootstrap/nfs-client.sh <this-host>:$store <MODEL_STORE> rw"
echo "on each agent:    sudo bootstrap/nfs-client.sh <this-host>:$store <MODEL_STORE> ro"
echo "agents' .env:     MODEL_STORE=<that mount point>; their VMs get their folders from the agent host"
