"""Agent liveness from the metrics stream and the clock. Pure: the caller passes `now` and what it knows of the bus.

An agent is `alive` while its metrics arrive, `suspect` after `suspect_after` missed intervals (never placed on),
and `lost` after `lost_after_s` of silence: then its deployments are moved. Silence proves a death only while the
path it would travel works, so loss decisions can be suspended (a `Gate`, advanced by `step` on every reconcile
pass):

- **bus**: while the broker does not answer the controller's own metadata requests, the platform's topics are
  missing (a memory-only broker restarted empty) or the controller's consumers are not assigned to them yet;
- **disruption**: while the broker answers but every agent fell quiet at once: at least two agents were still
  heard when the last message of any agent arrived, and none has been heard since (each is quiet: silent for longer
  than its metrics interval plus `window_s`, at most half of `lost_after_s`). The path (the agents' network to
  the broker, the controller's consumer) is broken rather than every machine dead in the same few seconds; and
  with every agent gone there would be nowhere to move the deployments to anyway (Kubernetes stops evicting under
  full disruption). One agent alone has nothing to be compared with: once the broker answers, its silence is an
  ordinary loss. Some agents quiet while another is still heard is ordinary loss too.

While suspended no agent becomes lost: one past its grace period shows as `suspect`. An agent already lost when the
suspension began stays lost. When a suspension ends, and when the controller starts, every agent's grace period
starts again from that moment (`Gate.grace_from`): no agent is lost for a silence the controller could not hear
(Nomad stretches heartbeat TTLs after a leader change for the same reason).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal

AgentState = Literal["alive", "suspect", "lost"]
Cause = Literal["bus", "disruption"]


@dataclass(frozen=True)
class Heard:
    """What the rule needs of one agent: when its latest metrics arrived, and how often it sends them."""

    last_seen: datetime
    interval_s: float


@dataclass(frozen=True)
class BusHealth:
    """The controller's latest word on the bus path; `why` says what is wrong when it is not `answering`."""

    answering: bool
    why: str | None = None


@dataclass(frozen=True)
class Gate:
    """Whether loss decisions are suspended, and from when an agent's silence counts."""

    grace_from: datetime
    """No silence counts before this: the controller's start, or the end of the latest suspension."""
    cause: Cause | None = None
    """Why loss decisions are suspended now; None when they are not."""
    since: datetime | None = None
    """When the current suspension began (a disruption: when the last message of any agent arrived)."""
    why: str | None = None
    lost_before: datetime | None = None
    """An agent heard last at or before this was lost before a suspension began: it stays lost."""

    @property
    def suspended(self) -> bool:
        return self.cause is not None


def start(now: datetime) -> Gate:
    """The gate of a controller starting now: every agent's grace period counts from now."""
    return Gate(grace_from=now)


def agent_state(
    last_seen: datetime, interval_s: float, now: datetime, *, suspect_after: float, lost_after_s: float,
    gate: Gate | None = None,
) -> AgentState:
    """alive while metrics arrive; suspect after `suspect_after` missed intervals; lost after `lost_after_s` of
    silence counted from `gate.grace_from` at the earliest, and never while the gate is suspended."""
    silence = now - last_seen
    lost_after = timedelta(seconds=lost_after_s)
    if gate is None:
        if silence >= lost_after:
            return "lost"
    else:
        if gate.lost_before is not None and last_seen <= gate.lost_before:
            return "lost"
        if gate.cause is None and now - max(last_seen, gate.grace_from) >= lost_after:
            return "lost"
    if silence >= timedelta(seconds=min(interval_s * suspect_after, lost_after_s)):
        return "suspect"
    return "alive"


def quiet_after_s(interval_s: float, window_s: float, lost_after_s: float) -> float:
    """Silence after which an agent is no longer heard, for the disruption rule: its interval plus the window,
    at most half the grace period (so a disruption is always seen before anyone would be lost)."""
    return min(interval_s + window_s, lost_after_s / 2)


def full_disruption(
    heard: Iterable[Heard], now: datetime, gate: Gate, *, lost_after_s: float, window_s: float,
) -> tuple[datetime, int] | None:
    """(when the last message of any agent arrived, how many agents fell quiet together then) when every agent that
    is not lost fell quiet at once, at least two of them; None otherwise."""

    def quiet_s(h: Heard) -> timedelta:
        return timedelta(seconds=quiet_after_s(h.interval_s, window_s, lost_after_s))

    standing = [h for h in heard
                if agent_state(h.last_seen, h.interval_s, now, suspect_after=1, lost_after_s=lost_after_s,
                               gate=gate) != "lost"]
    if not standing or any(now - h.last_seen <= quiet_s(h) for h in standing):
        return None  # nobody to judge, or someone is still heard: whoever is quiet is quiet on their own
    newest = max(h.last_seen for h in standing)
    together = sum(1 for h in standing if newest - h.last_seen <= quiet_s(h))
    return (newest, together) if together >= 2 else None


def step(
    gate: Gate, now: datetime, bus: BusHealth | None, heard: Iterable[Heard], *, lost_after_s: float,
    window_s: float,
) -> Gate:
    """The gate after one look at the bus (`bus`: None when it is not watched) and at the agents heard."""
    if bus is not None and not bus.answering:
        why = f"the bus does not answer: {bus.why or 'no reason given'}"
        if gate.cause == "bus":
            return gate if gate.why == why else replace(gate, why=why)
        return _suspend(gate, now, "bus", why, gate.since if gate.suspended else now, lost_after_s)
    was = gate
    if gate.cause == "bus":
        gate = _resume(gate, now)
    quiet = full_disruption(heard, now, gate, lost_after_s=lost_after_s, window_s=window_s)
    if quiet is not None:
        if gate.cause == "disruption":
            return gate
        newest, together = quiet
        why = (f"no metrics from any of the {together} agents heard until {newest.isoformat()}: they fell silent "
               "together, a disruption of the path rather than deaths")
        since = was.since if was.suspended and was.since is not None else newest
        return _suspend(gate, now, "disruption", why, since, lost_after_s)
    if gate.cause == "disruption":
        return _resume(gate, now)
    return gate


def _suspend(gate: Gate, now: datetime, cause: Cause, why: str, since: datetime | None,
             lost_after_s: float) -> Gate:
    """Suspend loss decisions; the agents lost at this moment stay lost."""
    lost_before = gate.lost_before
    cutoff = now - timedelta(seconds=lost_after_s)
    if not gate.suspended and gate.grace_from <= cutoff:
        lost_before = cutoff if lost_before is None else max(lost_before, cutoff)
    return Gate(grace_from=gate.grace_from, cause=cause, since=since, why=why, lost_before=lost_before)


def _resume(gate: Gate, now: datetime) -> Gate:
    """Loss decisions again, every grace period counted from now."""
    return Gate(grace_from=now, lost_before=gate.lost_before)


def lost_in_s(heard: Iterable[Heard], now: datetime, gate: Gate | None, lost_after_s: float) -> float | None:
    """Seconds until the next agent not lost yet turns lost; None when none will (or decisions are suspended)."""
    if gate is not None and gate.suspended:
        return None
    due = [(max(h.last_seen, gate.grace_from) if gate is not None else h.last_seen) for h in heard
           if agent_state(h.last_seen, h.interval_s, now, suspect_after=1, lost_after_s=lost_after_s,
                          gate=gate) != "lost"]
    return min(((t - now).total_seconds() + lost_after_s for t in due), default=None)


def is_fresh(sent_at: datetime, now: datetime, max_skew_s: float) -> bool:
    """A message dated too far in the past or the future does not prove the agent is alive now."""
    return abs((now - sent_at).total_seconds()) <= max_skew_s
