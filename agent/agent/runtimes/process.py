"""The process runtime: a model runs on the agent's machine, in a cached virtualenv.

By default (AGENT_SANDBOX=bwrap) every setup and start command runs in the deployment's bubblewrap sandbox as a
uid of its own, with an environment built from nothing and no outbound connection but its own ports
(sandbox.py, firewall.py). With AGENT_SANDBOX=none (trusted code only) a model runs as the agent's user with the
agent's access to the machine; only its environment is filtered so the agent's join token and secrets stay out.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from agent.errors import ProvisionCancelled, ProvisionFailed
from agent.gpus import GpuAllocator, cuda_env
from agent.logtail import tail_lines
from agent.runtimes.base import DeploymentSpec, RuntimeState
from agent.runtimes.sandbox import BwrapSandbox, Cell, NoSandbox, SandboxUnavailable, port_env_name
from agent.runtimes.venvs import Venv, VenvCache
from miaas.schemas import DeploymentStatus

log = logging.getLogger(__name__)

LOG_NAME = "model.log"
REASON_LINES = 20
_POLL_S = 0.1

# What a model inherits from the agent's environment; everything else (the join token first) stays out.
_INHERITED = {
    "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "USER", "LOGNAME", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
}
_INHERITED_PREFIXES = ("LC_", "PIP_")
_PROXIES = {"http_proxy", "https_proxy", "no_proxy", "all_proxy"}


def inherited_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The part of the agent's environment a model may see: locale, home, proxies, pip and GPU settings."""
    base = os.environ if base is None else base
    env = {
        k: v for k, v in base.items()
        if k in _INHERITED or k.startswith(_INHERITED_PREFIXES) or k.lower() in _PROXIES
    }
    env["PATH"] = base.get("PATH", os.defpath)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def model_env(spec: DeploymentSpec, venv: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the model's setup and start commands without a sandbox (AGENT_SANDBOX=none); in the
    sandbox it is sandbox.sandbox_env, which copies nothing of the agent's."""
    base = os.environ if base is None else base
    env = inherited_env(base)
    env.update(spec.env)
    env.update(
        {
            "PATH": f"{venv / 'bin'}{os.pathsep}{base.get('PATH', os.defpath)}",
            "VIRTUAL_ENV": str(venv),
            "PORT": str(spec.port),
            "MIAAS_DEPLOYMENT_ID": spec.deployment_id,
            "MIAAS_MODEL_ID": spec.model_id,
            "MIAAS_MODEL_VERSION": str(spec.version),
            "MIAAS_MODEL_DIR": str(spec.model_path),
            "MIAAS_WORKDIR": str(spec.workdir),
            # The version folder is read-only: bytecode goes to the deployment's own folder instead.
            "PYTHONPYCACHEPREFIX": str(spec.workdir / "pycache"),
        }
    )
    for name, port in spec.ports.items():
        env[port_env_name(name)] = str(port)
    return env


def answers(port: int, health_path: str | None, host: str = "127.0.0.1") -> bool:
    """True when the model answers: a 2xx on health_path if it has one, else an accepted TCP connection."""
    if health_path is None:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            return False
    conn = http.client.HTTPConnection(host, port, timeout=2.0)
    try:
        conn.request("GET", health_path)
        return 200 <= conn.getresponse().status < 300
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def group_alive(pgid: int) -> bool:
    """True while a process of the group is still alive (zombies waiting to be reaped do not count)."""
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


@dataclass
class _Deployment:
    """What the runtime keeps of one deployment."""

    spec: DeploymentSpec
    log_path: Path
    cancelled: threading.Event = field(default_factory=threading.Event)
    step: subprocess.Popen[bytes] | None = None
    model: subprocess.Popen[bytes] | None = None
    cell: Cell | None = None
    """The deployment's sandbox (uid, mounts, environment) while it holds one."""
    stopped: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class ProcessRuntime:
    """Runs each deployment's start commands as one bash script: in its sandbox (default), or in its own session
    (process group) as the agent's user (NoSandbox)."""

    name = "process"

    def __init__(
        self,
        venvs: VenvCache,
        *,
        sandbox: BwrapSandbox | NoSandbox | None = None,
        provision_timeout_s: float = 600.0,
        stop_grace_s: float = 10.0,
        probe: Callable[[int, str | None], bool] = answers,
        gpus: GpuAllocator | None = None,
    ) -> None:
        self.venvs = venvs
        self.sandbox: BwrapSandbox | NoSandbox = BwrapSandbox() if sandbox is None else sandbox
        self.gpus = gpus or GpuAllocator(lambda: [])
        self.provision_timeout_s = provision_timeout_s
        self.stop_grace_s = stop_grace_s
        self.probe = probe
        self._deployments: dict[str, _Deployment] = {}
        self._stopped_before_start: set[str] = set()
        self._lock = threading.Lock()

    def prepare(self) -> None:
        """At agent start: the sandbox's firewall rules (SandboxUnavailable when they cannot be written), or a
        warning that models run unconfined."""
        if isinstance(self.sandbox, BwrapSandbox):
            self.sandbox.start()
        else:
            log.warning("AGENT_SANDBOX=none: models of the process runtime run as the agent's user, with its access "
                        "to this machine, its files and the cluster's ports; run trusted models only")

    def close(self) -> None:
        """At agent exit (also done at interpreter exit): the sandbox's rules go once no model holds a uid."""
        if isinstance(self.sandbox, BwrapSandbox):
            self.sandbox.close()

    # ------------------------------------------------------------------ the Runtime interface

    def start(self, spec: DeploymentSpec) -> None:
        dep = self._admit(spec)
        deadline = time.monotonic() + self.provision_timeout_s
        try:
            self._provision(dep, deadline)
        except ProvisionCancelled:
            self._kill(dep)
            raise
        except ProvisionFailed as exc:
            self._note(dep, f"provisioning failed: {exc.message.splitlines()[0]}")
            self._kill(dep)
            raise
        except Exception as exc:
            log.exception("provisioning %s failed unexpectedly", spec.deployment_id)
            self._kill(dep)
            raise ProvisionFailed(f"agent error while provisioning: {exc.__class__.__name__}: {exc}") from exc

    def stop(self, deployment_id: str) -> None:
        with self._lock:
            dep = self._deployments.get(deployment_id)
            if dep is None:
                # stop() may overtake a start() that has not begun yet: that start must not run.
                self._stopped_before_start.add(deployment_id)
                return
        dep.cancelled.set()
        self._kill(dep)
        with dep.lock:
            if not dep.stopped:
                dep.stopped = True
                self._note(dep, "stopped")

    def status(self, deployment_id: str) -> RuntimeState:
        with self._lock:
            dep = self._deployments.get(deployment_id)
        if dep is None or dep.stopped or dep.cancelled.is_set():
            return RuntimeState(DeploymentStatus.STOPPED)
        model = dep.model
        if model is None:
            return RuntimeState(DeploymentStatus.PROVISIONING)
        code = model.poll()
        if code is None or self._leftovers(dep, model):
            return RuntimeState(DeploymentStatus.RUNNING)
        return RuntimeState(DeploymentStatus.FAILED, self._reason(dep, f"the model exited with code {code}"))

    def logs(self, deployment_id: str, tail: int) -> list[str]:
        with self._lock:
            dep = self._deployments.get(deployment_id)
        return [] if dep is None else tail_lines(dep.log_path, tail)

    def log_paths(self, deployment_id: str) -> list[Path]:
        with self._lock:
            dep = self._deployments.get(deployment_id)
        return [] if dep is None else [dep.log_path]

    # ------------------------------------------------------------------ provisioning

    def _admit(self, spec: DeploymentSpec) -> _Deployment:
        with self._lock:
            if spec.deployment_id in self._stopped_before_start:
                self._stopped_before_start.discard(spec.deployment_id)
                raise ProvisionCancelled(f"deployment {spec.deployment_id} was stopped before it started")
            known = self._deployments.get(spec.deployment_id)
            if known is not None and not known.stopped:
                raise ProvisionFailed(f"deployment {spec.deployment_id} is already started by this runtime")
            spec.workdir.mkdir(parents=True, exist_ok=True)
            dep = _Deployment(spec, spec.workdir / LOG_NAME)
            self._deployments[spec.deployment_id] = dep
            return dep

    def _provision(self, dep: _Deployment, deadline: float) -> None:
        spec = dep.spec
        self._note(dep, f"deployment {spec.deployment_id}: model {spec.model_id} v{spec.version} on port {spec.port}")
        sandbox = self.sandbox if isinstance(self.sandbox, BwrapSandbox) else None
        if sandbox is not None and (problem := sandbox.missing()):
            raise ProvisionFailed(f"the process runtime refuses to start models: {problem}")
        reserved = self.gpus.reserve(spec.deployment_id, spec.meta.resources.gpus)

        def run(argv: list[str], what: str) -> None:
            self._note(dep, f"{what}: {' '.join(argv)}")
            self._run_step(dep, argv, what, cwd=spec.model_path, env=None, deadline=deadline)

        venv: Venv = self.venvs.ensure(
            spec.model_path / "requirements.txt", run=run, deadline=deadline, cancelled=dep.cancelled
        )
        self._note(dep, f"{'built' if venv.built else 'reusing'} virtualenv {venv.path}")
        cuda = cuda_env(reserved, host_has_gpus=bool(self.gpus.devices()))
        if reserved:
            self._note(dep, "GPUs reserved: CUDA_VISIBLE_DEVICES=" + cuda["CUDA_VISIBLE_DEVICES"])
        script = "\n".join(spec.meta.start_commands)
        if sandbox is None:
            env = {**model_env(spec, venv.path), **cuda}
        else:
            env = self._enter(dep, sandbox, venv.path, cuda, bool(reserved))
            # The sandbox ends with its script: keep it while what the script started in the background runs.
            script += "\n__miaas_code=$?; wait; exit $__miaas_code"
        for number, command in enumerate(spec.meta.setup_commands, 1):
            self._note(dep, f"setup command {number}: {command}")
            self._run_step(dep, ["bash", "-c", command], f"setup command {number} ({command})",
                           cwd=spec.model_path, env=env, deadline=deadline)
        self._note(dep, "starting: " + " ; ".join(spec.meta.start_commands))
        with dep.lock:
            if dep.cancelled.is_set():
                raise ProvisionCancelled("stopped before the model started")
            dep.model = self._spawn(dep, ["bash", "-c", script], cwd=spec.model_path, env=env)
        self._wait_until_answering(dep, dep.model, deadline)
        self._note(dep, f"running: port {spec.port} answers")

    def _enter(
        self, dep: _Deployment, sandbox: BwrapSandbox, venv: Path, cuda: dict[str, str], gpus: bool
    ) -> dict[str, str]:
        """Take the deployment's sandbox (uid, home, firewall rules); its environment is the commands'."""
        try:
            cell = sandbox.enter(dep.spec, venv, gpus=gpus, cuda=cuda)
        except SandboxUnavailable as exc:
            raise ProvisionFailed(f"the process runtime refuses to start the model: {exc}") from exc
        with dep.lock:
            dep.cell = cell
            if dep.cancelled.is_set():
                raise ProvisionCancelled("stopped before the sandbox was ready")
        allowed = ", ".join(str(e) for e in sandbox.config.allow_outbound) or "none"
        self._note(dep, f"sandbox: bwrap as uid {cell.uid}; {dep.spec.model_path.name} read-only at /app, "
                        f"writable /work and /tmp; outbound connections: its own ports only (allow-list: {allowed})")
        return cell.env

    def _wait_until_answering(self, dep: _Deployment, model: subprocess.Popen[bytes], deadline: float) -> None:
        spec = dep.spec
        what = f"GET {spec.meta.health_path} → 2xx" if spec.meta.health_path else "a TCP connection"
        while True:
            if dep.cancelled.is_set():
                raise ProvisionCancelled("stopped while the model was starting")
            if self.probe(spec.port, spec.meta.health_path):
                return
            code = model.poll()
            if code is not None and (code != 0 or not self._leftovers(dep, model)):
                raise ProvisionFailed(self._reason(dep, f"the start commands exited with code {code} "
                                                        f"before port {spec.port} answered {what}"))
            if time.monotonic() > deadline:
                raise ProvisionFailed(self._reason(dep, f"port {spec.port} did not answer {what} within "
                                                        f"{self.provision_timeout_s:g} s"))
            dep.cancelled.wait(_POLL_S)

    def _run_step(
        self, dep: _Deployment, argv: list[str], what: str, *, cwd: Path, env: dict[str, str] | None, deadline: float
    ) -> None:
        """Run one provisioning command to its end, bounded by the deadline and cancellable by stop()."""
        with dep.lock:
            if dep.cancelled.is_set():
                raise ProvisionCancelled(f"stopped before {what}")
            proc = dep.step = self._spawn(dep, argv, cwd=cwd, env=env)
        try:
            while True:
                try:
                    code = proc.wait(timeout=_POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if dep.cancelled.is_set():
                    raise ProvisionCancelled(f"stopped during {what}")
                if time.monotonic() > deadline:
                    raise ProvisionFailed(self._reason(dep, f"{what} did not finish within the provisioning "
                                                            f"timeout of {self.provision_timeout_s:g} s"))
        finally:
            if proc.poll() is None:
                self._terminate(dep, proc, grace=1.0)
            with dep.lock:
                dep.step = None
        if dep.cancelled.is_set():
            raise ProvisionCancelled(f"stopped during {what}")
        if code != 0:
            raise ProvisionFailed(self._reason(dep, f"{what} failed with exit code {code}"))

    def _spawn(
        self, dep: _Deployment, argv: list[str], *, cwd: Path, env: dict[str, str] | None
    ) -> subprocess.Popen[bytes]:
        if env is None:
            env = inherited_env()  # a venv build: no venv yet, and no model variables needed
        elif dep.cell is not None:  # a model's command: in its sandbox (cwd /app there)
            with dep.log_path.open("ab") as out:
                return dep.cell.spawn(argv, out)
        with dep.log_path.open("ab") as out:
            return subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    # ------------------------------------------------------------------ stopping

    def _kill(self, dep: _Deployment) -> None:
        with dep.lock:
            procs = [p for p in (dep.step, dep.model) if p is not None]
        for proc in procs:
            self._terminate(dep, proc, grace=self.stop_grace_s)
        with dep.lock:
            cell, dep.cell = dep.cell, None
        if cell is not None and isinstance(self.sandbox, BwrapSandbox):
            self.sandbox.kill_leftovers(cell)
            self.sandbox.leave(cell)
        self.gpus.release(dep.spec.deployment_id)

    def _terminate(self, dep: _Deployment, proc: subprocess.Popen[bytes], *, grace: float) -> None:
        """SIGTERM to the model's processes, SIGKILL to what is left after `grace` seconds."""
        cell = dep.cell
        if cell is not None and isinstance(self.sandbox, BwrapSandbox):
            self.sandbox.terminate(cell, proc, grace=grace)
            return
        pgid = proc.pid  # start_new_session: the leader's pid is the group id
        if proc.poll() is not None and not group_alive(pgid):
            return  # already gone: never signal a group id that may have been reused
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        _signal_group(pgid, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("process %s survived SIGKILL", proc.pid)

    # ------------------------------------------------------------------ log helpers

    def _note(self, dep: _Deployment, line: str) -> None:
        """An agent line in the deployment's log, marked so it stands apart from the model's output."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        with dep.log_path.open("a", encoding="utf-8") as out:
            out.write(f"[agent {stamp}Z] {line}\n")

    def _leftovers(self, dep: _Deployment, proc: subprocess.Popen[bytes]) -> bool:
        """After the script's exit: does something it started still run? (A sandbox ends with its script.)"""
        return not isinstance(self.sandbox, BwrapSandbox) and group_alive(proc.pid)

    def _reason(self, dep: _Deployment, what: str) -> str:
        lines = tail_lines(dep.log_path, REASON_LINES)
        return what + ("; last log lines:\n" + "\n".join(lines) if lines else "; the log is empty")


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
