#!/usr/bin/env bash
# Build the Vagrant box of the vagrant runtime (Debian 12, libvirt provider) from Debian packages, and add it.
#   usage: sudo bootstrap/build-box.sh [--check]
#   --check  only say what is missing (root, packages) and exit 0 when nothing is
# Environment:
#   MIAAS_BOX_NAME   name under which the box is added           (default miaas/debian12)
#   MIAAS_BOX_CACHE  where built boxes are kept, one folder per hash of this script
#                    (default ${XDG_CACHE_HOME:-$HOME/.cache}/miaas/boxes)
#   DEBIAN_MIRROR    mirror debootstrap downloads from           (default http://deb.debian.org/debian)
#   VAGRANT_HOME     Vagrant's home, as the agent sees it         (default ~/.vagrant.d)
# The box is cached under $MIAAS_BOX_CACHE/<hash of this script>/: a rerun with the same script reuses it and
# only adds it to Vagrant when Vagrant does not hold this very build already. Editing the script builds a new one.
# Inside the box: systemd, the kernel, openssh-server, sudo, python3 + venv, nfs-common; a `vagrant` user with
# passwordless sudo and an SSH key made for this build (not Vagrant's well-known insecure key: the box carries
# the private key and tells Vagrant to use it); host keys made at first boot; console on ttyS0.
set -euo pipefail

BOX_NAME=${MIAAS_BOX_NAME:-miaas/debian12}
CACHE_ROOT=${MIAAS_BOX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/miaas/boxes}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
DISK_GIB=8
GUEST_PACKAGES=systemd-sysv,udev,linux-image-amd64,openssh-server,sudo,python3,python3-venv,nfs-common,iproute2,netbase,ifupdown,isc-dhcp-client,kmod
HOST_PACKAGES="debootstrap qemu-utils fdisk extlinux syslinux-common e2fsprogs mount openssh-client vagrant vagrant-libvirt"

say() { echo "build-box: $*" >&2; }
die() { say "error: $*"; exit 1; }

script_hash() { sha256sum "${BASH_SOURCE[0]}" | cut -c1-16; }

missing_tools() {
  local missing=()
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v qemu-img >/dev/null || missing+=(qemu-utils)
  command -v sfdisk >/dev/null || missing+=(fdisk)
  command -v extlinux >/dev/null || missing+=(extlinux)
  [ -f /usr/lib/syslinux/mbr/mbr.bin ] || missing+=(syslinux-common)
  command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
  command -v losetup >/dev/null || missing+=(mount)
  command -v vagrant >/dev/null || missing+=(vagrant)
  command -v ssh-keygen >/dev/null || missing+=(openssh-client)
  compgen -G "/usr/share/rubygems-integration/all/gems/vagrant-libvirt-*" >/dev/null \
    || compgen -G "${VAGRANT_HOME:-$HOME/.vagrant.d}/gems/*/gems/vagrant-libvirt-*" >/dev/null \
    || missing+=(vagrant-libvirt)
  echo "${missing[@]}"
}

check() {
  local ok=0 missing
  if [ "$(id -u)" -ne 0 ]; then
    say "error: run as root (debootstrap, loop devices and mounts need it): sudo $0"
    ok=1
  fi
  missing=$(missing_tools)
  if [ -n "$missing" ]; then
    say "error: missing packages: $missing"
    say "install them with: apt-get install -y $HOST_PACKAGES"
    ok=1
  fi
  return $ok
}

if [ "${1:-}" = "--check" ]; then
  check
  exit $?
fi
check || exit 1

HASH=$(script_hash)
OUT=$CACHE_ROOT/$HASH
BOX=$OUT/miaas-debian12.box
BOX_DIR=${VAGRANT_HOME:-$HOME/.vagrant.d}/boxes/${BOX_NAME//\//-VAGRANTSLASH-}/0/libvirt

build() {
  local work root disk loop="" size
  mkdir -p "$CACHE_ROOT"
  work=$(mktemp -d "$CACHE_ROOT/.build-XXXXXX")
  root=$work/root
  disk=$work/disk.raw
  cleanup() {
    set +e
    mountpoint -q "$root/proc" && umount "$root/proc"
    mountpoint -q "$root/sys" && umount "$root/sys"
    mountpoint -q "$work/mnt" && umount "$work/mnt"
    [ -n "$loop" ] && losetup -d "$loop"
    rm -rf "$work"
  }
  trap cleanup EXIT

  say "debootstrap $SUITE from $MIRROR (a few minutes)"
  debootstrap --variant=minbase --include="$GUEST_PACKAGES" "$SUITE" "$root" "$MIRROR" > "$work/debootstrap.log" 2>&1 \
    || { tail -30 "$work/debootstrap.log" >&2; die "debootstrap failed"; }

  say "configuring the guest"
  echo miaas-vm > "$root/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 miaas-vm\n' > "$root/etc/hosts"
  echo '/dev/vda1 / ext4 defaults,noatime,errors=remount-ro 0 1' > "$root/etc/fstab"
  cat > "$root/etc/network/interfaces" <<'EOF'
auto lo
iface lo inet loopback
allow-hotplug eth0
iface eth0 inet dhcp
EOF
  # Only what a model VM needs at boot: no RPC services (NFSv4.1 mounts need none), no timers.
  for unit in rpcbind.service rpcbind.socket nfs-client.target apt-daily.timer apt-daily-upgrade.timer \
              e2scrub_all.timer fstrim.timer man-db.timer dpkg-db-backup.timer; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
  done
  # Host keys are made at first boot (each VM its own); ECDSA and Ed25519 only, fast even under emulation.
  rm -f "$root"/etc/ssh/ssh_host_*
  cat > "$root/etc/ssh/sshd_config.d/miaas.conf" <<'EOF'
HostKey /etc/ssh/ssh_host_ed25519_key
HostKey /etc/ssh/ssh_host_ecdsa_key
UseDNS no
GSSAPIAuthentication no
EOF
  cat > "$root/usr/local/sbin/miaas-host-keys" <<'EOF'
#!/bin/sh
# Host keys of this VM, made at its first boot.
for type in ed25519 ecdsa; do
  [ -f /etc/ssh/ssh_host_${type}_key ] || ssh-keygen -q -t $type -N '' -f /etc/ssh/ssh_host_${type}_key
done
EOF
  chmod 0755 "$root/usr/local/sbin/miaas-host-keys"
  mkdir -p "$root/etc/systemd/system/ssh.service.d"
  # Drop-in ExecStartPre lines run after the unit's own (`sshd -t`, which needs the keys): list them all again.
  cat > "$root/etc/systemd/system/ssh.service.d/host-keys.conf" <<'EOF'
[Service]
ExecStartPre=
ExecStartPre=/usr/local/sbin/miaas-host-keys
ExecStartPre=/usr/sbin/sshd -t
EOF
  # The vagrant user: passwordless sudo, and the key of this build (its private half goes into the box).
  mkdir -p "$work/box"
  ssh-keygen -q -m PEM -t rsa -b 3072 -N '' -C "miaas-box-$HASH" -f "$work/box/vagrant_key"
  chroot "$root" useradd --create-home --shell /bin/bash vagrant
  echo 'vagrant ALL=(ALL) NOPASSWD: ALL' > "$root/etc/sudoers.d/vagrant"
  chmod 0440 "$root/etc/sudoers.d/vagrant"
  uid=$(chroot "$root" id -u vagrant)
  install -d -m 0700 -o "$uid" -g "$uid" "$root/home/vagrant/.ssh"
  install -m 0600 -o "$uid" -g "$uid" "$work/box/vagrant_key.pub" "$root/home/vagrant/.ssh/authorized_keys"
  chroot "$root" passwd -d root >/dev/null
  # The models' virtualenv, made here at native speed (ensurepip alone takes a minute under emulation).
  chroot "$root" python3 -m venv /opt/miaas/venv
  # A small initramfs: the VM's disk and network are virtio.
  printf 'virtio_pci\nvirtio_blk\nvirtio_net\next4\n' >> "$root/etc/initramfs-tools/modules"
  sed -i 's/^MODULES=.*/MODULES=list/' "$root/etc/initramfs-tools/initramfs.conf"
  mount -t proc proc "$root/proc"
  mount -t sysfs sys "$root/sys"
  chroot "$root" update-initramfs -u -k all > "$work/initramfs.log" 2>&1 \
    || { tail -20 "$work/initramfs.log" >&2; die "update-initramfs failed"; }
  umount "$root/proc" "$root/sys"
  chroot "$root" apt-get clean
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log
  : > "$root/etc/machine-id"  # a new one at first boot

  say "making the disk image (${DISK_GIB} GiB, extlinux)"
  truncate -s "${DISK_GIB}G" "$disk"
  echo 'start=2048, type=83, bootable' | sfdisk -q "$disk"
  size=$(( DISK_GIB * 1024 * 1024 * 1024 - 1048576 ))
  # Loop devices here have no partition scanning: the partition is a loop device at its offset.
  loop=$(losetup --find --show --offset 1048576 --sizelimit "$size" "$disk")
  mkfs.ext4 -q -F -L root -O ^64bit,^metadata_csum "$loop"
  mkdir -p "$work/mnt"
  mount "$loop" "$work/mnt"
  cp -a "$root/." "$work/mnt/"
  mkdir -p "$work/mnt/boot/extlinux"
  kernel=$(cd "$work/mnt/boot" && ls vmlinuz-* | sort -V | tail -1)
  initrd=$(cd "$work/mnt/boot" && ls initrd.img-* | sort -V | tail -1)
  cat > "$work/mnt/boot/extlinux/extlinux.conf" <<EOF
DEFAULT debian
TIMEOUT 0
PROMPT 0
LABEL debian
  LINUX /boot/$kernel
  INITRD /boot/$initrd
  APPEND root=/dev/vda1 ro quiet console=tty0 console=ttyS0,115200n8 net.ifnames=0 biosdevname=0
EOF
  extlinux --install "$work/mnt/boot/extlinux" 2>/dev/null
  umount "$work/mnt"
  losetup -d "$loop"
  loop=""
  dd if=/usr/lib/syslinux/mbr/mbr.bin of="$disk" bs=440 count=1 conv=notrunc status=none

  say "packing the box"
  qemu-img convert -O qcow2 "$disk" "$work/box/box.img"
  rm -f "$disk"
  cat > "$work/box/metadata.json" <<EOF
{"provider": "libvirt", "format": "qcow2", "virtual_size": $DISK_GIB}
EOF
  cat > "$work/box/Vagrantfile" <<'EOF'
Vagrant.configure("2") do |config|
  # This box's own key, made when it was built: nothing to replace at `vagrant up`.
  config.ssh.private_key_path = File.expand_path("../vagrant_key", __FILE__)
  config.ssh.insert_key = false
  config.vm.guest = :debian
  config.vm.synced_folder ".", "/vagrant", disabled: true
  config.vm.provider :libvirt do |libvirt|
    libvirt.disk_bus = "virtio"
    libvirt.nic_model_type = "virtio"
  end
end
EOF
  echo "$HASH" > "$work/box/miaas-box-build"
  tar -C "$work/box" -cf "$work/box.tar" metadata.json Vagrantfile miaas-box-build vagrant_key box.img
  mkdir -p -m 0700 "$OUT"  # the box holds its SSH private key
  mv "$work/box.tar" "$BOX"
  # Boxes of older versions of this script are of no use any more.
  find "$CACHE_ROOT" -mindepth 1 -maxdepth 1 -type d -not -name "$HASH" -not -name '.build-*' -exec rm -rf {} +
  trap - EXIT
  cleanup
}

if [ -f "$BOX" ]; then
  say "reusing $BOX (script hash $HASH)"
else
  started=$(date +%s)
  build
  say "built $BOX in $(( $(date +%s) - started )) s"
fi

if [ "$(cat "$BOX_DIR/miaas-box-build" 2>/dev/null)" = "$HASH" ]; then
  say "Vagrant already holds $BOX_NAME from this build"
else
  say "adding $BOX_NAME to Vagrant"
  vagrant box add --force --name "$BOX_NAME" "$BOX" >/dev/null
  # vagrant-libvirt copies a box into the storage pool on first use: drop a copy of an older build.
  if virsh -c qemu:///system pool-info default >/dev/null 2>&1; then
    prefix=${BOX_NAME//\//-VAGRANTSLASH-}_vagrant_box_image_
    for vol in $(virsh -c qemu:///system vol-list default 2>/dev/null | awk 'NR>2 {print $1}'); do
      case "$vol" in "$prefix"*) virsh -c qemu:///system vol-delete --pool default "$vol" >/dev/null || true ;; esac
    done
  fi
fi
echo "$BOX_NAME"
