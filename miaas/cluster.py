"""A whole local cluster as real processes: embedded broker, service registry, model registry, controller,
agents and portal. Used by `miaas up` and by the end-to-end tests.

Services are started by module name (`python -m controller`): this module never imports a service.

Identities (see miaas.identity): the first start makes the cluster CA and one credential per service and an admin
credential in `<state>/pki/`; every start makes a fresh join token the agents join with. An agent keeps the
credential it got when it joined in its state folder, so a restart needs no token.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from miaas import identity
from miaas.bus import ensure_topics
from miaas.client import SignedSession

DEFAULT_PORTS = {"broker": 9092, "service-registry": 8500, "model-registry": 8510, "controller": 8520, "frontend": 8080}
AGENT_BASE_PORT = 8530


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    url: str | None
    log: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def pick_port(host: str, wanted: int) -> int:
    """`wanted` when free, else any free port (0 always means any)."""
    if wanted and port_is_free(host, wanted):
        return wanted
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def load_or_create_secrets(path: Path) -> dict[str, str]:
    """Secrets of this local cluster: taken from the environment, else generated once and kept in `path` (0600)."""
    stored: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep:
                stored[key.strip()] = value.strip()
    wanted = {
        "FRONTEND_SECRET_KEY": lambda: secrets.token_hex(32),
        "FRONTEND_ADMIN_PASSWORD": lambda: secrets.token_urlsafe(12),
    }
    out = {}
    for key, make in wanted.items():
        out[key] = os.environ.get(key) or stored.get(key) or make()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{k}={v}\n" for k, v in out.items()))
    return out


SERVICES = {"service-registry": "SERVICE_REGISTRY", "model-registry": "MODEL_REGISTRY", "controller": "CONTROLLER",
            "frontend": "FRONTEND"}


@dataclass
class Pki:
    """The identities of one cluster in one folder: the CA, a credential per service, an admin credential."""

    root: Path
    ca_file: Path
    ca_key_file: Path
    credentials: dict[str, Path]

    @classmethod
    def ensure(cls, root: Path) -> Pki:
        """Load the cluster's identities from `root`, creating whatever is missing (a CA once, then credentials)."""
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)
        ca_key, ca_pub = root / "ca-key.json", root / "ca.json"
        if ca_key.is_file():
            ca = identity.CertificateAuthority.load(ca_key)
            if not ca_pub.is_file():
                ca.save(ca_key, ca_pub)
        else:
            ca = identity.CertificateAuthority.generate()
            ca.save(ca_key, ca_pub)
        creds: dict[str, Path] = {}
        now = time.time()
        for subject in (*SERVICES, identity.ADMIN):
            path = root / f"{subject}.json"
            creds[subject] = path
            try:
                current = identity.Credential.load(path)
                verifier = identity.Verifier(ca.public_key)
                verifier.certificate(current.token, now + 30 * 24 * 3600)  # valid a month from now, of this CA
                continue
            except (ValueError, identity.Refused):
                pass
            ca.credential(subject, subject, now=now).save(path)
        return cls(root, ca_pub, ca_key, creds)

    def ca(self) -> identity.CertificateAuthority:
        return identity.CertificateAuthority.load(self.ca_key_file)

    def admin(self) -> identity.Credential:
        return identity.Credential.load(self.credentials[identity.ADMIN])

    def join_token(self, uses: int, ttl_s: float = 3600.0) -> str:
        """A join token, made offline with the CA key (the controller counts its uses as agents join)."""
        return self.ca().join_token(now=time.time(), ttl_s=ttl_s, uses=max(1, uses)).token


@dataclass
class LocalCluster:
    """Starts and stops every process of a local cluster; `agents` gives extra environment per agent."""

    state_dir: Path
    host: str = "127.0.0.1"
    agents: list[dict[str, str]] = field(default_factory=lambda: [{}, {}])
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    extra_env: dict[str, str] = field(default_factory=dict)
    bootstrap: str | None = None  # an existing broker to use instead of starting the embedded one
    processes: list[Proc] = field(default_factory=list)
    secrets: dict[str, str] = field(default_factory=dict)
    pki: Pki | None = None

    @property
    def admin(self) -> identity.Credential:
        """The operator's credential: what the tests and the CLI call the services with."""
        assert self.pki is not None, "start the cluster first"
        return self.pki.admin()

    def session(self, credential: identity.Credential | None = None) -> requests.Session:
        """A requests session whose every request is signed as `credential` (default: the admin)."""
        return SignedSession(credential or self.admin)

    @property
    def admin_password(self) -> str:
        return self.secrets["FRONTEND_ADMIN_PASSWORD"]

    def url(self, name: str) -> str:
        for p in self.processes:
            if p.name == name and p.url:
                return p.url
        raise KeyError(name)

    def start(self, timeout: float = 60.0) -> LocalCluster:
        self.state_dir = self.state_dir.resolve()
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.secrets = load_or_create_secrets(self.state_dir / "secrets.env")
        self.pki = Pki.ensure(self.state_dir / "pki")
        try:
            self._start_all(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_all(self, timeout: float) -> None:
        host, state = self.host, self.state_dir
        ports = {name: pick_port(host, self.ports.get(name, 0)) for name in DEFAULT_PORTS}
        bootstrap = self.bootstrap or f"{host}:{ports['broker']}"
        registry_url = f"http://{host}:{ports['service-registry']}"
        assert self.pki is not None
        base = {
            **os.environ,
            **self.secrets,
            "MIAAS_CA_FILE": str(self.pki.ca_file),
            **{f"{prefix}_CREDENTIAL_FILE": str(self.pki.credentials[name]) for name, prefix in SERVICES.items()},
            "MIAAS_KAFKA_BOOTSTRAP": bootstrap,
            "MIAAS_SERVICE_REGISTRY_URL": registry_url,
            "MIAAS_HEARTBEAT_INTERVAL_S": "2",
            "MODEL_STORE": str(state / "models"),
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        if self.bootstrap is None:
            self._spawn("broker", ["-m", "embedded_broker", "--host", host, "--port", str(ports["broker"])], base, None)
            self._wait_port(host, ports["broker"], "broker", timeout)
        ensure_topics(bootstrap)
        self._service("service-registry", "service_registry", "SERVICE_REGISTRY", ports, base, timeout)
        self._service("model-registry", "model_registry", "MODEL_REGISTRY", ports, base, timeout,
                      MODEL_REGISTRY_DATABASE_URL=f"sqlite:///{state / 'model-registry.db'}")
        self._service("controller", "controller", "CONTROLLER", ports, base, timeout,
                      CONTROLLER_DATABASE_URL=f"sqlite:///{state / 'controller.db'}",
                      CONTROLLER_CA_KEY_FILE=str(self.pki.ca_key_file))
        controller_url = f"http://{host}:{ports['controller']}"
        join_token = self.pki.join_token(uses=len(self.agents))
        for i, extra in enumerate(self.agents, start=1):
            agent_id = f"agent-{i}"
            port = pick_port(host, AGENT_BASE_PORT + i if self.ports.get("controller") else 0)
            ports[agent_id] = port
            self._forget_moved_agent(state / agent_id / "credential.json", f"http://{host}:{port}", controller_url)
            self._service(agent_id, "agent", "AGENT", ports, base, timeout, **{
                "AGENT_AGENT_ID": agent_id, "AGENT_STATE_DIR": str(state / agent_id),
                "AGENT_JOIN_TOKEN": join_token, "AGENT_CONTROLLER_URL": controller_url,
                "AGENT_VENV_CACHE_DIR": str(state / "venvs"),
                "AGENT_PORT_RANGE": f"{20000 + 1000 * i}-{20999 + 1000 * i}",
                "AGENT_METRICS_INTERVAL_S": "2", **extra})
        self._service("frontend", "frontend", "FRONTEND", ports, base, timeout,
                      FRONTEND_DATABASE_URL=f"sqlite:///{state / 'frontend.db'}")

    def _forget_moved_agent(self, credential_file: Path, url: str, controller_url: str) -> None:
        """An agent whose port changed since it joined holds a certificate for its old URL: revoke it (as the
        admin) and let the agent join again with this start's token."""
        try:
            cert = identity.Credential.load(credential_file).cert
        except ValueError:
            return
        if cert.url == url:
            return
        resp = self.session().post(f"{controller_url}/controller/identities/revoke", timeout=10,
                                   json={"serial": cert.serial, "reason": f"local cluster: moved to {url}"})
        if resp.status_code >= 400:
            raise RuntimeError(f"could not revoke the old certificate of {cert.subject}: {resp.text[:300]}")
        credential_file.unlink()

    def _service(self, name: str, module: str, prefix: str, ports: dict[str, int], base: dict[str, str],
                 timeout: float, **env: str) -> None:
        url = f"http://{self.host}:{ports[name]}"
        full = {**base, f"{prefix}_HOST": self.host, f"{prefix}_PORT": str(ports[name]), **env}
        self._spawn(name, ["-m", module], full, url)
        self._wait_health(name, url, timeout)

    def _spawn(self, name: str, args: list[str], env: dict[str, str], url: str | None) -> None:
        log = self.state_dir / "logs" / f"{name}.log"
        out = open(log, "ab")  # noqa: SIM115 - the child process owns it from here
        proc = subprocess.Popen(
            [sys.executable, *args], env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=self.state_dir,
        )
        out.close()
        self.processes.append(Proc(name, proc, url, log, args, env))

    def _check_alive(self, name: str) -> None:
        for p in self.processes:
            if p.name == name and p.process.poll() is not None:
                tail = "\n".join(p.log.read_text(errors="replace").splitlines()[-20:])
                raise RuntimeError(f"{name} exited with code {p.process.returncode}; last log lines:\n{tail}")

    def _wait_port(self, host: str, port: int, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(name)
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not listen on {host}:{port} within {timeout:.0f}s") from None
                time.sleep(0.1)

    def _wait_health(self, name: str, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(name)
            try:
                if requests.get(f"{url}/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not answer {url}/health within {timeout:.0f}s")
            time.sleep(0.1)

    def stop(self, grace: float = 15.0) -> None:
        """Stop every process, newest first: SIGTERM to its process group, SIGKILL after `grace` seconds."""
        for p in reversed(self.processes):
            _terminate(p.process, grace)
        self.processes.clear()

    def dead(self) -> list[Proc]:
        return [p for p in self.processes if p.process.poll() is not None]

    def proc(self, name: str) -> Proc:
        for p in self.processes:
            if p.name == name:
                return p
        raise KeyError(name)

    def signal(self, name: str, sig: int) -> None:
        """Send a signal to one service's process only (not to what it started): SIGKILL, SIGSTOP, SIGCONT..."""
        os.kill(self.proc(name).process.pid, sig)

    def crash(self, name: str) -> None:
        """SIGKILL one service and every process it started (its models too): a machine that dies at once."""
        proc = self.proc(name).process
        with contextlib.suppress(psutil.NoSuchProcess):
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            for p in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
        proc.wait()

    def restart(self, name: str, timeout: float = 60.0, grace: float = 15.0) -> None:
        """Start one service again with the same command, environment and port (stopping it first if it runs)."""
        old = self.proc(name)
        _terminate(old.process, grace)
        self.processes.remove(old)
        self._spawn(name, old.args, old.env, old.url)
        if old.url:
            self._wait_health(name, old.url, timeout)


def _terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the service left in its group goes too
    proc.wait()
