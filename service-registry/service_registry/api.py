"""HTTP routes of the service registry (seed 002 names kept: /register, /getServiceInfo)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from flask import Response

from miaas.schemas import HeartbeatRequest, RegisterRequest, ServiceInstance, ServiceList, ServiceQuery
from miaas.web import Api
from service_registry.registry import Registry


def build_api(registry: Registry, clock: Callable[[], datetime]) -> Api:
    api = Api("service_registry")
    ttl: timedelta = registry.ttl

    @api.route("/register", "POST", body=RegisterRequest, response=ServiceInstance, status=201)
    def register(body: RegisterRequest) -> ServiceInstance:
        """Register an instance of a service, or renew one that presents its instance id."""
        return registry.register(body, clock()).to_wire(ttl)

    @api.route("/heartbeat", "POST", body=HeartbeatRequest, response=ServiceInstance)
    def heartbeat(body: HeartbeatRequest) -> ServiceInstance:
        """Renew an instance; 404 tells the instance to register again."""
        return registry.heartbeat(body.instance_id, clock()).to_wire(ttl)

    @api.route("/register/<instance_id>", "DELETE")
    def deregister(instance_id: str) -> Response:
        """Remove an instance (on clean shutdown)."""
        registry.deregister(instance_id)
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
