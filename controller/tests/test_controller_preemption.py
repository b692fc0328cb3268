"""Preemption's choice of victims: tables, and Hypothesis properties against a brute-force reference."""

from __future__ import annotations

from itertools import combinations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.preemption import Amount, Holder, Preemption, Room, choose_victims

LOW, NORMAL, HIGH, CRITICAL = range(4)


def h(deployment_id: str, priority: int, cpus: float = 1, memory_mb: float = 256, gpus: int = 0,
      stopping: bool = False) -> Holder:
    return Holder(deployment_id, priority, Amount(cpus, memory_mb, gpus), stopping)


def full(agent_id: str, *holders: Holder, free: Amount | None = None) -> Room:
    return Room(agent_id, free or Amount(0, 0, 0), holders)


NEED_1CPU = Amount(1, 256, 0)


@pytest.mark.parametrize(
    "need, priority, rooms, expected",
    [
        (NEED_1CPU, HIGH, [full("a", h("x", LOW))], Preemption("a", ("x",))),
        (NEED_1CPU, NORMAL, [full("a", h("x", NORMAL))], None),  # equal priority is never preempted
        (NEED_1CPU, NORMAL, [full("a", h("x", HIGH))], None),  # nor higher
        (NEED_1CPU, CRITICAL, [full("a", h("x", LOW), h("y", NORMAL))], Preemption("a", ("x",))),  # the lowest
        (Amount(2, 256), CRITICAL, [full("a", h("x", LOW), h("y", LOW), h("big", HIGH, cpus=2))],
         Preemption("a", ("big",))),  # fewest first, even if higher
        (Amount(2, 256), CRITICAL, [full("a", h("x", LOW), h("y", LOW)), full("b", h("z", NORMAL, cpus=2))],
         Preemption("b", ("z",))),  # one victim on b beats two on a
        (NEED_1CPU, HIGH, [full("a", h("x", LOW)), full("b", h("y", LOW))], Preemption("a", ("x",))),  # tie: agent id
        (NEED_1CPU, HIGH, [full("a", h("x", LOW, stopping=True))], Preemption("a", ())),  # being freed: wait
        (Amount(1, 256, 1), HIGH, [full("a", h("x", LOW))], None),  # nobody frees a GPU
        (Amount(1, 256, 1), HIGH, [full("a", h("x", LOW), h("g", NORMAL, gpus=1))], Preemption("a", ("g",))),
        (Amount(3, 256), HIGH, [full("a", h("x", LOW), free=Amount(1, 1000))], None),  # even all is not enough
        (Amount(1.5, 256), HIGH, [full("a", h("x", LOW, cpus=0.5), h("y", LOW, cpus=0.5), h("z", LOW, cpus=0.5))],
         Preemption("a", ("x", "y", "z"))),  # fractional CPUs add up exactly
        (NEED_1CPU, HIGH, [], None),
    ],
    ids=["lower-victim", "equal-never", "higher-never", "lowest-first", "fewest-first", "fewest-across-agents",
         "tie-smallest-agent", "wait-for-stopping", "gpu-not-freed", "gpu-freed", "not-enough-anyway",
         "fractional-exact", "no-agents"],
)
def test_choose_victims(need: Amount, priority: int, rooms: list[Room], expected: Preemption | None) -> None:
    assert choose_victims(need, priority, rooms) == expected


def test_the_choice_does_not_depend_on_the_order_of_its_input() -> None:
    rooms = [full("b", h("y", LOW), h("z", LOW)), full("a", h("w", LOW), h("x", LOW))]
    first = choose_victims(Amount(2, 512), HIGH, rooms)
    flipped = choose_victims(Amount(2, 512), HIGH, [Room(r.agent_id, r.free, r.holders[::-1]) for r in rooms[::-1]])
    assert first == flipped == Preemption("a", ("w", "x"))


holder_strategy = st.builds(
    Holder,
    deployment_id=st.text("abcdefgh", min_size=1, max_size=3),
    priority=st.integers(0, 3),
    uses=st.builds(Amount, cpus=st.sampled_from([0.25, 0.5, 1, 2]), memory_mb=st.sampled_from([128, 512, 2048]),
                   gpus=st.integers(0, 1)),
    stopping=st.booleans(),
)
room_strategy = st.builds(
    Room,
    agent_id=st.sampled_from(["a", "b", "c"]),
    free=st.builds(Amount, cpus=st.sampled_from([-1, 0, 0.5, 1]), memory_mb=st.sampled_from([0, 256, 1024]),
                   gpus=st.integers(0, 1)),
    holders=st.lists(holder_strategy, max_size=6, unique_by=lambda x: x.deployment_id).map(tuple),
)
need_strategy = st.builds(Amount, cpus=st.sampled_from([0.5, 1, 2, 3]), memory_mb=st.sampled_from([128, 1024, 4096]),
                          gpus=st.integers(0, 1))


def frees_enough(room: Room, victims: tuple[str, ...], need: Amount) -> bool:
    total = room.free
    for x in room.holders:
        if x.stopping or x.deployment_id in victims:
            total = total + x.uses
    return total.covers(need)


@given(need_strategy, st.integers(0, 3), st.lists(room_strategy, max_size=3, unique_by=lambda r: r.agent_id))
def test_victims_are_strictly_lower_fit_and_are_as_few_as_possible(need: Amount, priority: int,
                                                                   rooms: list[Room]) -> None:
    choice = choose_victims(need, priority, rooms)
    # the reference: the fewest lower-priority, not-yet-stopping victims on any one agent that make it fit
    fewest = None
    for room in rooms:
        candidates = [x.deployment_id for x in room.holders if not x.stopping and x.priority < priority]
        for k in range(len(candidates) + 1):
            if any(frees_enough(room, vs, need) for vs in combinations(candidates, k)):
                fewest = k if fewest is None else min(fewest, k)
                break
    if fewest is None:
        assert choice is None
        return
    assert choice is not None
    room = next(r for r in rooms if r.agent_id == choice.agent_id)
    by_id = {x.deployment_id: x for x in room.holders}
    assert all(by_id[v].priority < priority and not by_id[v].stopping for v in choice.victims)  # never equal/higher
    assert frees_enough(room, choice.victims, need)  # the result fits
    assert len(choice.victims) == fewest  # and takes no more victims than needed
