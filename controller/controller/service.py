"""The controller's use cases: deploy, stop, and folding the bus into its records."""

from __future__ import annotations

import copy
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any

import requests
from prometheus_client import Histogram

from controller.commands import Refused, Uncertain, send_command
from controller.leader import Deposed, Leader, LeaseStore, NotLeader, Role
from controller.lifecycle import Move, Record, backoff_s, judge_report
from controller.placement import AgentSnapshot, Placement, PlacementRequest, Usage, score
from controller.provenance import ReadOrderChecker, check_event, check_metrics
from controller.reconciler import BusWatch, Reconciler
from controller.reports import ReportFilter
from controller.settings import ControllerSettings
from controller.states import ACTIVE, IN_FLIGHT, PREEMPTIBLE
from controller.store import UNSET, DeploymentRow, DeploymentStore, Once, placement_json
from controller.view import ClusterView
from miaas.bus import (
    DEPLOYMENT_EVENTS,
    SCHEMAS,
    SNAPSHOTS,
    SYSTEM_METRICS,
    EventBus,
    PartitionConsumer,
    Received,
)
from miaas.client import ServiceClient, UpstreamAnswer
from miaas.errors import MiaasError, RemoteError, Unavailable, UpstreamError
from miaas.identity import CredentialSource
from miaas.schemas import (
    PRIORITIES,
    AgentList,
    AgentMetrics,
    AgentView,
    BusStats,
    Deployment,
    DeploymentEvent,
    DeploymentStatus,
    DeployRequest,
    PackageMeta,
    PlacementExplanation,
    Resources,
    priority_rank,
)
from miaas.trust import Trust

log = logging.getLogger(__name__)
S = DeploymentStatus
PLACEMENT_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0)
FETCHED_VERSIONS_KEPT = 1024  # fetch-model answers of versions by number, kept for when the registry is down


class Controller:
    """Owns deployment records, places them on agents and follows them through the bus.

    It calls the model registry and commands agents as itself (`trust.credential`), and believes a bus message
    only when its signature checks and its signer speaks for itself (`provenance`).

    Of the controllers on one database, only the holder of the lease (`leader`) decides: it applies agents'
    reports, places, and commands agents with its epoch as the fence; every write of the store checks that epoch in
    its transaction. A standby folds the bus into its view only (kept warm for a takeover) and serves reads."""

    def __init__(
        self,
        settings: ControllerSettings,
        store: DeploymentStore,
        locate: Callable[[str], str],
        clock: Callable[[], datetime],
        bus: EventBus | None = None,
        *,
        trust: Trust,
        leader: Leader | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.locate = locate
        self.clock = clock
        self.bus = bus
        self.trust = trust
        self.credential: CredentialSource = trust.credential
        self.view = ClusterView(
            suspect_after=settings.suspect_after_intervals,
            lost_after_s=settings.lost_after_s,
            max_skew_s=settings.max_clock_skew_s,
            disruption_window_s=settings.disruption_window_s,
        )
        self._place_lock = threading.Lock()
        self.place_lock = self._place_lock  # placement and its reservation are one critical section
        self._changed = threading.Condition()
        self._consumers: list[PartitionConsumer] = []
        self._reports = ReportFilter(store)
        self.started_at = clock()  # agents not heard from since are lost once `lost_after_s` has passed
        self.reconciler = Reconciler(self)
        self.leader = leader or Leader(LeaseStore(store.engine), settings.controller_id, url=settings.public_url,
                                       ttl_s=settings.leader_lease_s)
        store.guard_writes(self.leader.guard)  # a deposed leader's late write fails as a stale plan
        self.leader.listeners.append(self._on_role)
        self._fetched = FetchedVersions(FETCHED_VERSIONS_KEPT)
        # One placement decision (`index.place`); its app's /metrics shows it (controller/metrics.py).
        self.placement_seconds = Histogram("miaas_placement_duration_seconds", "Time of one placement decision",
                                           registry=None, buckets=PLACEMENT_BUCKETS)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Consume every partition of the metrics (from now) and of the deployment events (from the start), each
        message's signature checked, and run the reconcile loop."""
        self.started_at = self.clock()
        # Liveness: every grace period counts from now, and no agent is lost while the bus does not answer.
        self.view.restart_gate(self.started_at)
        self.reconciler.bus = BusWatch(self.settings.kafka_bootstrap, lambda: self._consumers,
                                       interval_s=self.settings.bus_probe_interval_s,
                                       timeout_s=self.settings.bus_probe_timeout_s).start()
        self.reconciler.start()
        self.leader.start()  # leads at once when the lease is free, else stands by and takes it once it expires
        self._consumers = [
            self.metrics_consumer(start="end").start(),
            PartitionConsumer(
                self.settings.kafka_bootstrap, [DEPLOYMENT_EVENTS], self.on_message, schemas=SCHEMAS,
                start="beginning", group_id="controller", checker=self.message_checker(),
            ).start(),
        ]

    def metrics_consumer(self, start: str = "end") -> PartitionConsumer:
        """The consumer of every partition of `system-metrics` that folds each batch into the view (not started);
        every message's signature is checked first."""
        return PartitionConsumer(
            self.settings.kafka_bootstrap, [SYSTEM_METRICS], batch_handler=self.on_metrics, schemas=SCHEMAS,
            latest_only=SNAPSHOTS, start=start, group_id="controller", batch_size=2000,
            checker=self.message_checker(),
        )

    def message_checker(self) -> ReadOrderChecker:
        """A checker of signed messages for one consumer (each keeps its own producers' sequences)."""
        return ReadOrderChecker(self.trust.verifier)

    def bus_stats(self) -> BusStats:
        """Messages each consumer handled and skipped (poison: bad JSON, unknown schema version, NaN...)."""
        return BusStats(consumers=[c.stats() for c in self._consumers],
                        broker=self.reconciler.bus.state() if self.reconciler.bus is not None else None,
                        liveness=self.reconciler.liveness())

    def wait_ready(self, timeout: float = 30.0) -> bool:
        return all(c.ready.wait(timeout) for c in self._consumers)

    def stop(self) -> None:
        self.leader.stop(release=True)  # stop acting first; a standby takes over without waiting for the expiry
        self.reconciler.stop()
        if self.reconciler.bus is not None:
            self.reconciler.bus.stop()
        for c in self._consumers:
            c.stop()
        if self.bus is not None:
            self.bus.flush()

    # ------------------------------------------------------------------ leadership

    def leading(self) -> bool:
        """Whether this controller may decide and command now (it holds the lease)."""
        return self.leader.leading()

    def _on_role(self, role: Role) -> None:
        if role == "leader":
            # A takeover starts from the store and the warm view: what this instance remembers of the records
            # was written by another, so it is dropped; the first pass comes at once.
            self._reports = ReportFilter(self.store)
            self.reconciler.wake()

    # ------------------------------------------------------------------ bus in

    def on_message(self, msg: Received) -> None:
        """Fold one bus message into the view or the records; invalid messages, and messages whose signer does not
        speak for what they say (`provenance`), raise and are skipped."""
        if msg.topic == SYSTEM_METRICS:
            self.on_metrics([msg])
        elif msg.topic == DEPLOYMENT_EVENTS:
            event = msg.message if isinstance(msg.message, DeploymentEvent) else DeploymentEvent.model_validate(
                msg.value)
            check_event(msg.signer, event)
            self.observe_event(event)

    def observe_event(self, event: DeploymentEvent) -> None:
        """Fold one `deployment-events` message: an agent's report applies as the lifecycle rules say.

        The in-process entry, for tests that feed the controller directly: nothing checks who sent `event`.
        Production input goes through `on_message`, from a consumer that checks every signature."""
        if event.source == "agent" and self.leading():
            self._apply_agent_report(event.deployment_id, event.status, event.agent_id, event.url, event.reason,
                                     event.generation)

    def on_metrics(self, batch: Iterable[Received]) -> None:
        """Fold a batch of `system-metrics` messages; invalid ones, and ones not signed by the agent they speak for
        at its certificate's URL, raise (the consumer then hands the batch over one at a time and skips those)."""
        self.fold_metrics(_checked_metrics(batch))

    def observe_metrics(self, *batch: AgentMetrics) -> None:
        """Fold metrics given in process, for tests that feed the controller directly: nothing checks who sent
        them. Production input goes through `on_metrics`, from a consumer that checks every signature."""
        self.fold_metrics(batch)

    def fold_metrics(self, batch: Iterable[AgentMetrics]) -> None:
        """Fold metrics into the view, then apply what their deployment reports change.

        Reports are level-triggered (every message repeats them); `ReportFilter` passes on only those that can
        change a record, without a query per report, so the unchanged majority costs no transaction.
        """
        folded = self.view.observe_many(batch, self.clock())
        if not self.leading():
            return  # a standby keeps its view warm; the leader applies what the reports change
        reported = frozenset((S.PROVISIONING, S.RUNNING, S.FAILED, S.STOPPED))
        for deployment_id, agent_id, status, url, generation in self._reports.changes(folded, reported):
            self._apply_agent_report(deployment_id, status, agent_id, url, None, generation, from_metrics=True)

    def _apply_agent_report(
        self, deployment_id: str, status: S, agent_id: str | None, url: str | None, reason: str | None,
        generation: int | None = None, *, from_metrics: bool = False,
    ) -> Deployment | None:
        """Apply what an agent says of a deployment, as `lifecycle.judge_report` rules; the changed deployment."""

        def decide(r: Record) -> dict[str, Any] | None:
            target = judge_report(r, agent_id, status, generation, from_metrics=from_metrics)
            if target is None:
                return None
            if target is S.PENDING:
                return _queued_again(f"stopped on agent {agent_id}; queued again ({r.reason or 'preempted'})")
            if target is S.LOST:
                return _lost(f"agent {agent_id} stopped it unasked (shutting down?)")
            return {"status": target, "url": url or UNSET, "reason": reason or UNSET}

        try:
            changed = self.store.decide(deployment_id, self.clock(), decide)
        except NotLeader as exc:
            log.info("report of %s by %s not applied: %s", deployment_id, agent_id, exc.message)
            return None
        if changed is not None:
            if changed.status in (S.PENDING, S.LOST) or changed.status.is_terminal:
                self._publish(changed)
                self.reconciler.wake()  # capacity may have appeared, or the deployment waits for a place
            self._notify()
        return changed

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _publish(self, d: Deployment) -> None:
        if self.bus is None:
            return
        event = DeploymentEvent(
            deployment_id=d.deployment_id, agent_id=d.agent_id, status=d.status, url=d.url, reason=d.reason,
            source="controller", at=self.clock(), generation=d.generation,
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
                    gpu_memory_free_mb=sum(g.memory_total_mb - g.memory_used_mb for g in m.load.gpus),
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
            ],
            liveness=self.reconciler.liveness(),
        )

    # ------------------------------------------------------------------ deploy

    def deploy(self, req: DeployRequest, user: str | None, wait: float = 0.0, once: Once | None = None) -> Deployment:
        """Resolve the version, queue it, and place the queue: provisioned at once when it fits (or when
        preempting lower-priority deployments makes it fit), else pending with the reason until capacity appears.
        With `once` (an Idempotency-Key), a request with the same key that won meanwhile decides: its deployment.
        Only the leader deploys (it places at once): a standby refuses with NotLeader, naming the leader."""
        self.leader.require("deploys")
        version = self._fetch_model(req.model_id, req.version, req.alias)
        meta = PackageMeta.model_validate(version["meta"])
        runtime = req.runtime or self.settings.default_runtime
        now = self.clock()
        row = DeploymentRow(
            id="d-" + uuid.uuid4().hex[:16], model_id=str(version["model_id"]), model_name=str(version["name"]),
            version=int(version["version"]), status=S.PENDING.value, agent_id=None, url=None,
            reason="waiting for a placement", runtime=runtime, cpus=meta.resources.cpus,
            memory_mb=meta.resources.memory_mb, gpus=meta.resources.gpus, placement=[], created_by=user,
            created_at=now, updated_at=now, priority=priority_rank(req.priority), generation=0, attempts=0,
            requeue=False,
        )
        deployment = self.store.add(row, once)
        if deployment.deployment_id != row.id:  # a concurrent request with the same Idempotency-Key made it
            return self.wait_for(deployment.deployment_id, wait) if wait > 0 else deployment
        self._publish(deployment)
        scheduled, victims = self.reconciler.place_queue()
        for d in scheduled:
            if d.deployment_id == row.id:
                self.send_create(d.deployment_id)  # in this request, so the answer shows it provisioning
            else:
                self.reconciler.submit(("create", d.deployment_id), self.send_create, d.deployment_id)
        for d in victims:
            self.reconciler.submit(("stop", d.deployment_id), self.send_stop, d.deployment_id)
        deployment = self.store.get(row.id)
        if wait > 0 and not deployment.status.is_terminal and deployment.status != S.RUNNING:
            deployment = self.wait_for(deployment.deployment_id, wait)
        return deployment

    def placement_request(self, r: Record) -> PlacementRequest:
        """What placement is asked for a queued deployment."""
        return PlacementRequest(Resources(cpus=r.cpus, memory_mb=r.memory_mb, gpus=r.gpus), r.runtime)

    def schedule(self, r: Record, decision: Placement, now: datetime) -> Deployment | None:
        """Record a placement of a queued deployment (a new generation); None if it left the queue meanwhile."""
        lease = self.settings.agent_timeout_s * (self.settings.command_retries + 1)
        d = self.store.change(
            r.deployment_id, now, when=lambda x: x.status is r.status and x.generation == r.generation,
            status=S.SCHEDULED, agent_id=decision.agent_id, generation=r.generation + 1, url=None, reason=None,
            attempts=0, requeue=False, next_attempt_at=now + timedelta(seconds=lease),
            placement=placement_json(decision.explanation),
        )
        if d is not None:
            log.info("placed %s (%s v%d, generation %d) on %s", d.deployment_id, d.model_name, d.version,
                     d.generation, decision.agent_id)
            self._publish(d)
            self._notify()
        return d

    def still_pending(self, r: Record, reason: str, explanation: PlacementExplanation | None) -> None:
        """Keep a queued deployment waiting, saying why (written only when the reason changes)."""
        if r.reason == reason:
            return
        placement = placement_json(explanation) if explanation is not None else UNSET
        d = self.store.change(r.deployment_id, self.clock(), when=lambda x: x.status is r.status, reason=reason,
                              placement=placement)
        if d is not None:
            self._notify()

    def preempt(self, victim_id: str, by: Record, now: datetime) -> Deployment | None:
        """Start stopping a lower-priority deployment so that `by` fits; it goes back to the queue once stopped."""
        d = self.store.change(
            victim_id, now, when=lambda x: x.status in PREEMPTIBLE and x.priority < by.priority,
            status=S.STOPPING, requeue=True, attempts=0, next_attempt_at=None,
            reason=f"preempted by {by.deployment_id} ({PRIORITIES[by.priority]} priority); back to the queue once "
                   "stopped",
        )
        if d is not None:
            log.info("preempting %s on %s for %s", victim_id, d.agent_id, by.deployment_id)
            self._publish(d)
            self._notify()
        return d

    def apply_move(self, move: Move, r: Record) -> None:
        """Carry out a liveness decision on a record that has not changed since it was judged."""
        values: dict[str, Any] = (
            _queued_again(move.reason) if move.status is S.PENDING
            else _lost(move.reason) if move.status is S.LOST
            else {"status": move.status, "reason": move.reason}
        )
        d = self.store.change(
            r.deployment_id, self.clock(),
            when=lambda x: (x.status, x.agent_id, x.generation) == (r.status, r.agent_id, r.generation), **values,
        )
        if d is not None:
            log.warning("%s is %s: %s", d.deployment_id, d.status.value, move.reason)
            self._publish(d)
            self._notify()
            self.reconciler.wake()

    def unassign(self, r: Record) -> None:
        """Take back a placement its agent never confirmed and does not hold: queued again, after a backoff."""
        wait = backoff_s(r.attempts, self.settings.retry_base_s, self.settings.retry_max_s)
        values = _queued_again(f"agent {r.agent_id} did not take it after {r.attempts} attempts; queued again")
        values["next_attempt_at"] = self.clock() + timedelta(seconds=wait)
        d = self.store.change(
            r.deployment_id, self.clock(),
            when=lambda x: x.status is S.SCHEDULED and (x.agent_id, x.generation) == (r.agent_id, r.generation),
            **values,
        )
        if d is not None:
            self._publish(d)
            self._notify()

    def _fetch_model(self, model_id: str, version: int | None, alias: str | None) -> dict[str, Any]:
        """The version to deploy, resolved by the model registry (latest, a number, or an alias).

        A version by number is immutable: its answer is kept (`FetchedVersions`) and served from there while the
        registry cannot be reached (no instance, no connection, a 5xx), so deploys of a version this controller
        resolved before go on. An alias or the latest moves, and is only ever resolved by the registry."""
        pinned = (model_id, version) if version is not None and alias is None else None
        params: dict[str, Any] = {"model_id": model_id}
        if version is not None:
            params["version"] = version
        if alias is not None:
            params["alias"] = alias
        try:
            registry = ServiceClient(self.locate("model-registry"), self.credential, timeout=10)
            try:
                found = registry.get("/registry/fetch-model", params=params)
            finally:
                registry.close()
        except RemoteError as exc:
            if exc.status == 404 and pinned is not None:
                self._fetched.drop(pinned)  # deleted since
            raise
        except MiaasError as exc:
            if not _registry_down(exc):
                raise
            kept = self._fetched.get(pinned) if pinned is not None else None
            if kept is None:
                raise _registry_unreachable(exc, model_id, version, alias) from exc
            log.warning("model registry cannot be reached (%s): deploying %s v%s as it answered before",
                        exc.message, model_id, version)
            return kept
        if not isinstance(found, dict) or "meta" not in found:
            raise UpstreamError("model registry answered fetch-model without meta")
        if pinned is not None and found.get("version") == version:
            self._fetched.put(pinned, found)
        return found

    def _agent_url(self, agent_id: str) -> str:
        """Where the agent's commands go: the URL of its latest metrics, which (read from the bus) is the URL
        bound in the certificate that signed them (`provenance.check_metrics`)."""
        record = self.view.get(agent_id)
        if record is None:
            raise Unavailable(f"agent '{agent_id}' has not reported metrics to this controller; retry shortly")
        return record.metrics.url

    def _command(self, agent_id: str, path: str, body: dict[str, Any]) -> Any:
        """Send a command with this leader's epoch as its fence (in the signed body); NotLeader when this instance
        may not act, Deposed when the agent has seen a higher fence (this instance then stops acting)."""
        fence = self.leader.fence()
        try:
            return send_command(self._agent_url(agent_id), self.credential, path, {**body, "fence": fence},
                                timeout=self.settings.agent_timeout_s, retries=self.settings.command_retries)
        except Refused as exc:
            if exc.code != "stale_leader":
                raise
            self.leader.depose(f"agent {agent_id} refused {path} with fence {fence}: {exc.message}")
            raise Deposed(f"controller {self.leader.controller_id} was deposed: agent {agent_id} refused its "
                          f"fence {fence} ({exc.message})") from exc

    def send_create(self, deployment_id: str) -> None:
        """Ask the agent of a scheduled deployment to provision it (idempotent: its id and generation are the key).

        A refusal fails the deployment; a command that may not have arrived (timeout, no answer) leaves it
        scheduled and is sent again after a backoff: the agent's own reports decide what happened.
        """
        d = self.store.get(deployment_id)
        if d.status is not S.SCHEDULED or d.agent_id is None:
            return
        agent_id, generation = d.agent_id, d.generation
        lease = self.settings.agent_timeout_s * (self.settings.command_retries + 1)
        this_placement = lambda x: x.status is S.SCHEDULED and (x.agent_id, x.generation) == (agent_id, generation)  # noqa: E731
        self.store.change(deployment_id, self.clock(), when=this_placement,
                          next_attempt_at=self.clock() + timedelta(seconds=lease))
        body = {"deployment_id": deployment_id, "model_id": d.model_id, "version": d.version, "runtime": d.runtime,
                "generation": generation}
        try:
            answer = self._command(agent_id, "/create-vm", body)
        except Refused as exc:
            failed = self.store.change(deployment_id, self.clock(), when=this_placement, status=S.FAILED,
                                       reason=f"agent {agent_id} refused it: {exc.message}")
            if failed is not None:
                self._publish(failed)
                self._notify()
                self.reconciler.wake()
            return
        except (Uncertain, Unavailable) as exc:
            attempts = d.attempts + 1
            wait = backoff_s(attempts, self.settings.retry_base_s, self.settings.retry_max_s)
            log.warning("create %s on %s failed (attempt %d, next in %.1fs): %s", deployment_id, agent_id, attempts,
                        wait, exc)
            self.store.change(
                deployment_id, self.clock(), when=this_placement, attempts=attempts,
                next_attempt_at=self.clock() + timedelta(seconds=wait),
                reason=f"create on agent {agent_id} failed (attempt {attempts}; the agent's reports decide): "
                       f"{getattr(exc, 'message', exc)}",
            )
            self._notify()
            return
        status = S(answer.get("status", S.PROVISIONING.value))
        self._apply_agent_report(deployment_id, status, agent_id, answer.get("url"), answer.get("reason"),
                                 answer.get("generation", generation))

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
        """Stop a deployment on its agent; stopping a finished one changes nothing.

        A pending or lost deployment runs nowhere the controller can reach: it is stopped at once (should its
        lost agent come back, it is told to stop the copy). A preempted one being stopped is stopped for good.
        """
        self.leader.require("stops deployments")
        d = self.store.get(deployment_id)
        if d.status.is_terminal:
            return d
        if d.status in (S.PENDING, S.LOST):
            final = self.store.change(deployment_id, self.clock(), when=lambda x: x.status is d.status,
                                      status=S.STOPPED, reason="stopped by request")
            if final is None:  # it moved meanwhile (placed): stop it where it went
                return self.stop_deployment(deployment_id)
            self._publish(final)
            self._notify()
            return final
        assert d.agent_id is not None
        # An agent the controller cannot reach may still run it: refuse rather than report a false stop.
        self._agent_url(d.agent_id)
        lease = self.clock() + timedelta(seconds=self.settings.agent_timeout_s * (self.settings.command_retries + 1))
        stopping = self.store.change(deployment_id, self.clock(), when=lambda x: x.agent_id == d.agent_id,
                                     status=S.STOPPING, requeue=False, reason="stopped by request", attempts=0,
                                     next_attempt_at=lease)  # the loop sends it again only if this call fails
        if stopping is not None:
            self._publish(stopping)
        try:
            self._stop_on_agent(deployment_id)
        except (Uncertain, Unavailable) as exc:
            self._stop_failed(self.store.get(deployment_id), exc)
            raise UpstreamError(f"agent {d.agent_id} could not stop {deployment_id}: {exc}; the controller keeps "
                                "trying") from exc
        return self.store.get(deployment_id)

    def send_stop(self, deployment_id: str) -> None:
        """Ask the agent of a stopping deployment to stop it; when that fails, try again after a backoff."""
        d = self.store.get(deployment_id)
        try:
            self._stop_on_agent(deployment_id)
        except (Uncertain, Unavailable) as exc:
            self._stop_failed(d, exc)

    def _stop_failed(self, d: Deployment, exc: Exception) -> None:
        attempts = d.attempts + 1
        wait = backoff_s(attempts, self.settings.retry_base_s, self.settings.retry_max_s)
        log.warning("stop %s on %s failed (attempt %d, next in %.1fs): %s", d.deployment_id, d.agent_id, attempts,
                    wait, exc)
        self.store.change(d.deployment_id, self.clock(),
                          when=lambda x: x.status is S.STOPPING and x.generation == d.generation,
                          attempts=attempts, next_attempt_at=self.clock() + timedelta(seconds=wait))

    def _stop_on_agent(self, deployment_id: str) -> None:
        """`/stop-vm` for a stopping deployment, then stopped (or queued again when preempted)."""
        d = self.store.get(deployment_id)
        if d.status is not S.STOPPING or d.agent_id is None:
            return
        try:
            self._command(d.agent_id, "/stop-vm", {"deployment_id": deployment_id, "generation": d.generation})
        except Refused as exc:
            if exc.status != 404:  # 404: the agent never had it or already forgot it
                raise Uncertain(f"agent {d.agent_id} refused to stop it: {exc.message}") from exc
        self._apply_agent_report(deployment_id, S.STOPPED, d.agent_id, None, None, d.generation)

    def stop_copy(self, agent_id: str, deployment_id: str, generation: int | None) -> None:
        """Tell an agent to stop a copy it should not run (the deployment is elsewhere, stopped or queued)."""
        log.warning("agent %s runs %s (generation %s) that is not its own any more: stopping that copy", agent_id,
                    deployment_id, generation)
        try:
            self._command(agent_id, "/stop-vm", {"deployment_id": deployment_id, "generation": generation})
        except Refused as exc:
            if exc.status != 404:
                log.warning("agent %s refused to stop %s: %s", agent_id, deployment_id, exc.message)
        except (Uncertain, Unavailable) as exc:
            log.warning("could not reach agent %s to stop %s (tried again later): %s", agent_id, deployment_id, exc)


def _checked_metrics(batch: Iterable[Received]) -> Iterator[AgentMetrics]:
    """The metrics of a batch, each only once its signer is found to speak for it (else Refused is raised)."""
    for m in batch:
        metrics = m.message if isinstance(m.message, AgentMetrics) else AgentMetrics.model_validate(m.value)
        check_metrics(m.signer, metrics)
        yield metrics


def _queued_again(reason: str | None) -> dict[str, Any]:
    """The columns of a deployment going back to the queue: on no agent, nothing in flight."""
    return {"status": S.PENDING, "agent_id": None, "url": None, "requeue": False, "attempts": 0,
            "next_attempt_at": None, "reason": reason}


def _lost(reason: str | None) -> dict[str, Any]:
    """The columns of a deployment whose agent is gone: to be placed again at once (no backoff left over)."""
    return {"status": S.LOST, "reason": reason, "attempts": 0, "next_attempt_at": None}


def _add(total: Usage | None, row: DeploymentRow) -> Usage:
    t = total or Usage()
    return Usage(t.cpus + row.cpus, t.memory_mb + row.memory_mb, t.gpus + row.gpus)



class FetchedVersions:
    """The model registry's fetch-model answers for versions asked by number (immutable), by (model, version) as
    asked; at most `size`, the least recently used dropped first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._answers: OrderedDict[tuple[str, int], dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> dict[str, Any] | None:
        with self._lock:
            answer = self._answers.get(key)
            if answer is not None:
                self._answers.move_to_end(key)
            return copy.deepcopy(answer)

    def put(self, key: tuple[str, int], answer: dict[str, Any]) -> None:
        with self._lock:
            self._answers[key] = copy.deepcopy(answer)
            self._answers.move_to_end(key)
            while len(self._answers) > self.size:
                self._answers.popitem(last=False)

    def drop(self, key: tuple[str, int]) -> None:
        with self._lock:
            self._answers.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._answers)


def _registry_down(exc: MiaasError) -> bool:
    """The model registry could not be asked: none registered or the service registry away (the lookup), no
    connection or no answer in time, or a 5xx. Not a refusal (404, 401/403, a bad request) nor a nonsense answer."""
    if isinstance(exc, UpstreamAnswer):
        return exc.answered_status >= 500
    if isinstance(exc, UpstreamError):
        return isinstance(exc.__cause__, requests.RequestException)
    return isinstance(exc, Unavailable)


def _registry_unreachable(exc: MiaasError, model_id: str, version: int | None, alias: str | None) -> UpstreamError:
    """The refusal of a deploy the registry must resolve and cannot: saying so, and what a number would have done."""
    if version is not None and alias is None:
        what = (f"version {version} of model '{model_id}' cannot be resolved: this controller has not resolved it "
                "before (a version it has is deployed from what the registry answered then)")
    else:
        what = (f"the {f'alias {alias!r}' if alias is not None else 'latest version'} of model '{model_id}' cannot "
                "be resolved (an alias or the latest moves: only the registry resolves it)")
    return UpstreamError(f"the model registry cannot be reached ({exc.message}), so {what}; retry once the model "
                         "registry is back", code="model_registry_unreachable")
