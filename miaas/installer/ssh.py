"""SSH to the hosts: keys only, host keys checked, one multiplexed connection per host.

Never `StrictHostKeyChecking=no`: with a known_hosts file from the operator every key must already be in it
(`yes`); without one, each host's key is recorded on first contact into the state folder's known_hosts and
checked on every later run (`accept-new`). `BatchMode=yes` means no password or passphrase prompt, ever.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miaas.installer.config import ClusterConfig, Host

HOSTSIDE = Path(__file__).with_name("hostside.py")


class HostError(Exception):
    """Something failed on one host; the message names it."""

    def __init__(self, host: Host, message: str) -> None:
        self.host = host
        self.message = message
        super().__init__(f"{host.name} ({host.address}): {message}")


@dataclass
class Ssh:
    config: ClusterConfig
    state_dir: Path

    def __post_init__(self) -> None:
        self.control_dir = control_dir(self.state_dir)
        self.known_hosts = self.config.ssh_known_hosts or (self.state_dir / "known_hosts")

    def base(self, host: Host) -> list[str]:
        strict = "yes" if self.config.ssh_known_hosts else "accept-new"
        argv = [
            "ssh", "-p", str(self.config.ssh_port),
            "-o", "BatchMode=yes", "-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no",
            "-o", f"StrictHostKeyChecking={strict}", "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5", "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=3", "-o", "ControlMaster=auto",
            "-o", f"ControlPath={self.control_dir}/%C", "-o", "ControlPersist=120", "-o", "LogLevel=ERROR",
        ]
        if self.config.ssh_key is not None:
            argv += ["-i", str(self.config.ssh_key), "-o", "IdentitiesOnly=yes"]
        return [*argv, f"{self.config.ssh_user}@{host.address}"]

    def _sudo(self) -> list[str]:
        return [] if self.config.ssh_user == "root" else ["sudo", "-n", "--"]

    def run(self, host: Host, command: list[str], *, input_bytes: bytes | None = None, timeout: float = 600,
            check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run `command` (argv, quoted for the remote shell) on `host` as root."""
        remote = " ".join(shlex.quote(a) for a in [*self._sudo(), *command])
        try:
            done = subprocess.run([*self.base(host), remote], input=input_bytes, capture_output=True,
                                  timeout=timeout, stdin=None if input_bytes is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise HostError(host, f"{command[0]} did not finish within {timeout:.0f}s") from exc
        if done.returncode == 255:
            raise HostError(host, "SSH failed: " + _ssh_reason(done.stderr.decode(errors="replace")))
        if check and done.returncode != 0:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-5:]
            raise HostError(host, f"{command[0]} exited with {done.returncode}: " + " | ".join(tail))
        return done

    def job(self, host: Host, action: str, timeout: float = 600, **job: Any) -> dict[str, Any]:
        """One action of `hostside.py` on `host`; its JSON answer."""
        payload = base64.b64encode(json.dumps({"action": action, **job}).encode()).decode()
        script = HOSTSIDE.read_bytes() + f"\n_main({payload!r})\n".encode()
        done = self.run(host, ["python3", "-c", "import sys; exec(compile(sys.stdin.read(), 'miaas-hostside', "
                                                "'exec'))"], input_bytes=script, timeout=timeout, check=False)
        out = done.stdout.decode(errors="replace")
        for line in reversed(out.splitlines()):
            if line.startswith("MIAAS-RESULT "):
                result: dict[str, Any] = json.loads(line[len("MIAAS-RESULT "):])
                return result
            if line.startswith("MIAAS-ERROR "):
                raise HostError(host, f"{action}: {line[len('MIAAS-ERROR '):]}")
        err = done.stderr.decode(errors="replace").strip().splitlines()[-5:]
        if done.returncode == 127 or any("python3: not found" in e or "No such file" in e for e in err):
            raise HostError(host, "python3 is missing: install python3 and python3-venv (apt-get install -y "
                                  "python3 python3-venv)")
        raise HostError(host, f"{action} gave no answer (exit {done.returncode}): " + " | ".join(err))

    def send_tree(self, host: Host, local: Path, remote: str, timeout: float = 600) -> None:
        """Copy the folder `local` to `remote` on `host` (tar over the SSH connection, into a temporary folder
        renamed into place, so a cut transfer leaves nothing that looks complete)."""
        tmp = f"{remote}.partial"
        script = (f"set -e; rm -rf {shlex.quote(tmp)}; mkdir -p {shlex.quote(tmp)}; "
                  f"tar -C {shlex.quote(tmp)} -xf -; rm -rf {shlex.quote(remote)}; "
                  f"mv {shlex.quote(tmp)} {shlex.quote(remote)}")
        remote_cmd = " ".join(shlex.quote(a) for a in [*self._sudo(), "sh", "-c", script])
        tar = subprocess.Popen(["tar", "-C", str(local), "-cf", "-", "."], stdout=subprocess.PIPE)
        try:
            done = subprocess.run([*self.base(host), remote_cmd], stdin=tar.stdout, capture_output=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            tar.kill()
            raise HostError(host, f"copying {local.name} did not finish within {timeout:.0f}s") from exc
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()
        if done.returncode != 0:
            raise HostError(host, f"copying {local.name} failed: "
                            + _ssh_reason(done.stderr.decode(errors="replace")))

    def close(self, host: Host) -> None:
        subprocess.run([*self.base(host)[:-1], "-O", "exit", self.base(host)[-1]], capture_output=True, timeout=10)


def control_dir(state_dir: Path) -> Path:
    """A short folder for the multiplexed connections' sockets (a Unix socket's path has at most 107 bytes, too
    few under a deep state folder): `/tmp/miaas-ssh-<uid>/<hash of the state folder>`, ours and 0700 or refused."""
    base = Path(tempfile.gettempdir()) / f"miaas-ssh-{os.getuid()}"
    for d in (base, base / hashlib.sha256(str(state_dir).encode()).hexdigest()[:10]):
        d.mkdir(mode=0o700, exist_ok=True)
        st = d.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
            raise OSError(f"{d} is not a private folder of this user: remove it")
    return d


def _ssh_reason(stderr: str) -> str:
    text = stderr.strip()
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or "Host key verification failed" in text:
        return ("its host key does not match the known_hosts file (a different machine at this address, or a "
                "reinstalled one: check, then remove the old key with ssh-keygen -R)")
    if "Permission denied" in text:
        return "the key was refused (check SSH_USER and SSH_KEY; passwords are never tried)"
    if "Connection refused" in text:
        return "connection refused: no SSH server on that port"
    if "timed out" in text or "No route to host" in text:
        return "it does not answer (down, or a firewall drops SSH)"
    if "Could not resolve hostname" in text:
        return "its name does not resolve"
    return " | ".join(text.splitlines()[-3:]) or "unknown error"
