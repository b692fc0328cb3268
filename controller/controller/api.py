"""HTTP routes of the controller (seed 002 names kept: /controller/deploy, /controller/stop); the identity routes
(join, renew, join tokens, revocations) are in `identities.py`.

Who may call: deploy and stop, the portal and operators; the records, the agents and the bus, the model registry
too (is a version deployed?); the leader lease, every role.

Reads work on every controller of the cluster; deploy and stop only on the leader: a standby answers 503
`not_leader` naming the leader (`details.leader_url`) with Retry-After."""

from __future__ import annotations

import hashlib
import json
import re

from flask import Response, g, request
from pydantic import Field

from controller.leader import LeaderStatus
from controller.service import Controller
from controller.store import Once
from miaas import identity
from miaas.errors import BadRequest
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


MAX_KEY_LENGTH = 255
MAX_SCOPE_LENGTH = 128  # the caller column of the idempotency keys
DEPLOYERS = (identity.FRONTEND, identity.ADMIN)
READERS = (identity.FRONTEND, identity.ADMIN, identity.MODEL_REGISTRY)


def idempotency_scope(cert: identity.Certificate, caller: str) -> str:
    """Whose an Idempotency-Key is: the authenticated identity and the person it acts for, so that two callers
    never share a key (a person through the portal and an operator of the same name are two)."""
    scope = f"{cert.role}:{cert.subject}/{caller}"
    if len(scope) <= MAX_SCOPE_LENGTH:
        return scope
    return "sha256:" + hashlib.sha256(scope.encode()).hexdigest()


def idempotency(header: str | None, caller: str | None, body: DeployRequest, ttl_s: float) -> Once | None:
    """The `Idempotency-Key` of a deploy request (draft-ietf-httpapi-idempotency-key-header: a structured-field
    string, `"..."`; a bare token is accepted too), scoped to its caller, with a digest of the validated body (so
    the same request written with other spacing or field order is the same request). 400 for a malformed key."""
    if header is None:
        return None
    key = header.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = re.sub(r'\\(["\\])', r"\1", key[1:-1])
    if not key or len(key) > MAX_KEY_LENGTH or not all(" " <= ch <= "~" for ch in key):
        raise BadRequest(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters",
                         code="invalid_idempotency_key")
    digest = hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True,
                                       separators=(",", ":")).encode()).hexdigest()
    return Once(caller=caller or "", key=key, fingerprint=digest, ttl_s=ttl_s)


def build_api(controller: Controller) -> Api:
    api = Api("controller", allow=READERS)

    @api.route("/controller/deploy", "POST", query=DeployQuery, body=DeployRequest, response=Deployment, status=202,
               allow=DEPLOYERS)
    def deploy(query: DeployQuery, body: DeployRequest) -> Response:
        """Queue a model version and place it on the least-loaded agent that fits (or by preempting strictly
        lower-priority deployments); when nothing fits it waits `pending` with the reason. 202 unless already
        running (201); `?wait=` blocks until running or failed. With an `Idempotency-Key` header, a retry (same
        identity and person, same key, same body) returns the same deployment and creates none; the key with
        another body: 422."""
        controller.leader.require("deploys")
        caller = g.caller
        once = idempotency(request.headers.get("Idempotency-Key"), idempotency_scope(g.identity, caller), body,
                           controller.settings.idempotency_key_ttl_s)
        replayed = controller.store.replay(once, controller.clock()) if once is not None else None
        if replayed is not None:
            d = controller.wait_for(replayed.deployment_id, query.wait) if query.wait > 0 else replayed
        else:
            d = controller.deploy(body, caller, wait=query.wait, once=once)
        code = 201 if d.status == DeploymentStatus.RUNNING else 202
        return Response(d.model_dump_json(), status=code, mimetype="application/json")

    @api.route("/controller/stop", "POST", body=StopRequest, response=Deployment, allow=DEPLOYERS)
    def stop(body: StopRequest) -> Deployment:
        """Stop a deployment; stopping a finished one is harmless."""
        controller.leader.require("stops deployments")
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

    @api.route("/controller/leader", response=LeaderStatus, allow=identity.ROLES)
    def leader() -> LeaderStatus:
        """Who holds the leader lease (id, URL, epoch: the fencing number, seconds left by the database's clock)
        and whether this controller is the leader or a standby."""
        return controller.leader.status()

    return api
