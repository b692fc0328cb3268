"""The reconcile loop: every `reconcile_interval_s` (and at once when woken) it brings the records and the agents
together. The rules are the pure functions of `lifecycle.py` and `preemption.py`; this module carries them out.

One pass:
0. the liveness gate takes one look at the bus (`BusWatch`, the controller's own metadata requests to the broker)
   and at the agents: while the bus does not answer, or every agent fell silent at once, no agent becomes lost
   (`liveness.py`);
1. deployments of lost agents become lost (or, if they were being stopped, stopped / queued again); those a live
   agent no longer reports become lost too;
2. commands not yet confirmed are sent again when due (create for a placement, stop for a stop), with backoff;
3. agents are told to stop the copies they run that the controller placed elsewhere, stopped or queued again;
4. the queue (pending and lost deployments) is placed: highest priority first, then oldest; what fits nowhere
   may preempt strictly lower-priority deployments on one agent.
Commands to agents run on a small pool of threads, one at a time per deployment, so a slow agent never holds the
loop up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from controller.leader import NotLeader
from controller.lifecycle import (
    LIVE_ON_AGENT,
    AgentReport,
    Command,
    Record,
    due_commands,
    effective_state,
    lost_moves,
    missing_moves,
    orphan_copies,
    queue_order,
)
from controller.liveness import BusHealth, Gate
from controller.placement import AgentSnapshot, Placement, PlacementIndex
from controller.preemption import Amount, Holder, Room, choose_victims
from controller.states import ACTIVE, QUEUED
from miaas.bus import TOPICS, PartitionConsumer, TopicInfo, TopicSpec, describe_topics, ensure_topics
from miaas.schemas import PRIORITIES, BrokerState, Deployment, DeploymentReport, LivenessState
from miaas.schemas import DeploymentStatus as S

if TYPE_CHECKING:
    from controller.service import Controller

log = logging.getLogger(__name__)
NOT_FINAL = frozenset(S) - {S.STOPPED, S.FAILED}
ORPHAN_RESEND_S = 5.0  # an agent still reporting a copy it was told to stop is told again after this long
COMMAND_THREADS = 8


class Reconciler:
    """Runs reconcile passes on its own thread; `tick()` runs one in the caller's thread (tests)."""

    def __init__(self, controller: Controller) -> None:
        self.c = controller
        self.passes = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: set[tuple[str, ...]] = set()
        self._orphans_told: dict[tuple[str, str, int | None], float] = {}
        self._next_lost_s: float | None = None  # seconds from the last pass until the next agent turns lost
        self._lock = threading.Lock()
        self.bus: BusWatch | None = None
        """The controller's own look at the bus, when it consumes one (None: not watched, e.g. tests without Kafka)."""

    # ------------------------------------------------------------------ loop

    def start(self) -> Reconciler:
        self._pool = ThreadPoolExecutor(COMMAND_THREADS, thread_name_prefix="agent-command")
        self._thread = threading.Thread(target=self._run, name="reconcile", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def wake(self) -> None:
        """Run a pass now (capacity may have appeared, or a deployment is waiting)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - one failed pass (a database hiccup) must not end the loop
                log.exception("reconcile pass failed")
            # The next pass comes early when an agent turns lost before it: failover starts on the dot.
            wait = self.c.settings.reconcile_interval_s
            if self._next_lost_s is not None:
                wait = min(wait, max(self._next_lost_s, 0.0) + 0.01)
            self._wake.wait(wait)

    def submit(self, key: tuple[str, ...], fn: Callable[..., Any], *args: Any) -> None:
        """Run a command on the pool (in the caller's thread when the loop is not started); one per key at a time."""
        with self._lock:
            if key in self._inflight:
                return
            self._inflight.add(key)

        def run() -> None:
            try:
                fn(*args)
            except NotLeader as exc:  # deposed meanwhile: the new leader's passes send what is due
                log.info("command %s not sent: %s", key, exc.message)
            except Exception:  # noqa: BLE001 - a failed command is retried by a later pass
                log.exception("command %s failed", key)
            finally:
                with self._lock:
                    self._inflight.discard(key)

        if self._pool is None:
            run()
        else:
            self._pool.submit(run)

    # ------------------------------------------------------------------ one pass

    def tick(self) -> None:
        c = self.c
        now = c.clock()
        records = c.store.records(NOT_FINAL)
        named = {r.agent_id for r in records if r.agent_id}
        unheard = named - c.view.known()
        gate = c.view.advance(now, self.bus.health() if self.bus is not None else None, c.started_at, len(unheard))
        self._next_lost_s = c.view.lost_in_s(now)
        if not c.leading():
            self.passes += 1  # a standby keeps its view and liveness gate current, and decides nothing
            return
        try:
            self._decide(now, records, named, gate)
        except NotLeader as exc:
            log.info("reconcile pass cut short: %s", exc.message)
        self.passes += 1

    def _decide(self, now: datetime, records: list[Record], named: set[str], gate: Gate) -> None:
        """The decisions of a pass, the leader's alone: loss, commands due, orphan copies, the queue."""
        c = self.c
        view = c.view.agents(now)
        states = {r.metrics.agent_id: state for r, state in view}
        agent_ids = set(states) | named
        state_of = {a: effective_state(a, states, now, c.started_at, c.settings.lost_after_s, gate)
                    for a in agent_ids}
        reports = {
            r.metrics.agent_id: AgentReport(r.last_seen, r.metrics.interval_s,
                                            frozenset(d.deployment_id for d in r.metrics.deployments))
            for r, state in view if state == "alive"
        }
        moves = lost_moves(records, state_of) + missing_moves(records, reports)
        by_id = {r.deployment_id: r for r in records}
        for move in moves:
            c.apply_move(move, by_id[move.deployment_id])
        if moves:
            records = c.store.records(NOT_FINAL)
        holds = {agent_id: report.deployment_ids for agent_id, report in reports.items()}
        for command in due_commands(records, state_of, holds, now, max_attempts=c.settings.max_command_attempts):
            self._dispatch(command)
        self._stop_orphans({r.metrics.agent_id: r.metrics.deployments for r, state in view if state == "alive"})
        scheduled, victims = self.place_queue()
        for d in scheduled:
            self.submit(("create", d.deployment_id), c.send_create, d.deployment_id)
        for d in victims:
            self.submit(("stop", d.deployment_id), c.send_stop, d.deployment_id)

    def _dispatch(self, command: Command) -> None:
        r = command.record
        if command.kind == "create":
            self.submit(("create", r.deployment_id), self.c.send_create, r.deployment_id)
        elif command.kind == "stop":
            self.submit(("stop", r.deployment_id), self.c.send_stop, r.deployment_id)
        elif command.kind == "unassign":
            self.c.unassign(r)

    def _stop_orphans(self, reported: dict[str, list[DeploymentReport]]) -> None:
        live = {agent_id: [d for d in ds if d.status in LIVE_ON_AGENT] for agent_id, ds in reported.items()}
        ids = {d.deployment_id for ds in live.values() for d in ds}
        if not ids:
            return
        records = self.c.store.records_of(ids)
        clock = time.monotonic()
        for agent_id, ds in live.items():
            for copy in orphan_copies(agent_id, ds, records):
                key = (agent_id, copy.deployment_id, copy.generation)
                if clock - self._orphans_told.get(key, float("-inf")) < ORPHAN_RESEND_S:
                    continue
                self._orphans_told[key] = clock
                self.submit(("orphan", agent_id, copy.deployment_id), self.c.stop_copy, agent_id,
                            copy.deployment_id, copy.generation)
        for key, told in list(self._orphans_told.items()):
            if clock - told > 60 * ORPHAN_RESEND_S:
                del self._orphans_told[key]

    def liveness(self) -> LivenessState:
        """Whether loss decisions are suspended, since when and why (`GET /controller/agents`, `/controller/bus`)."""
        c = self.c
        gate = c.view.gate
        grace_from = gate.grace_from if gate is not None else c.started_at
        return LivenessState(
            suspended=gate is not None and gate.suspended, cause=gate.cause if gate is not None else None,
            since=gate.since if gate is not None else None, why=gate.why if gate is not None else None,
            grace_from=grace_from, grace_until=grace_from + timedelta(seconds=c.settings.lost_after_s),
        )

    # ------------------------------------------------------------------ the queue

    def place_queue(self) -> tuple[list[Deployment], list[Deployment]]:
        """Place the queue in order; the deployments placed (to provision) and the victims (to stop)."""
        c = self.c
        with c.place_lock:
            now = c.clock()
            queue = queue_order(c.store.records(QUEUED), now)
            if not queue:
                return [], []
            snaps = {s.agent_id: s for s in c.snapshot(now)}
            index = PlacementIndex(snaps.values())  # one index per pass: each decision is a walk, not a sort
            holders: dict[str, list[Holder]] | None = None
            claimed: dict[str, Amount] = {}  # room promised in this pass to deployments waiting on preemption
            scheduled: list[Deployment] = []
            victims: list[Deployment] = []
            for r in queue:
                request = c.placement_request(r)
                with c.placement_seconds.time():
                    decision = index.place(request, now)
                if isinstance(decision, Placement):
                    d = c.schedule(r, decision, now)
                    if d is not None:
                        scheduled.append(d)
                        index.reserve(decision.agent_id, request)
                        snaps[decision.agent_id] = index.agent(decision.agent_id)
                    continue
                if c.settings.preemption:
                    if holders is None:
                        holders = self._holders()
                    stopped = self._preempt(r, snaps, holders, claimed, now)
                    if stopped is not None:
                        victims += stopped
                        continue
                c.still_pending(r, decision.reason, decision.explanation)
            return scheduled, victims

    def _holders(self) -> dict[str, list[Holder]]:
        out: dict[str, list[Holder]] = {}
        for r in self.c.store.records(ACTIVE):
            if r.agent_id is not None:
                out.setdefault(r.agent_id, []).append(Holder(
                    r.deployment_id, r.priority, Amount(r.cpus, r.memory_mb, r.gpus), stopping=r.status is S.STOPPING,
                ))
        return out

    def _preempt(
        self, r: Record, snaps: dict[str, AgentSnapshot], holders: dict[str, list[Holder]],
        claimed: dict[str, Amount], now: datetime,
    ) -> list[Deployment] | None:
        """Stop lower-priority deployments so `r` fits (or wait for those being stopped); None if it cannot."""
        rooms = [
            Room(s.agent_id, _free(s, claimed.get(s.agent_id, Amount())), tuple(holders.get(s.agent_id, ())))
            for s in snaps.values() if s.state == "alive" and r.runtime in s.runtimes
        ]
        need = Amount(r.cpus, r.memory_mb, r.gpus)
        choice = choose_victims(need, r.priority, rooms)
        if choice is None:
            return None
        stopped = []
        for victim_id in choice.victims:
            d = self.c.preempt(victim_id, r, now)
            if d is None:
                return None  # it changed meanwhile (stopped, finished): judge again on the next pass
            stopped.append(d)
        marked = {v: True for v in choice.victims}
        holders[choice.agent_id] = [replace(h, stopping=h.stopping or h.deployment_id in marked)
                                    for h in holders.get(choice.agent_id, [])]
        claimed[choice.agent_id] = claimed.get(choice.agent_id, Amount()) + need
        waiting_on = ", ".join(choice.victims) if choice.victims else "deployments being stopped"
        self.c.still_pending(r, f"waiting for {waiting_on} on agent {choice.agent_id} to stop (preempted for "
                                f"this {PRIORITIES[r.priority]}-priority deployment)", None)
        return stopped


def _free(s: AgentSnapshot, claimed: Amount) -> Amount:
    return Amount(s.cpus - s.allocated.cpus - claimed.cpus, s.memory_mb - s.allocated.memory_mb - claimed.memory_mb,
                  s.gpus - s.allocated.gpus - claimed.gpus)




class BusWatch:
    """The controller's own look at the bus, on its own thread so that a broker that does not answer never holds the
    reconcile loop up: every `interval_s` a metadata request for the platform's topics (`describe_topics`).

    Topics missing on a broker that answers are created again (`ensure_topics`: a memory-only broker restarted
    empty); a consumer assigned to a topic since deleted or created again is told to look again. `health()` is what
    the reconcile pass feeds the liveness rule: answering only while the broker answered lately, every topic exists
    and every consumer is assigned to the topics as they are now.
    """

    def __init__(
        self, bootstrap: str, consumers: Callable[[], list[PartitionConsumer]], *, interval_s: float,
        timeout_s: float,
        topics: tuple[TopicSpec, ...] = TOPICS, monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bootstrap = bootstrap
        self.consumers = consumers
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.topics = topics
        self.monotonic = monotonic
        self.recreated = 0
        self._admin = AdminClient({"bootstrap.servers": bootstrap})
        self._lock = threading.Lock()
        self._answered_at: float | None = None  # monotonic time of the latest answer of the broker
        self._answered_wall: datetime | None = None
        self._problem: str | None = "no answer from the broker yet"
        self._found: dict[str, TopicInfo | None] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> BusWatch:
        self._thread = threading.Thread(target=self._run, name="bus-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s * 3 + 5)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watch outlives any error; the next look tries again
                log.exception("bus watch: one look failed")
            self._stopping.wait(self.interval_s)

    def check(self) -> None:
        """One look: the topics as the broker has them, created again where missing, and the consumers' assignment."""
        names = [t.name for t in self.topics]
        try:
            found = describe_topics(self._admin, names, self.timeout_s)
            missing = [n for n in names if found.get(n) is None]
            if missing:
                log.warning("bus watch: topics %s are missing (the broker restarted empty?); creating them again",
                            ", ".join(missing))
                ensure_topics(self.bootstrap, [t for t in self.topics if t.name in missing], self.timeout_s)
                self.recreated += 1
                found = describe_topics(self._admin, names, self.timeout_s)
                missing = [n for n in names if found.get(n) is None]
        except KafkaException as exc:
            self._record(None, f"no answer from the broker at {self.bootstrap}: {_kafka_error(exc)}")
            return
        if missing:
            self._record(found, f"topics missing: {', '.join(missing)}")
            return
        consumers = self.consumers()
        behind = [c for c in consumers if not c.follows(found)]
        for c in behind:
            c.look_again()
        problem = None if consumers else "the consumers are not started yet"
        if behind:
            problem = "consumers not yet assigned to the topics as they are now: " + ", ".join(
                "+".join(c.topics) for c in behind)
        self._record(found, problem)

    def _record(self, found: dict[str, TopicInfo | None] | None, problem: str | None) -> None:
        with self._lock:
            if found is not None:
                self._answered_at = self.monotonic()
                self._answered_wall = datetime.now(UTC)
                self._found = found
            if problem != self._problem:
                if problem is None:
                    log.info("bus watch: the broker answers, every topic and consumer is in place")
                else:
                    log.warning("bus watch: %s", problem)
            self._problem = problem

    def health(self) -> BusHealth:
        """What the liveness rule is told: a look older than two intervals plus the timeout counts as no answer."""
        with self._lock:
            answered_at, problem = self._answered_at, self._problem
        if answered_at is None:
            return BusHealth(False, problem or "no answer from the broker yet")
        age = self.monotonic() - answered_at
        if age > 2 * self.interval_s + self.timeout_s:
            return BusHealth(False, f"no answer from the broker at {self.bootstrap} for {age:.0f}s"
                                    + (f" ({problem})" if problem else ""))
        return BusHealth(problem is None, problem)

    def state(self) -> BrokerState:
        health = self.health()
        with self._lock:
            found = dict(self._found)
            answered = self._answered_wall
        return BrokerState(
            bootstrap=self.bootstrap, answering=health.answering, problem=health.why, answered_at=answered,
            topics={n: i.partitions for n, i in found.items() if i is not None},
            topics_recreated=self.recreated,
        )


def _kafka_error(exc: KafkaException) -> str:
    err = exc.args[0] if exc.args else None
    return str(err.str()) if isinstance(err, KafkaError) else str(exc)
