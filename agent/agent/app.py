"""App factory of the agent: the deployment manager behind its routes, and the metrics it publishes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from flask import Flask

from agent.api import build_api
from agent.fetch import FetchModel, RegistryFetcher
from agent.manager import DeploymentManager
from agent.metrics import GpuProbe, MetricsCollector, MetricsPublisher
from agent.ports import PortAllocator
from agent.runtimes import Recoverable, Runtime, build_runtimes
from agent.settings import AgentSettings
from miaas.bus import EventBus
from miaas.web import create_service_app


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class AgentParts:
    """What an agent app is made of, for its process (and tests) to start and stop."""

    settings: AgentSettings
    bus: EventBus
    manager: DeploymentManager
    collector: MetricsCollector
    publisher: MetricsPublisher | None = None

    def start_metrics(self, url: str) -> None:
        """Start publishing metrics with the agent's public URL (known once the server is bound)."""
        self.publisher = MetricsPublisher(self.bus, self.collector, url, self.manager.reports).start()

    def shutdown(self) -> None:
        """Stop the metrics, then (if configured) every deployment, and flush the bus."""
        if self.publisher is not None:
            self.publisher.stop()
        self.manager.shutdown(stop_deployments=self.settings.stop_deployments_on_exit)
        self.collector.gpus.close()


def create_app(
    settings: AgentSettings,
    bus: EventBus,
    *,
    fetch_model: FetchModel | None = None,
    runtimes: Mapping[str, Runtime] | None = None,
    gpus: GpuProbe | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> Flask:
    token = settings.service_token.get_secret_value()
    lo, hi = settings.port_bounds
    manager = DeploymentManager(
        agent_id=settings.agent_id,
        runtimes=runtimes if runtimes is not None else build_runtimes(settings),
        fetch_model=fetch_model or RegistryFetcher(settings.service_registry_url, token),
        bus=bus,
        ports=PortAllocator(lo, hi),
        state_dir=settings.state_dir.absolute(),
        advertise_host=settings.advertise_host,
        clock=clock,
        stop_timeout_s=settings.stop_grace_s + 30,
    )
    for name, runtime in manager.runtimes.items():
        if isinstance(runtime, Recoverable):  # VMs outlive an agent restart: find them again, never launch twice
            manager.adopt(name, runtime.recover())
    collector = MetricsCollector(
        agent_id=settings.agent_id,
        runtimes=list(manager.runtimes),
        disk_path=settings.state_dir,
        interval_s=settings.metrics_interval_s,
        extra_load_percent=settings.extra_load_percent,
        capacity_cpus=settings.capacity_cpus,
        capacity_memory_mb=settings.capacity_memory_mb,
        gpus=gpus,
        clock=clock,
    )
    app = create_service_app("agent", token, [build_api(manager)], import_name=__name__)
    app.extensions["agent"] = AgentParts(settings, bus, manager, collector)
    return app


def parts(app: Flask) -> AgentParts:
    """The AgentParts of an app built by create_app."""
    found: AgentParts = app.extensions["agent"]
    return found
