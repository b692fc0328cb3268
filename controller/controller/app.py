"""App factory of the controller."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from flask import Flask, Response, jsonify

from controller import identities
from controller import metrics as controller_metrics
from controller.api import build_api
from controller.leader import NotLeader
from controller.service import Controller
from controller.settings import ControllerSettings
from controller.store import DeploymentStore
from miaas import identity
from miaas.bus import EventBus
from miaas.discovery import Discovery
from miaas.errors import Unavailable
from miaas.trust import trust_from_settings
from miaas.web import RevocationList, create_service_app, error_response


def utcnow() -> datetime:
    return datetime.now(UTC)


def create_app(
    settings: ControllerSettings,
    *,
    locate: Callable[[str], str] | None = None,
    bus: EventBus | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> Flask:
    """The controller app; call `app.extensions["controller"].start()` to begin consuming the bus.

    Its trust (`app.extensions["miaas_trust"]`) reads revocations from its own database: every
    `revocation_interval_s` once started, and at once after a revoke. `app.extensions["identities"]` is the
    authority that lets agents join."""
    store = DeploymentStore(settings.database_url)
    identity_store = identities.IdentityStore(store.engine)
    revocations = RevocationList(lambda: identity_store.revoked_serials(time.time()),
                                 interval_s=settings.revocation_interval_s)
    revocations.refresh()  # in force before the first request, not only once the trust is started
    trust = trust_from_settings(settings, revocations=revocations)
    ca = identity.CertificateAuthority.load(settings.ca_key_file) if settings.ca_key_file is not None else None
    authority = identities.Authority(identity_store, trust.verifier, revocations, ca,
                                     lifetime_s=settings.agent_certificate_lifetime_s)
    if locate is None:
        locate = _discovery_locate(settings, trust.credential)
    controller = Controller(settings, store, locate, clock, bus, trust=trust)
    app = create_service_app("controller", trust.auth, [build_api(controller), identities.build_api(authority)])
    controller_metrics.install(app.extensions["miaas_metrics"], controller)
    _say_leadership(app, controller)
    app.extensions["controller"] = controller
    app.extensions["identities"] = authority
    app.extensions["miaas_trust"] = trust
    return app


def _say_leadership(app: Flask, controller: Controller) -> None:
    """/health says this instance's role; a refusal by a standby carries Retry-After (RFC 9110 §10.2.3)."""
    endpoint = next(r.endpoint for r in app.url_map.iter_rules() if r.rule == "/health")
    base = app.view_functions[endpoint]

    def health() -> Response:
        answer = base()
        assert isinstance(answer, Response)
        body = dict(answer.get_json())
        body["role"] = controller.leader.role()
        return jsonify(body)

    health.__doc__ = base.__doc__
    app.view_functions[endpoint] = health

    @app.errorhandler(NotLeader)
    def _not_leader(exc: NotLeader) -> Response:
        response = error_response(exc)
        retry = exc.details.get("retry_after_s") if isinstance(exc.details, dict) else None
        response.headers["Retry-After"] = str(int(retry or 1))
        return response


def _discovery_locate(settings: ControllerSettings, credential: identity.CredentialSource) -> Callable[[str], str]:
    if not settings.service_registry_url:
        def nowhere(name: str) -> str:
            raise Unavailable(f"cannot find '{name}': MIAAS_SERVICE_REGISTRY_URL is not set")

        return nowhere
    return Discovery(settings.service_registry_url, credential).lookup
