"""HTTP routes of the service registry (seed 002 names kept: /register, /getServiceInfo)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from flask import Response, g

from miaas import identity
from miaas.errors import Forbidden
from miaas.schemas import HeartbeatRequest, RegisterRequest, ServiceInstance, ServiceList, ServiceQuery
from miaas.web import Api
from service_registry.registry import Registry

REGISTRANTS = (*identity.SERVICE_ROLES, identity.AGENT, identity.ADMIN)


def check_binding(cert: identity.Certificate, body: RegisterRequest) -> None:
    """A service registers under its own role's name, an agent as `agent` at the URL it joined with; an admin
    may register anything (an operator adding an external service)."""
    if cert.role == identity.ADMIN:
        return
    if body.name != cert.role:
        raise Forbidden(f"{cert.role} {cert.subject} may register only as '{cert.role}', not '{body.name}'",
                        code="forbidden_name")
    if cert.url is not None and body.url.rstrip("/") != cert.url.rstrip("/"):
        raise Forbidden(f"{cert.subject} joined with the URL {cert.url}; it may not register {body.url}",
                        code="forbidden_url")


def build_api(registry: Registry, clock: Callable[[], datetime]) -> Api:
    api = Api("service_registry", allow=identity.ROLES)
    ttl: timedelta = registry.ttl

    @api.route("/register", "POST", body=RegisterRequest, response=ServiceInstance, status=201, allow=REGISTRANTS)
    def register(body: RegisterRequest) -> ServiceInstance:
        """Register an instance of a service, or renew one that presents its instance id (its owner only)."""
        cert: identity.Certificate = g.identity
        check_binding(cert, body)
        return registry.register(body, clock(), owner=cert.subject).to_wire(ttl)

    @api.route("/heartbeat", "POST", body=HeartbeatRequest, response=ServiceInstance, allow=REGISTRANTS)
    def heartbeat(body: HeartbeatRequest) -> ServiceInstance:
        """Renew an instance (its owner only); 404 tells the instance to register again."""
        return registry.heartbeat(body.instance_id, clock(), owner=g.identity.subject).to_wire(ttl)

    @api.route("/register/<instance_id>", "DELETE", allow=REGISTRANTS)
    def deregister(instance_id: str) -> Response:
        """Remove an instance (on clean shutdown; its owner only)."""
        registry.deregister(instance_id, owner=g.identity.subject)
        return Response(status=204)

    @api.route("/getServiceInfo", query=ServiceQuery, response=ServiceInstance)
    def get_service_info(query: ServiceQuery) -> ServiceInstance:
        """A live instance of the named service; several instances take turns."""
        return registry.lookup(query.name, clock()).to_wire(ttl)

    @api.route("/services", response=ServiceList)
    def services() -> ServiceList:
        """Every live instance, by service name."""
        found = registry.instances(clock())
        return ServiceList(services={n: [i.to_wire(ttl) for i in insts] for n, insts in found.items()})

    return api
