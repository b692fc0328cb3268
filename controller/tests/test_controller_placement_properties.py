"""Placement properties (Hypothesis): never a filtered agent, always a best one, blind to the snapshot's order, and
the index — fresh or kept current through updates — agrees with a naive reference written from the rules."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.placement import (
    AgentSnapshot,
    NoPlacement,
    Placement,
    PlacementIndex,
    PlacementRequest,
    Usage,
    place,
    score,
)
from miaas.schemas import Resources

NOW = datetime(2025, 1, 1, tzinfo=UTC)

# Few distinct values, so ties and exact fits happen.
agent_strategy = st.builds(
    AgentSnapshot,
    agent_id=st.integers(0, 999).map(lambda i: f"a{i:03d}"),
    state=st.sampled_from(["alive", "alive", "alive", "suspect", "lost"]),
    runtimes=st.sampled_from([("process",), ("vagrant",), ("process", "vagrant"), ()]),
    cpus=st.sampled_from([1.0, 2.0, 4.0, 8.0]) | st.floats(0.5, 64),
    memory_mb=st.sampled_from([1024.0, 8192.0]) | st.floats(256, 65536),
    gpus=st.integers(0, 2),
    cpu_percent=st.sampled_from([0.0, 50.0]) | st.floats(0, 100),
    memory_percent=st.sampled_from([0.0, 50.0]) | st.floats(0, 100),
    allocated=st.builds(Usage, cpus=st.sampled_from([0.0, 1.0, 3.0]) | st.floats(0, 8),
                        memory_mb=st.sampled_from([0.0, 512.0]) | st.floats(0, 4096), gpus=st.integers(0, 2)),
    in_flight=st.builds(Usage, cpus=st.sampled_from([0.0, 1.0]), memory_mb=st.sampled_from([0.0, 512.0])),
    gpu_memory_free_mb=st.sampled_from([0.0, 4000.0, 16000.0]),
)
# Snapshots on both sides of the line between explaining every agent (<= 50) and the best few.
agents_strategy = (st.lists(agent_strategy, max_size=12, unique_by=lambda a: a.agent_id)
                   | st.lists(agent_strategy, min_size=45, max_size=70, unique_by=lambda a: a.agent_id))
requests_strategy = st.builds(
    PlacementRequest,
    resources=st.builds(Resources, cpus=st.sampled_from([0.5, 1.0, 2.0, 3.0]) | st.floats(0.1, 16),
                        memory_mb=st.sampled_from([256, 512]) | st.integers(1, 8192), gpus=st.integers(0, 2)),
    runtime=st.sampled_from(["process", "vagrant", "docker"]),
    strategy=st.sampled_from(["spread", "binpack"]),
    gpu_memory_mb=st.sampled_from([0.0, 0.0, 4000.0]),
)


# --------------------------------------------------------------------------- the naive reference


def free(a: AgentSnapshot) -> tuple[float, float, int]:
    return a.cpus - a.allocated.cpus, a.memory_mb - a.allocated.memory_mb, a.gpus - a.allocated.gpus


def fits(a: AgentSnapshot, r: PlacementRequest) -> bool:
    cpus, memory, gpus = free(a)
    return (a.state == "alive" and r.runtime in a.runtimes and cpus >= r.resources.cpus - 1e-9
            and memory >= r.resources.memory_mb and (r.resources.gpus == 0 or gpus >= r.resources.gpus)
            and (r.gpu_memory_mb == 0 or a.gpu_memory_free_mb >= r.gpu_memory_mb))


def rank(a: AgentSnapshot, r: PlacementRequest) -> tuple[Any, ...]:
    """Spread: least load. Binpack: fewest free CPUs, then least free memory. Then the agent id."""
    if r.strategy == "spread":
        return score(a), a.agent_id
    return *free(a)[:2], a.agent_id


def naive(agents: list[AgentSnapshot], r: PlacementRequest) -> dict[str, Any]:
    """Judge every agent, sort the fitting ones, count each reason: the explanation's contract, slowly."""
    ranked = [a.agent_id for a in sorted((a for a in agents if fits(a, r)), key=lambda a: rank(a, r))]
    listed = ranked + sorted(a.agent_id for a in agents if not fits(a, r)) if len(agents) <= 50 else ranked[:11]
    rejections = []
    for state in sorted({a.state for a in agents} - {"alive"}):
        ids = sorted(a.agent_id for a in agents if a.state == state)
        rejections.append(("state", len(ids), ids[:3]))
    live = [a for a in agents if a.state == "alive"]
    lacking = sorted(a.agent_id for a in live if r.runtime not in a.runtimes)
    if lacking:
        rejections.append(("runtime", len(lacking), lacking[:3]))
    eligible = [a for a in live if r.runtime in a.runtimes]
    checks = [("cpus", lambda a: free(a)[0], r.resources.cpus - 1e-9),
              ("memory_mb", lambda a: free(a)[1], r.resources.memory_mb)]
    if r.resources.gpus:
        checks.append(("gpus", lambda a: free(a)[2], r.resources.gpus))
    if r.gpu_memory_mb:
        checks.append(("gpu_memory_mb", lambda a: a.gpu_memory_free_mb, r.gpu_memory_mb))
    for code, value, least in checks:
        short = sorted((a for a in eligible if value(a) < least), key=lambda a: (value(a), a.agent_id))
        if short:
            rejections.append((code, len(short), [a.agent_id for a in short[:3]]))
    return {"chosen": ranked[0] if ranked else None, "listed": listed, "eligible": len(eligible),
            "rejections": rejections}


def observed(decision: Placement | NoPlacement) -> dict[str, Any]:
    ex = decision.explanation
    return {"chosen": ex.chosen, "listed": [c.agent_id for c in ex.candidates], "eligible": ex.eligible,
            "rejections": [(x.code, x.count, x.examples) for x in ex.rejections]}


# --------------------------------------------------------------------------- properties


@settings(deadline=None)
@given(agents_strategy, requests_strategy)
def test_never_picks_a_filtered_agent_and_always_a_best_one(agents: list[AgentSnapshot], r: PlacementRequest) -> None:
    decision = place(agents, r, NOW)
    fitting = [a for a in agents if fits(a, r)]
    if not fitting:
        assert isinstance(decision, NoPlacement)
        return
    assert isinstance(decision, Placement)
    picked = next(a for a in agents if a.agent_id == decision.agent_id)
    assert fits(picked, r)
    assert decision.score == score(picked)
    if r.strategy == "spread":
        assert decision.score == min(score(a) for a in fitting)
    else:  # binpack: the fewest free CPUs left after placing, then the least memory left
        assert free(picked)[:2] == min(free(a)[:2] for a in fitting)


@settings(deadline=None)
@given(agents_strategy, requests_strategy, st.randoms(use_true_random=False))
def test_the_decision_is_blind_to_the_order_of_the_snapshot(agents: list[AgentSnapshot], r: PlacementRequest,
                                                            rnd: random.Random) -> None:
    shuffled = list(agents)
    rnd.shuffle(shuffled)
    assert place(agents, r, NOW) == place(shuffled, r, NOW)


@settings(deadline=None)
@given(agents_strategy, requests_strategy)
def test_the_index_agrees_with_the_naive_reference(agents: list[AgentSnapshot], r: PlacementRequest) -> None:
    assert observed(place(agents, r, NOW)) == naive(agents, r)


@settings(deadline=None)
@given(agents_strategy, st.lists(requests_strategy, min_size=1, max_size=3), st.data())
def test_an_index_kept_current_agrees_with_the_naive_reference(
    agents: list[AgentSnapshot], asked: list[PlacementRequest], data: st.DataObject
) -> None:
    # given an index that has already decided (so its columns are sorted and must be kept sorted)
    index = PlacementIndex(agents)
    for r in asked:
        index.place(r, NOW)
    current = {a.agent_id: a for a in agents}
    # when agents change numbers, state or runtimes, leave, join, and take reservations
    for a in agents:
        change = data.draw(st.sampled_from(["keep", "numbers", "state", "runtimes", "leave", "reserve"]))
        if change == "numbers":
            current[a.agent_id] = replace(a, cpu_percent=data.draw(st.floats(0, 100)),
                                          allocated=Usage(data.draw(st.floats(0, 8)), 512.0, 0))
        elif change == "state":
            current[a.agent_id] = replace(a, state=data.draw(st.sampled_from(["alive", "suspect", "lost"])))
        elif change == "runtimes":
            current[a.agent_id] = replace(a, runtimes=data.draw(st.sampled_from([("process",), ("docker",)])))
        elif change == "leave":
            del current[a.agent_id]
            index.remove(a.agent_id)
            continue
        elif change == "reserve":
            r = data.draw(st.sampled_from(asked))
            used = Usage(r.resources.cpus, r.resources.memory_mb, r.resources.gpus)
            current[a.agent_id] = replace(a, allocated=a.allocated + used, in_flight=a.in_flight + used,
                                          gpu_memory_free_mb=a.gpu_memory_free_mb - r.gpu_memory_mb)
            index.reserve(a.agent_id, r)
            continue
        index.update(current[a.agent_id])
    for newcomer in data.draw(agents_strategy.map(lambda xs: [x for x in xs if x.agent_id not in current])):
        current[newcomer.agent_id] = newcomer
        index.update(newcomer)
    # then every decision is the one a fresh look at the agents gives
    for r in asked:
        assert observed(index.place(r, NOW)) == naive(list(current.values()), r)
        assert index.place(r, NOW) == place(current.values(), r, NOW)
