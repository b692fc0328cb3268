"""Per-deployment NFS exports: a VM can mount its own version folder and its own wheelhouse, nothing else.

The agent's host serves its VMs with nfs-ganesha (user space; `agent.nfsdev` in development and CI, Debian's
`nfs-ganesha` service in production: bootstrap/agent-vm-host.sh). The agent owns one file of EXPORT blocks that
ganesha's configuration `%include`s; for each deployment it writes

    Pseudo /miaas/<deployment id>/app     → the version folder            (read-only, root squashed)
    Pseudo /miaas/<deployment id>/wheels  → the wheelhouse of its requirements (the same)

each with a single client, the VM's address (learnt from libvirt's DHCP lease while the VM boots, and bound to the
VM's bridge port and MAC by vmfirewall.py so no other VM can send from it), then makes ganesha reread its exports
(SIGHUP to the pid in its pid file: ganesha ≥ 2.6 adds, updates and removes exports on a reread). A client that
is not listed sees neither the export nor its folder (NFS4ERR_NOENT), and nothing exports the store's root or the
wheelhouse root any more. The file is rewritten whole (atomically) at every change, from what the agent holds.

Export ids are handed out from a counter and not reused by a running agent, so one reread never sees an id move
from one folder to another.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PSEUDO_ROOT = "/miaas"
FIRST_ID = 1000
"""Ids below are left to the static exports of a host's own ganesha configuration."""
LAST_ID = 65000
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_WHAT_RE = re.compile(r"^[a-z]+$")


class ExportError(RuntimeError):
    """The NFS server could not be told about an export."""


@dataclass(frozen=True)
class Export:
    """One folder exported read-only to one client at a pseudo path."""

    export_id: int
    path: Path
    pseudo: str
    client: str

    def to_json(self) -> dict[str, object]:
        return {"export_id": self.export_id, "path": str(self.path), "pseudo": self.pseudo, "client": self.client}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Export:
        return cls(int(str(data["export_id"])), Path(str(data["path"])), str(data["pseudo"]), str(data["client"]))


def pseudo_path(deployment_id: str, what: str) -> str:
    """Where a VM mounts `what` ("app", "wheels") of its deployment: /miaas/<deployment id>/<what>."""
    if not _ID_RE.match(deployment_id) or not _WHAT_RE.match(what):
        raise ValueError(f"bad deployment id or export name: {deployment_id!r}, {what!r}")
    return f"{PSEUDO_ROOT}/{deployment_id}/{what}"


def export_block(export_id: int, path: Path, pseudo: str, clients: str) -> list[str]:
    """A ganesha EXPORT block: read-only to `clients`, nobody else, root squashed, NFSv4 over TCP."""
    if not pseudo.startswith("/") or any(c in pseudo for c in ' ;{}"\n'):
        raise ValueError(f"bad pseudo path {pseudo!r}")
    if any(c in str(path) for c in ';{}"\n'):
        raise ValueError(f"a folder with such characters cannot be exported: {path}")
    if any(c in clients for c in ';{}"\n'):
        raise ValueError(f"bad client list {clients!r}")
    return [
        "EXPORT {",
        f"    Export_Id = {export_id};",
        f'    Path = "{path}";',
        f'    Pseudo = "{pseudo}";',
        "    Access_Type = None;",
        "    Squash = root_squash;",
        "    Protocols = 4;",
        "    Transports = TCP;",
        "    SecType = sys;",
        "    FSAL { Name = VFS; }",
        f"    CLIENT {{ Clients = {clients}; Access_Type = RO; }}",
        "}",
    ]


def ganesha_exports(exports: Iterable[Export]) -> str:
    """The file the agent owns: one EXPORT block per export, each to its one client. Pure."""
    lines = ["# Written by the MIaaS agent (agent/agent/runtimes/vmexports.py): one export per VM and folder."]
    for export in sorted(exports, key=lambda e: e.export_id):
        lines += export_block(export.export_id, export.path, export.pseudo, str(ipaddress.IPv4Address(export.client)))
    return "\n".join(lines) + "\n"


def sighup_pid_file(pid_file: Path) -> Callable[[], None]:
    """A reload that sends SIGHUP to the process whose pid is in pid_file (ganesha rereads its exports)."""

    def reload() -> None:
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError, IndexError) as exc:
            raise ExportError(f"cannot make the NFS server reread its exports (SIGHUP to the pid in {pid_file}): "
                              f"{exc}; is nfs-ganesha running (python -m agent.nfsdev)?") from exc

    return reload


class VmExports:
    """The exports of this agent's VMs: kept in memory, written whole to `config_file`, then `reload()`."""

    def __init__(self, config_file: Path, reload: Callable[[], None] | None = None) -> None:
        self.config_file = config_file
        self.reload = reload
        self._held: dict[str, list[Export]] = {}
        self._next_id = FIRST_ID
        self._lock = threading.Lock()

    def add(self, deployment_id: str, client: str, folders: Mapping[str, Path]) -> dict[str, Export]:
        """Export each folder (name → folder) of the deployment to client; replaces what it had. Reloads."""
        client = str(ipaddress.IPv4Address(client))
        with self._lock:
            exports = {what: Export(self._new_id(), Path(folder), pseudo_path(deployment_id, what), client)
                       for what, folder in folders.items()}
            self._held[deployment_id] = list(exports.values())
            self._sync()
        return exports

    def restore(self, deployment_id: str, exports: Iterable[Export]) -> None:
        """Hold again the exports of a VM adopted after an agent restart (call sync() once all are restored)."""
        with self._lock:
            held = list(exports)
            self._held[deployment_id] = held
            self._next_id = max([self._next_id, *(e.export_id + 1 for e in held)])

    def remove(self, deployment_id: str) -> None:
        """Stop exporting the deployment's folders (nothing held is fine). Reloads when something was held."""
        with self._lock:
            if self._held.pop(deployment_id, None) is not None:
                self._sync()

    def held(self, deployment_id: str) -> list[Export]:
        with self._lock:
            return list(self._held.get(deployment_id, []))

    def sync(self) -> None:
        """Write the file from what is held and reload the server (at agent start: drops what no VM needs)."""
        with self._lock:
            self._sync()

    def _new_id(self) -> int:
        used = {e.export_id for held in self._held.values() for e in held}
        for _ in range(LAST_ID - FIRST_ID + 1):
            candidate = self._next_id
            self._next_id = FIRST_ID if self._next_id >= LAST_ID else self._next_id + 1
            if candidate not in used:
                return candidate
        raise ExportError("no NFS export id left")

    def _sync(self) -> None:
        text = ganesha_exports(e for held in self._held.values() for e in held)
        self.config_file.parent.mkdir(parents=True, exist_ok=True)
        fd, staged = tempfile.mkstemp(prefix=".exports-", dir=self.config_file.parent)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(text)
            os.chmod(staged, 0o644)
            os.replace(staged, self.config_file)
        except BaseException:
            Path(staged).unlink(missing_ok=True)
            raise
        if self.reload is not None:
            self.reload()
