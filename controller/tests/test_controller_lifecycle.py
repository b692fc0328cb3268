"""The lifecycle rules under failure, one by one, with an injected `now`: reports, lost agents, orphan copies,
retries with backoff, the queue order, and the state machine they move along."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from controller.lifecycle import (
    AgentReport,
    Move,
    Record,
    backoff_s,
    due_commands,
    effective_state,
    judge_report,
    lost_moves,
    missing_moves,
    orphan_copies,
    queue_order,
)
from controller.liveness import Gate
from controller.states import can_move
from miaas.schemas import DeploymentReport
from miaas.schemas import DeploymentStatus as S

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def rec(deployment_id: str = "d-1", status: S = S.RUNNING, agent_id: str | None = "a", **kw: object) -> Record:
    base = Record(deployment_id=deployment_id, status=status, agent_id=agent_id, created_at=T0, updated_at=T0,
                  generation=1)
    return replace(base, **kw)  # type: ignore[arg-type]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# ------------------------------------------------------------------------------------------------ agents' reports


@pytest.mark.parametrize(
    "record, agent, status, generation, from_metrics, expected",
    [
        (rec(status=S.SCHEDULED), "a", S.PROVISIONING, 1, False, S.PROVISIONING),
        (rec(status=S.PROVISIONING), "a", S.RUNNING, 1, False, S.RUNNING),
        (rec(status=S.RUNNING), "b", S.FAILED, 1, False, None),  # not its agent
        (rec(status=S.SCHEDULED, generation=2), "a", S.STOPPED, 1, True, None),  # an older placement's copy
        (rec(status=S.RUNNING), "a", S.RUNNING, None, True, None),  # nothing new
        (rec(status=S.RUNNING), "a", S.STOPPING, 1, False, None),  # stopping is the controller's to decide
        (rec(status=S.RUNNING), "a", S.STOPPED, 1, False, S.LOST),  # stopped unasked: agent shutting down
        (rec(status=S.STOPPING), "a", S.STOPPED, 1, False, S.STOPPED),
        (rec(status=S.STOPPING, requeue=True), "a", S.STOPPED, 1, False, S.PENDING),  # preempted: queued again
        (rec(status=S.STOPPING, requeue=True), "a", S.FAILED, 1, False, S.PENDING),
        (rec(status=S.STOPPING), "a", S.RUNNING, 1, True, None),  # a late report must not undo a stop
        (rec(status=S.LOST), "a", S.RUNNING, 1, True, S.RUNNING),  # the agent is back, and so is it
        (rec(status=S.LOST), "a", S.RUNNING, 1, False, None),  # an old event replayed proves nothing
        (rec(status=S.LOST), "a", S.STOPPED, 1, True, None),  # stays lost: re-placed
        (rec(status=S.STOPPED), "a", S.RUNNING, 1, True, None),  # final
        (rec(status=S.PENDING, agent_id=None), "a", S.RUNNING, 1, True, None),  # queued: that copy is an orphan
    ],
    ids=["provisioning", "running", "other-agent", "older-generation", "same", "agent-stopping-ignored",
         "stopped-unasked-is-lost", "stopped-as-asked", "preempted-requeued", "preempted-failed-requeued",
         "late-running-while-stopping", "lost-comes-back-on-metrics", "lost-not-on-replayed-event",
         "lost-stays-lost", "final-is-final", "pending-ignores-copies"],
)
def test_an_agent_report_moves_a_record_only_as_the_rules_say(
    record: Record, agent: str, status: S, generation: int | None, from_metrics: bool, expected: S | None
) -> None:
    assert judge_report(record, agent, status, generation, from_metrics=from_metrics) == expected


@pytest.mark.parametrize(
    "record, agent, status, generation, from_metrics",
    [
        (rec(status=S.RUNNING), "a", S.FAILED, None, False),  # an event without a generation: refused
        (rec(status=S.RUNNING), "a", S.STOPPED, None, False),  # (it would have lost the deployment)
        (rec(status=S.SCHEDULED), "a", S.PROVISIONING, None, False),
        (rec(status=S.PROVISIONING), "a", S.RUNNING, None, False),
        (rec(status=S.STOPPING), "a", S.STOPPED, None, False),
        (rec(status=S.LOST), "a", S.RUNNING, None, True),  # metrics without a generation: refused too
        (rec(status=S.RUNNING), "a", S.FAILED, None, True),
        (rec(status=S.RUNNING), "a", S.FAILED, 2, False),  # a generation never placed (forged or from the future)
        (rec(status=S.SCHEDULED, generation=3), "a", S.RUNNING, 2, False),  # an older placement's event
        (rec(status=S.RUNNING, generation=3), "a", S.FAILED, 0, False),  # a recovered copy of unknown placement
        (rec(status=S.RUNNING), "b", S.FAILED, 1, False),  # the right generation from another agent
        (rec(status=S.RUNNING), None, S.FAILED, 1, False),  # from no agent at all
        (rec(status=S.RUNNING), "b", S.FAILED, None, False),  # neither
    ],
    ids=["no-generation-failed", "no-generation-stopped", "no-generation-provisioning", "no-generation-running",
         "no-generation-stopped-as-asked", "metrics-no-generation-back", "metrics-no-generation-failed",
         "future-generation", "older-generation", "unknown-generation-0", "other-agent", "no-agent",
         "other-agent-no-generation"],
)
def test_a_forged_or_stale_report_changes_nothing(
    record: Record, agent: str | None, status: S, generation: int | None, from_metrics: bool
) -> None:
    assert judge_report(record, agent, status, generation, from_metrics=from_metrics) is None
    # while the same report from the deployment's agent, about its current placement, would
    if agent == record.agent_id and generation is None:
        assert judge_report(record, agent, status, record.generation, from_metrics=from_metrics) is not None


def test_every_move_a_report_can_decide_is_a_legal_transition() -> None:
    for current in S:
        for reported in S:
            for requeue in (False, True):
                r = rec(status=current, requeue=requeue)
                target = judge_report(r, "a", reported, 1, from_metrics=True)
                assert target is None or can_move(current, target), (current, reported, target)


# ------------------------------------------------------------------------------------------------ lost agents


def test_an_agent_never_heard_from_is_lost_only_after_the_grace_period() -> None:
    started = T0
    assert effective_state("ghost", {}, at(14.9), started, 15) == "suspect"
    assert effective_state("ghost", {}, at(15), started, 15) == "lost"
    assert effective_state("a", {"a": "alive"}, at(100), started, 15) == "alive"


@pytest.mark.parametrize(
    "gate, now, expected",
    [
        (Gate(grace_from=T0, cause="bus", since=at(5)), 600, "suspect"),  # never lost while the bus is down
        (Gate(grace_from=at(50)), 60, "suspect"),  # the grace period counts again from the bus's return
        (Gate(grace_from=at(50)), 65, "lost"),
        (Gate(grace_from=at(50), lost_before=at(0)), 55, "lost"),  # lost before the outage: stays lost
    ],
    ids=["bus-down", "grace-after-return", "lost-after-grace", "lost-before-outage"],
)
def test_an_agent_never_heard_from_follows_the_liveness_gate(gate: Gate, now: float, expected: str) -> None:
    assert effective_state("ghost", {}, at(now), T0, 15, gate) == expected


def test_deployments_of_a_lost_agent_are_lost_and_stops_there_are_over() -> None:
    records = [rec("d-run"), rec("d-sched", S.SCHEDULED), rec("d-prov", S.PROVISIONING),
               rec("d-stop", S.STOPPING), rec("d-pre", S.STOPPING, requeue=True), rec("d-b", agent_id="b"),
               rec("d-pending", S.PENDING, agent_id=None), rec("d-lost", S.LOST)]
    moves = {m.deployment_id: m.status for m in lost_moves(records, {"a": "lost", "b": "suspect"})}
    assert moves == {"d-run": S.LOST, "d-sched": S.LOST, "d-prov": S.LOST, "d-stop": S.STOPPED,
                     "d-pre": S.PENDING}


def test_a_suspect_agent_keeps_its_deployments() -> None:
    assert lost_moves([rec()], {"a": "suspect"}) == []


def test_a_deployment_its_live_agent_stopped_reporting_is_lost_after_two_intervals() -> None:
    running = rec(updated_at=at(0))
    fresh = {"a": AgentReport(received_at=at(3.9), interval_s=2, deployment_ids=frozenset())}
    later = {"a": AgentReport(received_at=at(4), interval_s=2, deployment_ids=frozenset())}
    listed = {"a": AgentReport(received_at=at(60), interval_s=2, deployment_ids=frozenset({"d-1"}))}
    assert missing_moves([running], fresh) == []
    assert missing_moves([running], later) == [Move("d-1", S.LOST, "agent a no longer reports it")]
    assert missing_moves([running], listed) == []
    assert missing_moves([rec(status=S.SCHEDULED)], later) == []  # not confirmed yet: the create retries decide


# ------------------------------------------------------------------------------------------------ orphan copies


def report(deployment_id: str, status: S = S.RUNNING, generation: int | None = 1) -> DeploymentReport:
    return DeploymentReport(deployment_id=deployment_id, status=status, generation=generation)


def test_an_agent_is_told_to_stop_copies_placed_elsewhere_stopped_failed_or_queued() -> None:
    records = {
        "mine": rec("mine"),
        "moved": rec("moved", agent_id="b", generation=2),
        "stopped": rec("stopped", S.STOPPED),
        "failed": rec("failed", S.FAILED),
        "queued": rec("queued", S.PENDING, agent_id=None),
        "lost-here": rec("lost-here", S.LOST),
        "stopping": rec("stopping", S.STOPPING),
    }
    reports = [report(d) for d in records] + [report("unknown"), report("moved-done", S.STOPPED)]
    records["moved-done"] = rec("moved-done", agent_id="b")
    assert [r.deployment_id for r in orphan_copies("a", reports, records)] == ["moved", "stopped", "failed",
                                                                              "queued"]


# ------------------------------------------------------------------------------------------------ commands


@pytest.mark.parametrize("attempts, expected", [(0, 0), (1, 1), (2, 2), (3, 4), (5, 16), (6, 30), (60, 30)])
def test_backoff_doubles_and_is_capped(attempts: int, expected: float) -> None:
    assert backoff_s(attempts, 1, 30) == expected


def kinds(records: list[Record], states: dict[str, str], holds: dict[str, frozenset[str]], now: datetime) -> list[
        tuple[str, str]]:
    return [(c.kind, c.record.deployment_id)
            for c in due_commands(records, states, holds, now, max_attempts=3)]  # type: ignore[arg-type]


def test_an_unconfirmed_placement_is_sent_again_when_due_and_only_to_a_live_agent() -> None:
    scheduled = rec(status=S.SCHEDULED, next_attempt_at=at(10))
    assert kinds([scheduled], {"a": "alive"}, {"a": frozenset()}, at(9)) == []
    assert kinds([scheduled], {"a": "alive"}, {"a": frozenset()}, at(10)) == [("create", "d-1")]
    assert kinds([scheduled], {"a": "suspect"}, {}, at(10)) == []


def test_a_placement_whose_commands_kept_failing_is_taken_back_only_if_its_agent_does_not_hold_it() -> None:
    tired = rec(status=S.SCHEDULED, attempts=3)
    assert kinds([tired], {"a": "alive"}, {"a": frozenset()}, at(0)) == [("unassign", "d-1")]
    assert kinds([tired], {"a": "alive"}, {"a": frozenset({"d-1"})}, at(0)) == [("create", "d-1")]


def test_a_stop_not_done_is_sent_again_unless_the_agent_is_lost() -> None:
    stopping = rec(status=S.STOPPING, next_attempt_at=at(5))
    assert kinds([stopping], {"a": "suspect"}, {}, at(5)) == [("stop", "d-1")]
    assert kinds([stopping], {"a": "lost"}, {}, at(5)) == []
    assert kinds([stopping], {"a": "alive"}, {}, at(4)) == []


# ------------------------------------------------------------------------------------------------ queue


def test_the_queue_is_highest_priority_first_then_oldest_and_only_what_is_due() -> None:
    records = [
        rec("old-low", S.PENDING, None, priority=0, created_at=at(0)),
        rec("new-critical", S.PENDING, None, priority=3, created_at=at(9)),
        rec("old-normal", S.PENDING, None, priority=1, created_at=at(1)),
        rec("lost-normal", S.LOST, priority=1, created_at=at(0.5)),
        rec("new-normal", S.PENDING, None, priority=1, created_at=at(5)),
        rec("backing-off", S.PENDING, None, priority=3, created_at=at(0), next_attempt_at=at(100)),
        rec("running", S.RUNNING, priority=3),
    ]
    order = [r.deployment_id for r in queue_order(records, at(10))]
    assert order == ["new-critical", "lost-normal", "old-normal", "new-normal", "old-low"]
    assert "backing-off" in [r.deployment_id for r in queue_order(records, at(100))]
