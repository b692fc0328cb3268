"""Placement speed at 1k, 10k and 100k agents on one core. Prints the figures; never fails.

What it measures:
- hot path: a caller keeps one `PlacementIndex`, and a deploy is `index.place(request, now)` then
  `index.reserve(agent, request)` (the new deployment counts as allocated and in flight). decisions/s, p50 and
  p99 are of that pair (decisions/s = decisions / time spent in them). To keep the cluster at a steady fill,
  the deployment placed 1,000 decisions earlier then stops: `index.update` gives its agent's reservation back,
  timed on its own ("update").
- full rebuild: `place(snapshot, request, now)`, which builds an index for one decision and throws it away. This
  is what the controller's reconcile pass calls today, once per queued deployment; keeping one index for the
  pass (`reserve` instead of rebuilding) turns its decisions into the hot path.
- build: `PlacementIndex(snapshot)` alone, and with the first decision (which sorts the columns it needs).

Goal (issue 4): at 10k agents >= 20,000 decisions/s and p99 <= 1 ms on the hot path.
Run: .venv/bin/python bench/placement.py [--seconds 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import deque
from dataclasses import replace
from datetime import UTC, datetime

from controller.placement import AgentSnapshot, Placement, PlacementIndex, PlacementRequest, Usage, place
from miaas.schemas import Resources, Strategy

NOW = datetime(2025, 1, 1, tzinfo=UTC)
IN_FLIGHT = 1_000  # deployments placed and not yet stopped, in the hot path
SIZES = (1_000, 10_000, 100_000)


def snapshot(n: int, rnd: random.Random) -> list[AgentSnapshot]:
    """A cluster: 90% alive, a quarter with vagrant too, mixed sizes, some GPUs, some allocations already."""
    return [
        AgentSnapshot(
            agent_id=f"agent-{i:06d}", state=rnd.choices(["alive", "suspect", "lost"], [90, 5, 5])[0],
            runtimes=("process",) if i % 4 else ("process", "vagrant"), cpus=rnd.choice([4, 8, 16, 32]),
            memory_mb=rnd.choice([8192, 16384, 65536]), gpus=rnd.choice([0, 0, 0, 1]),
            cpu_percent=rnd.uniform(0, 100), memory_percent=rnd.uniform(0, 100),
            allocated=Usage(cpus=rnd.uniform(0, 4), memory_mb=rnd.uniform(0, 4096)),
        )
        for i in range(n)
    ]


def request(strategy: Strategy = "spread") -> PlacementRequest:
    return PlacementRequest(Resources(cpus=1, memory_mb=512, gpus=0), "process", strategy)


def percentiles(latencies: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    latencies.sort()
    return statistics.median(latencies) * 1e3, latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3


def hot_path(n: int, strategy: Strategy, seconds: float) -> str:
    index = PlacementIndex(snapshot(n, random.Random(n)))
    req = request(strategy)
    used = Usage(req.resources.cpus, req.resources.memory_mb, req.resources.gpus)
    placed: deque[str] = deque()
    decide: list[float] = []
    release: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(decide) < 3:
        t0 = time.perf_counter()
        decision = index.place(req, NOW)
        assert isinstance(decision, Placement)  # the cluster never fills: deployments stop as fast as they come
        index.reserve(decision.agent_id, req)
        t1 = time.perf_counter()
        placed.append(decision.agent_id)
        if len(placed) > IN_FLIGHT:
            a = index.agent(placed.popleft())
            index.update(replace(a, allocated=_minus(a.allocated, used), in_flight=_minus(a.in_flight, used)))
        release.append(time.perf_counter() - t1)
        decide.append(t1 - t0)
    rate = len(decide) / sum(decide)
    p50, p99 = percentiles(decide)
    _, update_p99 = percentiles(release)
    return f"{n:>8} {strategy:>8} {len(decide):>10} {rate:>12.0f} {p50:>9.4f} {p99:>9.4f} {update_p99:>12.4f}"


def full_rebuild(n: int, seconds: float) -> str:
    agents = snapshot(n, random.Random(n))
    req = request()
    latencies: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(latencies) < 3:
        t0 = time.perf_counter()
        place(agents, req, NOW)
        latencies.append(time.perf_counter() - t0)
    rate = len(latencies) / (time.perf_counter() - start)
    p50, p99 = percentiles(latencies)
    return f"{n:>8} {len(latencies):>10} {rate:>12.1f} {p50:>9.3f} {p99:>9.3f}"


def build(n: int, repeats: int = 5) -> str:
    agents = snapshot(n, random.Random(n))
    alone, with_first = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        index = PlacementIndex(agents)
        t1 = time.perf_counter()
        index.place(request(), NOW)
        alone.append(t1 - t0)
        with_first.append(time.perf_counter() - t0)
    return f"{n:>8} {statistics.median(alone) * 1e3:>12.1f} {statistics.median(with_first) * 1e3:>18.1f}"


def _minus(total: Usage, part: Usage) -> Usage:
    return Usage(total.cpus - part.cpus, total.memory_mb - part.memory_mb, total.gpus - part.gpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="time spent per row")
    args = parser.parse_args()
    print("hot path: index.place + index.reserve per decision; update: the release of an older deployment")
    print(f"{'agents':>8} {'strategy':>8} {'decisions':>10} {'decisions/s':>12} {'p50 ms':>9} {'p99 ms':>9}"
          f" {'update p99 ms':>12}")
    for n in SIZES:
        for strategy in ("spread", "binpack"):
            print(hot_path(n, strategy, args.seconds), flush=True)
    print("\nfull rebuild: place(snapshot, request, now) per decision (spread)")
    print(f"{'agents':>8} {'decisions':>10} {'decisions/s':>12} {'p50 ms':>9} {'p99 ms':>9}")
    for n in SIZES:
        print(full_rebuild(n, args.seconds), flush=True)
    print("\nbuild: PlacementIndex(snapshot), median of 5")
    print(f"{'agents':>8} {'build ms':>12} {'+ first place ms':>18}")
    for n in SIZES:
        print(build(n), flush=True)
    print("\ngoal at 10k agents on the hot path: >= 20000 decisions/s, p99 <= 1 ms")


if __name__ == "__main__":
    main()
