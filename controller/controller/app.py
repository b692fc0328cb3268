"""App factory of the controller."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from flask import Flask

from controller.api import build_api
from controller.service import Controller
from controller.settings import ControllerSettings
from controller.store import DeploymentStore
from miaas.bus import EventBus
from miaas.discovery import Discovery
from miaas.errors import Unavailable
from miaas.web import create_service_app


def utcnow() -> datetime:
    return datetime.now(UTC)


def create_app(
    settings: ControllerSettings,
    *,
    locate: Callable[[str], str] | None = None,
    bus: EventBus | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> Flask:
    """The controller app; call `app.extensions["controller"].start()` to begin consuming the bus."""
    if locate is None:
        locate = _discovery_locate(settings)
    controller = Controller(settings, DeploymentStore(settings.database_url), locate, clock, bus)
    app = create_service_app("controller", settings.service_token.get_secret_value(), [build_api(controller)])
    app.extensions["controller"] = controller
    return app


def _discovery_locate(settings: ControllerSettings) -> Callable[[str], str]:
    if not settings.service_registry_url:
        def nowhere(name: str) -> str:
            raise Unavailable(f"cannot find '{name}': MIAAS_SERVICE_REGISTRY_URL is not set")

        return nowhere
    return Discovery(settings.service_registry_url, settings.service_token.get_secret_value()).lookup
