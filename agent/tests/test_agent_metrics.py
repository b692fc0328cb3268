"""Metrics: a valid AgentMetrics from psutil, GPUs from NVML when it works and none when it does not."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pynvml
import pytest

from agent.metrics import GpuProbe, MetricsCollector, MetricsPublisher
from miaas.bus import SYSTEM_METRICS, MemoryBus
from miaas.schemas import AgentMetrics, DeploymentReport, DeploymentStatus


def collector(tmp_path: Path, extra: float = 0.0, gpus: GpuProbe | None = None) -> MetricsCollector:
    return MetricsCollector(
        agent_id="agent-m", runtimes=["process"], disk_path=tmp_path / "not-yet-created",
        interval_s=2.0, extra_load_percent=extra, gpus=gpus,
    )


def test_a_collected_message_is_valid_agent_metrics(tmp_path: Path) -> None:
    report = DeploymentReport(deployment_id="d1", status=DeploymentStatus.RUNNING, url="http://h:20000")
    message = collector(tmp_path).collect("http://agent:8600", [report])
    again = AgentMetrics.model_validate_json(message.model_dump_json())
    assert again.agent_id == "agent-m"
    assert again.url == "http://agent:8600"
    assert again.runtimes == ["process"]
    assert again.capacity.cpus >= 1
    assert again.capacity.memory_mb > 0
    assert again.capacity.disk_mb > 0
    assert again.deployments == [report]
    assert again.interval_s == 2.0
    assert again.sent_at.tzinfo is not None
    assert isinstance(again.load.gpus, list)
    assert again.capacity.gpus == len(again.load.gpus)


def test_extra_load_raises_cpu_and_memory_and_is_capped_at_100(tmp_path: Path) -> None:
    some = collector(tmp_path, extra=40).collect("http://a:1", []).load
    assert some.cpu_percent >= 40
    assert some.memory_percent >= 40
    full = collector(tmp_path, extra=100).collect("http://a:1", []).load
    assert (full.cpu_percent, full.memory_percent) == (100.0, 100.0)


def test_no_nvml_library_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    assert GpuProbe().read() == []


def fake_nvml(**overrides: Any) -> types.SimpleNamespace:
    """NVML as pynvml exposes it, for two GPUs (the driver is an edge we do not own)."""
    calls = {"init": 0}

    def init() -> None:
        calls["init"] += 1

    nvml = types.SimpleNamespace(
        calls=calls,
        nvmlInit=init,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: b"Fake H100" if h == 0 else "Fake A100",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=[35, 0][h]),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=1024 * 1024 * 1024 * (h + 1),
                                                                total=80 * 1024 * 1024 * 1024),
    )
    for name, value in overrides.items():
        setattr(nvml, name, value)
    return nvml


def raise_nvml(*_: Any) -> None:
    raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)


def test_gpus_are_read_through_nvml_initialised_once() -> None:
    nvml = fake_nvml()
    probe = GpuProbe(lambda: nvml)  # type: ignore[arg-type, return-value]
    gpus = probe.read()
    probe.read()
    assert nvml.calls["init"] == 1
    assert [(g.index, g.name, g.utilization_percent, g.memory_used_mb, g.memory_total_mb) for g in gpus] == [
        (0, "Fake H100", 35.0, 1024.0, 81920.0),
        (1, "Fake A100", 0.0, 2048.0, 81920.0),
    ]


@pytest.mark.parametrize("broken", ["nvmlInit", "nvmlDeviceGetCount", "nvmlDeviceGetMemoryInfo"])
def test_any_nvml_failure_means_no_gpus_never_a_crash(tmp_path: Path, broken: str) -> None:
    nvml = fake_nvml(**{broken: raise_nvml})
    probe = GpuProbe(lambda: nvml)  # type: ignore[arg-type, return-value]
    assert probe.read() == []
    assert collector(tmp_path, gpus=probe).collect("http://a:1", []).load.gpus == []


def test_the_publisher_sends_at_once_then_every_interval_until_stopped(tmp_path: Path, eventually) -> None:  # type: ignore[no-untyped-def]
    bus = MemoryBus()
    slow = collector(tmp_path)
    slow.interval_s = 3600.0  # only the first, immediate message can arrive
    publisher = MetricsPublisher(bus, slow, "http://agent:1", lambda: []).start()
    eventually(lambda: bus.on(SYSTEM_METRICS), 10, "the first metrics message")
    publisher.stop()
    assert [k for t, k, _ in bus.messages if t == SYSTEM_METRICS] == ["agent-m"]

    fast = collector(tmp_path)
    fast.interval_s = 0.01
    publisher = MetricsPublisher(bus, fast, "http://agent:1", lambda: []).start()
    eventually(lambda: len(bus.on(SYSTEM_METRICS)) >= 4, 10, "several metrics messages")
    publisher.stop()
    sent = len(bus.on(SYSTEM_METRICS))
    assert publisher.published == sent - 1


def test_the_capacity_offered_can_be_smaller_than_the_machine(tmp_path: Path) -> None:
    # given an agent that offers 1.5 CPUs and 1 GB (AGENT_CAPACITY_CPUS, AGENT_CAPACITY_MEMORY_MB)
    collector = MetricsCollector(agent_id="agent-m", runtimes=["process"], disk_path=tmp_path, interval_s=2.0,
                                 capacity_cpus=1.5, capacity_memory_mb=1024, gpus=GpuProbe(lambda: None))  # type: ignore[arg-type, return-value]
    # then its metrics report that, not the machine's
    capacity = collector.collect("http://a", []).capacity
    assert (capacity.cpus, capacity.memory_mb) == (1.5, 1024)
