"""App factory of the agent: the deployment manager behind its routes, the metrics it publishes, and its identity.

The agent's credential is obtained once its URL is known (`AgentParts.start_metrics`, run_service's on_start):
loaded from its file, or joined with AGENT_JOIN_TOKEN (agent/credential.py). Everything signs through one
`CredentialHolder`, renewed in the background.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from flask import Flask

from agent import scrape
from agent.api import build_api
from agent.cache import ModelCache
from agent.cache_api import build_cache_api
from agent.controllers import ControllerUrls
from agent.credential import CredentialHolder, Renewer, obtain
from agent.fence import FENCE_FILE, Fence
from agent.fetch import FetchModel, RegistryFetcher
from agent.manager import DeploymentManager
from agent.metrics import GpuProbe, MetricsCollector, MetricsPublisher
from agent.ports import PortAllocator
from agent.runtimes import Recoverable, RecoveredDeployment, Runtime, build_runtimes
from agent.settings import AgentSettings
from miaas.bus import EventBus
from miaas.discovery import Discovery
from miaas.identity import CredentialSource
from miaas.trust import trust_from_settings
from miaas.web import create_service_app

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class AgentParts:
    """What an agent app is made of, for its process (and tests) to start and stop."""

    settings: AgentSettings
    bus: EventBus
    manager: DeploymentManager
    collector: MetricsCollector
    credential: CredentialHolder
    controller_url: Callable[[], str] | None = None
    recovered: list[tuple[str, list[RecoveredDeployment]]] = field(default_factory=list)
    publisher: MetricsPublisher | None = None
    renewer: Renewer | None = None
    model_cache: ModelCache | None = None

    def start_metrics(self, url: str) -> None:
        """Obtain the agent's credential for serving at `url` (its public URL, known once the server is bound)
        unless it was given, then report what it recovered and start publishing metrics.

        Raises agent.credential.NoCredential, saying what to do, when it has none and cannot join."""
        if not self.credential.ready:
            joins_at = self.controller_url() if self.settings.controller_urls and self.controller_url else None
            self.credential.set(obtain(self.settings, url, controller_url=joins_at,
                                       now=time.time()))
            if self.controller_url is None:
                log.warning("no controller known (AGENT_CONTROLLER_URL, MIAAS_SERVICE_REGISTRY_URL): the agent's "
                            "certificate will not be renewed and expires")
            else:
                self.renewer = Renewer(self.credential, path=self.settings.credential_path,
                                       controller_url=self.controller_url,
                                       interval_s=self.settings.renewal_check_s).start()
        self.adopt_recovered()
        bound = self.credential().cert.url or url  # the controller believes metrics only from the bound URL
        if bound != url:
            log.warning("the agent's certificate is bound to %s, not to %s where it serves", bound, url)
        self.publisher = MetricsPublisher(self.bus, self.collector, bound, self.manager.reports).start()

    def adopt_recovered(self) -> None:
        """Hold again (and report, signed) what the runtimes found at start."""
        found, self.recovered = self.recovered, []
        for name, deployments in found:
            self.manager.adopt(name, deployments)

    def shutdown(self) -> None:
        """Stop the metrics and renewal, then (if configured) every deployment, and flush the bus."""
        if self.publisher is not None:
            self.publisher.stop()
        if self.renewer is not None:
            self.renewer.stop()
        self.manager.shutdown(stop_deployments=self.settings.stop_deployments_on_exit)
        self.collector.gpus.close()


def create_app(
    settings: AgentSettings,
    bus: EventBus,
    *,
    credential: CredentialSource | None = None,
    fetch_model: FetchModel | None = None,
    runtimes: Mapping[str, Runtime] | None = None,
    gpus: GpuProbe | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> Flask:
    """The agent's app. `credential`: the agent's credential, used as is (tests); without it (or with an empty
    CredentialHolder, which the process shares with its bus's MessageSigner) the agent obtains its own in
    `start_metrics` and renews it."""
    holder = credential if isinstance(credential, CredentialHolder) else CredentialHolder(credential)
    locate_controller = controller_locator(settings, holder)
    trust = trust_from_settings(settings, credential=holder, controller_url=locate_controller)
    lo, hi = settings.port_bounds
    # Model files over HTTP (AGENT_MODEL_FILES http, or auto without the store): pulled into the local cache.
    cache = None
    if fetch_model is None:
        if settings.model_files != "nfs":
            cache = ModelCache(settings.model_cache_path, max_bytes=settings.model_cache_max_bytes)
        fetcher = RegistryFetcher(settings.service_registry_url, holder, files=settings.model_files, cache=cache)
        if cache is not None:
            cache.source = fetcher
        fetch_model = fetcher
    manager = DeploymentManager(
        agent_id=settings.agent_id,
        runtimes=runtimes if runtimes is not None else build_runtimes(settings),
        fetch_model=fetch_model,
        bus=bus,
        ports=PortAllocator(lo, hi),
        state_dir=settings.state_dir.absolute(),
        advertise_host=settings.advertise_host,
        clock=clock,
        stop_timeout_s=settings.stop_grace_s + 30,
        health=settings.health_policy,
    )
    if cache is not None:
        cache.in_use = manager.versions_in_use  # never evicted while a deployment here holds it
        cache.open()
    # VMs outlive an agent restart: find them again, never launch twice; they are reported once the agent can sign.
    recovered = [(name, runtime.recover()) for name, runtime in manager.runtimes.items()
                 if isinstance(runtime, Recoverable)]
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
    agent = AgentParts(settings, bus, manager, collector, holder, locate_controller, recovered, model_cache=cache)
    if holder.ready:
        agent.adopt_recovered()
    # The highest controller fence accepted: a deposed controller's late commands are refused, across restarts.
    fence = Fence(settings.state_dir.absolute() / FENCE_FILE)
    apis = [build_api(manager, fence=fence), *([build_cache_api(cache)] if cache is not None else [])]
    app = create_service_app("agent", trust.auth, apis, import_name=__name__)
    app.extensions["agent"] = agent
    app.extensions["miaas_trust"] = trust
    scrape.install(app.extensions["miaas_metrics"], settings.agent_id, lambda: agent.publisher)
    return app


def controller_locator(settings: AgentSettings, credential: CredentialSource) -> Callable[[], str] | None:
    """Where the controller is: AGENT_CONTROLLER_URL (of several, the leader), else asked of the service registry
    (None: neither)."""
    if settings.controller_urls:
        return ControllerUrls(settings.controller_urls)
    if settings.service_registry_url:
        discovery = Discovery(settings.service_registry_url, credential)
        return lambda: discovery.lookup("controller")
    return None


def parts(app: Flask) -> AgentParts:
    """The AgentParts of an app built by create_app."""
    found: AgentParts = app.extensions["agent"]
    return found
