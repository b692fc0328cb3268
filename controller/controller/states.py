"""The deployment state machine (DESIGN §2): which transitions are legal.

The happy path is `pending → scheduled → provisioning → running → stopping → stopped`; besides it:
- any live state → `failed` (with a reason); `stopped` and `failed` are final;
- `scheduled | provisioning | running → lost`: its agent vanished; the queue places it again
  (`lost → scheduled`), or its agent returns and reports it (`lost → provisioning | running`);
- `stopping → pending`: a preempted deployment, once stopped, goes back to the queue;
- `scheduled → pending`: its commands kept failing and its agent does not hold it: placed again.
"""

from __future__ import annotations

from miaas.schemas import DeploymentStatus as S

TRANSITIONS: dict[S, frozenset[S]] = {
    S.PENDING: frozenset({S.SCHEDULED, S.FAILED, S.STOPPED}),
    S.SCHEDULED: frozenset({S.PENDING, S.PROVISIONING, S.RUNNING, S.FAILED, S.STOPPING, S.STOPPED, S.LOST}),
    S.PROVISIONING: frozenset({S.RUNNING, S.FAILED, S.STOPPING, S.STOPPED, S.LOST}),
    S.RUNNING: frozenset({S.STOPPING, S.STOPPED, S.FAILED, S.LOST}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED, S.PENDING}),
    S.LOST: frozenset({S.SCHEDULED, S.PROVISIONING, S.RUNNING, S.STOPPED, S.FAILED}),
    S.STOPPED: frozenset(),
    S.FAILED: frozenset(),
}

ACTIVE = frozenset({S.SCHEDULED, S.PROVISIONING, S.RUNNING, S.STOPPING})
"""States that hold resources on an agent."""
IN_FLIGHT = frozenset({S.SCHEDULED, S.PROVISIONING})
QUEUED = frozenset({S.PENDING, S.LOST})
"""States waiting for a placement: the queue."""
PREEMPTIBLE = frozenset({S.SCHEDULED, S.PROVISIONING, S.RUNNING})
"""States a deployment can be preempted from (it holds resources and is not already being stopped)."""


def can_move(current: S, target: S) -> bool:
    """True when `current → target` is a legal transition."""
    return target in TRANSITIONS[current]
