"""App factory of the model registry."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from flask import Flask

from miaas.bus import EventBus
from miaas.web import create_service_app
from model_registry.api import build_api
from model_registry.registry import ModelRegistry
from model_registry.settings import ModelRegistrySettings
from model_registry.storage import ModelStorage
from model_registry.store import Store
from model_registry.uploads import Spool, install_spool
from model_registry.validation import Limits

REGISTRY = "model_registry"


def utcnow() -> datetime:
    return datetime.now(UTC)


def create_app(
    settings: ModelRegistrySettings, bus: EventBus | None = None, clock: Callable[[], datetime] = utcnow
) -> Flask:
    """The model registry app: prepares the store (sweeping `.tmp`) and the database tables; no network."""
    storage = ModelStorage(settings.model_store)
    storage.prepare()
    store = Store(settings.database_url)
    store.create_schema()
    limits = Limits(
        max_entries=settings.max_entries, max_unpacked_bytes=settings.max_unpacked_bytes, max_ratio=settings.max_ratio
    )
    registry = ModelRegistry(store, storage, limits, clock=clock, bus=bus)
    app = create_service_app(
        "model-registry", settings.service_token.get_secret_value(), [build_api(registry, settings)],
        import_name=__name__,
    )
    install_spool(app, Spool(storage, settings.max_upload_bytes))
    app.extensions[REGISTRY] = registry
    return app
