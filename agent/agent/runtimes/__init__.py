"""Runtimes: the plugins that run deployments (see base.Runtime). Add a kind by adding it to RUNTIME_KINDS."""

from __future__ import annotations

from collections.abc import Callable

from agent.gpus import GpuAllocator
from agent.runtimes.base import DeploymentSpec, Recoverable, RecoveredDeployment, Runtime, RuntimeState
from agent.runtimes.process import ProcessRuntime
from agent.runtimes.sandbox import BwrapSandbox, NoSandbox, SandboxConfig
from agent.runtimes.vagrant import VagrantRuntime, VmGuard
from agent.runtimes.vagrant_driver import VagrantDriver
from agent.runtimes.vagrantfile import VagrantConfig
from agent.runtimes.venvs import VenvCache
from agent.runtimes.vmexports import VmExports, sighup_pid_file
from agent.runtimes.vmfirewall import NftFirewall
from agent.runtimes.wheelhouse import Wheelhouse
from agent.settings import AgentSettings


def sandbox_config(settings: AgentSettings) -> SandboxConfig:
    """The process runtime's sandbox, as the agent's settings describe it."""
    return SandboxConfig(
        uid_range=settings.sandbox_uid_bounds,
        allow_outbound=tuple(settings.sandbox_endpoints),
        deny_ports=tuple(settings.sandbox_denied_ports),
        lock_dir=settings.sandbox_lock_dir,
        env=dict(settings.sandbox_env),
    )


def _process(settings: AgentSettings, gpus: GpuAllocator) -> Runtime:
    runtime = ProcessRuntime(
        VenvCache(settings.venv_cache_dir),
        sandbox=BwrapSandbox(sandbox_config(settings)) if settings.sandbox == "bwrap" else NoSandbox(),
        provision_timeout_s=settings.provision_timeout_s,
        stop_grace_s=settings.stop_grace_s,
        gpus=gpus,
    )
    runtime.prepare()  # the sandbox's firewall rules: a failure stops the agent from starting
    return runtime


def vagrant_config(settings: AgentSettings) -> VagrantConfig:
    """The VMs of this agent, as its settings describe them."""
    return VagrantConfig(
        box=settings.vagrant_box,
        acceleration=settings.vagrant_acceleration,
        libvirt_uri=settings.vagrant_libvirt_uri,
        boot_timeout_s=settings.vagrant_boot_timeout_s,
        min_memory_mb=settings.vagrant_min_memory_mb,
        forward_host_ip=settings.vagrant_forward_host_ip,
        nfs_server=settings.vagrant_nfs_server,
        nfs_options=settings.vagrant_nfs_options,
        network_name=settings.vagrant_network_name,
        network=settings.vagrant_network,
        insert_key=settings.vagrant_insert_key,
    )


def _vagrant(settings: AgentSettings, gpus: GpuAllocator) -> Runtime:
    return VagrantRuntime(
        vagrant_config(settings),
        driver=VagrantDriver(libvirt_uri=settings.vagrant_libvirt_uri, vagrant_home=settings.vagrant_home),
        wheelhouse=Wheelhouse(settings.wheelhouse_dir.absolute(), guest_python=settings.vagrant_guest_python),
        model_store=settings.model_store,
        state_dir=settings.state_dir.absolute(),
        gpus=gpus,
        provision_timeout_s=settings.provision_timeout_s,
        exports=VmExports(settings.vagrant_nfs_exports_file.absolute(),
                          reload=sighup_pid_file(settings.vagrant_nfs_pid_file.absolute())),
        guard=VmGuard(NftFirewall(), nfs_servers=(settings.vagrant_nfs_server,)) if settings.vagrant_firewall else None,
        model_cache=settings.model_cache_path if settings.model_files != "nfs" else None,
    )


RUNTIME_KINDS: dict[str, Callable[[AgentSettings, GpuAllocator], Runtime]] = {
    "process": _process,
    "vagrant": _vagrant,
}


def build_runtimes(settings: AgentSettings, gpus: GpuAllocator | None = None) -> dict[str, Runtime]:
    """The runtimes this agent offers (settings.runtimes), sharing one view of the GPUs; an unknown kind is a
    configuration error."""
    unknown = sorted(set(settings.runtimes) - set(RUNTIME_KINDS))
    if unknown:
        raise ValueError(f"unknown runtime(s) {unknown} in AGENT_RUNTIMES; known: {sorted(RUNTIME_KINDS)}")
    gpus = gpus or GpuAllocator()
    return {name: RUNTIME_KINDS[name](settings, gpus) for name in dict.fromkeys(settings.runtimes)}


__all__ = [
    "RUNTIME_KINDS", "DeploymentSpec", "RecoveredDeployment", "Recoverable", "Runtime", "RuntimeState",
    "build_runtimes", "sandbox_config", "vagrant_config",
]
