"""The agent's /metrics: its load, GPUs and deployments by state, from the latest metrics message it published."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from agent.app import parts
from agent.metrics import GpuProbe
from agent.settings import AgentSettings
from miaas.bus import SYSTEM_METRICS, MemoryBus
from miaas.identity import CONTROLLER
from miaas.schemas import AgentMetrics
from miaas.testing import Pki

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
GIB = 1024 ** 3


def scrape(app: Flask, pki: Pki) -> Samples:
    resp = pki.client(app, CONTROLLER).get("/metrics")
    assert resp.status_code == 200, resp.json
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def two_gpus() -> GpuProbe:
    """NVML as pynvml exposes it, for two GPUs (the driver is an edge we do not own)."""
    nvml = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetName=lambda h: f"Fake GPU {h}",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=[35, 0][h]),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=GIB * (h + 1), total=80 * GIB))
    return GpuProbe(lambda: nvml)  # type: ignore[arg-type, return-value]


def test_the_agents_load_gpus_and_deployments_are_its_latest_published_message(
        make_agent: Callable[..., Flask], settings: AgentSettings, store: Any, pki: Pki, eventually: Any) -> None:
    # given an agent with two GPUs that has not published yet: only the published count shows
    bus = MemoryBus()
    app = make_agent(settings, bus, gpus=two_gpus())
    agent_id = settings.agent_id
    first = scrape(app, pki)
    assert value(first, "miaas_agent_metrics_published_total", agent=agent_id) == 0
    assert value(first, "miaas_agent_cpu_percent", agent=agent_id) is None
    # when it starts publishing and a deployment fails its setup
    parts(app).start_metrics("http://127.0.0.1:8600")
    store.add("unready", setup=["ls /no/such/folder"])
    created = pki.client(app, CONTROLLER).post("/create-vm", json={"deployment_id": "dep-m", "model_id": "unready",
                                                                    "version": 1})
    assert created.status_code < 300, created.json

    def failed_counted() -> Samples | None:
        samples = scrape(app, pki)
        return samples if value(samples, "miaas_agent_deployments", agent=agent_id, state="failed") == 1 else None

    samples = eventually(failed_counted, 60, "the failed deployment in /metrics")
    # then the numbers are those of the latest message on the bus
    published = [m for m in bus.on(SYSTEM_METRICS) if isinstance(m, AgentMetrics)]
    assert published and (value(samples, "miaas_agent_metrics_published_total", agent=agent_id) or 0) >= 1
    # (it publishes every 0.2 s: the scrape read one of the messages sent so far, not necessarily the latest now)
    assert value(samples, "miaas_agent_memory_percent", agent=agent_id) in {m.load.memory_percent for m in published}
    assert value(samples, "miaas_agent_capacity_cpus", agent=agent_id) == published[-1].capacity.cpus
    assert value(samples, "miaas_agent_gpu_utilization_percent", agent=agent_id, gpu="0") == 35
    assert value(samples, "miaas_agent_gpu_memory_used_mb", agent=agent_id, gpu="1") == 2048
    assert value(samples, "miaas_agent_gpu_memory_total_mb", agent=agent_id, gpu="1") == 80 * 1024
    # and every state is listed, 0 included
    assert value(samples, "miaas_agent_deployments", agent=agent_id, state="running") == 0
