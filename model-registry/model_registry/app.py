"""App factory of the model registry."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from flask import Flask, Response, jsonify

from miaas import identity
from miaas.bus import EventBus
from miaas.discovery import Discovery
from miaas.errors import Unavailable
from miaas.trust import Trust, trust_from_settings
from miaas.web import create_service_app
from model_registry import scrape
from model_registry.api import build_api
from model_registry.ownership import secure_store
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
    settings: ModelRegistrySettings, bus: EventBus | None = None, clock: Callable[[], datetime] = utcnow, *,
    trust: Trust | None = None,
) -> Flask:
    """The model registry app: migrates the database, checks that it owns the store (`StoreRefused` otherwise,
    with nothing changed; the first start claims an empty store), then prepares the store: removes the registry's own
    unfinished temp files and moves to the quarantine what the database does not record. No network.

    `trust` defaults to `registry_trust(settings)`; `python -m model_registry` builds it first, so that the bus it
    gives the app signs with the same credential."""
    trust = trust or registry_trust(settings)
    storage = ModelStorage(settings.model_store)
    store = Store(settings.database_url)
    try:
        store.create_schema()
        store_id = secure_store(storage, store, settings.database_url, clock())
        storage.prepare()
        storage.quarantine_strays(store.all_versions(), clock())
    except BaseException:
        store.close()
        raise
    limits = Limits(
        max_entries=settings.max_entries, max_unpacked_bytes=settings.max_unpacked_bytes, max_ratio=settings.max_ratio,
        allow_requirement_urls=settings.allow_requirement_urls,
    )
    usage = ControllerUsage(controller_locator(settings, trust.credential), trust.credential)
    registry = ModelRegistry(store, storage, limits, clock=clock, bus=bus, usage=usage)
    app = create_service_app("model-registry", trust.auth, [build_api(registry, settings)], import_name=__name__)
    install_spool(app, Spool(storage, settings.max_upload_bytes))
    scrape.install(app, storage.quarantined_count)
    app.extensions[REGISTRY] = registry
    app.extensions["miaas_trust"] = trust
    _report_store_on_health(app, lambda: {
        "store_id": store_id, "quarantined": storage.quarantined_count(), "quarantine": str(storage.quarantine_root),
    })
    return app


def _report_store_on_health(app: Flask, facts: Callable[[], dict[str, object]]) -> None:
    """Add the store's id and what sits in its quarantine to the answer of `/health` (the shared route's view is
    wrapped, so whatever it answers stays as it is)."""
    endpoints = [rule.endpoint for rule in app.url_map.iter_rules() if rule.rule == "/health"]
    if len(endpoints) != 1:
        raise RuntimeError(f"expected one /health route, found {endpoints}")
    original = app.view_functions[endpoints[0]]

    def health(*args: object, **kwargs: object) -> Response:
        answer = app.make_response(app.ensure_sync(original)(*args, **kwargs))
        body = answer.get_json(silent=True)
        if answer.status_code != 200 or not isinstance(body, dict):
            return answer
        extended = jsonify({**body, **facts()})
        extended.status_code = answer.status_code
        return extended

    health.__doc__ = original.__doc__
    app.view_functions[endpoints[0]] = health


def registry_trust(settings: ModelRegistrySettings) -> Trust:
    """The registry's identity (its credential file) and its checks of callers; revocations come from the
    controller found as `controller_locator` finds it (none are fetched when no controller is configured)."""
    credential = identity.CredentialFile(settings.credential_file)
    controller = None
    if settings.controller_url or settings.service_registry_url:
        controller = controller_locator(settings, credential)
    return trust_from_settings(settings, credential=credential, controller_url=controller)


def controller_locator(settings: ModelRegistrySettings, credential: identity.CredentialSource) -> Callable[[], str]:
    """Where the controller is: the configured URL, else the service registry's answer at the time of asking
    (asked as `credential`)."""
    if settings.controller_url:
        url = settings.controller_url
        return lambda: url
    if settings.service_registry_url:
        discovery = Discovery(settings.service_registry_url, credential)
        return lambda: discovery.lookup(CONTROLLER)

    def nowhere() -> str:
        raise Unavailable("no controller is configured: set MODEL_REGISTRY_CONTROLLER_URL or "
                          "MIAAS_SERVICE_REGISTRY_URL")

    return nowhere
