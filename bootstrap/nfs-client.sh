#!/usr/bin/env bash
# Mount the cluster's model store on a MIaaS machine (the model registry: rw; an agent: ro).
#   usage: sudo bootstrap/nfs-client.sh <server>:<export> <mount-point> <ro|rw>
#   e.g.   sudo bootstrap/nfs-client.sh nfs.lan:/srv/miaas/models /srv/miaas/models ro
# The mount point is the MODEL_STORE of the machine: the same path on the registry and every agent, since the
# registry hands agents absolute version paths. Mounted now and at every boot (/etc/fstab, after the network).
set -euo pipefail

usage() { echo "usage: $0 <server>:<export> <mount-point> <ro|rw>" >&2; exit 2; }
[ $# -eq 3 ] || usage
source=$1
target=$2
mode=$3
[ "$(id -u)" -eq 0 ] || { echo "error: run as root (it installs nfs-common, mounts and writes /etc/fstab)" >&2; exit 1; }
[[ "$source" =~ ^[A-Za-z0-9.:_-]+:/[A-Za-z0-9./_-]*$ ]] || { echo "error: not <server>:<export>: $source" >&2; exit 1; }
case "$target" in /*) ;; *) echo "error: the mount point must be an absolute path" >&2; exit 1 ;; esac
case "$mode" in ro|rw) ;; *) usage ;; esac

command -v mount.nfs >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nfs-common; }
install -d -m 0755 "$target"
options="$mode,vers=4.2,hard,noatime,_netdev,nofail"
line="$source $target nfs $options 0 0"
if grep -qE "^[^#]*[[:space:]]$target[[:space:]]" /etc/fstab; then
  sed -i "\|^[^#]*[[:space:]]$target[[:space:]]|c\\$line" /etc/fstab
else
  echo "$line" >> /etc/fstab
fi
mountpoint -q "$target" && umount "$target"
mount "$target"
echo "mounted $source at $target ($mode); MODEL_STORE=$target"
