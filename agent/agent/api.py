"""HTTP routes of the agent (seed 002 names kept: /create-vm, /stop-vm)."""

from __future__ import annotations

from flask import Response
from pydantic import Field

from agent.manager import AgentDeploymentDetail, AgentDeploymentList, DeploymentManager
from miaas.schemas import CreateVmRequest, Request, StopVmRequest
from miaas.web import Api


class LogsQuery(Request):
    tail: int = Field(100, ge=1, le=10_000, description="how many last lines")


def build_api(manager: DeploymentManager) -> Api:
    api = Api("agent")

    @api.route("/create-vm", "POST", body=CreateVmRequest, response=AgentDeploymentDetail, status=202)
    def create_vm(body: CreateVmRequest) -> AgentDeploymentDetail:
        """Provision a deployment in the background; answers at once with its URL (idempotent by id)."""
        return manager.create(body)

    @api.route("/stop-vm", "POST", body=StopVmRequest, response=AgentDeploymentDetail)
    def stop_vm(body: StopVmRequest) -> AgentDeploymentDetail:
        """Stop a deployment and free its ports; stopping a stopped one is harmless."""
        return manager.stop(body.deployment_id)

    @api.route("/deployments", response=AgentDeploymentList)
    def list_deployments() -> AgentDeploymentList:
        """Every deployment this agent holds."""
        return AgentDeploymentList(deployments=manager.all())

    @api.route("/deployments/<deployment_id>", response=AgentDeploymentDetail)
    def get_deployment(deployment_id: str) -> AgentDeploymentDetail:
        """One deployment of this agent."""
        return manager.get(deployment_id)

    @api.route("/deployments/<deployment_id>/logs", query=LogsQuery)
    def deployment_logs(deployment_id: str, query: LogsQuery) -> Response:
        """The last lines of a deployment's log (provisioning and model output), as text/plain."""
        lines = manager.logs(deployment_id, query.tail)
        return Response("".join(f"{line}\n" for line in lines), mimetype="text/plain")

    return api
