"""The agent's exception tree; each carries its HTTP status through miaas.errors."""

from __future__ import annotations

from miaas.errors import MiaasError, Unavailable


class AgentError(MiaasError):
    """Root of the errors the agent raises on purpose."""


class PortsExhausted(Unavailable):
    """No free port is left in the agent's port range."""

    code = "ports_exhausted"


class ProvisionFailed(AgentError):
    """A runtime could not bring a deployment up; the message is the reason reported to the controller."""

    code = "provision_failed"


class ProvisionCancelled(AgentError):
    """Provisioning stopped because the deployment was stopped meanwhile."""

    code = "provision_cancelled"
