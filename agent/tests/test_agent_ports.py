"""Port allocation: distinct free ports from the range, released on demand, a clear error when none is left."""

from __future__ import annotations

import socket

import pytest

from agent.errors import PortsExhausted
from agent.ports import PortAllocator


def always_free(port: int) -> bool:
    return True


def test_ports_handed_out_are_distinct_and_held_by_their_owner() -> None:
    allocator = PortAllocator(20000, 20009, is_free=always_free)
    a = allocator.allocate("dep-a", 2)
    b = allocator.allocate("dep-b")
    assert len(set(a + b)) == 3
    assert all(20000 <= p <= 20009 for p in a + b)
    assert allocator.held() == {a[0]: "dep-a", a[1]: "dep-a", b[0]: "dep-b"}


def test_released_ports_can_be_handed_out_again() -> None:
    allocator = PortAllocator(20000, 20001, is_free=always_free)
    first = allocator.allocate("dep-a", 2)
    assert allocator.release("dep-a") == first
    assert allocator.release("dep-a") == []  # twice is harmless
    assert sorted(allocator.allocate("dep-b", 2)) == sorted(first)


def test_exhausted_range_is_a_clear_error_and_holds_nothing() -> None:
    allocator = PortAllocator(20000, 20002, is_free=always_free)
    allocator.allocate("dep-a", 2)
    with pytest.raises(PortsExhausted, match="20000-20002") as raised:
        allocator.allocate("dep-b", 2)
    assert raised.value.status == 503
    assert set(allocator.held().values()) == {"dep-a"}


def test_a_port_in_use_on_the_host_is_never_handed_out() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        allocator = PortAllocator(port, port)
        with pytest.raises(PortsExhausted):
            allocator.allocate("dep-a")
    assert PortAllocator(port, port).allocate("dep-a") == [port]


def test_a_restarted_agent_reserves_the_ports_its_vms_still_hold() -> None:
    # the VMs' forwarders listen on them: they are taken on the host, yet ours again
    allocator = PortAllocator(20000, 20009, is_free=lambda port: False)
    allocator.reserve("dep-vm", [20003, 20004])
    assert allocator.held() == {20003: "dep-vm", 20004: "dep-vm"}
    allocator.reserve("dep-vm", [20003])  # twice is harmless
    with pytest.raises(ValueError, match="20004"):
        allocator.reserve("dep-other", [20004])
    assert PortAllocator(20000, 20009, is_free=always_free).allocate("x", 1) == [20000]
    allocator._is_free = always_free  # the next ones handed out skip the reserved ports
    assert not {20003, 20004} & set(allocator.allocate("dep-new", 8))
