"""The deployments of this agent: their state machine, their ports, their runtimes, and the events they publish.

Every state change is published on `deployment-events` (key: deployment id) in the order it happens.
Commands are idempotent by deployment id: a repeated create returns the deployment already held, a repeated
stop the stopped one. The controller numbers each placement of a deployment (`generation`): a create of a newer
generation restarts a copy that was stopped or failed here (the deployment came back to this agent), and a stop
of an older generation leaves a newer copy running.

Once running, each deployment is watched (health.py): a model that stops answering its health_path, or whose
process or VM ended, is restarted in place (same id, port and generation; status stays `running`) with a growing
backoff, and failed after too many restarts. Its `restarts`, `last_restart_reason` and `health` are in its detail
and in the metrics' reports.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from pydantic import Field

from agent.errors import AgentError, ProvisionCancelled, ProvisionFailed
from agent.fetch import FetchModel, ModelSource
from agent.health import Health, HealthPolicy, HealthWatch
from agent.ports import PortAllocator
from agent.runtimes.base import DeploymentSpec, RecoveredDeployment, Runtime, RuntimeState
from agent.verify import verify_version
from miaas.bus import DEPLOYMENT_EVENTS, EventBus
from miaas.errors import BadRequest, Conflict, NotFound, Unavailable
from miaas.schemas import AgentDeployment, CreateVmRequest, DeploymentEvent, DeploymentReport, DeploymentStatus, Wire

log = logging.getLogger(__name__)
S = DeploymentStatus


def utcnow() -> datetime:
    return datetime.now(UTC)


class AgentDeploymentDetail(AgentDeployment):
    """AgentDeployment plus the host port of each named port of meta.json, and what its health watch saw."""

    ports: dict[str, int] = Field(default_factory=dict)
    restarts: int = Field(0, ge=0, description="restarts in place since it was placed here")
    last_restart_reason: str | None = Field(None, description="why it was restarted last")
    health: Health = Field("unknown", description="passing, failing, or unknown (not running, or not probed yet)")


class AgentDeploymentList(Wire):
    deployments: list[AgentDeploymentDetail]


@dataclass
class _Record:
    deployment_id: str
    model_id: str
    version: int
    runtime: str
    url: str
    port: int
    ports: dict[str, int]
    status: DeploymentStatus = S.PROVISIONING
    reason: str | None = None
    generation: int = 0
    thread: threading.Thread | None = None
    settled: threading.Event = field(default_factory=threading.Event)
    finished_at: float | None = None
    spec: DeploymentSpec | None = None
    """What the runtime was started with (None for an adopted copy until a restart needs it)."""
    watch: HealthWatch | None = None
    restarts: int = 0
    last_restart_reason: str | None = None
    health: Health = "unknown"

    def view(self) -> AgentDeploymentDetail:
        return AgentDeploymentDetail(
            deployment_id=self.deployment_id, model_id=self.model_id, version=self.version, runtime=self.runtime,
            status=self.status, url=self.url, port=self.port, reason=self.reason, ports=self.ports,
            generation=self.generation, restarts=self.restarts, last_restart_reason=self.last_restart_reason,
            health=self.health if self.status is S.RUNNING else "unknown",
        )

    def report(self) -> DeploymentReport:
        return DeploymentReport(
            deployment_id=self.deployment_id, status=self.status, url=self.url, generation=self.generation,
            restarts=self.restarts, last_restart_reason=self.last_restart_reason,
            health=self.health if self.status is S.RUNNING else "unknown",
        )


def model_url(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    return f"http://{host}:{port}"


class DeploymentManager:
    """Holds this agent's deployments by id. Thread-safe."""

    def __init__(
        self,
        *,
        agent_id: str,
        runtimes: Mapping[str, Runtime],
        fetch_model: FetchModel,
        bus: EventBus,
        ports: PortAllocator,
        state_dir: Path,
        advertise_host: str,
        clock: Callable[[], datetime] = utcnow,
        stop_timeout_s: float = 60.0,
        keep_finished: int = 200,
        health: HealthPolicy | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.runtimes = dict(runtimes)
        self.fetch_model = fetch_model
        self.bus = bus
        self.ports = ports
        self.state_dir = state_dir
        self.advertise_host = advertise_host
        self.clock = clock
        self.stop_timeout_s = stop_timeout_s
        self.keep_finished = keep_finished
        self.health = health
        """How running deployments are watched (None: not at all; a dead model is failed when it is seen)."""
        self._records: dict[str, _Record] = {}
        self._creating: dict[str, threading.Lock] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ commands

    def create(self, req: CreateVmRequest) -> AgentDeploymentDetail:
        """Take a deployment: answer at once with `provisioning` and its URL, provision in the background."""
        runtime = self.runtimes.get(req.runtime)
        if runtime is None:
            raise BadRequest(
                f"runtime '{req.runtime}' is not offered by agent {self.agent_id} (it offers {sorted(self.runtimes)})",
                code="unknown_runtime",
            )
        with self._lock:
            known = self._records.get(req.deployment_id)
            if known is not None and not self._restarts(known, req):
                return self._same(known, req)
            gate = self._creating.setdefault(req.deployment_id, threading.Lock())
        with gate:  # one create per id at a time; a concurrent twin waits and gets the first one's answer
            try:
                with self._lock:
                    known = self._records.get(req.deployment_id)
                    if known is not None and not self._restarts(known, req):
                        return self._same(known, req)
                    if known is not None:
                        self._records.pop(req.deployment_id)  # a finished copy of an older placement
                return self._admit(req, runtime)
            finally:
                with self._lock:
                    self._creating.pop(req.deployment_id, None)

    def stop(self, deployment_id: str, generation: int | None = None) -> AgentDeploymentDetail:
        """Stop a deployment and free its ports; answers when it is stopped. Stopping twice is harmless.

        With `generation`, a copy of a newer placement is left running (the stop was meant for an older one).
        """
        with self._lock:
            record = self._find(deployment_id)
            if record.status is S.STOPPED or (generation is not None and record.generation > generation):
                return record.view()
            watch = record.watch
            if record.status is S.STOPPING:
                waiting = True
            else:
                waiting = False
                if record.status is S.FAILED:  # nothing runs any more: only the record changes
                    self._transition(record, S.STOPPED, record.reason)
                    record.settled.set()
                    return record.view()
                self._transition(record, S.STOPPING)
                if watch is not None:
                    watch.cancel()  # before anything stops: a restart in its backoff never starts
        if waiting:
            record.settled.wait(self.stop_timeout_s)
            return record.view()
        try:
            runtime = self.runtimes[record.runtime]
            runtime.stop(deployment_id)
            if record.thread is not None and record.thread is not threading.current_thread():
                record.thread.join(self.stop_timeout_s)
            if watch is not None:
                watch.join(self.stop_timeout_s)
                runtime.stop(deployment_id)  # a restart that began before the cancel and ended after the stop
        except Exception as exc:
            log.exception("stopping %s failed", deployment_id)
            with self._lock:
                self._transition(record, S.FAILED, f"stopping failed: {exc.__class__.__name__}: {exc}")
                record.settled.set()
            raise AgentError(f"stopping deployment {deployment_id} failed: {exc}") from exc
        self.ports.release(deployment_id)
        with self._lock:
            self._transition(record, S.STOPPED)
            record.settled.set()
            return record.view()

    # ------------------------------------------------------------------ queries

    def get(self, deployment_id: str) -> AgentDeploymentDetail:
        self.refresh()
        with self._lock:
            return self._find(deployment_id).view()

    def all(self) -> list[AgentDeploymentDetail]:
        self.refresh()
        with self._lock:
            return [r.view() for r in self._records.values()]

    def logs(self, deployment_id: str, tail: int) -> list[str]:
        with self._lock:
            record = self._find(deployment_id)
        return self.runtimes[record.runtime].logs(deployment_id, tail)

    def reports(self) -> list[DeploymentReport]:
        """Every deployment held, as carried in the metrics message (after checking the running ones)."""
        self.refresh()
        with self._lock:
            return [r.report() for r in self._records.values()]

    def versions_in_use(self) -> set[tuple[str, int]]:
        """(model id, version) of every deployment held and not finished: the model cache never evicts them."""
        with self._lock:
            return {(r.model_id, r.version) for r in self._records.values() if not r.status.is_terminal}

    def refresh(self) -> None:
        """Running deployments whose model died by itself: their health watch is told to look now (it restarts
        them); without one, or with no restart allowed (AGENT_RESTART_ATTEMPTS=0), they are marked failed and
        cleaned up after."""
        with self._lock:
            running = [r for r in self._records.values() if r.status is S.RUNNING]
        for record in running:
            runtime = self.runtimes[record.runtime]
            watch = record.watch
            if watch is not None and watch.thread.is_alive() and watch.policy.attempts > 0:
                if runtime.status(record.deployment_id).status is S.FAILED:
                    watch.nudge()  # it restarts the model
                continue
            state = runtime.status(record.deployment_id)
            if state.status is not S.FAILED:
                continue
            with self._lock:
                if record.status is not S.RUNNING:
                    continue
                self._transition(record, S.FAILED, state.reason or "the model stopped by itself")
            runtime.stop(record.deployment_id)
            self.ports.release(record.deployment_id)

    # ------------------------------------------------------------------ lifecycle

    def shutdown(self, *, stop_deployments: bool = True) -> None:
        """On agent exit: stop every live deployment (in parallel, publishing events), then flush the bus."""
        with self._lock:
            watches = [r.watch for r in self._records.values() if r.watch is not None]
        for watch in watches:  # nothing is restarted while the agent exits
            watch.cancel()
        if stop_deployments:
            with self._lock:
                live = [r.deployment_id for r in self._records.values() if not r.status.is_terminal]
            stoppers = [threading.Thread(target=self._stop_quietly, args=(i,), name=f"stop-{i}") for i in live]
            for thread in stoppers:
                thread.start()
            for thread in stoppers:
                thread.join(self.stop_timeout_s)
        self.bus.flush()

    def adopt(self, runtime: str, found: list[RecoveredDeployment]) -> None:
        """At start: hold again what a runtime found after a restart (its ports too) and report its state.

        Their generation is unknown here (0): a newer placement of the same deployment wins over them.
        """
        for item in found:
            with self._lock:
                if item.deployment_id in self._records:
                    continue
                if item.status is S.RUNNING:
                    self.ports.reserve(item.deployment_id, [item.port, *item.ports.values()])
                record = _Record(
                    deployment_id=item.deployment_id, model_id=item.model_id, version=item.version, runtime=runtime,
                    url=model_url(self.advertise_host, item.port), port=item.port, ports=dict(item.ports),
                )
                self._records[item.deployment_id] = record
                self._transition(record, item.status, item.reason)
                if item.status.is_terminal:
                    record.settled.set()
                elif item.status is S.RUNNING:
                    self._watch(record)

    # ------------------------------------------------------------------ internals

    def _admit(self, req: CreateVmRequest, runtime: Runtime) -> AgentDeploymentDetail:
        source = self.fetch_model(req.model_id, req.version)
        names = list(source.meta.ports)
        ports = self.ports.allocate(req.deployment_id, max(1, len(names)))
        record = _Record(
            deployment_id=req.deployment_id, model_id=req.model_id, version=req.version, runtime=req.runtime,
            url=model_url(self.advertise_host, ports[0]), port=ports[0], ports=dict(zip(names, ports, strict=False)),
            generation=req.generation,
        )
        spec = DeploymentSpec(
            deployment_id=req.deployment_id, model_id=req.model_id, version=req.version, model_path=source.path,
            meta=source.meta, port=ports[0], workdir=self.state_dir / req.deployment_id, ports=record.ports,
        )
        record.thread = threading.Thread(
            target=self._provision, args=(record, runtime, spec, source),
            name=f"provision-{req.deployment_id}", daemon=True,
        )
        with self._lock:
            self._records[req.deployment_id] = record
            self._transition(record, S.PROVISIONING)
            view = record.view()
        record.thread.start()
        return view

    def _provision(self, record: _Record, runtime: Runtime, spec: DeploymentSpec, source: ModelSource) -> None:
        try:
            if source.pull is not None:  # over HTTP: pulled (or found) and verified in the model cache
                spec = replace(spec, model_path=source.pull())
            elif not verify_version(spec.model_path, source.manifest_sha256):
                log.info("%s: %s has no manifest to verify", record.deployment_id, spec.model_path)
            runtime.start(spec)
        except ProvisionCancelled:
            return  # stop() took over: it publishes stopping and stopped
        except ProvisionFailed as exc:
            self._fail_provisioning(record, exc.message)
            return
        except Exception as exc:
            log.exception("runtime %s failed on %s", runtime.name, record.deployment_id)
            runtime.stop(record.deployment_id)
            self._fail_provisioning(record, f"agent error: {exc.__class__.__name__}: {exc}")
            return
        with self._lock:
            record.spec = spec
            if record.status is S.PROVISIONING:
                self._transition(record, S.RUNNING)
                self._watch(record)

    def _watch(self, record: _Record) -> None:
        """Start the health watch of a deployment that now runs; called with the lock held."""
        if self.health is not None and record.watch is None:
            record.watch = HealthWatch(_Watched(self, record), self.health).start()

    def _fail_provisioning(self, record: _Record, reason: str) -> None:
        with self._lock:
            if record.status is not S.PROVISIONING:
                return  # being stopped: that path reports
            self.ports.release(record.deployment_id)
            self._transition(record, S.FAILED, reason)

    def _stop_quietly(self, deployment_id: str) -> None:
        try:
            self.stop(deployment_id)
        except Exception:  # noqa: BLE001 - on exit, one stubborn deployment must not keep the others running
            log.exception("could not stop %s on exit", deployment_id)

    def _restarts(self, known: _Record, req: CreateVmRequest) -> bool:
        """A create of a newer placement starts anew a copy that finished here; called with the lock held."""
        if req.generation <= known.generation:
            return False
        if known.status is S.STOPPING:
            raise Unavailable(f"deployment {req.deployment_id} is being stopped here; retry once it is stopped",
                              code="stopping")
        if not known.status.is_terminal:
            self._same(known, req)
            known.generation = req.generation  # the live copy now serves the newer placement
            self._transition(known, known.status, known.reason)
            return False
        return True

    def _same(self, known: _Record, req: CreateVmRequest) -> AgentDeploymentDetail:
        if (known.model_id, known.version, known.runtime) != (req.model_id, req.version, req.runtime):
            raise Conflict(
                f"deployment {req.deployment_id} already exists here for model {known.model_id} "
                f"v{known.version} ({known.runtime})"
            )
        return known.view()

    def _find(self, deployment_id: str) -> _Record:
        record = self._records.get(deployment_id)
        if record is None:
            raise NotFound(f"deployment '{deployment_id}' is not held by agent {self.agent_id}")
        return record

    def _transition(self, record: _Record, status: DeploymentStatus, reason: str | None = None) -> None:
        """Change state and publish it; called with the lock held so events leave in the order of changes."""
        record.status = status
        record.reason = reason
        event = DeploymentEvent(
            deployment_id=record.deployment_id, agent_id=self.agent_id, status=status, url=record.url,
            reason=reason, source="agent", at=self.clock(), generation=record.generation,
        )
        try:
            self.bus.publish(DEPLOYMENT_EVENTS, record.deployment_id, event)
        except Exception:  # noqa: BLE001 - the metrics message still carries the state if an event is lost
            log.exception("publishing %s of %s failed", status.value, record.deployment_id)
        log.info("deployment %s is %s%s", record.deployment_id, status.value, f": {reason}" if reason else "")
        if status.is_terminal:
            record.finished_at = time.monotonic()
            self._forget_oldest_finished()

    def _forget_oldest_finished(self) -> None:
        finished = sorted(
            (r for r in self._records.values() if r.status.is_terminal),
            key=lambda r: r.finished_at or 0.0,
        )
        for record in finished[: max(0, len(finished) - self.keep_finished)]:
            del self._records[record.deployment_id]


class _Watched:
    """One deployment as its health watch sees it (health.Watched)."""

    def __init__(self, manager: DeploymentManager, record: _Record) -> None:
        self.manager = manager
        self.record = record
        self.deployment_id = record.deployment_id
        self.port = record.port
        self.runtime = manager.runtimes[record.runtime]
        self._no_meta_logged = False

    def watching(self) -> bool:
        return self.record.status is S.RUNNING

    def liveness(self) -> RuntimeState:
        return self.runtime.status(self.deployment_id)

    def health_path(self) -> str | None:
        spec = self._spec(quiet=True)
        return None if spec is None else spec.meta.health_path

    def set_health(self, health: Health) -> None:
        with self.manager._lock:
            self.record.health = health

    def kill(self) -> None:
        self.runtime.stop(self.deployment_id)

    def begin_restart(self, reason: str) -> bool:
        with self.manager._lock:
            watch = self.record.watch
            if self.record.status is not S.RUNNING or (watch is not None and watch.cancelled.is_set()):
                return False
            self.record.restarts += 1
            self.record.last_restart_reason = reason
            self.record.health = "unknown"
            log.warning("deployment %s: restart %d in place on port %d", self.deployment_id, self.record.restarts,
                        self.port)
            return True

    def start(self) -> None:
        spec = self._spec(quiet=False)
        if spec is None:
            raise ProvisionFailed(f"model {self.record.model_id} v{self.record.version} could not be fetched again")
        self.runtime.start(spec)

    def give_up(self, reason: str) -> None:
        manager = self.manager
        if not self.watching():
            return  # being stopped: that path reports
        self.runtime.stop(self.deployment_id)  # nothing runs, nothing is held, before it is reported failed
        with manager._lock:
            if self.record.status is not S.RUNNING:
                return
            manager.ports.release(self.deployment_id)
            manager._transition(self.record, S.FAILED, reason)

    def _spec(self, *, quiet: bool) -> DeploymentSpec | None:
        """The spec it was started with; for an adopted copy, made again from its model version and ports."""
        record = self.record
        if record.spec is not None:
            return record.spec
        try:
            source = self.manager.fetch_model(record.model_id, record.version)
            if source.pull is not None:
                source = replace(source, path=source.pull())
        except Exception as exc:  # noqa: BLE001 - the watch goes on with liveness only
            if not (quiet and self._no_meta_logged):
                log.warning("deployment %s: model %s v%s not fetched (%s); watching its liveness only",
                            self.deployment_id, record.model_id, record.version, exc)
                self._no_meta_logged = True
            return None
        record.spec = DeploymentSpec(
            deployment_id=record.deployment_id, model_id=record.model_id, version=record.version,
            model_path=source.path, meta=source.meta, port=record.port,
            workdir=self.manager.state_dir / record.deployment_id, ports=record.ports,
        )
        return record.spec
