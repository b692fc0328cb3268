"""Placement speed: decisions/s and p50/p99 latency of `place` at 1k, 10k and 100k agents (one core).

Goal (issue 4): at 10k agents >= 20,000 decisions/s and p99 <= 1 ms. Prints the figures; never fails.
Run: .venv/bin/python bench/placement.py [--seconds 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from controller.placement import AgentSnapshot, PlacementRequest, Usage, place
from miaas.schemas import Resources


def snapshot(n: int, rnd: random.Random) -> list[AgentSnapshot]:
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


def measure(n: int, seconds: float) -> tuple[int, float, float, float]:
    rnd = random.Random(n)
    agents = snapshot(n, rnd)
    request = PlacementRequest(Resources(cpus=1, memory_mb=512, gpus=0), "process")
    latencies: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(latencies) < 3:
        t0 = time.perf_counter()
        place(agents, request)
        latencies.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return len(latencies), len(latencies) / total, statistics.median(latencies), p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0, help="time spent per size")
    args = parser.parse_args()
    print(f"{'agents':>8} {'decisions':>10} {'decisions/s':>12} {'p50 ms':>9} {'p99 ms':>9}")
    for n in (1_000, 10_000, 100_000):
        count, rate, p50, p99 = measure(n, args.seconds)
        print(f"{n:>8} {count:>10} {rate:>12.1f} {p50 * 1e3:>9.3f} {p99 * 1e3:>9.3f}")
    print("goal at 10k agents: >= 20000 decisions/s, p99 <= 1 ms")


if __name__ == "__main__":
    main()
