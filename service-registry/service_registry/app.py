"""App factory of the service registry."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from flask import Flask

from miaas.trust import trust_from_settings
from miaas.web import create_service_app
from service_registry.api import build_api
from service_registry.registry import Registry
from service_registry.settings import ServiceRegistrySettings


def utcnow() -> datetime:
    return datetime.now(UTC)


def create_app(settings: ServiceRegistrySettings, clock: Callable[[], datetime] = utcnow) -> Flask:
    registry = Registry(ttl=timedelta(seconds=settings.ttl_s))

    def controller_url() -> str:  # the revocation list comes from the controller, found in our own book
        return registry.lookup("controller", clock()).url

    trust = trust_from_settings(settings, controller_url=controller_url)
    app = create_service_app("service-registry", trust.auth, [build_api(registry, clock)])
    app.extensions["registry"] = registry
    app.extensions["miaas_trust"] = trust
    return app
