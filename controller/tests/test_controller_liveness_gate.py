"""The liveness gate, one rule at a time, with an injected `now`: silence counts only while the bus works.

Settings of every table: lost after 15 s, agents sending every 5 s, a disruption window of 2 s (an agent is quiet
after 7 s of silence).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from controller.liveness import (
    BusHealth,
    Gate,
    Heard,
    agent_state,
    full_disruption,
    lost_in_s,
    quiet_after_s,
    start,
    step,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LOST, INTERVAL, WINDOW = 15.0, 5.0, 2.0
UP, DOWN = BusHealth(True), BusHealth(False, "no answer from the broker at 127.0.0.1:9092")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def heard(*last_seen: float) -> list[Heard]:
    return [Heard(at(s), INTERVAL) for s in last_seen]


def state(last_seen: float, now: float, gate: Gate | None) -> str:
    return agent_state(at(last_seen), INTERVAL, at(now), suspect_after=3, lost_after_s=LOST, gate=gate)


def run(gate: Gate, now: float, bus: BusHealth | None, *last_seen: float) -> Gate:
    return step(gate, at(now), bus, heard(*last_seen), lost_after_s=LOST, window_s=WINDOW)


BUS_DOWN = Gate(grace_from=at(-100), cause="bus", since=at(10), why="the bus does not answer: x")
DISRUPTED = Gate(grace_from=at(-100), cause="disruption", since=at(10), why="no metrics")


# ------------------------------------------------------------------------------------------------ one agent's state


@pytest.mark.parametrize(
    "last_seen, now, gate, expected",
    [
        (0, 20, None, "lost"),  # the plain rule: 15 s of silence
        (0, 20, start(at(0)), "lost"),  # a gate that suspends nothing is the plain rule
        (0, 600, BUS_DOWN, "suspect"),  # bus down: never lost, however long the silence; never placed on either
        (0, 600, DISRUPTED, "suspect"),
        (0, 3, BUS_DOWN, "alive"),  # silence shorter than 3 intervals is still alive
        (0, 20, Gate(grace_from=at(10)), "suspect"),  # grace counted from the bus's return at 10 s...
        (0, 25, Gate(grace_from=at(10)), "lost"),  # ...so lost at 25 s, not 15 s
        (30, 40, Gate(grace_from=at(10)), "alive"),  # heard after the return: its own silence counts
        (30, 45, Gate(grace_from=at(10)), "lost"),
        (0, 600, Gate(grace_from=at(300), cause="bus", lost_before=at(1)), "lost"),  # lost before the outage
        (0, 320, Gate(grace_from=at(300), lost_before=at(0)), "lost"),  # ...and after it: no new grace
        (2, 310, Gate(grace_from=at(300), lost_before=at(1)), "suspect"),  # heard after the cut-off: new grace
    ],
    ids=["plain", "open-gate", "bus-down-holds", "disruption-holds", "bus-down-recent-alive", "grace-from-return",
         "lost-after-grace", "heard-after-return", "own-silence-after-return", "lost-before-stays-lost",
         "lost-before-no-new-grace", "after-cutoff-gets-grace"],
)
def test_an_agent_is_lost_only_for_silence_the_bus_could_have_carried(
    last_seen: float, now: float, gate: Gate | None, expected: str
) -> None:
    assert state(last_seen, now, gate) == expected


# ------------------------------------------------------------------------------------------------ full disruption


@pytest.mark.parametrize(
    "last_seen, now, expected",
    [
        ((0, 0.4), 7.5, (0.4, 2)),  # two agents, quiet together: a disruption since the last message
        ((0, 1, 2), 10, (2, 3)),  # three, within one interval of each other
        ((0,), 10, None),  # one agent alone: its silence is its own (ordinary loss)
        ((0, 0.4), 6, None),  # not quiet yet (7 s): nothing to say
        ((0, 5), 10, None),  # one of them is still heard: whoever is quiet is quiet on its own
        ((0, 9), 16.5, None),  # the first is lost (15 s) before the second fell quiet: one standing
        ((-20, 0, 0.5), 8, (0.5, 2)),  # a long-lost agent does not count; the two others fell quiet together
        ((-5, 3, 3.2), 10.5, (3.2, 2)),  # quiet 8 s before the others (beyond the window): not with them
        ((), 10, None),  # nobody
    ],
    ids=["two-together", "three-together", "one-alone", "not-quiet-yet", "one-still-heard", "apart-one-lost",
         "lost-one-ignored", "earlier-one-not-together", "nobody"],
)
def test_every_agent_falling_quiet_together_is_a_disruption_not_deaths(
    last_seen: tuple[float, ...], now: float, expected: tuple[float, int] | None
) -> None:
    found = full_disruption(heard(*last_seen), at(now), start(at(-100)), lost_after_s=LOST, window_s=WINDOW)
    assert found == (None if expected is None else (at(expected[0]), expected[1]))


def test_quiet_is_an_interval_plus_the_window_at_most_half_the_grace_period() -> None:
    assert quiet_after_s(5, 2, 15) == 7
    assert quiet_after_s(0.1, 2, 1) == 0.5  # a disruption is seen before anyone could be lost


# ------------------------------------------------------------------------------------------------ the gate's steps


@pytest.mark.parametrize(
    "gate, now, bus, last_seen, cause, since, grace_from",
    [
        (start(at(0)), 20, DOWN, (18,), "bus", 20, 0),  # the broker stops answering: suspended from now
        (BUS_DOWN, 30, DOWN, (18,), "bus", 10, -100),  # still down: the same suspension
        (BUS_DOWN, 30, UP, (18,), None, None, 30),  # back, one agent: resumed, its grace counted from now
        (BUS_DOWN, 30, UP, (8, 9), "disruption", 10, 30),  # back, two agents silent: still suspended, since 10 s
        (start(at(0)), 27, UP, (18, 19), "disruption", 19, 0),  # the broker answers, both fell quiet at ~19 s
        (start(at(0)), 27, UP, (18, 25), None, None, 0),  # one still heard: nothing suspended
        (start(at(0)), 27, None, (18, 19), "disruption", 19, 0),  # bus not watched: the disruption rule alone
        (DISRUPTED, 40, UP, (9, 39), None, None, 40),  # a message again: resumed, grace from now
        (DISRUPTED, 40, UP, (9, 9.5), "disruption", 10, -100),  # still nobody: still suspended
        (DISRUPTED, 40, DOWN, (9, 9.5), "bus", 10, -100),  # then the broker goes: one suspension, the same since
        (start(at(0)), 20, DOWN, (), "bus", 20, 0),  # nobody heard yet: the bus decides alone
    ],
    ids=["bus-goes", "bus-still-down", "bus-back-one-agent", "bus-back-all-silent", "disruption", "partial",
         "unwatched-bus", "disruption-ends", "disruption-goes-on", "disruption-then-bus", "no-agents"],
)
def test_the_gate_suspends_and_resumes_as_the_rules_say(
    gate: Gate, now: float, bus: BusHealth | None, last_seen: tuple[float, ...], cause: str | None,
    since: float | None, grace_from: float,
) -> None:
    after = run(gate, now, bus, *last_seen)
    assert after.cause == cause
    assert after.since == (at(since) if since is not None else None)
    assert after.grace_from == at(grace_from)
    assert (after.why is not None) == (cause is not None)


def test_agents_lost_when_a_suspension_begins_stay_lost_after_it() -> None:
    # given one agent lost at 15 s (silent since 0) and one heard at 18 s, when the broker goes at 20 s
    gate = run(start(at(-100)), 20, DOWN, 0, 18)
    assert gate.lost_before == at(5)
    # then while it is down the first stays lost and the second is held
    assert [state(0, 60, gate), state(18, 60, gate)] == ["lost", "suspect"]
    # and when it is back both keep their state: the second gets a full grace period, the first none
    gate = run(gate, 60, UP, 0, 18)
    assert [state(0, 70, gate), state(18, 70, gate), state(18, 75, gate)] == ["lost", "suspect", "lost"]


def test_a_suspension_within_the_grace_period_marks_nobody_lost() -> None:
    gate = run(start(at(0)), 10, DOWN, 0)  # the controller started at 0, heard nobody since: nobody was lost
    assert gate.lost_before is None


def test_a_broker_outage_longer_than_the_grace_period_loses_nobody_second_by_second() -> None:
    # two agents send every 5 s; the broker is down from 12 s to 80 s; both are heard again at 83 s and 84 s
    gate, lost = start(at(0)), []
    for second in range(1, 120):
        sends = [s for s in (0, 5, 10, 83, 88, 93, 98, 103, 108, 113, 118) if s <= second]
        other = [s for s in (1, 6, 11, 84, 89, 94, 99, 104, 109, 114, 119) if s <= second]
        bus = DOWN if 12 <= second < 80 else UP
        gate = run(gate, second, bus, sends[-1], other[-1])
        lost += [second for last in (sends[-1], other[-1]) if state(last, second, gate) == "lost"]
        if 12 <= second < 83:
            assert gate.suspended, second  # down, then back with both still silent: one suspension
    assert lost == []
    assert not gate.suspended and gate.grace_from == at(83)  # resumed when the first message came


def test_after_the_bus_returns_an_agent_that_never_sends_again_is_lost_a_grace_period_later() -> None:
    gate = run(start(at(0)), 20, DOWN, 10, 11)
    gate = run(gate, 60, UP, 10, 11)  # back; both silent: a disruption goes on
    assert gate.cause == "disruption"
    gate = run(gate, 62, UP, 10, 61.5)  # the second is heard: resumed at 62 s
    assert not gate.suspended
    assert [state(10, 76, gate), state(10, 77, gate)] == ["suspect", "lost"]


def test_the_single_agent_of_a_cluster_is_lost_once_the_broker_answers_and_its_grace_ends() -> None:
    gate = run(start(at(0)), 20, DOWN, 10)
    assert state(10, 50, gate) == "suspect"  # held while the broker is down
    gate = run(gate, 50, UP, 10)  # back: alone, nothing to compare with, so no disruption
    assert not gate.suspended
    assert [state(10, 64, gate), state(10, 65, gate)] == ["suspect", "lost"]


def test_the_next_loss_is_due_a_grace_period_after_the_later_of_silence_and_return() -> None:
    assert lost_in_s(heard(0, 4), at(5), start(at(0)), LOST) == 10
    assert lost_in_s(heard(0, 4), at(5), Gate(grace_from=at(3)), LOST) == 13
    assert lost_in_s(heard(0, 4), at(5), BUS_DOWN, LOST) is None
    assert lost_in_s(heard(0), at(20), start(at(0)), LOST) is None  # already lost
