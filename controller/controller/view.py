"""The controller's live view of the agents, folded from the `system-metrics` stream, and the liveness gate that says
whether their silence may count (`liveness.py`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from datetime import datetime
from typing import NamedTuple

from controller import liveness
from controller.liveness import AgentState, BusHealth, Gate, Heard, agent_state
from miaas.schemas import AgentMetrics

log = logging.getLogger(__name__)


class AgentRecord(NamedTuple):
    """An agent's latest metrics and when they arrived (a tuple: one is built per message folded)."""

    metrics: AgentMetrics
    last_seen: datetime
    sent: float = 0.0  # metrics.sent_at as a POSIX timestamp: compared once per message


class ClusterView:
    """Latest metrics of every agent and when they arrived. Thread-safe."""

    def __init__(self, *, suspect_after: float, lost_after_s: float, max_skew_s: float,
                 disruption_window_s: float = 2.0, now: datetime | None = None) -> None:
        self.suspect_after = suspect_after
        self.lost_after_s = lost_after_s
        self.max_skew_s = max_skew_s
        self.disruption_window_s = disruption_window_s
        self.stale = 0
        self._agents: dict[str, AgentRecord] = {}
        self._gate: Gate | None = liveness.start(now) if now is not None else None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the liveness gate

    @property
    def gate(self) -> Gate | None:
        """Whether loss decisions are suspended, and from when silence counts (None: not started, plain rule)."""
        with self._lock:
            return self._gate

    def restart_gate(self, now: datetime) -> Gate:
        """The controller starts (again) now: every agent's grace period counts from now."""
        with self._lock:
            self._gate = liveness.start(now)
            return self._gate

    def advance(self, now: datetime, bus: BusHealth | None, unheard_since: datetime | None = None,
                unheard: int = 0) -> Gate:
        """One look at the bus and the agents (`liveness.step`); `unheard` agents named by records but not heard
        since `unheard_since` (the controller's start) count as heard then, sending at once."""
        with self._lock:
            gate = self._gate if self._gate is not None else liveness.start(now)
            heard = [Heard(r.last_seen, r.metrics.interval_s) for r in self._agents.values()]
            if unheard_since is not None:
                heard += [Heard(unheard_since, 0.0)] * unheard
            self._gate = liveness.step(gate, now, bus, heard, lost_after_s=self.lost_after_s,
                                       window_s=self.disruption_window_s)
            if self._gate.cause != gate.cause:
                log.warning("liveness: %s", f"loss decisions suspended: {self._gate.why}" if self._gate.suspended
                            else "loss decisions resumed; every agent's grace period counts from now")
            return self._gate

    def lost_in_s(self, now: datetime) -> float | None:
        """Seconds until the next agent turns lost (None: none will, or decisions are suspended)."""
        with self._lock:
            gate = self._gate
            heard = [Heard(r.last_seen, r.metrics.interval_s) for r in self._agents.values()]
        return liveness.lost_in_s(heard, now, gate, self.lost_after_s)

    def observe(self, metrics: AgentMetrics, now: datetime) -> bool:
        """Fold one message in; a message dated too far from now is counted and ignored."""
        return bool(self.observe_many([metrics], now))

    def observe_many(self, batch: Iterable[AgentMetrics], now: datetime) -> list[AgentMetrics]:
        """Fold messages in, in order; of each agent whose record changed, the latest message folded.

        A message dated too far from now is counted in `stale` and ignored; one older than what the view holds
        for its agent (delivered late) is ignored: it must not roll the view back. `batch` may be a lazy iterator
        (the consumer validates as it goes): the lock is taken per message, so readers never wait for a batch,
        and a message replaced by a later one of its agent is freed at once.
        """
        folded: dict[str, AgentMetrics] = {}
        now_ts = now.timestamp()
        for metrics in batch:
            # `liveness.is_fresh` and the order of messages, on timestamps: comparing aware datetimes whose tzinfo
            # objects differ costs more than the rest of the fold.
            sent = metrics.sent_at.timestamp()
            if abs(now_ts - sent) > self.max_skew_s:
                with self._lock:
                    self.stale += 1
                continue
            with self._lock:
                known = self._agents.get(metrics.agent_id)
                if known is not None and known.sent > sent:
                    continue
                self._agents[metrics.agent_id] = AgentRecord(metrics, now, sent)
            folded[metrics.agent_id] = metrics
        return list(folded.values())

    def agents(self, now: datetime) -> list[tuple[AgentRecord, AgentState]]:
        """Every agent seen with its state, by the liveness gate of the latest reconcile pass."""
        with self._lock:
            records = list(self._agents.values())
            gate = self._gate
        return [
            (r, agent_state(r.last_seen, r.metrics.interval_s, now, suspect_after=self.suspect_after,
                            lost_after_s=self.lost_after_s, gate=gate))
            for r in sorted(records, key=lambda r: r.metrics.agent_id)
        ]

    def known(self) -> set[str]:
        """The ids of every agent heard since this controller started."""
        with self._lock:
            return set(self._agents)

    def get(self, agent_id: str) -> AgentRecord | None:
        with self._lock:
            return self._agents.get(agent_id)
