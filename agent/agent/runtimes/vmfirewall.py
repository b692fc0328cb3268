"""The host firewall of the VMs: a VM reaches nothing but the NFS server of its exports (and libvirt's DHCP).

nftables, in tables of their own (`inet miaas_vms`, `bridge miaas_vms`), not iptables chains: libvirt inserts
its own iptables chains (LIBVIRT_INP, LIBVIRT_FWO, ...) at the top of INPUT and FORWARD whenever it starts a
network, and those ACCEPT a VM's traffic before a chain of ours would see it. In nftables a drop or a reject in any
table is final, whatever another table accepts, so the order of tables (or of libvirt's rules) does not matter.

    inet miaas_vms    hooks input and forward; everything that comes from the VM network (its bridge, or a source
                      address in its subnet) is rejected (ICMP admin-prohibited), except: replies of connections the
                      host opened (vagrant-libvirt's `ssh -L` port forwarders connect into the VM: host → VM, so the
                      model answers through its forwarded ports), DHCP to libvirt's dnsmasq, and TCP 2049 to the
                      NFS server(s). No DNS, no metadata address (169.254.169.254), no control-plane port, no
                      broker, no other VM. New connections routed to a VM from elsewhere are rejected too.
    bridge miaas_vms  on the bridge itself (whatever br_netfilter does): no frame is bridged from or to a known VM
                      port (no VM-to-VM traffic at all), and the address a VM was given is bound to its port and MAC:
                      no other port or MAC may send from it or claim it in ARP, and a known VM port sends from its
                      own address only, never IPv6. The NFS exports are restricted to each VM's address, so this
                      binding is what makes that restriction hold.

`ruleset()` is pure (settings and bindings in, an `nft -f` script out), applied whole and atomically by
`NftFirewall.apply`: the script deletes and recreates both tables, so applying it again is harmless.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

TABLE = "miaas_vms"
NFS_PORT = 2049
_IFNAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
_MAC = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$")


class FirewallError(RuntimeError):
    """The firewall of the VMs could not be installed or removed."""


@dataclass(frozen=True)
class FirewallConfig:
    """What the rules need: the VM network's bridge and subnet, and the NFS servers the VMs may reach."""

    bridge: str
    network: ipaddress.IPv4Network
    nfs_servers: tuple[ipaddress.IPv4Address, ...]
    table: str = TABLE

    def __post_init__(self) -> None:
        if not _IFNAME.match(self.bridge):
            raise ValueError(f"not a network interface name: {self.bridge!r}")
        if not re.match(r"^[a-z][a-z0-9_]*$", self.table):
            raise ValueError(f"not an nftables table name: {self.table!r}")


@dataclass(frozen=True)
class VmBinding:
    """One VM as the bridge sees it: its port (the tap device on the host), its MAC and the address it was given."""

    port: str
    mac: str
    ip: ipaddress.IPv4Address

    def __post_init__(self) -> None:
        if not _IFNAME.match(self.port):
            raise ValueError(f"not a network interface name: {self.port!r}")
        if not _MAC.match(self.mac):
            raise ValueError(f"not a MAC address (lower case, colons): {self.mac!r}")

    @classmethod
    def of(cls, port: str, mac: str, ip: str) -> VmBinding:
        return cls(port, mac.lower(), ipaddress.IPv4Address(ip))


def firewall_config(bridge: str, network: str, nfs_servers: Iterable[str], table: str = TABLE) -> FirewallConfig:
    """FirewallConfig from settings' strings; an NFS server must be an IPv4 address (a rule cannot resolve names)."""
    servers = []
    for server in dict.fromkeys(nfs_servers):
        try:
            servers.append(ipaddress.IPv4Address(server))
        except ValueError:
            raise ValueError(f"the VM firewall needs the NFS server as an IPv4 address, not {server!r}") from None
    return FirewallConfig(bridge, ipaddress.IPv4Network(network), tuple(servers), table)


def _elements(items: list[str]) -> str:
    return f" elements = {{ {', '.join(items)} }}" if items else ""


def ruleset(config: FirewallConfig, bindings: Iterable[VmBinding] = ()) -> list[str]:
    """The `nft -f` script (one line each) that installs, or replaces, both tables. Pure."""
    t, bridge, subnet = config.table, f'"{config.bridge}"', str(config.network)
    vms = sorted(set(bindings), key=lambda b: (b.ip, b.port))
    nfs = ", ".join(str(ip) for ip in config.nfs_servers)
    allow_nfs = [f"ip daddr {{ {nfs} }} tcp dport {NFS_PORT} accept"] if nfs else []
    reject = "reject with icmpx type admin-prohibited"
    ports = [f'"{b.port}"' for b in vms]
    ips = [str(b.ip) for b in vms]
    pairs = [f'"{b.port}" . {b.mac} . {b.ip}' for b in vms]
    return [
        f"# The VMs' firewall (agent/agent/runtimes/vmfirewall.py): network {subnet} on bridge {config.bridge}.",
        f"table inet {t}",
        f"delete table inet {t}",
        f"table inet {t} {{",
        "  chain input {",
        "    type filter hook input priority filter - 10; policy accept;",
        f"    iifname {bridge} jump from_vm_to_host",
        f'    iifname != "lo" ip saddr {subnet} jump from_vm_to_host',
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter - 10; policy accept;",
        f"    iifname {bridge} jump from_vm_through_host",
        f"    ip saddr {subnet} jump from_vm_through_host",
        f"    oifname {bridge} jump to_vm_through_host",
        "  }",
        "  chain from_vm_to_host {",
        "    ct state established,related accept",
        "    udp sport 68 udp dport 67 accept",
        *[f"    {rule}" for rule in allow_nfs],
        f"    {reject}",
        "  }",
        "  chain from_vm_through_host {",
        "    ct state established,related accept",
        *[f"    {rule}" for rule in allow_nfs],
        f"    {reject}",
        "  }",
        "  chain to_vm_through_host {",
        "    ct state established,related accept",
        f"    {reject}",
        "  }",
        "}",
        f"table bridge {t}",
        f"delete table bridge {t}",
        f"table bridge {t} {{",
        f"  set vm_ports {{ type ifname;{_elements(ports)} }}",
        f"  set bound_ips {{ type ipv4_addr;{_elements(ips)} }}",
        f"  set bindings {{ type ifname . ether_addr . ipv4_addr;{_elements(pairs)} }}",
        "  chain prerouting {",
        "    type filter hook prerouting priority -300; policy accept;",
        "    ether type ip ip saddr @bound_ips iifname . ether saddr . ip saddr != @bindings drop",
        "    ether type arp arp saddr ip @bound_ips iifname . arp saddr ether . arp saddr ip != @bindings drop",
        "    iifname @vm_ports ether type ip ip saddr != 0.0.0.0 iifname . ether saddr . ip saddr != @bindings drop",
        "    iifname @vm_ports ether type arp arp saddr ip != 0.0.0.0 "
        "iifname . arp saddr ether . arp saddr ip != @bindings drop",
        "    iifname @vm_ports ether type ip6 drop",
        "  }",
        "  chain forward {",
        "    type filter hook forward priority -10; policy accept;",
        "    iifname @vm_ports drop",
        "    oifname @vm_ports drop",
        "  }",
        "}",
    ]


class NftFirewall:
    """Applies `ruleset()` with `nft -f -` (root, or CAP_NET_ADMIN), and removes both tables."""

    def __init__(self, nft: str | None = None) -> None:
        self.nft = nft or shutil.which("nft") or "/usr/sbin/nft"

    def _nft(self, *args: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([self.nft, *args], input=script, capture_output=True, text=True, timeout=30,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FirewallError(f"nft could not run ({exc}); install nftables (root or CAP_NET_ADMIN needed)") from exc

    def apply(self, config: FirewallConfig, bindings: Iterable[VmBinding] = ()) -> None:
        result = self._nft("-f", "-", script="\n".join(ruleset(config, bindings)) + "\n")
        if result.returncode != 0:
            raise FirewallError(f"nft refused the VMs' firewall: {(result.stderr or result.stdout).strip()}")

    def remove(self, table: str = TABLE) -> None:
        for family in ("inet", "bridge"):
            result = self._nft("delete", "table", family, table)
            text = (result.stderr or result.stdout).lower()
            if result.returncode != 0 and "no such file" not in text:
                raise FirewallError(f"nft could not delete table {family} {table}: {text.strip()}")

    def installed(self, table: str = TABLE) -> bool:
        return self._nft("list", "table", "inet", table).returncode == 0
