"""The Runtime interface: how a deployment of one model version is brought up, stopped, watched and read.

A runtime is a plugin (`process`, `vagrant`). The manager owns the deployment's state and events;
a runtime only does the work and says what it sees.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from miaas.schemas import DeploymentStatus, PackageMeta


@dataclass(frozen=True)
class DeploymentSpec:
    """Everything a runtime needs to run one deployment."""

    deployment_id: str
    model_id: str
    version: int
    model_path: Path
    """The version folder on the model store: read-only, never written by a runtime."""
    meta: PackageMeta
    port: int
    """The primary host port: the deployment's URL points at it."""
    workdir: Path
    """A writable folder of this deployment on the agent (logs, generated files)."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Variables for the model's commands on top of the runtime's own."""
    ports: Mapping[str, int] = field(default_factory=dict)
    """Host port per name of meta.ports (the primary one included)."""


@dataclass(frozen=True)
class RuntimeState:
    """What a runtime sees of one deployment now."""

    status: DeploymentStatus
    reason: str | None = None


@dataclass(frozen=True)
class RecoveredDeployment:
    """A deployment a runtime found again after an agent restart (see Recoverable)."""

    deployment_id: str
    model_id: str
    version: int
    port: int
    ports: Mapping[str, int]
    status: DeploymentStatus
    """RUNNING when it was adopted, FAILED (with a reason) when it was found half-made and cleaned up."""
    reason: str | None = None


class Runtime(Protocol):
    """Runs deployments; every method is keyed by deployment id and safe to call from any thread."""

    name: str

    def start(self, spec: DeploymentSpec) -> None:
        """Provision and start; block until the model answers. Raise ProvisionFailed (cleaned up) or
        ProvisionCancelled (stop() was called meanwhile)."""
        ...

    def stop(self, deployment_id: str) -> None:
        """Stop and clean up, cancelling a start in progress; stopping twice or an unknown id is harmless."""
        ...

    def status(self, deployment_id: str) -> RuntimeState:
        """RUNNING while the model is up, FAILED (with a reason) when it died by itself, STOPPED otherwise."""
        ...

    def logs(self, deployment_id: str, tail: int) -> list[str]:
        """The last `tail` lines of the deployment's log (provisioning and model output)."""
        ...

    def log_paths(self, deployment_id: str) -> list[Path]:
        """The files behind logs(), which may not exist yet: following them streams the deployment's log."""
        ...


@runtime_checkable
class Recoverable(Protocol):
    """A runtime whose deployments outlive the agent (VMs): it finds them again from the agent's state folder."""

    def recover(self) -> list[RecoveredDeployment]:
        """Adopt what still runs, clean up what was left half-made; called once, when the agent starts."""
        ...
