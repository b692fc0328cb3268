"""The VMs' firewall as rules: pure (settings and bindings in, an nft script out). tests/test_vm_deploy.py checks
it from inside a real VM; test_agent_vmfirewall_netns.py applies it to a bridge with network namespaces."""

from __future__ import annotations

import ipaddress

import pytest

from agent.runtimes.vmfirewall import FirewallConfig, VmBinding, firewall_config, ruleset

CONFIG = firewall_config("virbr1", "192.168.121.0/24", ["192.168.121.1"])
VM_A = VmBinding.of("vnet0", "52:54:00:AA:00:01", "192.168.121.57")
VM_B = VmBinding.of("vnet1", "52:54:00:aa:00:02", "192.168.121.58")


def chain(lines: list[str], family: str, name: str) -> list[str]:
    """The rule lines of one chain of one table."""
    start = lines.index(f"table {family} miaas_vms {{")
    body = lines[start:lines.index("}", start)]
    first = body.index(f"  chain {name} {{")
    return [line.strip() for line in body[first + 1:body.index("  }", first)]]


def test_both_tables_are_replaced_whole_so_applying_twice_is_harmless() -> None:
    lines = ruleset(CONFIG)
    for family in ("inet", "bridge"):
        at = lines.index(f"table {family} miaas_vms")
        assert lines[at + 1] == f"delete table {family} miaas_vms"  # declare, delete, define: one transaction
        assert lines[at + 2] == f"table {family} miaas_vms {{"


def test_traffic_from_the_vm_network_to_the_host_is_rejected_but_dhcp_nfs_and_replies() -> None:
    lines = ruleset(CONFIG)
    assert chain(lines, "inet", "input") == [
        "type filter hook input priority filter - 10; policy accept;",
        'iifname "virbr1" jump from_vm_to_host',
        'iifname != "lo" ip saddr 192.168.121.0/24 jump from_vm_to_host',
    ]
    assert chain(lines, "inet", "from_vm_to_host") == [
        "ct state established,related accept",  # the replies of the host's ssh port forwarders into the VM
        "udp sport 68 udp dport 67 accept",
        "ip daddr { 192.168.121.1 } tcp dport 2049 accept",
        "reject with icmpx type admin-prohibited",  # the controller, the broker, DNS, anything else of the host
    ]


def test_traffic_from_a_vm_through_the_host_is_rejected_but_nfs_and_replies() -> None:
    lines = ruleset(firewall_config("virbr1", "192.168.121.0/24", ["192.168.121.1", "10.0.0.9"]))
    assert chain(lines, "inet", "forward")[1:] == [
        'iifname "virbr1" jump from_vm_through_host',
        "ip saddr 192.168.121.0/24 jump from_vm_through_host",
        'oifname "virbr1" jump to_vm_through_host',
    ]
    # 169.254.169.254, other VMs (bridged traffic seen by br_netfilter), other hosts: all rejected
    assert chain(lines, "inet", "from_vm_through_host") == [
        "ct state established,related accept",
        "ip daddr { 192.168.121.1, 10.0.0.9 } tcp dport 2049 accept",
        "reject with icmpx type admin-prohibited",
    ]
    assert chain(lines, "inet", "to_vm_through_host")[-1] == "reject with icmpx type admin-prohibited"


def test_without_an_nfs_server_nothing_is_allowed_but_dhcp_and_replies() -> None:
    lines = ruleset(FirewallConfig("virbr1", ipaddress.IPv4Network("192.168.121.0/24"), ()))
    assert not any("2049" in line for line in lines)


def test_each_vm_is_bound_to_its_port_mac_and_address_and_no_frame_goes_vm_to_vm() -> None:
    lines = ruleset(CONFIG, [VM_B, VM_A, VM_A])
    assert '  set vm_ports { type ifname; elements = { "vnet0", "vnet1" } }' in lines
    assert "  set bound_ips { type ipv4_addr; elements = { 192.168.121.57, 192.168.121.58 } }" in lines
    assert ('  set bindings { type ifname . ether_addr . ipv4_addr; elements = { "vnet0" . 52:54:00:aa:00:01 . '
            '192.168.121.57, "vnet1" . 52:54:00:aa:00:02 . 192.168.121.58 } }') in lines
    prerouting = chain(lines, "bridge", "prerouting")
    # nobody else sends from (or claims in ARP) a bound address: the exports' client restriction holds
    assert "ether type ip ip saddr @bound_ips iifname . ether saddr . ip saddr != @bindings drop" in prerouting
    assert ("ether type arp arp saddr ip @bound_ips iifname . arp saddr ether . arp saddr ip != @bindings drop"
            in prerouting)
    assert "iifname @vm_ports ether type ip6 drop" in prerouting
    assert chain(lines, "bridge", "forward")[1:] == ["iifname @vm_ports drop", "oifname @vm_ports drop"]


def test_no_vm_yet_means_empty_sets() -> None:
    lines = ruleset(CONFIG)
    assert "  set vm_ports { type ifname; }" in lines
    assert "  set bindings { type ifname . ether_addr . ipv4_addr; }" in lines


@pytest.mark.parametrize("bridge", ['virbr1"; flush ruleset; "', "a" * 16, ""])
def test_names_that_would_inject_rules_are_refused(bridge: str) -> None:
    with pytest.raises(ValueError):
        firewall_config(bridge, "192.168.121.0/24", ["192.168.121.1"])


@pytest.mark.parametrize("port, mac, ip", [("vnet0", "52:54:00:aa:00:zz", "192.168.121.5"),
                                          ('vnet0" drop', "52:54:00:aa:00:01", "192.168.121.5"),
                                          ("vnet0", "52:54:00:aa:00:01", "192.168.121.5; flush ruleset")])
def test_bindings_are_checked(port: str, mac: str, ip: str) -> None:
    with pytest.raises(ValueError):
        VmBinding.of(port, mac, ip)


def test_an_nfs_server_must_be_an_address() -> None:
    with pytest.raises(ValueError, match="IPv4 address"):
        firewall_config("virbr1", "192.168.121.0/24", ["nfs.cluster.lan"])
