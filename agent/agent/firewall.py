"""Outbound rules for the model uids of the process runtime's sandbox (iptables and ip6tables, filter table).

Default deny: a model uid opens no connection of its own, except replies on connections made to it (conntrack
ESTABLISHED/RELATED: clients and the agent's health check reach the model's port), its own ports on loopback (a
frontend talking to its backend), and what the operator allow-lists. The cluster's service and broker ports are
refused before the allow-list is read, so a wide allow-list ("0.0.0.0/0:443") still reaches no control plane.

    OUTPUT                    -m owner --uid-owner LO-HI -j MIAAS-MODELS-LO-HI     (first in OUTPUT)
    MIAAS-MODELS-LO-HI        ESTABLISHED,RELATED → ACCEPT
                              tcp to each denied port (any address) → REJECT (tcp-reset)
                              → MIAAS-OWN-LO-HI (per deployment: its uid to its own ports on loopback → ACCEPT)
                              each allow-listed endpoint → ACCEPT
                              tcp → REJECT (tcp-reset); anything else → REJECT (icmp port unreachable)

The chains are named after the uid range: agents of one host that share a range share them (and must share
their sandbox settings); another range has chains of its own. The base chain is replaced atomically
(iptables-restore --noflush); the OWN chain keeps the rules of every deployment of the range. Callers serialise
changes with a host-wide lock (sandbox.py).
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

CHAIN_PREFIX = "MIAAS-MODELS-"
OWN_CHAIN_PREFIX = "MIAAS-OWN-"
INSTALL_HINT = "apt-get install iptables"
_TIMEOUT_S = 30
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_LOOPBACK = {4: "127.0.0.0/8", 6: "::1/128"}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class FirewallError(RuntimeError):
    """The rules could not be read or written."""


@dataclass(frozen=True)
class Endpoint:
    """Where model uids may connect: a network, optionally one port, TCP unless said otherwise."""

    network: Network
    port: int | None = None
    protocol: Literal["tcp", "udp"] = "tcp"

    @property
    def family(self) -> int:
        return self.network.version

    def match(self) -> list[str]:
        spec = ["-d", str(self.network), "-p", self.protocol]
        return spec + (["--dport", str(self.port)] if self.port is not None else [])

    def __str__(self) -> str:
        host = f"[{self.network}]" if self.family == 6 and self.port is not None else str(self.network)
        return f"{self.protocol}:{host}" + (f":{self.port}" if self.port is not None else "")


_BRACKETED = re.compile(r"^\[([^\]]+)\](?::(\d+))?$")


def parse_endpoint(text: str) -> Endpoint:
    """`[tcp:|udp:]ADDRESS[/PREFIX][:PORT]`, an IPv6 address in brackets when a port follows:
    `10.0.0.0/8`, `10.1.2.3:443`, `udp:10.0.0.2:53`, `[2001:db8::/32]:443`."""
    rest = text.strip()
    protocol: Literal["tcp", "udp"] = "tcp"
    for name in ("tcp", "udp"):
        if rest.lower().startswith(name + ":"):
            protocol, rest = name, rest[len(name) + 1:]  # type: ignore[assignment]
    port_text: str | None = None
    bracketed = _BRACKETED.match(rest)
    if bracketed:
        address, port_text = bracketed[1], bracketed[2]
    elif rest.count(":") == 1:
        address, port_text = rest.split(":")
    else:
        address = rest  # IPv4 without port, or a bare IPv6 network
    try:
        network = ipaddress.ip_network(address, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an endpoint: [tcp:|udp:]ADDRESS[/PREFIX][:PORT], an IP address "
                         "(no host names), IPv6 in brackets when a port follows") from None
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{text!r}: the port must be 1-65535")
        port = int(port_text)
    return Endpoint(network, port, protocol)


def ipv6_enabled() -> bool:
    """True when the kernel has IPv6 (then ip6tables must carry the same rules)."""
    path = Path("/proc/net/if_inet6")
    try:
        return path.exists() and bool(path.read_text().strip())
    except OSError:
        return False


class Firewall:
    """The rules of one uid range, in IPv4 and (when the kernel has it) IPv6."""

    def __init__(
        self,
        uid_lo: int,
        uid_hi: int,
        *,
        allow: Sequence[Endpoint] = (),
        deny_ports: Iterable[int] = (),
        ipv6: bool | None = None,
        binaries: dict[int, str] | None = None,
    ) -> None:
        self.uid_range = f"{uid_lo}-{uid_hi}"
        self.chain = CHAIN_PREFIX + self.uid_range
        self.own_chain = OWN_CHAIN_PREFIX + self.uid_range
        self.allow = list(allow)
        self.deny_ports = sorted(set(deny_ports))
        self.ipv6 = ipv6_enabled() if ipv6 is None else ipv6
        names = binaries or {4: "iptables", 6: "ip6tables"}
        self.binaries = {family: names[family] for family in ((4, 6) if self.ipv6 else (4,))}

    # ------------------------------------------------------------------ the whole set

    def missing(self) -> str | None:
        """Why the rules cannot be written here (a binary is missing), or None."""
        for binary in self.binaries.values():
            for tool in (binary, f"{binary}-restore"):
                if shutil.which(tool, path=_PATH) is None:
                    return f"{tool} is not installed ({INSTALL_HINT})"
        return None

    def install(self) -> None:
        """Create or replace the rules of this range (idempotent): the base chain is swapped atomically, the
        deployments' own-port rules are kept, and the OUTPUT jump is added once, first in OUTPUT."""
        problem = self.missing()
        if problem:
            raise FirewallError(problem)
        for family, binary in self.binaries.items():
            if self._run(binary, ["-S", self.own_chain], check=False).returncode != 0:
                self._run(binary, ["-N", self.own_chain])
            self._restore(binary, self._base_rules(family))
            if not self._has_jump(binary):
                self._run(binary, ["-I", "OUTPUT", "1", *self._jump()])

    def installed(self) -> bool:
        """True when every family jumps from OUTPUT into the base chain for this range."""
        try:
            return all(self._has_jump(binary) for binary in self.binaries.values())
        except FirewallError:
            return False

    def remove(self) -> None:
        """Take this range's jump out of OUTPUT, then its chains."""
        for binary in self.binaries.values():
            if shutil.which(binary, path=_PATH) is None:
                continue
            while self._has_jump(binary):
                self._run(binary, ["-D", "OUTPUT", *self._jump()])
            for chain in (self.chain, self.own_chain):
                if self._run(binary, ["-S", chain], check=False).returncode == 0:
                    self._run(binary, ["-F", chain])
            for chain in (self.chain, self.own_chain):
                self._run(binary, ["-X", chain], check=False)

    # ------------------------------------------------------------------ one deployment

    def allow_own_ports(self, uid: int, ports: Iterable[int], tag: str) -> None:
        """Let one model uid reach its own ports on loopback (its replies need no rule)."""
        listed = ",".join(str(p) for p in sorted(set(ports)))
        if not listed:
            return
        for family, binary in self.binaries.items():
            self._run(binary, ["-A", self.own_chain, *self._own_rule(family, uid, listed, tag)])

    def forget_uid(self, uid: int) -> None:
        """Remove every own-port rule of a uid (its deployment ended, or a crashed agent left it behind)."""
        for binary in self.binaries.values():
            listing = self._run(binary, ["-S", self.own_chain], check=False)
            if listing.returncode != 0:
                continue
            for line in listing.stdout.splitlines():
                words = shlex.split(line)
                if words[:2] == ["-A", self.own_chain] and _uid_of(words) == uid:
                    self._run(binary, ["-D", *words[1:]], check=False)

    # ------------------------------------------------------------------ helpers

    def _jump(self) -> list[str]:
        return ["-m", "owner", "--uid-owner", self.uid_range, "-j", self.chain]

    def _has_jump(self, binary: str) -> bool:
        return self._run(binary, ["-C", "OUTPUT", *self._jump()], check=False).returncode == 0

    @staticmethod
    def _own_rule(family: int, uid: int, ports: str, tag: str) -> list[str]:
        return ["-d", _LOOPBACK[family], "-p", "tcp", "-m", "owner", "--uid-owner", str(uid), "-m", "multiport",
                "--dports", ports, "-m", "comment", "--comment", f"miaas:{tag}", "-j", "ACCEPT"]

    def _base_rules(self, family: int) -> list[list[str]]:
        rules = [["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]]
        rules += [["-p", "tcp", "--dport", str(port), "-j", "REJECT", "--reject-with", "tcp-reset"]
                  for port in self.deny_ports]
        rules.append(["-j", self.own_chain])
        rules += [[*endpoint.match(), "-j", "ACCEPT"] for endpoint in self.allow if endpoint.family == family]
        rules.append(["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"])
        rules.append(["-j", "REJECT"])
        return rules

    def _restore(self, binary: str, rules: list[list[str]]) -> None:
        lines = ["*filter", f":{self.chain} - [0:0]"]  # declaring the chain empties it, in the same commit
        lines += [shlex.join(["-A", self.chain, *rule]) for rule in rules]
        lines.append("COMMIT")
        self._run(f"{binary}-restore", ["--noflush"], stdin="\n".join(lines) + "\n", wait=False)

    @staticmethod
    def _run(
        binary: str, args: list[str], *, check: bool = True, stdin: str | None = None, wait: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = [binary, *(["-w"] if wait else []), *args]
        try:
            done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=_TIMEOUT_S,
                                  env={"PATH": _PATH, "LC_ALL": "C"})
        except FileNotFoundError:
            raise FirewallError(f"{binary} is not installed ({INSTALL_HINT})") from None
        except subprocess.TimeoutExpired:
            raise FirewallError(f"{shlex.join(argv)} did not finish within {_TIMEOUT_S} s") from None
        if check and done.returncode != 0:
            raise FirewallError(f"{shlex.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
        return done


def _uid_of(words: list[str]) -> int | None:
    for before, value in zip(words, words[1:], strict=False):
        if before == "--uid-owner" and value.isdigit():
            return int(value)
    return None
