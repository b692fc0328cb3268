"""What the portal follows on the bus: deployment events fanned out to live pages, and the agents' recent load.

`LiveFeed` hands each `DeploymentEvent` to every subscriber (one per open Server-Sent Events stream);
`LoadHistory` keeps the last minutes of each agent's CPU, memory and GPU load for the charts. `BusFollower`
feeds both from Kafka with `miaas.bus.PartitionConsumer` (every partition assigned, from the end).

Only what is signed is believed: each message's signature is checked first (`miaas.identity.MessageChecker`), and
then that its signer may say it (`speaks_for`): an agent's metrics and reports only by that agent, the controller's
events only by the controller. Refused messages never reach a page; they are counted per reason (`stats()`), and
the bus page shows the counts.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from miaas import identity
from miaas.bus import DEPLOYMENT_EVENTS, SYSTEM_METRICS, PartitionConsumer, Received
from miaas.schemas import AgentMetrics, ConsumerStats, DeploymentEvent

log = logging.getLogger(__name__)
SUBSCRIBER_BACKLOG = 1000
MAX_SAMPLES = 2000  # per agent, whatever the interval


class Subscription:
    """The events of one stream: all deployments, or the one it asked for. Overflow drops the stream's backlog."""

    def __init__(self, deployment_id: str | None) -> None:
        self.deployment_id = deployment_id
        self.events: queue.Queue[DeploymentEvent] = queue.Queue(SUBSCRIBER_BACKLOG)
        self.overflowed = False
        self.closed = False  # the portal is stopping: the stream ends

    def wants(self, event: DeploymentEvent) -> bool:
        return self.deployment_id is None or event.deployment_id == self.deployment_id

    def get(self, timeout: float) -> DeploymentEvent | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None


@dataclass
class LiveFeed:
    """Fans deployment events out to subscribers; a slow subscriber loses events, never blocks the others."""

    _subscribers: set[Subscription] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    published: int = 0

    def subscribe(self, deployment_id: str | None = None) -> Subscription:
        sub = Subscription(deployment_id)
        with self._lock:
            self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers.discard(sub)

    def publish(self, event: DeploymentEvent) -> None:
        with self._lock:
            subs = [s for s in self._subscribers if s.wants(event)]
            self.published += 1
        for sub in subs:
            try:
                sub.events.put_nowait(event)
            except queue.Full:
                sub.overflowed = True

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def close(self) -> None:
        """End every stream (the portal is stopping): each notices within a second."""
        with self._lock:
            for sub in self._subscribers:
                sub.closed = True


class Sample(NamedTuple):
    """One agent's load at one moment (seconds on the portal's monotonic clock).

    A tuple of numbers, which the garbage collector stops tracking: 1,000 agents' ten minutes are 120,000
    samples that a full collection then never walks.
    """

    at: float
    cpu_percent: float
    memory_percent: float
    gpu_percent: float | None  # mean utilisation of its GPUs; None without GPUs
    gpu_memory_percent: float | None


@dataclass
class LoadHistory:
    """The last `window_s` seconds of every agent's load. Pure: the caller passes the time."""

    window_s: float
    _samples: dict[str, deque[Sample]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def observe(self, metrics: AgentMetrics, now: float) -> None:
        gpus = metrics.load.gpus
        total_gpu_mb = sum(g.memory_total_mb for g in gpus)
        sample = Sample(
            at=now, cpu_percent=metrics.load.cpu_percent, memory_percent=metrics.load.memory_percent,
            gpu_percent=sum(g.utilization_percent for g in gpus) / len(gpus) if gpus else None,
            gpu_memory_percent=100 * sum(g.memory_used_mb for g in gpus) / total_gpu_mb if total_gpu_mb else None,
        )
        with self._lock:
            samples = self._samples.setdefault(metrics.agent_id, deque(maxlen=MAX_SAMPLES))
            samples.append(sample)
            self._trim(samples, now)

    def series(self, agent_id: str, now: float) -> list[Sample]:
        with self._lock:
            samples = self._samples.get(agent_id)
            if samples is None:
                return []
            self._trim(samples, now)
            return list(samples)

    def _trim(self, samples: deque[Sample], now: float) -> None:
        while samples and samples[0].at < now - self.window_s:
            samples.popleft()


def speaks_for(signer: identity.Certificate | None, message: AgentMetrics | DeploymentEvent) -> None:
    """Refuse (IMPERSONATION) a message its signer may not say: an agent speaks only for itself, only the
    controller for the controller. Pure."""
    if signer is None:
        raise identity.Refused(identity.UNSIGNED, "the message is not signed")
    if isinstance(message, AgentMetrics):
        agent_id: str | None = message.agent_id
    elif message.source == "controller":
        if signer.role != identity.CONTROLLER:
            raise identity.Refused(identity.IMPERSONATION, f"{signer.role} {signer.subject} sent an event of the "
                                   f"controller about {message.deployment_id}")
        return
    else:
        agent_id = message.agent_id
    if signer.role != identity.AGENT or signer.subject != agent_id:
        raise identity.Refused(identity.IMPERSONATION, f"{signer.role} {signer.subject} spoke for agent {agent_id}")


class BusFollower:
    """Feeds a `LiveFeed` from deployment-events and a `LoadHistory` from system-metrics, believing only the
    messages `checker` accepts and whose signer `speaks_for` them."""

    def __init__(self, bootstrap: str, feed: LiveFeed, history: LoadHistory, clock: Callable[[], float], *,
                 checker: identity.MessageChecker) -> None:
        self.feed = feed
        self.history = history
        self.clock = clock
        self._consumer = PartitionConsumer(bootstrap, [DEPLOYMENT_EVENTS, SYSTEM_METRICS], self.on_message,
                                           start="end", group_id="frontend", checker=checker)

    def start(self) -> BusFollower:
        self._consumer.start()
        return self

    def stop(self) -> None:
        self._consumer.stop()

    @property
    def ready(self) -> threading.Event:
        return self._consumer.ready

    def stats(self) -> ConsumerStats:
        """What the portal has consumed, and skipped or refused per reason."""
        return self._consumer.stats()

    def on_message(self, msg: Received) -> None:
        """One message from the bus; an invalid one, or one its signer may not say, raises and is skipped by the
        consumer."""
        if msg.topic == DEPLOYMENT_EVENTS:
            event = DeploymentEvent.model_validate(msg.value)
            speaks_for(msg.signer, event)
            self.feed.publish(event)
        elif msg.topic == SYSTEM_METRICS:
            metrics = AgentMetrics.model_validate(msg.value)
            speaks_for(msg.signer, metrics)
            self.history.observe(metrics, self.clock())
