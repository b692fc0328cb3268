"""What the agent reports on `system-metrics`: capacity and load from psutil, GPUs from NVML, its deployments."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

from miaas.bus import SYSTEM_METRICS, EventBus
from miaas.schemas import AgentCapacity, AgentLoad, AgentMetrics, DeploymentReport, GpuMetrics

log = logging.getLogger(__name__)
MB = 1024 * 1024


def utcnow() -> datetime:
    return datetime.now(UTC)


def _import_pynvml() -> ModuleType:
    import pynvml

    return pynvml


class GpuProbe:
    """Reads GPUs through NVML, initialised once on first use; any NVML failure means "no GPUs", never a crash."""

    def __init__(self, load_nvml: Callable[[], ModuleType] = _import_pynvml) -> None:
        self._load_nvml = load_nvml
        self._nvml: Any = None
        self._tried = False
        self._lock = threading.Lock()

    def _init(self) -> Any:
        if not self._tried:
            self._tried = True
            try:
                nvml = self._load_nvml()
                nvml.nvmlInit()
                self._nvml = nvml
            except Exception as exc:  # noqa: BLE001 - no library, no driver, NVMLError: all mean no GPU
                log.info("no GPUs reported: NVML unavailable (%s: %s)", exc.__class__.__name__, exc)
        return self._nvml

    def read(self) -> list[GpuMetrics]:
        """Utilisation and memory of every GPU; an empty list when NVML is missing or fails."""
        with self._lock:
            nvml = self._init()
            if nvml is None:
                return []
            try:
                gpus = []
                for index in range(nvml.nvmlDeviceGetCount()):
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    name = nvml.nvmlDeviceGetName(handle)
                    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                    gpus.append(
                        GpuMetrics(
                            index=index,
                            name=name.decode() if isinstance(name, bytes) else str(name),
                            utilization_percent=min(100.0, float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)),
                            memory_used_mb=memory.used / MB,
                            memory_total_mb=memory.total / MB,
                        )
                    )
                return gpus
            except Exception as exc:  # noqa: BLE001 - a GPU that cannot be read is not reported
                log.warning("reading GPUs failed (%s: %s); reporting none", exc.__class__.__name__, exc)
                return []

    def close(self) -> None:
        with self._lock:
            if self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                except Exception:  # noqa: BLE001 - shutting down a broken NVML is not our problem
                    log.debug("nvmlShutdown failed", exc_info=True)
                self._nvml = None


def _existing(path: Path) -> Path:
    """The nearest existing folder at or above path (disk usage needs one)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class MetricsCollector:
    """Builds one AgentMetrics message from this machine's state."""

    def __init__(
        self,
        *,
        agent_id: str,
        runtimes: list[str],
        disk_path: Path,
        interval_s: float,
        extra_load_percent: float = 0.0,
        capacity_cpus: float | None = None,
        capacity_memory_mb: float | None = None,
        gpus: GpuProbe | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.agent_id = agent_id
        self.runtimes = list(runtimes)
        self.disk_path = disk_path
        self.interval_s = interval_s
        self.extra_load_percent = extra_load_percent
        self.capacity_cpus = capacity_cpus
        self.capacity_memory_mb = capacity_memory_mb
        self.gpus = gpus or GpuProbe()
        self.clock = clock

    def collect(self, url: str, deployments: list[DeploymentReport]) -> AgentMetrics:
        # cpu_percent(None) is the usage since the previous call: non-blocking, 0.0 on the very first one.
        cpu = psutil.cpu_percent(interval=None)
        memory = psutil.virtual_memory()
        disk = psutil.disk_usage(str(_existing(self.disk_path)))
        gpus = self.gpus.read()
        return AgentMetrics(
            agent_id=self.agent_id,
            url=url,
            runtimes=self.runtimes,
            capacity=AgentCapacity(
                cpus=self.capacity_cpus or psutil.cpu_count() or 1,
                memory_mb=self.capacity_memory_mb or memory.total / MB,
                disk_mb=disk.total / MB,
                gpus=len(gpus),
            ),
            load=AgentLoad(
                cpu_percent=self._loaded(cpu),
                memory_percent=self._loaded(memory.percent),
                disk_percent=min(100.0, disk.percent),
                gpus=gpus,
            ),
            deployments=deployments,
            interval_s=self.interval_s,
            sent_at=self.clock(),
        )

    def _loaded(self, percent: float) -> float:
        return min(100.0, max(0.0, percent + self.extra_load_percent))


class MetricsPublisher:
    """Publishes a metrics message at once, then every interval, until stopped."""

    def __init__(
        self,
        bus: EventBus,
        collector: MetricsCollector,
        url: str,
        deployments: Callable[[], list[DeploymentReport]],
    ) -> None:
        self.bus = bus
        self.collector = collector
        self.url = url
        self.deployments = deployments
        self.published = 0
        self.last: AgentMetrics | None = None  # the latest message published: the agent's /metrics reads it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish_metrics(self) -> AgentMetrics:
        message = self.collector.collect(self.url, self.deployments())
        self.bus.publish(SYSTEM_METRICS, self.collector.agent_id, message)
        self.published += 1
        self.last = message
        return message

    def start(self) -> MetricsPublisher:
        self._thread = threading.Thread(target=self._run, name="metrics-publisher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            try:
                self.publish_metrics()
            except Exception:  # noqa: BLE001 - one bad sample must not end the heartbeat
                log.exception("publishing metrics failed")
            if self._stop.wait(self.collector.interval_s):
                return
