"""Preemption: which deployments to stop so that a higher-priority one fits. Pure: no I/O, no clock.

A deployment that fits nowhere may take the place of strictly lower-priority deployments on one agent. The choice
is the fewest victims, then the lowest priorities among them, then the least taken beyond the need, then the
smallest agent id, so it never depends on the order of its input. Deployments already being stopped free their
resources soon: when those make the request fit, no new victim is needed (the answer has no victims: wait).

Victims are stopped on their agent and go back to the queue as pending (never dropped); equal or higher priority
is never preempted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import combinations

CPU_SLACK = 1e-9  # sums of fractional CPUs must not turn away an exact fit
MAX_COMBINATIONS = 20_000
"""Victim sets judged per agent before falling back to a greedy choice (then the count may not be minimal)."""


@dataclass(frozen=True)
class Amount:
    """CPUs, memory and GPUs: a request, or what is free (possibly negative when over-allocated)."""

    cpus: float = 0.0
    memory_mb: float = 0.0
    gpus: int = 0

    def __add__(self, other: Amount) -> Amount:
        return Amount(self.cpus + other.cpus, self.memory_mb + other.memory_mb, self.gpus + other.gpus)

    def covers(self, need: Amount) -> bool:
        return (
            self.cpus >= need.cpus - CPU_SLACK
            and self.memory_mb >= need.memory_mb
            and (need.gpus == 0 or self.gpus >= need.gpus)
        )


@dataclass(frozen=True)
class Holder:
    """A deployment holding resources on an agent."""

    deployment_id: str
    priority: int
    uses: Amount
    stopping: bool = False
    """Already being stopped: its resources are about to be free, it is no victim to choose."""


@dataclass(frozen=True)
class Room:
    """One agent that could take the request (alive, right runtime): what is free now and who holds the rest."""

    agent_id: str
    free: Amount
    holders: tuple[Holder, ...] = ()


@dataclass(frozen=True)
class Preemption:
    """Stop `victims` on `agent_id` and the request fits there; no victims: what is being stopped is enough."""

    agent_id: str
    victims: tuple[str, ...]


_Key = tuple[int, int, int, float, float, str, tuple[str, ...]]


def choose_victims(need: Amount, priority: int, rooms: Iterable[Room]) -> Preemption | None:
    """The agent and the fewest, lowest-priority deployments to stop there so that `need` fits; None if none."""
    best: tuple[_Key, Preemption] | None = None
    for room in rooms:
        found = _best_in_room(need, priority, room)
        if found is not None and (best is None or found[0] < best[0]):
            best = found
    return best[1] if best is not None else None


def _best_in_room(need: Amount, priority: int, room: Room) -> tuple[_Key, Preemption] | None:
    soon_free = room.free
    for h in room.holders:
        if h.stopping:
            soon_free = soon_free + h.uses
    if soon_free.covers(need):
        return _key(room.agent_id, ()), Preemption(room.agent_id, ())
    candidates = sorted(
        (h for h in room.holders if not h.stopping and h.priority < priority),
        key=lambda h: (h.priority, h.deployment_id),
    )
    if not (soon_free + _total(candidates)).covers(need):
        return None  # even every lower-priority deployment together does not make room
    budget = MAX_COMBINATIONS
    for k in range(1, len(candidates) + 1):
        best: tuple[_Key, tuple[Holder, ...]] | None = None
        for victims in combinations(candidates, k):
            budget -= 1
            if budget < 0:
                return _greedy(need, soon_free, candidates, room.agent_id)
            if (soon_free + _total(victims)).covers(need):
                key = _key(room.agent_id, victims)
                if best is None or key < best[0]:
                    best = key, victims
        if best is not None:
            return best[0], Preemption(room.agent_id, tuple(sorted(h.deployment_id for h in best[1])))
    return None


def _greedy(need: Amount, free: Amount, candidates: list[Holder], agent_id: str) -> tuple[_Key, Preemption] | None:
    """Lowest priority first, the biggest first within a priority, until it fits (used past the search budget)."""
    chosen: list[Holder] = []
    for h in sorted(candidates, key=lambda h: (h.priority, -h.uses.cpus, -h.uses.memory_mb, h.deployment_id)):
        chosen.append(h)
        free = free + h.uses
        if free.covers(need):
            return _key(agent_id, chosen), Preemption(agent_id, tuple(sorted(x.deployment_id for x in chosen)))
    return None


def _total(holders: Iterable[Holder]) -> Amount:
    total = Amount()
    for h in holders:
        total = total + h.uses
    return total


def _key(agent_id: str, victims: Iterable[Holder]) -> _Key:
    """Order of preference: fewest victims, lowest top priority, lowest priority sum, least taken, agent, ids."""
    vs = list(victims)
    taken = _total(vs)
    return (len(vs), max((h.priority for h in vs), default=-1), sum(h.priority for h in vs), taken.cpus,
            taken.memory_mb, agent_id, tuple(sorted(h.deployment_id for h in vs)))
