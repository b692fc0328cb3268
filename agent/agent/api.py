"""HTTP routes of the agent (seed 002 names kept: /create-vm, /stop-vm)."""

from __future__ import annotations

from collections.abc import Iterator

from flask import Response
from pydantic import Field

from agent.logtail import LogFollower
from agent.manager import AgentDeploymentDetail, AgentDeploymentList, DeploymentManager
from miaas.errors import NotFound
from miaas.schemas import CreateVmRequest, Request, StopVmRequest
from miaas.web import Api


class LogsQuery(Request):
    tail: int = Field(100, ge=1, le=10_000, description="how many last lines")
    follow: bool = Field(False, description="then stream new lines as they come, until the deployment ends")
    max_s: float = Field(3600.0, gt=0, le=86_400, description="a followed log ends after this many seconds")


def build_api(manager: DeploymentManager) -> Api:
    api = Api("agent")

    @api.route("/create-vm", "POST", body=CreateVmRequest, response=AgentDeploymentDetail, status=202)
    def create_vm(body: CreateVmRequest) -> AgentDeploymentDetail:
        """Provision a deployment in the background; answers at once with its URL (idempotent by id)."""
        return manager.create(body)

    @api.route("/stop-vm", "POST", body=StopVmRequest, response=AgentDeploymentDetail)
    def stop_vm(body: StopVmRequest) -> AgentDeploymentDetail:
        """Stop a deployment and free its ports; stopping a stopped one (or, with `generation`, a newer copy) is
        harmless."""
        return manager.stop(body.deployment_id, body.generation)

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
        """The last lines of a deployment's log (provisioning and model output), as text/plain; with `follow`,
        then every new line as it is written, until the deployment is stopped or failed."""
        runtime = manager.runtimes[manager.get(deployment_id).runtime]
        follower = LogFollower(runtime.log_paths(deployment_id)) if query.follow else None
        lines = manager.logs(deployment_id, query.tail)  # after the follower starts: no line falls in between
        head = "".join(f"{line}\n" for line in lines)
        if follower is None:
            return Response(head, mimetype="text/plain")

        def ended() -> bool:
            try:
                return manager.get(deployment_id).status.is_terminal
            except NotFound:
                return True

        def stream() -> Iterator[str]:
            yield head
            yield from follower.follow(done=ended, max_s=query.max_s)

        # No buffering on the way out: each line leaves as soon as it is read.
        return Response(stream(), mimetype="text/plain", headers={"X-Accel-Buffering": "no",
                                                                  "Cache-Control": "no-cache"})

    return api
