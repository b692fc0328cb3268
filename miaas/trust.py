"""One service's side of the trust model, built from its settings: its own credential, the checks of its callers
(CA key, revocations, nonces) and the signer and checker of bus messages.

Revocations come from the controller (`GET /controller/identities/revoked`), fetched every
`MIAAS_REVOCATION_INTERVAL_S` seconds: a revoked agent's or service's calls and messages are refused within that
time everywhere. The controller serves the list from its own database and needs no fetch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from miaas import identity
from miaas.client import ServiceClient
from miaas.settings import ServiceSettings
from miaas.web import RevocationList, ServiceAuth

if TYPE_CHECKING:
    from miaas.discovery import Discovery

REVOKED_PATH = "/controller/identities/revoked"


@dataclass
class Trust:
    """What one service holds: who it is, and how it checks everyone else."""

    credential: identity.CredentialSource
    verifier: identity.Verifier
    revocations: RevocationList
    metrics_token: str | None = None
    auth: ServiceAuth = field(init=False)

    def __post_init__(self) -> None:
        self.auth = ServiceAuth(self.verifier, metrics_token=self.metrics_token)

    def client(self, base_url: str, *, timeout: float = 10.0, user: str | None = None) -> ServiceClient:
        """A client that calls `base_url` as this service."""
        return ServiceClient(base_url, self.credential, timeout=timeout, user=user)

    def message_signer(self) -> identity.MessageSigner:
        return identity.MessageSigner(self.credential)

    def message_checker(self) -> identity.MessageChecker:
        return identity.MessageChecker(self.verifier)

    def start(self) -> Trust:
        self.revocations.start()
        return self

    def stop(self) -> None:
        self.revocations.stop()


def revoked_from_controller(controller_url: Callable[[], str], credential: identity.CredentialSource,
                            ) -> Callable[[], Iterable[str]]:
    """A fetch of the revocation list from the controller found by `controller_url()`."""
    return lambda: revoked_at(controller_url(), credential)


def revoked_through(discovery: Discovery, credential: identity.CredentialSource) -> Callable[[], Iterable[str]]:
    """A fetch of the revocation list from the controller the service registry lists; a controller that does not
    answer or is a standby is forgotten and the fetch made once more on another (`Discovery.call`), so a takeover
    is followed at once."""
    return lambda: discovery.call("controller", lambda url: revoked_at(url, credential))


def revoked_at(url: str, credential: identity.CredentialSource) -> list[str]:
    """The serials the controller at `url` lists as revoked."""
    client = ServiceClient(url, credential, timeout=3.0)
    try:
        answer = client.get(REVOKED_PATH)
    finally:
        client.close()
    return [str(s) for s in answer["serials"]]


def trust_from_settings(
    settings: ServiceSettings, *, credential: identity.CredentialSource | None = None,
    controller_url: Callable[[], str] | None = None, revocations: RevocationList | None = None,
) -> Trust:
    """The service's Trust. `controller_url` finds the controller for revocations; without one (and without a
    `revocations` list given), revocations are fetched through the service registry when one is configured."""
    cred = credential or identity.CredentialFile(settings.credential_file)
    if revocations is None:
        fetch = None
        if controller_url is not None:
            fetch = revoked_from_controller(controller_url, cred)
        elif settings.service_registry_url:
            from miaas.discovery import Discovery

            fetch = revoked_through(Discovery(settings.service_registry_url, cred), cred)
        revocations = RevocationList(fetch, interval_s=settings.revocation_interval_s)
    verifier = identity.Verifier(identity.load_ca_public(settings.ca_file), revoked=revocations)
    token = settings.metrics_token.get_secret_value() if settings.metrics_token is not None else None
    return Trust(cred, verifier, revocations, metrics_token=token)
