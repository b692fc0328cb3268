"""The controller's own metrics, read at each scrape of `/metrics` from what it already holds.

- `miaas_deployments{state}`: deployments not yet final (stopped and failed grow without end and are left out),
  from the same store read each reconcile pass makes; every such state is listed, 0 included.
- `miaas_agents{state}`: agents by liveness state (alive, suspect, lost), from the cluster view.
- `miaas_bus_messages_consumed_total{topic}`, `miaas_bus_messages_refused_total{topic,reason}`: what each consumer
  handled and skipped (bad signature, replay, bad JSON... the reasons of `GET /controller/bus`).
- `miaas_bus_broker_answering`, `miaas_liveness_suspended`: 1 or 0.
- `miaas_placement_duration_seconds`: one placement decision (kept by the `Controller`, observed by the reconciler).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.metrics_core import Metric

from controller.reconciler import NOT_FINAL
from controller.service import Controller
from miaas.metrics import ServiceMetrics, counter, gauge
from miaas.schemas import BusStats

AGENT_STATES = ("alive", "suspect", "lost")


def install(metrics: ServiceMetrics, controller: Controller) -> None:
    """Add the controller's metrics to its app's registry."""
    metrics.register(controller.placement_seconds)
    metrics.collect_with("deployments", lambda: [deployments_by_state(controller)])
    metrics.collect_with("agents", lambda: [agents_by_state(controller)])
    metrics.collect_with("bus", lambda: bus_families(controller.bus_stats()))


def deployments_by_state(controller: Controller) -> Metric:
    counts: dict[tuple[str, ...], float] = {(s.value,): 0 for s in NOT_FINAL}
    for r in controller.store.records(NOT_FINAL):
        counts[r.status.value,] += 1
    return gauge("miaas_deployments", "Deployments not yet stopped or failed, by state", ["state"], counts)


def agents_by_state(controller: Controller) -> Metric:
    counts: dict[tuple[str, ...], float] = {(s,): 0 for s in AGENT_STATES}
    for _, state in controller.view.agents(controller.clock()):
        counts[state,] = counts.get((state,), 0) + 1
    return gauge("miaas_agents", "Agents heard since this controller started, by liveness state", ["state"], counts)


def bus_families(stats: BusStats) -> Iterable[Metric]:
    consumed: dict[tuple[str, ...], float] = {}
    refused: dict[tuple[str, ...], float] = {}
    for c in stats.consumers:
        topic = ",".join(c.topics)
        consumed[topic,] = consumed.get((topic,), 0) + c.consumed
        for reason, n in c.skipped_by_reason.items():
            refused[topic, reason] = refused.get((topic, reason), 0) + n
    yield counter("miaas_bus_messages_consumed", "Bus messages handed to the controller, by topic", ["topic"],
                  consumed)
    yield counter("miaas_bus_messages_refused",
                  "Bus messages the controller skipped (unsigned, bad signature, replayed, bad JSON...), by reason",
                  ["topic", "reason"], refused)
    if stats.broker is not None:
        yield gauge("miaas_bus_broker_answering", "1 when the broker answered the controller's latest probe", [],
                    float(stats.broker.answering))
    if stats.liveness is not None:
        yield gauge("miaas_liveness_suspended", "1 while loss decisions are suspended (bus outage, disruption)", [],
                    float(stats.liveness.suspended))
