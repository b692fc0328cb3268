"""Agent liveness from the metrics stream and the clock. Pure: the caller passes `now`."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

AgentState = Literal["alive", "suspect", "lost"]


def agent_state(
    last_seen: datetime, interval_s: float, now: datetime, *, suspect_after: float, lost_after_s: float
) -> AgentState:
    """alive while metrics arrive; suspect after `suspect_after` missed intervals; lost after `lost_after_s`."""
    silence = now - last_seen
    if silence >= timedelta(seconds=lost_after_s):
        return "lost"
    if silence >= timedelta(seconds=interval_s * suspect_after):
        return "suspect"
    return "alive"


def is_fresh(sent_at: datetime, now: datetime, max_skew_s: float) -> bool:
    """A message dated too far in the past or the future does not prove the agent is alive now."""
    return abs((now - sent_at).total_seconds()) <= max_skew_s
