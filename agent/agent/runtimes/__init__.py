"""Runtimes: the plugins that run deployments (see base.Runtime). Add a kind by adding it to RUNTIME_KINDS."""

from __future__ import annotations

from collections.abc import Callable

from agent.runtimes.base import DeploymentSpec, Runtime, RuntimeState
from agent.runtimes.process import ProcessRuntime
from agent.runtimes.venvs import VenvCache
from agent.settings import AgentSettings


def _process(settings: AgentSettings) -> Runtime:
    return ProcessRuntime(
        VenvCache(settings.venv_cache_dir),
        provision_timeout_s=settings.provision_timeout_s,
        stop_grace_s=settings.stop_grace_s,
    )


RUNTIME_KINDS: dict[str, Callable[[AgentSettings], Runtime]] = {"process": _process}


def build_runtimes(settings: AgentSettings) -> dict[str, Runtime]:
    """The runtimes this agent offers (settings.runtimes); an unknown kind is a configuration error."""
    unknown = sorted(set(settings.runtimes) - set(RUNTIME_KINDS))
    if unknown:
        raise ValueError(f"unknown runtime(s) {unknown} in AGENT_RUNTIMES; known: {sorted(RUNTIME_KINDS)}")
    return {name: RUNTIME_KINDS[name](settings) for name in dict.fromkeys(settings.runtimes)}


__all__ = ["RUNTIME_KINDS", "DeploymentSpec", "Runtime", "RuntimeState", "build_runtimes"]
