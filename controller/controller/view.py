"""The controller's live view of the agents, folded from the `system-metrics` stream."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime

from controller.liveness import AgentState, agent_state, is_fresh
from miaas.schemas import AgentMetrics


@dataclass(frozen=True)
class AgentRecord:
    metrics: AgentMetrics
    last_seen: datetime


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
        if not is_fresh(metrics.sent_at, now, self.max_skew_s):
            with self._lock:
                self.stale += 1
            return False
        with self._lock:
            known = self._agents.get(metrics.agent_id)
            if known is not None and known.metrics.sent_at > metrics.sent_at:
                return False  # an older message delivered late must not roll the view back
            self._agents[metrics.agent_id] = AgentRecord(metrics, now)
        return True

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
