"""The controller's live view of the agents, folded from the `system-metrics` stream."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import datetime
from typing import NamedTuple

from controller.liveness import AgentState, agent_state
from miaas.schemas import AgentMetrics


class AgentRecord(NamedTuple):
    """An agent's latest metrics and when they arrived (a tuple: one is built per message folded)."""

    metrics: AgentMetrics
    last_seen: datetime
    sent: float = 0.0  # metrics.sent_at as a POSIX timestamp: compared once per message


class ClusterView:
    """Latest metrics of every agent and when they arrived. Thread-safe."""

    def __init__(self, *, suspect_after: float, lost_after_s: float, max_skew_s: float) -> None:
        self.suspect_after = suspect_after
        self.lost_after_s = lost_after_s
        self.max_skew_s = max_skew_s
        self.stale = 0
        self._agents: dict[str, AgentRecord] = {}
        self._lock = threading.Lock()

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
        with self._lock:
            records = list(self._agents.values())
        return [
            (r, agent_state(r.last_seen, r.metrics.interval_s, now, suspect_after=self.suspect_after,
                            lost_after_s=self.lost_after_s))
            for r in sorted(records, key=lambda r: r.metrics.agent_id)
        ]

    def get(self, agent_id: str) -> AgentRecord | None:
        with self._lock:
            return self._agents.get(agent_id)
