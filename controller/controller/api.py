"""HTTP routes of the controller (seed 002 names kept: /controller/deploy, /controller/stop)."""

from __future__ import annotations

from flask import Response, g
from pydantic import Field

from controller.service import Controller
from miaas.schemas import (
    AgentList,
    BusStats,
    Deployment,
    DeploymentList,
    DeploymentStatus,
    DeployQuery,
    DeployRequest,
    Request,
    StopRequest,
)
from miaas.web import Api


class ListQuery(Request):
    status: DeploymentStatus | None = None
    active: bool = Field(False, description="only deployments that hold or may hold resources (not stopped/failed)")
    model_id: str | None = Field(None, max_length=128)
    version: int | None = Field(None, ge=1)


def build_api(controller: Controller) -> Api:
    api = Api("controller")

    @api.route("/controller/deploy", "POST", query=DeployQuery, body=DeployRequest, response=Deployment, status=202)
    def deploy(query: DeployQuery, body: DeployRequest) -> Response:
        """Queue a model version and place it on the least-loaded agent that fits (or by preempting strictly
        lower-priority deployments); when nothing fits it waits `pending` with the reason. 202 unless already
        running (201); `?wait=` blocks until running or failed."""
        d = controller.deploy(body, g.get("caller"), wait=query.wait)
        code = 201 if d.status == DeploymentStatus.RUNNING else 202
        return Response(d.model_dump_json(), status=code, mimetype="application/json")

    @api.route("/controller/stop", "POST", body=StopRequest, response=Deployment)
    def stop(body: StopRequest) -> Deployment:
        """Stop a deployment; stopping a finished one is harmless."""
        return controller.stop_deployment(body.deployment_id)

    @api.route("/controller/deployments", query=ListQuery, response=DeploymentList)
    def deployments(query: ListQuery) -> DeploymentList:
        """Every deployment, newest first; filters: status, active, model_id, version (e.g. is a version in use?)."""
        statuses = {query.status} if query.status is not None else set(DeploymentStatus)
        if query.active:
            statuses -= {DeploymentStatus.STOPPED, DeploymentStatus.FAILED}
        found = controller.store.all(frozenset(statuses), model_id=query.model_id, version=query.version)
        return DeploymentList(deployments=found)

    @api.route("/controller/deployments/<deployment_id>", response=Deployment)
    def deployment(deployment_id: str) -> Deployment:
        """One deployment with its placement explanation."""
        return controller.store.get(deployment_id)

    @api.route("/controller/agents", response=AgentList)
    def agents() -> AgentList:
        """Every agent seen on the metrics stream with its state, load and score."""
        return controller.agents()

    @api.route("/controller/bus", response=BusStats)
    def bus() -> BusStats:
        """What the controller's bus consumers handled, and the poison messages they skipped, per reason."""
        return controller.bus_stats()

    return api
