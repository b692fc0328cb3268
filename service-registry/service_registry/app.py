"""App factory of the service registry."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from flask import Flask

from miaas.web import create_service_app
from service_registry.api import build_api
from service_registry.registry import Registry
from service_registry.settings import ServiceRegistrySettings


def utcnow() -> datetime:
    return datetime.now(UTC)


def create_app(settings: ServiceRegistrySettings, clock: Callable[[], datetime] = utcnow) -> Flask:
    registry = Registry(ttl=timedelta(seconds=settings.ttl_s))
    token = settings.service_token.get_secret_value()
    app = create_service_app("service-registry", token, [build_api(registry, clock)])
    app.extensions["registry"] = registry
    return app
