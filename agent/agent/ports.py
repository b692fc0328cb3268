"""Host ports for deployments: free ones from the agent's range, never one another deployment of this agent holds."""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Callable

from agent.errors import PortsExhausted


def port_is_free(port: int) -> bool:
    """True when nothing listens on the port: we can bind it on every address ourselves."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


class PortAllocator:
    """Hands out ports of [lo, hi] to owners (deployment ids). Thread-safe.

    The search starts after the last port handed out, so a port just released is the last to be reused
    (its old clients and TIME_WAIT sockets fade away first).
    """

    def __init__(self, lo: int, hi: int, *, is_free: Callable[[int], bool] = port_is_free) -> None:
        if not 0 < lo <= hi <= 65535:
            raise ValueError(f"bad port range {lo}-{hi}")
        self.lo, self.hi = lo, hi
        self._is_free = is_free
        self._held: dict[int, str] = {}
        self._next = lo
        self._lock = threading.Lock()

    def allocate(self, owner: str, count: int = 1) -> list[int]:
        """`count` distinct free ports for `owner`, or PortsExhausted (nothing is held then)."""
        with self._lock:
            size = self.hi - self.lo + 1
            found: list[int] = []
            for step in range(size):
                port = self.lo + (self._next - self.lo + step) % size
                if port in self._held or not self._is_free(port):
                    continue
                found.append(port)
                if len(found) == count:
                    break
            if len(found) < count:
                raise PortsExhausted(
                    f"no {count} free port(s) left in {self.lo}-{self.hi}: "
                    f"{len(self._held)} held by deployments of this agent, the others in use on this host"
                )
            for port in found:
                self._held[port] = owner
            self._next = self.lo + (found[-1] - self.lo + 1) % size
            return found

    def reserve(self, owner: str, ports: list[int]) -> None:
        """Hold these very ports for `owner` (a deployment found again after a restart: its VM's forwarders
        still listen on them, so they are not checked free). A port another owner holds is a ValueError."""
        with self._lock:
            taken = {p: self._held[p] for p in ports if self._held.get(p, owner) != owner}
            if taken:
                raise ValueError(f"ports already held by other deployments: {taken}")
            for port in ports:
                self._held[port] = owner

    def release(self, owner: str) -> list[int]:
        """Give back every port of `owner`; releasing twice is harmless."""
        with self._lock:
            ports = [p for p, o in self._held.items() if o == owner]
            for port in ports:
                del self._held[port]
            return ports

    def held(self) -> dict[int, str]:
        with self._lock:
            return dict(self._held)
