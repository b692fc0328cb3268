"""What the agent's `/metrics` shows beside the HTTP metrics: its load and deployments, read at each scrape from
the latest metrics message it published (the same numbers the controller places by; nothing measured again, so
a scrape never disturbs the CPU sample of the next message).

- `miaas_agent_cpu_percent`, `miaas_agent_memory_percent`, `miaas_agent_disk_percent`{agent}
- `miaas_agent_capacity_cpus`, `miaas_agent_capacity_memory_mb`{agent}
- `miaas_agent_gpu_utilization_percent`, `miaas_agent_gpu_memory_used_mb`, `miaas_agent_gpu_memory_total_mb`
  {agent,gpu}
- `miaas_agent_deployments`{agent,state}: the deployments it holds, every state listed (0 included)
- `miaas_agent_deployment_restarts`{agent}: restarts in place of the deployments it holds, summed
- `miaas_agent_metrics_published_total`{agent}: metrics messages sent on the bus

Nothing but the published count appears before the first message (the agent has no credential yet).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.metrics_core import Metric

from agent.metrics import MetricsPublisher
from miaas.metrics import ServiceMetrics, counter, gauge
from miaas.schemas import DeploymentStatus


def install(metrics: ServiceMetrics, agent_id: str, publisher: Callable[[], MetricsPublisher | None]) -> None:
    """Add the agent's metrics to its app's registry; `publisher()` is the running publisher, if any yet."""
    metrics.collect_with("agent", lambda: agent_families(agent_id, publisher()))


def agent_families(agent_id: str, publisher: MetricsPublisher | None) -> Iterable[Metric]:
    a = (agent_id,)
    yield counter("miaas_agent_metrics_published", "Metrics messages the agent published on the bus", ["agent"],
                  {a: publisher.published if publisher is not None else 0})
    last = publisher.last if publisher is not None else None
    if last is None:
        return
    load, capacity = last.load, last.capacity
    yield gauge("miaas_agent_cpu_percent", "CPU in use on the agent's host, percent", ["agent"],
                {a: load.cpu_percent})
    yield gauge("miaas_agent_memory_percent", "Memory in use on the agent's host, percent", ["agent"],
                {a: load.memory_percent})
    yield gauge("miaas_agent_disk_percent", "Disk in use where the agent keeps its state, percent", ["agent"],
                {a: load.disk_percent})
    yield gauge("miaas_agent_capacity_cpus", "CPUs the agent offers", ["agent"], {a: capacity.cpus})
    yield gauge("miaas_agent_capacity_memory_mb", "Memory the agent offers, MB", ["agent"], {a: capacity.memory_mb})
    gpus = {(agent_id, str(g.index)): g for g in load.gpus}
    yield gauge("miaas_agent_gpu_utilization_percent", "GPU utilisation, percent", ["agent", "gpu"],
                {k: g.utilization_percent for k, g in gpus.items()})
    yield gauge("miaas_agent_gpu_memory_used_mb", "GPU memory in use, MB", ["agent", "gpu"],
                {k: g.memory_used_mb for k, g in gpus.items()})
    yield gauge("miaas_agent_gpu_memory_total_mb", "GPU memory, MB", ["agent", "gpu"],
                {k: g.memory_total_mb for k, g in gpus.items()})
    states: dict[tuple[str, ...], float] = {(agent_id, s.value): 0 for s in DeploymentStatus}
    for d in last.deployments:
        states[agent_id, d.status.value] += 1
    yield gauge("miaas_agent_deployments", "Deployments the agent holds, by state", ["agent", "state"], states)
    yield gauge("miaas_agent_deployment_restarts", "Restarts in place of the deployments the agent holds, summed",
                ["agent"], {a: sum(d.restarts for d in last.deployments)})
