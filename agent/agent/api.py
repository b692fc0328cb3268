"""HTTP routes of the agent (seed 002 names kept: /create-vm, /stop-vm)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from flask import Flask, Response, current_app
from pydantic import Field

from agent.fence import Fence
from agent.logtail import LogFollower
from agent.manager import AgentDeploymentDetail, AgentDeploymentList, DeploymentManager
from miaas.errors import NotFound, Unavailable
from miaas.identity import ADMIN, CONTROLLER, FRONTEND
from miaas.schemas import CreateVmRequest, Request, StopVmRequest
from miaas.web import Api


class LogsQuery(Request):
    tail: int = Field(100, ge=1, le=10_000, description="how many last lines")
    follow: bool = Field(False, description="then stream new lines as they come, until the deployment ends")
    max_s: float | None = Field(
        None, gt=0, le=86_400,
        description="a followed log ends after this many seconds (default and upper bound: AGENT_LOGS_FOLLOW_MAX_S)",
    )


@dataclass(frozen=True)
class FollowLimits:
    """How long and how many log follows may hold the agent's worker threads (AGENT_LOGS_* settings)."""

    max_s: float = 600.0
    write_timeout_s: float = 30.0
    max_follows: int = 8


def _limits(app: Flask) -> FollowLimits:
    """The limits of this agent's settings (an app made by agent.app.create_app keeps them in its parts)."""
    settings = getattr(app.extensions.get("agent"), "settings", None)
    if settings is None:
        return FollowLimits()
    return FollowLimits(settings.logs_follow_max_s, settings.logs_write_timeout_s, settings.logs_max_follows)


class _Follows:
    """Log follows in progress: at most `limit` at once."""

    def __init__(self) -> None:
        self.active = 0
        self._lock = threading.Lock()

    def enter(self, limit: int) -> Callable[[], None]:
        with self._lock:
            if self.active >= limit:
                raise Unavailable(f"{self.active} logs are followed already, the most this agent serves at once "
                                  "(AGENT_LOGS_MAX_FOLLOWS); ask without follow, or later", code="too_many_follows")
            self.active += 1
        released = threading.Event()

        def leave() -> None:
            with self._lock:
                if not released.is_set():
                    released.set()
                    self.active -= 1

        return leave


def build_api(manager: DeploymentManager, limits: FollowLimits | None = None, fence: Fence | None = None) -> Api:
    """The agent's routes; with `fence`, a command of a deposed controller (a lower fence) is refused before it is
    carried out (agent/fence.py)."""
    # Only the controller commands an agent; the portal and operators may look (DESIGN.md §7).
    api = Api("agent", allow=(CONTROLLER, FRONTEND, ADMIN))
    commands = (CONTROLLER,)
    follows = _Follows()

    @api.route("/create-vm", "POST", body=CreateVmRequest, response=AgentDeploymentDetail, status=202,
               allow=commands)
    def create_vm(body: CreateVmRequest) -> AgentDeploymentDetail:
        """Provision a deployment in the background; answers at once with its URL (idempotent by id). A command
        whose `fence` is lower than one accepted before is refused: 409 `stale_leader`."""
        if fence is not None:
            fence.check(body.fence, f"create-vm of {body.deployment_id}")
        return manager.create(body)

    @api.route("/stop-vm", "POST", body=StopVmRequest, response=AgentDeploymentDetail, allow=commands)
    def stop_vm(body: StopVmRequest) -> AgentDeploymentDetail:
        """Stop a deployment and free its ports; stopping a stopped one (or, with `generation`, a newer copy) is
        harmless. A command whose `fence` is lower than one accepted before is refused: 409 `stale_leader`."""
        if fence is not None:
            fence.check(body.fence, f"stop-vm of {body.deployment_id}")
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
        then every new line as it is written, until the deployment is stopped or failed, `max_s` (at most
        AGENT_LOGS_FOLLOW_MAX_S) passed, or the client took longer than AGENT_LOGS_WRITE_TIMEOUT_S to take a
        line. At most AGENT_LOGS_MAX_FOLLOWS follows at once (503 `too_many_follows`)."""
        runtime = manager.runtimes[manager.get(deployment_id).runtime]
        if not query.follow:
            return Response("".join(f"{line}\n" for line in manager.logs(deployment_id, query.tail)),
                            mimetype="text/plain")
        bounds = limits or _limits(current_app)
        max_s = min(query.max_s or bounds.max_s, bounds.max_s)
        leave = follows.enter(bounds.max_follows)
        try:
            follower = LogFollower(runtime.log_paths(deployment_id))
            lines = manager.logs(deployment_id, query.tail)  # after the follower starts: no line falls in between
        except BaseException:
            leave()
            raise
        head = "".join(f"{line}\n" for line in lines)

        def ended() -> bool:
            try:
                return manager.get(deployment_id).status.is_terminal
            except NotFound:
                return True

        def stream() -> Iterator[str]:
            try:
                yield head
                yield from follower.follow(done=ended, max_s=max_s, write_timeout_s=bounds.write_timeout_s)
                if follower.ended == "max_s":
                    yield f"[agent] log follow ended after {max_s:g} s; ask again to go on\n"
            finally:
                leave()

        # No buffering on the way out: each line leaves as soon as it is read.
        response = Response(stream(), mimetype="text/plain", headers={"X-Accel-Buffering": "no",
                                                                      "Cache-Control": "no-cache"})
        response.call_on_close(leave)  # also when the stream is closed before it started
        return response

    return api
