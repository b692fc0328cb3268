"""App factory of the model registry."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from flask import Flask

from miaas.bus import EventBus
from miaas.discovery import Discovery
from miaas.errors import Unavailable
from miaas.web import create_service_app
from model_registry.api import build_api
from model_registry.registry import ModelRegistry
from model_registry.settings import ModelRegistrySettings
from model_registry.storage import ModelStorage
from model_registry.store import Store
from model_registry.uploads import Spool, install_spool
from model_registry.usage import CONTROLLER, ControllerUsage
from model_registry.validation import Limits

REGISTRY = "model_registry"


def utcnow() -> datetime:
    return datetime.now(UTC)


def create_app(
    settings: ModelRegistrySettings, bus: EventBus | None = None, clock: Callable[[], datetime] = utcnow
) -> Flask:
    """The model registry app: migrates the database, prepares the store (emptying `.tmp`, removing version files
    the database does not record); no network."""
    storage = ModelStorage(settings.model_store)
    storage.prepare()
    store = Store(settings.database_url)
    store.create_schema()
    storage.sweep(store.all_versions())
    limits = Limits(
        max_entries=settings.max_entries, max_unpacked_bytes=settings.max_unpacked_bytes, max_ratio=settings.max_ratio,
        allow_requirement_urls=settings.allow_requirement_urls,
    )
    token = settings.service_token.get_secret_value()
    registry = ModelRegistry(store, storage, limits, clock=clock, bus=bus,
                             usage=ControllerUsage(_controller_locator(settings), token))
    app = create_service_app(
        "model-registry", token, [build_api(registry, settings)],
        import_name=__name__,
    )
    install_spool(app, Spool(storage, settings.max_upload_bytes))
    app.extensions[REGISTRY] = registry
    return app


def _controller_locator(settings: ModelRegistrySettings) -> Callable[[], str]:
    """Where the controller is: the configured URL, else the service registry's answer at the time of asking."""
    if settings.controller_url:
        url = settings.controller_url
        return lambda: url
    if settings.service_registry_url:
        discovery = Discovery(settings.service_registry_url, settings.service_token.get_secret_value())
        return lambda: discovery.lookup(CONTROLLER)

    def nowhere() -> str:
        raise Unavailable("no controller is configured: set MODEL_REGISTRY_CONTROLLER_URL or "
                          "MIAAS_SERVICE_REGISTRY_URL")

    return nowhere
