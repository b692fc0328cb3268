"""Agent liveness from the clock, and the deployment state machine."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from controller.liveness import agent_state, is_fresh
from controller.states import TRANSITIONS, can_move
from miaas.schemas import DeploymentStatus as S

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("silence, expected", [(0, "alive"), (5.9, "alive"), (6, "suspect"), (14.9, "suspect"),
                                               (15, "lost"), (600, "lost")])
def test_agent_state_follows_silence(silence: float, expected: str) -> None:
    now = T0 + timedelta(seconds=silence)
    assert agent_state(T0, 2.0, now, suspect_after=3, lost_after_s=15) == expected


def test_messages_dated_far_away_are_not_fresh() -> None:
    assert is_fresh(T0, T0 + timedelta(seconds=5), 30)
    assert not is_fresh(T0, T0 + timedelta(seconds=31), 30)
    assert not is_fresh(T0 + timedelta(hours=1), T0, 30)  # from the future


def test_terminal_states_go_nowhere() -> None:
    for terminal in (S.STOPPED, S.FAILED):
        assert not any(can_move(terminal, target) for target in S)


def test_every_state_has_a_rule_and_happy_path_is_legal() -> None:
    assert set(TRANSITIONS) == set(S)
    path = [S.PENDING, S.SCHEDULED, S.PROVISIONING, S.RUNNING, S.STOPPING, S.STOPPED]
    assert all(can_move(a, b) for a, b in zip(path, path[1:], strict=False))
    assert not can_move(S.RUNNING, S.PROVISIONING)
