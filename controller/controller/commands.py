"""Commands to agents (`/create-vm`, `/stop-vm`): signed as the controller, sent only to the URL bound in the
agent's certificate, idempotent by deployment id and generation, bounded by a timeout, retried at once when the
agent could not be reached, and sorted into two kinds of failure:

- `Refused`: the agent answered and said no (4xx). It will say no again: the caller can decide on it.
- `Uncertain`: no answer, a timeout or a 5xx. The agent may still act on the command (a create that timed out
  may well start the model), so only the agent's own reports decide what happened; the caller retries later.
"""

from __future__ import annotations

import time
from typing import Any

import requests

from miaas.client import ServiceClient
from miaas.errors import MiaasError, RemoteError
from miaas.identity import Credential, CredentialSource

RETRY_PAUSE_S = 0.2


class CommandFailed(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Refused(CommandFailed):
    """The agent answered the command with a refusal (4xx)."""

    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class Uncertain(CommandFailed):
    """The command may or may not have been carried out."""


def send_command(url: str, credential: Credential | CredentialSource, path: str, body: dict[str, Any], *,
                 timeout: float, retries: int) -> Any:
    """POST `body` to an agent at `url`, signed by `credential`; the decoded answer, or Refused / Uncertain.

    An agent that refuses the controller's signature (401/403: `ServiceClient` makes it an UpstreamError) did not
    act on it: Uncertain, so the command is sent again later (a clock put right, a revocation list caught up)
    rather than the deployment failed.

    Only failures to connect are retried here (nothing reached the agent); a timeout is not (the agent may be
    working on it), and is left to the caller's retry with backoff.
    """
    client = ServiceClient(url, credential, timeout=timeout)
    try:
        for attempt in range(retries + 1):
            try:
                return client.post(path, json=body)
            except RemoteError as exc:
                raise Refused(f"{exc.status} {exc.code}: {exc.message}", exc.status, exc.code) from exc
            except MiaasError as exc:
                unreached = isinstance(exc.__cause__, requests.ConnectionError)  # ConnectTimeout included
                if not unreached or attempt == retries:
                    raise Uncertain(exc.message) from exc
                time.sleep(RETRY_PAUSE_S * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover
    finally:
        client.close()
