"""Placement as tables: each filter, each strategy, the tie-break, reservations, the index kept current, and the
explanation of small and large snapshots."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from controller.placement import (
    AgentSnapshot,
    NoPlacement,
    Placement,
    PlacementIndex,
    PlacementRequest,
    Usage,
    place,
)
from miaas.schemas import Resources, Strategy

NOW = datetime(2025, 1, 1, tzinfo=UTC)


def agent(agent_id: str, cpu: float = 10, mem: float = 10, **kw: object) -> AgentSnapshot:
    base = AgentSnapshot(agent_id=agent_id, state="alive", runtimes=("process",), cpus=4, memory_mb=8192, gpus=0,
                         cpu_percent=cpu, memory_percent=mem)
    return replace(base, **kw)  # type: ignore[arg-type]


def ask(cpus: float = 1, memory_mb: int = 256, gpus: int = 0, runtime: str = "process",
        strategy: Strategy = "spread", gpu_memory_mb: float = 0.0) -> PlacementRequest:
    return PlacementRequest(Resources(cpus=cpus, memory_mb=memory_mb, gpus=gpus), runtime, strategy, gpu_memory_mb)


SMALL = ask()


def chosen(agents: list[AgentSnapshot], request: PlacementRequest = SMALL) -> str:
    decision = place(agents, request, NOW)
    assert isinstance(decision, Placement), decision
    return decision.agent_id


# Each filter: agent "a" would win on load, but the filter turns it away, so "b" is chosen.
@pytest.mark.parametrize(
    "a, request_",
    [
        (agent("a", cpu=0, state="suspect"), SMALL),
        (agent("a", cpu=0, state="lost"), SMALL),
        (agent("a", cpu=0, runtimes=("vagrant",)), SMALL),
        (agent("a", cpu=0, allocated=Usage(cpus=3.5)), SMALL),
        (agent("a", cpu=0, allocated=Usage(memory_mb=8000)), SMALL),
        (agent("a", cpu=0, gpus=0), ask(gpus=1)),
        (agent("a", cpu=0, gpus=1, allocated=Usage(gpus=1)), ask(gpus=1)),
        (agent("a", cpu=0, gpus=1, gpu_memory_free_mb=2000), ask(gpus=1, gpu_memory_mb=4000)),
        (agent("a", cpu=0, gpus=1), ask(gpus=1, gpu_memory_mb=1)),  # reports no GPU memory: cannot promise any
    ],
    ids=["suspect", "lost", "runtime", "cpus", "memory", "no-gpu", "gpu-allocated", "gpu-memory-short",
         "gpu-memory-unknown"],
)
def test_each_filter_turns_an_agent_away(a: AgentSnapshot, request_: PlacementRequest) -> None:
    b = agent("b", cpu=90, gpus=1, gpu_memory_free_mb=8000)
    assert chosen([a, b], request_) == "b"


@pytest.mark.parametrize(
    "a, request_",
    [
        (agent("a", cpu=0, cpus=4, allocated=Usage(cpus=0.1 + 0.2)), ask(cpus=3.7)),  # 3.6999999999999997 free
        (agent("a", cpu=0, allocated=Usage(memory_mb=8192 - 256)), SMALL),
        (agent("a", cpu=0, gpus=2, allocated=Usage(gpus=1), gpu_memory_free_mb=4000), ask(gpus=1, gpu_memory_mb=4000)),
        (agent("a", cpu=0, gpus=0, allocated=Usage(gpus=1)), SMALL),  # over-allocated GPUs matter only when asked
    ],
    ids=["cpus-exact-despite-float-sums", "memory-exact", "gpus-exact", "gpus-not-asked"],
)
def test_an_exact_fit_fits(a: AgentSnapshot, request_: PlacementRequest) -> None:
    assert chosen([a, agent("b", cpu=90, gpus=2, gpu_memory_free_mb=8000)], request_) == "a"


@pytest.mark.parametrize(
    "agents, request_, expected",
    [
        ([agent("a", cpu=80), agent("b", cpu=5)], SMALL, "b"),
        ([agent("a", cpu=50, mem=0), agent("b", cpu=0, mem=100)], SMALL, "b"),  # 35 vs 30: the weights 0.7 / 0.3
        ([agent("a", cpu=0, in_flight=Usage(cpus=2, memory_mb=2048)), agent("b", cpu=20)], SMALL, "b"),
        ([agent("a", cpu=0, cpus=16, allocated=Usage(cpus=12)), agent("b", cpu=90)], SMALL, "a"),  # fits: load wins
        ([agent("a", cpu=0), agent("b", cpu=90, allocated=Usage(cpus=3))], ask(strategy="binpack"), "b"),
        ([agent("a", allocated=Usage(cpus=1)), agent("b", cpus=8, allocated=Usage(cpus=5))],
         ask(strategy="binpack"), "a"),  # 3 CPUs and all memory left on each: the smallest id
        ([agent("a", allocated=Usage(cpus=2)), agent("b", allocated=Usage(cpus=2, memory_mb=4096))],
         ask(strategy="binpack"), "b"),  # same CPUs left: the least memory left wins
        ([agent("a", cpu=0, allocated=Usage(cpus=3.5)), agent("b", cpu=90, allocated=Usage(cpus=2))],
         ask(strategy="binpack"), "b"),  # the fullest agent cannot fit: the next fullest that can
    ],
    ids=["spread-least-loaded", "spread-weights", "spread-in-flight-counts-as-used", "spread-ignores-allocation",
         "binpack-fullest", "binpack-tie-on-cpus-goes-to-id", "binpack-then-memory", "binpack-skips-too-full"],
)
def test_each_strategy_ranks(agents: list[AgentSnapshot], request_: PlacementRequest, expected: str) -> None:
    assert chosen(agents, request_) == expected


@pytest.mark.parametrize("strategy", ["spread", "binpack"])
def test_ties_go_to_the_smallest_agent_id_whatever_the_order(strategy: Strategy) -> None:
    agents = [agent("c"), agent("a"), agent("b")]
    assert chosen(agents, ask(strategy=strategy)) == "a"
    assert chosen(agents[::-1], ask(strategy=strategy)) == "a"


def test_ten_sequential_deploys_onto_two_equal_idle_agents_split_five_five() -> None:
    # given two equal idle agents, and each decision reserving its deployment on the chosen agent
    agents = {"a": agent("a", cpu=0, mem=0, cpus=8), "b": agent("b", cpu=0, mem=0, cpus=8)}
    placed = []
    for _ in range(10):
        # when placing on a fresh snapshot that counts the earlier deployments as in flight
        d = place(list(agents.values()), SMALL, NOW)
        assert isinstance(d, Placement)
        placed.append(d.agent_id)
        a = agents[d.agent_id]
        used = Usage(1, 256)
        agents[d.agent_id] = replace(a, in_flight=a.in_flight + used, allocated=a.allocated + used)
    # then they spread evenly, alternating from the smallest id
    assert placed == ["a", "b"] * 5


@pytest.mark.parametrize("strategy, expected", [("spread", ["a", "b"] * 5), ("binpack", ["a"] * 8 + ["b"] * 2)])
def test_an_index_kept_current_with_reservations(strategy: Strategy, expected: list[str]) -> None:
    # given one index over two equal idle agents of 8 CPUs
    index = PlacementIndex([agent("a", cpu=0, mem=0, cpus=8), agent("b", cpu=0, mem=0, cpus=8)])
    request = ask(strategy=strategy)
    placed = []
    for _ in range(10):
        d = index.place(request, NOW)
        assert isinstance(d, Placement)
        placed.append(d.agent_id)
        index.reserve(d.agent_id, request)
    # then spread alternates and binpack fills the first agent before the second
    assert placed == expected
    assert index.agent("a").in_flight == Usage(expected.count("a"), 256 * expected.count("a"))
    assert index.agent("a").allocated == index.agent("a").in_flight


def test_an_index_follows_updates_and_removals() -> None:
    index = PlacementIndex([agent("a", cpu=0), agent("b", cpu=50)])
    assert _agent_of(index.place(SMALL, NOW)) == "a"
    index.update(replace(index.agent("a"), state="suspect"))
    assert _agent_of(index.place(SMALL, NOW)) == "b"
    index.update(agent("c", cpu=10))  # a newcomer
    assert _agent_of(index.place(SMALL, NOW)) == "c"
    index.remove("c")
    index.update(replace(index.agent("b"), runtimes=("vagrant",)))
    decision = index.place(SMALL, NOW)
    assert isinstance(decision, NoPlacement)
    assert [(r.code, r.count) for r in decision.explanation.rejections] == [("state", 1), ("runtime", 1)]
    index.update(replace(index.agent("a"), state="alive", cpu_percent=99))
    assert _agent_of(index.place(SMALL, NOW)) == "a"


def _agent_of(decision: Placement | NoPlacement) -> str:
    assert isinstance(decision, Placement), decision
    return decision.agent_id


def test_a_snapshot_naming_an_agent_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="appears twice"):
        place([agent("a"), agent("a", cpu=50)], SMALL, NOW)


@pytest.mark.parametrize("kw", [{"strategy": "random"}, {"gpu_memory_mb": -1.0}, {"gpu_memory_mb": float("nan")}])
def test_a_malformed_request_is_refused(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PlacementRequest(Resources(), "process", **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- explanations


def test_a_small_snapshot_explains_every_agent() -> None:
    agents = [agent("e", state="lost"), agent("d", runtimes=("vagrant",)), agent("c", cpu=40),
              agent("b", allocated=Usage(cpus=3.5, memory_mb=8000)), agent("a", cpu=20)]
    decision = place(agents, SMALL, NOW)
    assert isinstance(decision, Placement)
    ex = decision.explanation
    assert (ex.strategy, ex.agents, ex.eligible, ex.chosen, ex.complete) == ("spread", 5, 3, "a", True)
    # the fitting agents best first, then the rejected ones by id, each with its reason
    assert [(c.agent_id, c.score) for c in ex.candidates[:2]] == [("a", pytest.approx(0.7 * 20 + 0.3 * 10)),
                                                                  ("c", pytest.approx(0.7 * 40 + 0.3 * 10))]
    assert [(c.agent_id, c.rejected) for c in ex.candidates[2:]] == [
        ("b", "needs 1 CPUs, 0.5 free; needs 256 MB memory, 192 MB free"),
        ("d", "runtime 'process' not supported (has vagrant)"),
        ("e", "agent is lost"),
    ]
    assert [(r.code, r.reason, r.count, r.examples) for r in ex.rejections] == [
        ("state", "lost", 1, ["e"]),
        ("runtime", "without runtime 'process'", 1, ["d"]),
        ("cpus", "with fewer than 1 CPUs free", 1, ["b"]),
        ("memory_mb", "with less than 256 MB memory free", 1, ["b"]),
    ]
    assert ex.decided_at == NOW


def test_binpack_explains_what_each_candidate_would_have_left() -> None:
    decision = place([agent("a", allocated=Usage(cpus=1, memory_mb=1000)), agent("b")], ask(strategy="binpack"), NOW)
    assert isinstance(decision, Placement)
    assert [(c.agent_id, c.free_cpus_after, c.free_memory_mb_after) for c in decision.explanation.candidates] == [
        ("a", 2, 8192 - 1000 - 256), ("b", 3, 8192 - 256)]


def large_snapshot() -> list[AgentSnapshot]:
    """1,000 agents: 100 suspect, 50 lost, 150 live without the runtime, and of the 700 with it, 200 with one CPU
    free (of which 40 also with 100 MB memory free), 60 more with 100 MB memory free, 440 that fit."""
    agents = []
    for i in range(1000):
        aid = f"agent-{i:04d}"
        if i < 100:
            agents.append(agent(aid, state="suspect"))
        elif i < 150:
            agents.append(agent(aid, state="lost"))
        elif i < 300:
            agents.append(agent(aid, runtimes=("vagrant",)))
        elif i < 500:
            memory = 8192 - 100 if i < 340 else 0
            agents.append(agent(aid, cpu=0, allocated=Usage(cpus=3 + (i % 7) / 10, memory_mb=memory)))
        elif i < 560:
            agents.append(agent(aid, cpu=0, allocated=Usage(memory_mb=8192 - 100)))
        else:
            agents.append(agent(aid, cpu=10 + i / 1000))
    return agents


def test_a_large_snapshot_explains_the_best_few_and_counts_every_rejection() -> None:
    decision = place(large_snapshot()[::-1], ask(cpus=2, memory_mb=512), NOW)
    assert isinstance(decision, Placement)
    ex = decision.explanation
    assert (ex.agents, ex.eligible, ex.chosen, ex.complete) == (1000, 700, "agent-0560", False)
    # the chosen agent and the next ten, best first
    assert [c.agent_id for c in ex.candidates] == [f"agent-{i:04d}" for i in range(560, 571)]
    assert all(c.rejected is None and c.score is not None for c in ex.candidates)
    # every rejection counted once per reason, with the agents shortest of the resource as examples
    assert [(r.code, r.count) for r in ex.rejections] == [("state", 50), ("state", 100), ("runtime", 150),
                                                          ("cpus", 200), ("memory_mb", 100)]
    by_code = {(r.code, r.reason): r.examples for r in ex.rejections}
    assert by_code[("state", "lost")] == ["agent-0100", "agent-0101", "agent-0102"]
    assert by_code[("runtime", "without runtime 'process'")] == ["agent-0150", "agent-0151", "agent-0152"]
    assert by_code[("cpus", "with fewer than 2 CPUs free")] == ["agent-0300", "agent-0307", "agent-0314"]  # 0.4 free
    assert by_code[("memory_mb", "with less than 512 MB memory free")] == ["agent-0300", "agent-0301", "agent-0302"]


def test_when_nothing_fits_the_reason_summarises_rather_than_lists() -> None:
    agents = [agent(f"agent-{i:04d}", allocated=Usage(cpus=3)) for i in range(1200)]
    decision = place(agents, ask(cpus=2), NOW)
    assert isinstance(decision, NoPlacement)
    assert decision.reason.startswith("no agent fits the request (runtime 'process', 2 CPUs, 256 MB memory)")
    assert "1,200 with fewer than 2 CPUs free (e.g. agent-0000, agent-0001, agent-0002)" in decision.reason
    assert len(decision.reason) < 400
    assert decision.explanation.candidates == [] and decision.explanation.chosen is None


@pytest.mark.parametrize(
    "agents, start",
    [([], "no live agent: none has reported metrics"),
     ([agent("a", state="lost"), agent("b", state="suspect")], "no live agent: every known agent (2)")],
    ids=["empty", "all-down"],
)
def test_no_live_agent_is_a_reasoned_refusal(agents: list[AgentSnapshot], start: str) -> None:
    decision = place(agents, SMALL, NOW)
    assert isinstance(decision, NoPlacement)
    assert decision.reason.startswith(start)
    assert len(decision.explanation.candidates) == len(agents)
