"""The deployment state machine (DESIGN §2): which transitions are legal."""

from __future__ import annotations

from miaas.schemas import DeploymentStatus as S

TRANSITIONS: dict[S, frozenset[S]] = {
    S.PENDING: frozenset({S.SCHEDULED, S.FAILED, S.STOPPED}),
    S.SCHEDULED: frozenset({S.PROVISIONING, S.RUNNING, S.FAILED, S.STOPPING, S.STOPPED, S.LOST}),
    S.PROVISIONING: frozenset({S.RUNNING, S.FAILED, S.STOPPING, S.STOPPED, S.LOST}),
    S.RUNNING: frozenset({S.STOPPING, S.STOPPED, S.FAILED, S.LOST}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED}),
    S.LOST: frozenset({S.SCHEDULED, S.RUNNING, S.STOPPED, S.FAILED}),
    S.STOPPED: frozenset(),
    S.FAILED: frozenset(),
}

ACTIVE = frozenset({S.SCHEDULED, S.PROVISIONING, S.RUNNING, S.STOPPING})
IN_FLIGHT = frozenset({S.SCHEDULED, S.PROVISIONING})


def can_move(current: S, target: S) -> bool:
    """True when `current → target` is a legal transition."""
    return target in TRANSITIONS[current]
