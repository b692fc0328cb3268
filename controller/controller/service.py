"""The controller's use cases: deploy, stop, and folding the bus into its records."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from controller.placement import AgentSnapshot, NoPlacement, PlacementRequest, Usage, place, score
from controller.settings import ControllerSettings
from controller.states import ACTIVE, IN_FLIGHT
from controller.store import DeploymentRow, DeploymentStore, placement_json
from controller.view import ClusterView
from miaas.bus import DEPLOYMENT_EVENTS, SYSTEM_METRICS, EventBus, PartitionConsumer, Received
from miaas.client import ServiceClient
from miaas.errors import MiaasError, RemoteError, Unavailable, UpstreamError
from miaas.schemas import (
    AgentList,
    AgentMetrics,
    AgentView,
    Deployment,
    DeploymentEvent,
    DeploymentStatus,
    DeployRequest,
    PackageMeta,
)

log = logging.getLogger(__name__)
S = DeploymentStatus


class Controller:
    """Owns deployment records, places them on agents and follows them through the bus."""

    def __init__(
        self,
        settings: ControllerSettings,
        store: DeploymentStore,
        locate: Callable[[str], str],
        clock: Callable[[], datetime],
        bus: EventBus | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.locate = locate
        self.clock = clock
        self.bus = bus
        self.token = settings.service_token.get_secret_value()
        self.view = ClusterView(
            suspect_after=settings.suspect_after_intervals,
            lost_after_s=settings.lost_after_s,
            max_skew_s=settings.max_clock_skew_s,
        )
        self._place_lock = threading.Lock()
        self._changed = threading.Condition()
        self._consumers: list[PartitionConsumer] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Consume every partition of the metrics (from now) and of the deployment events (from the start)."""
        boot = self.settings.kafka_bootstrap
        self._consumers = [
            PartitionConsumer(boot, [SYSTEM_METRICS], self.on_message, start="end", group_id="controller").start(),
            PartitionConsumer(
                boot, [DEPLOYMENT_EVENTS], self.on_message, start="beginning", group_id="controller"
            ).start(),
        ]

    def wait_ready(self, timeout: float = 30.0) -> bool:
        return all(c.ready.wait(timeout) for c in self._consumers)

    def stop(self) -> None:
        for c in self._consumers:
            c.stop()
        if self.bus is not None:
            self.bus.flush()

    # ------------------------------------------------------------------ bus in

    def on_message(self, msg: Received) -> None:
        """Fold one bus message into the view or the records; invalid messages raise and are skipped."""
        if msg.topic == SYSTEM_METRICS:
            self.observe_metrics(AgentMetrics.model_validate(msg.value))
        elif msg.topic == DEPLOYMENT_EVENTS:
            event = DeploymentEvent.model_validate(msg.value)
            if event.source == "agent":
                self._apply_agent_report(event.deployment_id, event.status, event.agent_id, event.url, event.reason)

    def observe_metrics(self, metrics: AgentMetrics) -> None:
        if not self.view.observe(metrics, self.clock()):
            return
        for report in metrics.deployments:
            if report.status in (S.RUNNING, S.FAILED, S.STOPPED):
                self._apply_agent_report(report.deployment_id, report.status, metrics.agent_id, report.url, None)

    def _apply_agent_report(
        self, deployment_id: str, status: S, agent_id: str | None, url: str | None, reason: str | None
    ) -> None:
        changed = self.store.transition(
            deployment_id, status, self.clock(), url=url, reason=reason, from_agent=agent_id, strict=False
        )
        if changed is not None:
            self._notify()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _publish(self, d: Deployment) -> None:
        if self.bus is None:
            return
        event = DeploymentEvent(
            deployment_id=d.deployment_id, agent_id=d.agent_id, status=d.status, url=d.url, reason=d.reason,
            source="controller", at=self.clock(),
        )
        try:
            self.bus.publish(DEPLOYMENT_EVENTS, d.deployment_id, event)
        except Exception:  # noqa: BLE001 - the record is the truth; a lost notification must not fail a deploy
            log.exception("could not publish event of %s", d.deployment_id)

    # ------------------------------------------------------------------ snapshot

    def snapshot(self, now: datetime) -> list[AgentSnapshot]:
        """Placement's view: each agent's state and load, plus what deployments hold or are about to use."""
        allocated: dict[str, Usage] = {}
        in_flight: dict[str, Usage] = {}
        for row in self.store.active_on_agents(ACTIVE):
            assert row.agent_id is not None
            allocated[row.agent_id] = _add(allocated.get(row.agent_id), row)
            if S(row.status) in IN_FLIGHT:
                in_flight[row.agent_id] = _add(in_flight.get(row.agent_id), row)
        out = []
        for record, state in self.view.agents(now):
            m = record.metrics
            out.append(
                AgentSnapshot(
                    agent_id=m.agent_id, state=state, runtimes=tuple(m.runtimes), cpus=m.capacity.cpus,
                    memory_mb=m.capacity.memory_mb, gpus=m.capacity.gpus, cpu_percent=m.load.cpu_percent,
                    memory_percent=m.load.memory_percent, allocated=allocated.get(m.agent_id, Usage()),
                    in_flight=in_flight.get(m.agent_id, Usage()),
                )
            )
        return out

    def agents(self) -> AgentList:
        now = self.clock()
        snaps = {s.agent_id: s for s in self.snapshot(now)}
        return AgentList(
            agents=[
                AgentView(
                    agent_id=r.metrics.agent_id, url=r.metrics.url, state=state, last_seen=r.last_seen,
                    runtimes=r.metrics.runtimes, capacity=r.metrics.capacity, load=r.metrics.load,
                    score=score(snaps[r.metrics.agent_id]), deployments=r.metrics.deployments,
                )
                for r, state in self.view.agents(now)
            ]
        )

    # ------------------------------------------------------------------ deploy

    def deploy(self, req: DeployRequest, user: str | None, wait: float = 0.0) -> Deployment:
        """Resolve the version, place it, record it, and ask the chosen agent to provision it."""
        version = self._fetch_model(req.model_id, req.version, req.alias)
        meta = PackageMeta.model_validate(version["meta"])
        runtime = req.runtime or self.settings.default_runtime
        with self._place_lock:
            now = self.clock()
            decision = place(self.snapshot(now), PlacementRequest(meta.resources, runtime))
            if isinstance(decision, NoPlacement):
                raise Unavailable(decision.reason, details=[c.model_dump() for c in decision.explanation],
                                  code="no_placement")
            row = DeploymentRow(
                id="d-" + uuid.uuid4().hex[:16], model_id=str(version["model_id"]), model_name=str(version["name"]),
                version=int(version["version"]), status=S.SCHEDULED.value, agent_id=decision.agent_id, url=None,
                reason=None, runtime=runtime, cpus=meta.resources.cpus, memory_mb=meta.resources.memory_mb,
                gpus=meta.resources.gpus, placement=placement_json(decision.explanation), created_by=user,
                created_at=now, updated_at=now,
            )
            deployment = self.store.add(row)
        log.info("placed %s (%s v%d) on %s", row.id, row.model_name, row.version, decision.agent_id)
        self._publish(deployment)
        deployment = self._provision(deployment)
        if wait > 0 and not deployment.status.is_terminal and deployment.status != S.RUNNING:
            deployment = self.wait_for(deployment.deployment_id, wait)
        return deployment

    def _fetch_model(self, model_id: str, version: int | None, alias: str | None) -> dict[str, Any]:
        """The version to deploy, resolved by the model registry (latest, a number, or an alias)."""
        registry = ServiceClient(self.locate("model-registry"), self.token, timeout=10)
        params: dict[str, Any] = {"model_id": model_id}
        if version is not None:
            params["version"] = version
        if alias is not None:
            params["alias"] = alias
        found = registry.get("/registry/fetch-model", params=params)
        if not isinstance(found, dict) or "meta" not in found:
            raise UpstreamError("model registry answered fetch-model without meta")
        return found

    def _agent(self, agent_id: str) -> ServiceClient:
        record = self.view.get(agent_id)
        if record is None:
            raise Unavailable(f"agent '{agent_id}' has not reported metrics to this controller; retry shortly")
        return ServiceClient(record.metrics.url, self.token, timeout=self.settings.agent_timeout_s)

    def _provision(self, d: Deployment) -> Deployment:
        assert d.agent_id is not None
        body = {"deployment_id": d.deployment_id, "model_id": d.model_id, "version": d.version, "runtime": d.runtime}
        try:
            answer = self._agent(d.agent_id).post("/create-vm", json=body)
        except MiaasError as exc:
            failed = self.store.transition(
                d.deployment_id, S.FAILED, self.clock(), reason=f"agent {d.agent_id} refused: {exc.message}",
                strict=False,
            )
            self._notify()
            if failed is not None:
                self._publish(failed)
            return failed or self.store.get(d.deployment_id)
        status = S(answer.get("status", S.PROVISIONING.value))
        updated = self.store.transition(
            d.deployment_id, status, self.clock(), url=answer.get("url"), reason=answer.get("reason"), strict=False
        )
        self._notify()
        return updated or self.store.get(d.deployment_id)

    def wait_for(self, deployment_id: str, timeout: float) -> Deployment:
        """Block until the deployment is running or finished, or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                d = self.store.get(deployment_id)
                left = deadline - time.monotonic()
                if d.status == S.RUNNING or d.status.is_terminal or left <= 0:
                    return d
                self._changed.wait(min(left, 1.0))

    # ------------------------------------------------------------------ stop

    def stop_deployment(self, deployment_id: str) -> Deployment:
        """Stop a deployment on its agent; stopping a finished one changes nothing."""
        d = self.store.get(deployment_id)
        if d.status.is_terminal:
            return d
        if d.status in (S.PENDING, S.LOST):  # nothing runs that the controller could reach
            final = self.store.transition(deployment_id, S.STOPPED, self.clock()) or d
            self._publish(final)
            return final
        if d.agent_id is not None:
            # An agent the controller cannot reach may still run it: refuse rather than report a false stop.
            agent = self._agent(d.agent_id)
            d = self.store.transition(deployment_id, S.STOPPING, self.clock()) or d
            self._publish(d)
            try:
                agent.post("/stop-vm", json={"deployment_id": deployment_id})
            except RemoteError as exc:
                if exc.status != 404:  # 404: the agent never had it or already forgot it
                    raise
            except MiaasError as exc:
                raise UpstreamError(f"agent {d.agent_id} could not stop {deployment_id}: {exc.message}") from exc
        stopped = self.store.transition(deployment_id, S.STOPPED, self.clock(), strict=False)
        self._notify()
        final = stopped or self.store.get(deployment_id)
        self._publish(final)
        return final


def _add(total: Usage | None, row: DeploymentRow) -> Usage:
    t = total or Usage()
    return Usage(t.cpus + row.cpus, t.memory_mb + row.memory_mb, t.gpus + row.gpus)

