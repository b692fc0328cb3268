"""Placement: choose the agent for one deployment. Pure: a snapshot and a request in, a decision out.

Filters turn away agents that are not alive, lack the runtime, or cannot fit the request in what is free after the
deployments already allocated to them: CPUs, memory, GPUs, and GPU memory when asked. A strategy ranks the rest:

- `spread` (default): least loaded first. Load is the seed's `0.7·cpu% + 0.3·mem%` plus the share of capacity
  reserved by deployments still in flight (placed, not yet visible in the agent's own metrics), so concurrent
  deploys spread instead of piling onto one agent.
- `binpack`: fill agents up. The fitting agent with the fewest free CPUs left after placing wins, then the one with
  the least free memory left after placing: best fit, which keeps whole agents free for big requests. Every
  candidate gives up the same amount, so this is the order of free CPUs, then free memory, before placing.

Ties go to the smallest agent id, so a decision never depends on the order of the snapshot. Every decision carries
a `PlacementExplanation` (miaas.schemas) whose size does not grow with the cluster.

Speed: a `PlacementIndex` keeps, per runtime, the live agents in sorted columns (by load, by free resources). A
decision walks one column best first and stops once it has the few agents it explains, and it counts rejections by
bisecting the free-resource columns instead of judging every agent. Between decisions one agent changes with
`update` or `reserve`: a bisection and a list insert per column, O(log n) comparisons plus a memmove of pointers
(tens of microseconds at 100k agents). `place()` builds an index for a single decision: the simple pure entry
point, O(n log n).

Glossary: free = capacity minus allocated (deployments on the agent, in flight or running); in flight = placed but
not yet visible in the agent's metrics.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from heapq import heapify, heappop, heapreplace
from itertools import chain
from operator import attrgetter
from typing import Any, get_args

from miaas.schemas import PlacementExplanation, Resources, Strategy

CPU_WEIGHT = 0.7
MEM_WEIGHT = 0.3
CPU_SLACK = 1e-9  # sums of fractional CPUs must not turn away an exact fit
ALIVE = "alive"
STRATEGIES: tuple[str, ...] = get_args(Strategy)
RUNNERS_UP = 10  # agents explained after the chosen one on snapshots too big to list whole
LIST_ALL_UP_TO = 50  # snapshots this small explain every agent
EXAMPLES = 3  # agent ids named per rejection reason


@dataclass(frozen=True)
class Usage:
    """Resources summed over deployments (zero allowed, unlike a request)."""

    cpus: float = 0.0
    memory_mb: float = 0.0
    gpus: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.cpus + other.cpus, self.memory_mb + other.memory_mb, self.gpus + other.gpus)


@dataclass(frozen=True)
class AgentSnapshot:
    """What placement knows of one agent at one instant.

    `gpu_memory_free_mb` is the measured free memory summed over its GPUs; an agent that reports none cannot take a
    request that asks for GPU memory.
    """

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
    gpu_memory_free_mb: float = 0.0


@dataclass(frozen=True)
class PlacementRequest:
    """What one deployment asks of an agent, and how to choose among those that can give it.

    `gpu_memory_mb` is the GPU memory it needs in all (0: not asked), checked against the agent's measured free.
    """

    resources: Resources
    runtime: str
    strategy: Strategy = "spread"
    gpu_memory_mb: float = 0.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown placement strategy '{self.strategy}' (known: {', '.join(STRATEGIES)})")
        if not self.gpu_memory_mb >= 0:
            raise ValueError("gpu_memory_mb must be a number >= 0")


@dataclass(frozen=True)
class Placement:
    """The chosen agent, its load score (whatever the strategy ranked by), and why."""

    agent_id: str
    score: float
    explanation: PlacementExplanation


@dataclass(frozen=True)
class NoPlacement:
    """No agent can take the request: a sentence for a person, and the explanation for a program."""

    reason: str
    explanation: PlacementExplanation


def score(agent: AgentSnapshot) -> float:
    """Load of an agent in percent-points, counting in-flight reservations as used."""
    cpu = agent.cpu_percent + 100.0 * agent.in_flight.cpus / agent.cpus
    mem = agent.memory_percent + 100.0 * agent.in_flight.memory_mb / max(agent.memory_mb, 1.0)
    return round(CPU_WEIGHT * cpu + MEM_WEIGHT * mem, 6)


def place(snapshot: Iterable[AgentSnapshot], request: PlacementRequest, now: datetime) -> Placement | NoPlacement:
    """Pick the agent for `request` on this snapshot, or say why none can take it.

    Builds an index for this one decision; a caller deciding many times on one evolving snapshot keeps a
    `PlacementIndex` instead. `now` only dates the explanation: liveness is already in the snapshot.
    """
    return PlacementIndex(snapshot).place(request, now)


# Live agents are split by free CPUs at these bounds, just below the round numbers requests use, so spread never
# walks an agent of a class that is short of the request: without it, agents fully allocated yet idle would
# gather at the least-loaded end and every decision would walk past them.
_CPU_CLASS_BOUNDS = (0.5 - 1e-6, 1 - 1e-6, 2 - 1e-6, 4 - 1e-6, 8 - 1e-6, 16 - 1e-6)


class _Entry:
    """An agent with the numbers placement compares, computed once per snapshot or update."""

    __slots__ = ("agent", "agent_id", "load", "free_cpus", "free_memory_mb", "free_gpus", "cpu_class")

    def __init__(self, a: AgentSnapshot) -> None:
        self.agent = a
        self.agent_id = a.agent_id
        self.load = score(a)
        self.free_cpus = a.cpus - a.allocated.cpus
        self.free_memory_mb = a.memory_mb - a.allocated.memory_mb
        self.free_gpus = a.gpus - a.allocated.gpus
        self.cpu_class = bisect_right(_CPU_CLASS_BOUNDS, self.free_cpus)


@dataclass(frozen=True, slots=True)
class _Need:
    """A request as the least free amounts an agent must have; the one definition of "fits"."""

    cpus: float
    memory_mb: float
    gpus: int
    gpu_memory_mb: float

    @classmethod
    def of(cls, request: PlacementRequest) -> _Need:
        r = request.resources
        return cls(r.cpus - CPU_SLACK, r.memory_mb, r.gpus, request.gpu_memory_mb)

    def fits(self, e: _Entry) -> bool:
        return (
            e.free_cpus >= self.cpus
            and e.free_memory_mb >= self.memory_mb
            and (self.gpus == 0 or e.free_gpus >= self.gpus)
            and (self.gpu_memory_mb == 0 or e.agent.gpu_memory_free_mb >= self.gpu_memory_mb)
        )


# A column holds one row per entry of a group, sorted: the values it orders by, then the agent id (the tie-break).
# Rows of plain numbers and strings are cheap to compare, and the garbage collector stops tracking them.
_Row = tuple[Any, ...]
_COLUMNS: dict[str, tuple[str, ...]] = {
    "free": ("free_cpus", "free_memory_mb"),
    "cpus": ("free_cpus",),
    "memory_mb": ("free_memory_mb",),
    "gpus": ("free_gpus",),
    "gpu_memory_mb": ("agent.gpu_memory_free_mb",),
    "load": ("load",),
}
_KEYS: dict[str, Callable[[_Entry], _Row]] = {
    name: attrgetter(*values, "agent_id") for name, values in _COLUMNS.items()
}
_ID: Callable[[_Entry], str] = attrgetter("agent_id")


class _Group:
    """The live agents offering one runtime, with columns sorted on first use and kept sorted through updates.

    Sorting lazily means a one-shot `place()` pays only for the columns its request needs (no GPU columns for a
    request without GPUs). Spread's load column is kept per CPU class (see `_CPU_CLASS_BOUNDS`).
    """

    __slots__ = ("entries", "_columns", "_load", "_in_id_order")

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}  # filled in id order when the index is built
        self._columns: dict[str, list[_Row]] = {}
        self._load: list[list[_Row]] | None = None
        self._in_id_order = True

    def column(self, name: str) -> list[_Row]:
        col = self._columns.get(name)
        if col is None:
            col = self._columns[name] = _rows(self._by_id(), _COLUMNS[name])
        return col

    def load_columns(self) -> list[list[_Row]]:
        """Spread's load column, one per CPU class, by class."""
        if self._load is None:
            classes: list[list[_Entry]] = [[] for _ in range(len(_CPU_CLASS_BOUNDS) + 1)]
            for e in self._by_id():
                classes[e.cpu_class].append(e)
            self._load = [_rows(members, _COLUMNS["load"]) for members in classes]
        return self._load

    def _by_id(self) -> list[_Entry]:
        return list(self.entries.values()) if self._in_id_order else sorted(self.entries.values(), key=_ID)

    def add(self, e: _Entry) -> None:
        self.entries[e.agent_id] = e
        self._in_id_order = False
        for name, col in self._columns.items():
            insort(col, _KEYS[name](e))
        if self._load is not None:
            insort(self._load[e.cpu_class], _KEYS["load"](e))

    def discard(self, agent_id: str) -> None:
        e = self.entries.pop(agent_id)
        for name, col in self._columns.items():
            del col[bisect_left(col, _KEYS[name](e))]
        if self._load is not None:
            col = self._load[e.cpu_class]
            del col[bisect_left(col, _KEYS["load"](e))]


def _rows(by_id: list[_Entry], values: tuple[str, ...]) -> list[_Row]:
    """The sorted rows of entries given in id order.

    Stable sorts on plain numbers, the last value first, keep ties in id order and beat sorting tuples; the rows
    are then zipped together in C.
    """
    for value in reversed(values):
        by_id = sorted(by_id, key=attrgetter(value))
    return list(zip(*(map(attrgetter(value), by_id) for value in values), map(_ID, by_id), strict=True))


class PlacementIndex:
    """A snapshot arranged for fast decisions; `update`, `reserve` and `remove` keep it current agent by agent.

    Deciding never changes what the index holds (only which columns are sorted yet), so `place` is a pure function
    of the agents it was given and updated with.
    """

    def __init__(self, snapshot: Iterable[AgentSnapshot]) -> None:
        self._entries: dict[str, _Entry] = {}
        self._down: dict[str, list[str]] = {}  # state -> sorted ids of the agents in it, for every state but alive
        self._live_by_runtimes: dict[tuple[str, ...], list[str]] = {}  # runtime set -> sorted ids of live agents
        self._groups: dict[str, _Group] = {}  # runtime -> live agents offering it
        # runtime asked -> rejections for state and runtime; they change only when an agent joins, leaves,
        # or changes state or runtimes, far less often than its numbers.
        self._membership: dict[str, list[dict[str, Any]]] = {}
        entries = self._entries
        groups_of: dict[tuple[str, ...], tuple[list[str], list[dict[str, _Entry]]]] = {}  # by `runtimes` as given
        # Agents in id order fill every id list and group in order: no insert, no sort of their own.
        for a in sorted(snapshot, key=attrgetter("agent_id")):
            agent_id = a.agent_id
            if agent_id in entries:
                raise ValueError(f"agent '{agent_id}' appears twice in the snapshot")
            e = entries[agent_id] = _Entry(a)
            if a.state != ALIVE:
                self._down.setdefault(a.state, []).append(agent_id)
                continue
            found = groups_of.get(a.runtimes)
            if found is None:
                found = groups_of[a.runtimes] = (
                    self._live_by_runtimes.setdefault(_runtime_set(a), []),
                    [self._groups.setdefault(runtime, _Group()).entries for runtime in set(a.runtimes)],
                )
            found[0].append(agent_id)
            for members in found[1]:
                members[agent_id] = e

    # ------------------------------------------------------------------ keeping it current

    def agent(self, agent_id: str) -> AgentSnapshot:
        """What the index holds of one agent now, to derive its next snapshot from."""
        return self._entries[agent_id].agent

    def update(self, agent: AgentSnapshot) -> None:
        """Replace what the index knows of one agent (or add a new one)."""
        old = self._entries.get(agent.agent_id)
        if old is not None and old.agent.state == agent.state and old.agent.runtimes == agent.runtimes:
            # Only its numbers changed (a metrics report, a reservation): move its keys, nothing else.
            e = self._entries[agent.agent_id] = _Entry(agent)
            if agent.state == ALIVE:
                for runtime in set(agent.runtimes):
                    group = self._groups[runtime]
                    group.discard(agent.agent_id)
                    group.add(e)
            return
        if old is not None:
            self.remove(agent.agent_id)
        e = self._entries[agent.agent_id] = _Entry(agent)
        self._membership.clear()
        if agent.state != ALIVE:
            insort(self._down.setdefault(agent.state, []), agent.agent_id)
            return
        insort(self._live_by_runtimes.setdefault(_runtime_set(agent), []), agent.agent_id)
        for runtime in set(agent.runtimes):
            self._groups.setdefault(runtime, _Group()).add(e)

    def remove(self, agent_id: str) -> None:
        """Forget one agent."""
        a = self._entries.pop(agent_id).agent
        self._membership.clear()
        if a.state != ALIVE:
            _discard_id(self._down, a.state, agent_id)
            return
        _discard_id(self._live_by_runtimes, _runtime_set(a), agent_id)
        for runtime in set(a.runtimes):
            self._groups[runtime].discard(agent_id)

    def reserve(self, agent_id: str, request: PlacementRequest) -> None:
        """Count a deployment just placed on an agent as allocated and in flight, as the next snapshot will.

        Its GPU memory leaves the measured free amount too: no in-flight figure exists for it.
        """
        a = self._entries[agent_id].agent
        r = request.resources
        used = Usage(r.cpus, r.memory_mb, r.gpus)
        self.update(replace(a, allocated=a.allocated + used, in_flight=a.in_flight + used,
                            gpu_memory_free_mb=a.gpu_memory_free_mb - request.gpu_memory_mb))

    # ------------------------------------------------------------------ deciding

    def place(self, request: PlacementRequest, now: datetime) -> Placement | NoPlacement:
        """Pick the agent for `request`, or say why none can take it; every decision carries its explanation."""
        need = _Need.of(request)
        group = self._groups.get(request.runtime)
        complete = len(self._entries) <= LIST_ALL_UP_TO
        fits = self._best(group, request, need, None if complete else RUNNERS_UP + 1) if group else []
        candidates = [_explain_fit(e, request) for e in fits]
        if complete:
            chosen = {e.agent_id for e in fits}
            candidates += [
                {"agent_id": agent_id, "rejected": _rejection(self._entries[agent_id], request)}
                for agent_id in sorted(self._entries.keys() - chosen)
            ]
        rejections = self._rejections(group, request, need)
        explanation = PlacementExplanation.model_validate({
            "strategy": request.strategy, "agents": len(self._entries),
            "eligible": len(group.entries) if group else 0, "chosen": fits[0].agent_id if fits else None,
            "candidates": candidates, "complete": complete, "rejections": rejections, "decided_at": now,
        })
        if not fits:
            return NoPlacement(self._refusal(request, rejections), explanation)
        return Placement(fits[0].agent_id, fits[0].load, explanation)

    @staticmethod
    def _best(group: _Group, request: PlacementRequest, need: _Need, limit: int | None) -> list[_Entry]:
        """The first `limit` fitting agents (all when None), best first, from a walk in the strategy's order.

        Binpack walks the free column from the first agent with enough free CPUs, found by bisection. Spread merges
        the load columns of the CPU classes that can hold the request. Either walk is as long as the run of agents
        it meets that have the CPUs but miss memory or GPUs: short unless nearly every such agent is full.
        """
        entries, fits = group.entries, []
        if request.strategy == "binpack":
            col = group.column("free")
            for i in range(bisect_left(col, (need.cpus,)), len(col)):  # by index: islice would step over the rest
                e = entries[col[i][-1]]
                if need.fits(e):
                    fits.append(e)
                    if len(fits) == limit:
                        break
            return fits
        # Classes with an upper bound at or below the CPUs asked hold no agent that fits: skip them whole.
        classes = group.load_columns()[bisect_right(_CPU_CLASS_BOUNDS, need.cpus):]
        heap = [(col[0], 0, col) for col in classes if col]  # rows are unique, so the heap never compares the rest
        heapify(heap)
        while heap:
            row, i, col = heap[0]
            e = entries[row[-1]]
            if need.fits(e):
                fits.append(e)
                if len(fits) == limit:
                    break
            if i + 1 < len(col):
                heapreplace(heap, (col[i + 1], i + 1, col))
            else:
                heappop(heap)
        return fits

    def _rejections(self, group: _Group | None, request: PlacementRequest, need: _Need) -> list[dict[str, Any]]:
        """Every reason agents were turned away, with counts and examples, from list sizes and bisections."""
        out = list(self._membership_rejections(request.runtime))
        if group is None:
            return out
        r = request.resources
        checks = [("cpus", "cpus", need.cpus, f"with fewer than {r.cpus:g} CPUs free"),
                  ("memory_mb", "memory_mb", need.memory_mb, f"with less than {r.memory_mb} MB memory free")]
        if need.gpus:
            checks.append(("gpus", "gpus", need.gpus, f"with fewer than {r.gpus} GPUs free"))
        if need.gpu_memory_mb:
            checks.append(("gpu_memory_mb", "gpu_memory_mb", need.gpu_memory_mb,
                           f"with less than {need.gpu_memory_mb:g} MB GPU memory free"))
        for code, column, least, reason in checks:
            col = group.column(column)
            # Keys below (least,) are exactly the agents with less than `least` free: the shortest come first.
            if count := bisect_left(col, (least,)):
                out.append({"code": code, "reason": reason, "count": count,
                            "examples": [row[-1] for row in col[:min(count, EXAMPLES)]]})
        return out

    def _membership_rejections(self, runtime: str) -> list[dict[str, Any]]:
        """Agents turned away for their state, then live ones for lacking the runtime (cached until one changes)."""
        cached = self._membership.get(runtime)
        if cached is not None:
            return cached
        out: list[dict[str, Any]] = [
            {"code": "state", "reason": state, "count": len(ids), "examples": ids[:EXAMPLES]}
            for state, ids in sorted(self._down.items())
        ]
        lacking = [ids for runtimes, ids in self._live_by_runtimes.items() if runtime not in runtimes]
        if count := sum(map(len, lacking)):
            examples = sorted(chain.from_iterable(ids[:EXAMPLES] for ids in lacking))[:EXAMPLES]
            out.append({"code": "runtime", "reason": f"without runtime '{runtime}'", "count": count,
                        "examples": examples})
        self._membership[runtime] = out
        return out

    def _refusal(self, request: PlacementRequest, rejections: list[dict[str, Any]]) -> str:
        """Why no agent can take the request, summarised by reason rather than listed agent by agent."""
        if not self._entries:
            return "no live agent: none has reported metrics"
        if not self._live_by_runtimes:
            return f"no live agent: every known agent ({len(self._entries):,}) is suspect or lost"
        parts = "; ".join(
            f"{r['count']:,} {r['reason']} (e.g. {', '.join(r['examples'])})" for r in rejections
        )
        return (f"no agent fits the request ({_describe(request)}) among {len(self._entries):,} agents: {parts}"
                " — an agent short of several resources counts under each")


def _explain_fit(e: _Entry, request: PlacementRequest) -> dict[str, Any]:
    """A fitting agent as explained: its load, and for binpack what it would have left, which binpack ranks by."""
    if request.strategy == "spread":
        return {"agent_id": e.agent_id, "score": e.load}
    return {"agent_id": e.agent_id, "score": e.load, "free_cpus_after": e.free_cpus - request.resources.cpus,
            "free_memory_mb_after": e.free_memory_mb - request.resources.memory_mb}


def _rejection(e: _Entry, request: PlacementRequest) -> str:
    """Why one agent cannot take the request: its state, its runtimes, or every resource it is short of."""
    a, need, r = e.agent, _Need.of(request), request.resources
    if a.state != ALIVE:
        return f"agent is {a.state}"
    if request.runtime not in a.runtimes:
        return f"runtime '{request.runtime}' not supported (has {', '.join(a.runtimes) or 'none'})"
    short = []
    if e.free_cpus < need.cpus:
        short.append(f"needs {r.cpus:g} CPUs, {max(e.free_cpus, 0):g} free")
    if e.free_memory_mb < need.memory_mb:
        short.append(f"needs {r.memory_mb} MB memory, {max(e.free_memory_mb, 0):.0f} MB free")
    if need.gpus and e.free_gpus < need.gpus:
        short.append(f"needs {r.gpus} GPUs, {max(e.free_gpus, 0)} free")
    if need.gpu_memory_mb and a.gpu_memory_free_mb < need.gpu_memory_mb:
        short.append(f"needs {need.gpu_memory_mb:g} MB GPU memory, {max(a.gpu_memory_free_mb, 0):.0f} MB free")
    return "; ".join(short)


def _describe(request: PlacementRequest) -> str:
    r = request.resources
    text = f"runtime '{request.runtime}', {r.cpus:g} CPUs, {r.memory_mb} MB memory"
    if r.gpus:
        text += f", {r.gpus} GPUs"
    if request.gpu_memory_mb:
        text += f", {request.gpu_memory_mb:g} MB GPU memory"
    return text


def _runtime_set(agent: AgentSnapshot) -> tuple[str, ...]:
    return tuple(sorted(set(agent.runtimes)))


def _discard_id(lists: dict[Any, list[str]], key: Any, agent_id: str) -> None:
    """Drop an id from one of the sorted id lists, and the list once empty, so only present keys are reported."""
    ids = lists[key]
    del ids[bisect_left(ids, agent_id)]
    if not ids:
        del lists[key]
