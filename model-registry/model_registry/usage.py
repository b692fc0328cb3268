"""Is a version in use? The controller knows: it owns the deployments. The registry asks it before a delete."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from miaas.client import ServiceClient
from miaas.errors import MiaasError, Unavailable
from miaas.identity import CredentialSource

log = logging.getLogger(__name__)
CONTROLLER = "controller"


class UsageCheck(Protocol):
    def deployments_of(self, model_id: str, version: int) -> list[str]:
        """Ids of the deployments that still need this version (not stopped, not failed). Raises `Unavailable`."""
        ...


class ControllerUsage:
    """Asks the controller (`GET /controller/deployments?active=true&model_id=&version=`).

    `locate` gives the controller's URL (from settings, or the service registry); the question is signed with
    `credential`, the registry's own. Any failure to get a clear answer is a 503: a version whose use cannot be
    checked is never deleted.
    """

    def __init__(self, locate: Callable[[], str], credential: CredentialSource, *, timeout_s: float = 5.0) -> None:
        self.locate = locate
        self.credential = credential
        self.timeout_s = timeout_s

    def deployments_of(self, model_id: str, version: int) -> list[str]:
        try:
            client = ServiceClient(self.locate(), self.credential, timeout=self.timeout_s)
            try:
                answer = client.get("/controller/deployments",
                                    params={"active": "true", "model_id": model_id, "version": version})
            finally:
                client.close()
            return [str(d["deployment_id"]) for d in answer["deployments"]]
        except (MiaasError, KeyError, TypeError) as exc:
            log.warning("could not ask the controller whether %s v%d is in use: %s", model_id, version, exc)
            raise Unavailable(
                f"cannot check whether {model_id} v{version} is deployed (the controller did not answer: {exc}); "
                "nothing was deleted, try again later", code="controller_unavailable",
            ) from exc
