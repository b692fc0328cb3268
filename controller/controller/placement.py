"""Placement: choose the agent for one deployment. Pure: a snapshot and a request in, a decision out.

Filters reject agents that are not alive, lack the runtime, or cannot fit the resources still free after
the deployments already allocated to them. Among the rest the least loaded wins, where load is the seed's
`0.7·cpu% + 0.3·mem%` plus the share of capacity reserved by deployments still in flight (not yet visible
in the agent's own metrics), so concurrent deploys spread instead of piling onto one agent. Ties go to the
smallest agent id. Every candidate is explained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from miaas.schemas import CandidateExplanation, Resources

CPU_WEIGHT = 0.7
MEM_WEIGHT = 0.3


@dataclass(frozen=True)
class Usage:
    """Resources summed over deployments (zero allowed, unlike a request)."""

    cpus: float = 0.0
    memory_mb: float = 0.0
    gpus: int = 0


@dataclass(frozen=True)
class AgentSnapshot:
    """What placement knows of one agent at one instant."""

    agent_id: str
    state: str
    runtimes: tuple[str, ...]
    cpus: float
    memory_mb: float
    gpus: int
    cpu_percent: float
    memory_percent: float
    allocated: Usage = field(default_factory=Usage)
    in_flight: Usage = field(default_factory=Usage)


@dataclass(frozen=True)
class PlacementRequest:
    resources: Resources
    runtime: str


@dataclass(frozen=True)
class Placement:
    agent_id: str
    score: float
    explanation: tuple[CandidateExplanation, ...]


@dataclass(frozen=True)
class NoPlacement:
    reason: str
    explanation: tuple[CandidateExplanation, ...]


def score(agent: AgentSnapshot) -> float:
    """Load of an agent in percent-points, counting in-flight reservations as used."""
    cpu = agent.cpu_percent + 100.0 * agent.in_flight.cpus / agent.cpus
    mem = agent.memory_percent + 100.0 * agent.in_flight.memory_mb / max(agent.memory_mb, 1.0)
    return round(CPU_WEIGHT * cpu + MEM_WEIGHT * mem, 6)


def rejection(agent: AgentSnapshot, request: PlacementRequest) -> str | None:
    """Why an agent cannot take the request, or None when it can."""
    if agent.state != "alive":
        return f"agent is {agent.state}"
    if request.runtime not in agent.runtimes:
        return f"runtime '{request.runtime}' not supported (has {', '.join(agent.runtimes) or 'none'})"
    need, used = request.resources, agent.allocated
    free_cpus = agent.cpus - used.cpus
    if need.cpus > free_cpus + 1e-9:
        return f"needs {need.cpus:g} CPUs, {max(free_cpus, 0):g} free"
    free_mem = agent.memory_mb - used.memory_mb
    if need.memory_mb > free_mem:
        return f"needs {need.memory_mb} MB memory, {max(free_mem, 0):.0f} MB free"
    free_gpus = agent.gpus - used.gpus
    if need.gpus > 0 and need.gpus > free_gpus:
        return f"needs {need.gpus} GPUs, {max(free_gpus, 0)} free"
    return None


def place(snapshot: Sequence[AgentSnapshot], request: PlacementRequest) -> Placement | NoPlacement:
    """Pick the least-loaded agent that can take the request, or say why none can."""
    explained: list[CandidateExplanation] = []
    best: tuple[float, str] | None = None
    for agent in sorted(snapshot, key=lambda a: a.agent_id):
        why = rejection(agent, request)
        if why is not None:
            explained.append(CandidateExplanation(agent_id=agent.agent_id, rejected=why))
            continue
        s = score(agent)
        explained.append(CandidateExplanation(agent_id=agent.agent_id, score=s))
        if best is None or (s, agent.agent_id) < best:
            best = (s, agent.agent_id)
    if best is None:
        if not snapshot:
            return NoPlacement("no live agent: none has reported metrics", tuple(explained))
        if all(a.state != "alive" for a in snapshot):
            return NoPlacement("no live agent: every known agent is suspect or lost", tuple(explained))
        reasons = "; ".join(f"{e.agent_id}: {e.rejected}" for e in explained)
        return NoPlacement(f"no agent fits the request ({reasons})", tuple(explained))
    return Placement(best[1], best[0], tuple(explained))
