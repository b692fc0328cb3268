"""Placement: filters, least-loaded choice, reservations, tie-break, explanations — tables and properties."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.placement import AgentSnapshot, NoPlacement, Placement, PlacementRequest, Usage, place, score
from miaas.schemas import Resources


def agent(agent_id: str, cpu: float = 10, mem: float = 10, **kw: object) -> AgentSnapshot:
    base = AgentSnapshot(agent_id=agent_id, state="alive", runtimes=("process",), cpus=4, memory_mb=8192, gpus=0,
                         cpu_percent=cpu, memory_percent=mem)
    return replace(base, **kw)  # type: ignore[arg-type]


SMALL = PlacementRequest(Resources(cpus=1, memory_mb=256, gpus=0), "process")


@pytest.mark.parametrize(
    "agents, request_, expected",
    [
        ([agent("a", cpu=80), agent("b", cpu=5)], SMALL, "b"),
        ([agent("a", cpu=50, mem=0), agent("b", cpu=0, mem=100)], SMALL, "b"),  # 35 vs 30
        ([agent("a"), agent("b")], SMALL, "a"),  # tie → smallest id
        ([agent("a", cpu=0, state="suspect"), agent("b", cpu=90)], SMALL, "b"),
        ([agent("a", cpu=0, runtimes=("vagrant",)), agent("b", cpu=90)], SMALL, "b"),
        ([agent("a", cpu=0, allocated=Usage(cpus=3.5)), agent("b", cpu=90)], SMALL, "b"),
        ([agent("a", cpu=0, gpus=0), agent("b", cpu=90, gpus=1)],
         PlacementRequest(Resources(cpus=1, memory_mb=1, gpus=1), "process"), "b"),
        ([agent("a", cpu=0, in_flight=Usage(cpus=2, memory_mb=2048)), agent("b", cpu=20)], SMALL, "b"),
    ],
    ids=["least-loaded", "weights-0.7-0.3", "tie-break", "suspect-filtered", "runtime-filtered",
         "cpu-does-not-fit", "gpu-needed", "in-flight-counts-as-used"],
)
def test_place_picks(agents: list[AgentSnapshot], request_: PlacementRequest, expected: str) -> None:
    decision = place(agents, request_)
    assert isinstance(decision, Placement)
    assert decision.agent_id == expected


def test_every_candidate_is_explained() -> None:
    decision = place([agent("a", state="lost"), agent("b", runtimes=("vagrant",)), agent("c", cpu=40)], SMALL)
    assert isinstance(decision, Placement)
    by_id = {e.agent_id: e for e in decision.explanation}
    assert by_id["a"].rejected == "agent is lost"
    assert "runtime 'process' not supported" in (by_id["b"].rejected or "")
    assert by_id["c"].score == pytest.approx(0.7 * 40 + 0.3 * 10)


def test_no_agents_is_a_reasoned_refusal() -> None:
    decision = place([], SMALL)
    assert isinstance(decision, NoPlacement)
    assert decision.reason.startswith("no live agent")


def test_only_lost_agents_is_no_live_agent() -> None:
    decision = place([agent("a", state="lost")], SMALL)
    assert isinstance(decision, NoPlacement)
    assert "no live agent" in decision.reason


def test_nothing_fits_names_each_agent_and_why() -> None:
    decision = place([agent("a", allocated=Usage(memory_mb=8000))], SMALL)
    assert isinstance(decision, NoPlacement)
    assert "a: needs 256 MB memory, 192 MB free" in decision.reason


def test_concurrent_deploys_spread_when_reservations_count() -> None:
    agents = {"a": agent("a", cpu=0, mem=0, cpus=8), "b": agent("b", cpu=0, mem=0, cpus=8)}
    placed = []
    for _ in range(10):
        d = place(list(agents.values()), SMALL)
        assert isinstance(d, Placement)
        placed.append(d.agent_id)
        a = agents[d.agent_id]
        agents[d.agent_id] = replace(a, in_flight=Usage(a.in_flight.cpus + 1, a.in_flight.memory_mb + 256),
                                     allocated=Usage(a.allocated.cpus + 1, a.allocated.memory_mb + 256))
    assert placed.count("a") == 5 and placed.count("b") == 5


agent_strategy = st.builds(
    AgentSnapshot,
    agent_id=st.text("abcdef", min_size=1, max_size=4),
    state=st.sampled_from(["alive", "suspect", "lost"]),
    runtimes=st.sampled_from([("process",), ("vagrant",), ("process", "vagrant")]),
    cpus=st.floats(0.5, 64),
    memory_mb=st.floats(256, 65536),
    gpus=st.integers(0, 4),
    cpu_percent=st.floats(0, 100),
    memory_percent=st.floats(0, 100),
    allocated=st.builds(Usage, cpus=st.floats(0, 8), memory_mb=st.floats(0, 4096), gpus=st.integers(0, 2)),
)
agents_strategy = st.lists(agent_strategy, max_size=12, unique_by=lambda a: a.agent_id)


@given(agents_strategy)
def test_never_picks_a_filtered_agent_and_picks_a_minimum(agents: list[AgentSnapshot]) -> None:
    decision = place(agents, SMALL)
    fits = [a for a in agents if a.state == "alive" and "process" in a.runtimes
            and a.cpus - a.allocated.cpus >= 1 - 1e-9 and a.memory_mb - a.allocated.memory_mb >= 256]
    if not fits:
        assert isinstance(decision, NoPlacement)
        return
    assert isinstance(decision, Placement)
    assert decision.agent_id in {a.agent_id for a in fits}
    assert decision.score == min(score(a) for a in fits)


@given(agents_strategy, st.randoms())
def test_unchanged_under_any_permutation(agents: list[AgentSnapshot], rnd) -> None:  # type: ignore[no-untyped-def]
    shuffled = list(agents)
    rnd.shuffle(shuffled)
    first, second = place(agents, SMALL), place(shuffled, SMALL)
    assert type(first) is type(second)
    if isinstance(first, Placement):
        assert isinstance(second, Placement)
        assert first.agent_id == second.agent_id
