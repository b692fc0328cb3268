"""An agent's side of joining the cluster: trade a join token for its own credential, and renew it.

The private key is made here and never leaves the agent; the controller only sees its public half. The
credential is written atomically with mode 0600, so a crash never leaves half a key behind.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from miaas import identity
from miaas.client import ServiceClient
from miaas.errors import RemoteError, UpstreamError

log = logging.getLogger(__name__)

JOIN_PATH = "/controller/join"
RENEW_PATH = "/controller/renew"


def _public(key: Ed25519PrivateKey) -> str:
    return identity.b64e(identity._raw_public(key.public_key()))


def _credential(key: Ed25519PrivateKey, certificate: str) -> identity.Credential:
    cert = identity.Certificate.model_validate_json(identity.b64d(certificate.partition(".")[0]))
    if cert.public_key != _public(key):
        raise UpstreamError("the controller answered a certificate for another key")
    return identity.Credential(key, identity.Signed(certificate, cert))


def join(controller_url: str, join_token: str, *, agent_id: str, url: str, path: Path,
         timeout: float = 10.0) -> identity.Credential:
    """Join with `join_token` as `agent_id` serving at `url`; the credential is saved to `path` and returned.

    A refused join (a bad, expired or used-up token, an id already taken) raises RemoteError with the controller's
    reason; an unreachable controller raises UpstreamError."""
    key = Ed25519PrivateKey.generate()
    body = {"join_token": join_token, "agent_id": agent_id, "url": url, "public_key": _public(key)}
    endpoint = f"{controller_url.rstrip('/')}{JOIN_PATH}"
    try:
        resp = requests.post(endpoint, json=body, timeout=timeout)
    except requests.RequestException as exc:
        raise UpstreamError(f"POST {endpoint} failed: {exc.__class__.__name__}: {exc}") from exc
    if resp.status_code >= 400:
        try:
            err = resp.json()["error"]
            raise RemoteError(resp.status_code, str(err["code"]), str(err["message"]), err.get("details"))
        except (ValueError, KeyError, TypeError):
            raise UpstreamError(f"POST {endpoint} answered {resp.status_code}: {resp.text[:200]}") from None
    credential = _credential(key, str(resp.json()["certificate"]))
    credential.save(path)
    log.info("joined the cluster as %s (certificate %s, valid until %s)", agent_id, credential.cert.serial,
             time.strftime("%Y-%m-%d %H:%M", time.gmtime(credential.cert.not_after)))
    return credential


def renew(controller_url: str, current: identity.Credential, *, path: Path, timeout: float = 10.0,
          ) -> identity.Credential:
    """A new key and certificate for the same identity, signed for by the current one; saved to `path`."""
    key = Ed25519PrivateKey.generate()
    client = ServiceClient(controller_url, current, timeout=timeout)
    try:
        answer = client.post(RENEW_PATH, json={"public_key": _public(key)})
    finally:
        client.close()
    credential = _credential(key, str(answer["certificate"]))
    credential.save(path)
    return credential


def needs_renewal(credential: identity.Credential, now: float, fraction: float = 0.5) -> bool:
    """True past `fraction` of the certificate's lifetime (kubelet rotates at 70-90%; we renew early)."""
    cert = credential.cert
    return now >= cert.not_before + (cert.not_after - cert.not_before) * fraction
