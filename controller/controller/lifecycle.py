"""Rules of a deployment's life under failure. Pure: records, reports and `now` in; decisions out.

The controller's reconcile loop feeds these with its database and its view of the agents, then carries the
decisions out (database writes, commands to agents). Glossary:
- generation: how many times a deployment was placed. Commands and agents' reports carry it, so a report about
  an older placement (a copy since moved, or stopped before the deployment came back) never moves the record.
- orphan copy: a deployment an agent runs that the controller has placed elsewhere, stopped, failed, or queued
  again; the agent is told to stop it (`/stop-vm` is idempotent).
- due: a record whose next command may be sent now (`next_attempt_at` passed); failed commands back off.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from controller.liveness import AgentState, Gate, agent_state
from controller.states import QUEUED, can_move
from miaas.schemas import DeploymentReport
from miaas.schemas import DeploymentStatus as S

LIVE_ON_AGENT = frozenset({S.PROVISIONING, S.RUNNING})
"""What an agent reports of a copy that runs (or is about to)."""


@dataclass(frozen=True)
class Record:
    """What the rules know of one deployment record."""

    deployment_id: str
    status: S
    agent_id: str | None
    created_at: datetime
    updated_at: datetime
    generation: int = 0
    priority: int = 1
    attempts: int = 0
    next_attempt_at: datetime | None = None
    requeue: bool = False
    """Being stopped to go back to the queue (preempted), not stopped for good."""
    cpus: float = 1.0
    memory_mb: int = 512
    gpus: int = 0
    runtime: str = "process"
    reason: str | None = None


@dataclass(frozen=True)
class Move:
    """A decided change of one record: its new status and why."""

    deployment_id: str
    status: S
    reason: str | None = None


# ---------------------------------------------------------------------------------------------- agents' reports


def judge_report(
    record: Record, agent_id: str | None, status: S, generation: int | None, *, from_metrics: bool
) -> S | None:
    """The status an agent's report moves the record to, or None when the report changes nothing.

    - Only the agent the deployment is placed on speaks for it, and only about the current placement: a report
      must name the record's generation exactly. One without a generation (forged, or from an agent that predates
      generations) or of another one (an older copy, or a placement this controller never made) changes nothing.
    - `stopping` is the controller's to decide: an agent announcing it changes nothing.
    - A lost record comes back only on live metrics (an old event replayed after a restart proves nothing).
    - An agent stopping a copy nobody asked it to stop (its own shutdown) loses the deployment: it is re-placed.
    - A copy stopped (or failed) at the controller's request is stopped, or queued again when it was preempted.
    """
    if agent_id is None or record.agent_id != agent_id:
        return None
    if generation is None or generation != record.generation:
        return None
    current = record.status
    if status is S.STOPPING or current is status:
        return None
    if current is S.LOST and not from_metrics:
        return None
    if current is S.STOPPING:
        if status in (S.STOPPED, S.FAILED):
            return S.PENDING if record.requeue else status
        return None
    if status is S.STOPPED:
        return S.LOST if current in (S.SCHEDULED, S.PROVISIONING, S.RUNNING) else None
    return status if can_move(current, status) else None


def orphan_copies(
    agent_id: str, reports: Iterable[DeploymentReport], records: Mapping[str, Record]
) -> list[DeploymentReport]:
    """The copies an agent runs that it should not: placed elsewhere, stopped, failed or queued again.

    A copy the controller has no record of is left alone (it is not this controller's to stop).
    """
    out = []
    for report in reports:
        record = records.get(report.deployment_id)
        if report.status not in LIVE_ON_AGENT or record is None:
            continue
        if record.agent_id != agent_id or record.status.is_terminal or record.status is S.PENDING:
            out.append(report)
    return out


# ---------------------------------------------------------------------------------------------- lost agents


def effective_state(
    agent_id: str, states: Mapping[str, AgentState], now: datetime, started_at: datetime, lost_after_s: float,
    gate: Gate | None = None,
) -> AgentState:
    """An agent's state; one not heard from since this controller started is lost once the grace period ends,
    counted from the start or from the end of the latest suspension of loss decisions (`liveness.Gate`)."""
    state = states.get(agent_id)
    if state is not None:
        return state
    return agent_state(started_at, 0.0, now, suspect_after=1, lost_after_s=lost_after_s,
                       gate=gate if gate is not None else Gate(grace_from=started_at))


def lost_moves(records: Iterable[Record], state_of: Mapping[str, AgentState]) -> list[Move]:
    """What becomes of the deployments of lost agents: lost (to be re-placed), or done stopping."""
    out = []
    for r in records:
        if r.agent_id is None or state_of.get(r.agent_id) != "lost":
            continue
        why = f"agent {r.agent_id} is lost (no metrics)"
        if r.status in (S.SCHEDULED, S.PROVISIONING, S.RUNNING):
            out.append(Move(r.deployment_id, S.LOST, why))
        elif r.status is S.STOPPING:
            out.append(Move(r.deployment_id, S.PENDING if r.requeue else S.STOPPED, f"{why} while stopping it"))
    return out


@dataclass(frozen=True)
class AgentReport:
    """The latest metrics of one live agent, as far as its deployments go."""

    received_at: datetime
    interval_s: float
    deployment_ids: frozenset[str]


def missing_moves(records: Iterable[Record], reports: Mapping[str, AgentReport]) -> list[Move]:
    """Deployments their live agent stopped reporting (it restarted and forgot them): lost, to be re-placed.

    Only reports received two intervals after the record last changed count, so a report collected just before
    the agent took the deployment is not mistaken for its absence.
    """
    out = []
    for r in records:
        report = reports.get(r.agent_id or "")
        if r.status not in LIVE_ON_AGENT or report is None or r.deployment_id in report.deployment_ids:
            continue
        if report.received_at - r.updated_at >= timedelta(seconds=2 * report.interval_s):
            out.append(Move(r.deployment_id, S.LOST, f"agent {r.agent_id} no longer reports it"))
    return out


# ---------------------------------------------------------------------------------------------- commands


def backoff_s(attempts: int, base_s: float, cap_s: float) -> float:
    """Seconds to wait after the `attempts`-th failed command: base, 2·base, 4·base… capped."""
    if attempts <= 0:
        return 0.0
    return float(min(cap_s, base_s * 2 ** min(attempts - 1, 30)))


def is_due(record: Record, now: datetime) -> bool:
    return record.next_attempt_at is None or record.next_attempt_at <= now


@dataclass(frozen=True)
class Command:
    """What to do next for one record: send `create` or `stop` to its agent, or `unassign` it (queue it again)."""

    kind: str
    record: Record


def due_commands(
    records: Iterable[Record],
    state_of: Mapping[str, AgentState],
    holds: Mapping[str, frozenset[str]],
    now: datetime,
    *,
    max_attempts: int,
) -> list[Command]:
    """Commands to (re)send: a placement its agent has not confirmed, a stop it has not done.

    A placement whose commands kept failing is taken back (`unassign`) once the agent's metrics show it does not
    hold the deployment; while they show it does, its own reports decide. Agents that are not alive are left to
    the liveness rules.
    """
    out = []
    for r in records:
        if r.agent_id is None or not is_due(r, now):
            continue
        state = state_of.get(r.agent_id)
        if r.status is S.SCHEDULED and state == "alive":
            held = r.deployment_id in holds.get(r.agent_id, frozenset())
            if r.attempts >= max_attempts and r.agent_id in holds and not held:
                out.append(Command("unassign", r))
            elif r.attempts < max_attempts or held:
                out.append(Command("create", r))
        elif r.status is S.STOPPING and state in ("alive", "suspect"):
            out.append(Command("stop", r))
    return out


# ---------------------------------------------------------------------------------------------- queue


def queue_order(records: Iterable[Record], now: datetime) -> list[Record]:
    """The deployments waiting for a placement that may be tried now: highest priority first, then oldest."""
    waiting = [r for r in records if r.status in QUEUED and is_due(r, now)]
    return sorted(waiting, key=lambda r: (-r.priority, r.created_at, r.deployment_id))
