"""HTTP client for calling other MIaaS services, every request signed by the caller's identity, with one error
mapping."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.auth import AuthBase

from miaas import identity
from miaas.errors import RemoteError, UpstreamError

DEFAULT_PORTS = {"http": 80, "https": 443}


def host_header(url: str) -> str:
    """The Host header http.client sends for `url`: the host, and the port unless it is the scheme's default."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None and parts.port != DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{parts.port}"
    return host


class Signer(AuthBase):
    """Signs each request with the current credential (read again on every request: rotation needs no restart).

    The Host header is set to the value signed. A body that is not bytes or text (a file or generator being
    streamed) is signed as UNSIGNED-PAYLOAD; only an upload route accepts that."""

    def __init__(self, credential: identity.CredentialSource) -> None:
        self.credential = credential

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        host = host_header(str(r.url))
        body = r.body
        digest = identity.body_digest(body) if body is None or isinstance(body, (bytes, str)) \
            else identity.UNSIGNED_PAYLOAD
        r.headers["Host"] = host
        r.headers.update(identity.sign_request(self.credential(), str(r.method), r.path_url, host, digest,
                                               time.time(), user=r.headers.get("X-MIaaS-User")))
        return r


class SignedSession(requests.Session):
    """A session that signs every request as one identity, redirected ones too (a signature covers one target:
    requests would otherwise send the first request's headers to the redirect's target, and be refused)."""

    def __init__(self, credential: identity.Credential | identity.CredentialSource) -> None:
        super().__init__()
        self.auth = Signer(credential_source(credential))
        self.trust_env = False  # a proxy from the environment would see (and could replay) our requests

    def rebuild_auth(self, prepared_request: requests.PreparedRequest, response: requests.Response) -> None:
        super().rebuild_auth(prepared_request, response)
        for name in (identity.CERT_HEADER, identity.SIGNATURE_HEADER, "Host"):
            prepared_request.headers.pop(name, None)
        assert isinstance(self.auth, Signer)
        self.auth(prepared_request)


def credential_source(credential: identity.Credential | identity.CredentialSource) -> identity.CredentialSource:
    return identity.fixed(credential) if isinstance(credential, identity.Credential) else credential


class ServiceClient:
    """Calls one service as one identity; errors it answers come back as `RemoteError` with its status and code.

    `user`: the person the portal acts for (`X-MIaaS-User`; only the portal's identity may send it)."""

    def __init__(self, base_url: str, credential: identity.Credential | identity.CredentialSource, *,
                 timeout: float = 10.0, user: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = SignedSession(credential)
        if user:
            self.session.headers["X-MIaaS-User"] = user

    def request(self, method: str, path: str, *, timeout: float | None = None, **kw: Any) -> Any:
        """Send a request and return its decoded JSON body."""
        url = f"{self.base_url}{path}"
        try:
            resp = self.session.request(method, url, timeout=timeout or self.timeout, **kw)
        except requests.RequestException as exc:
            raise UpstreamError(f"{method} {url} failed: {exc.__class__.__name__}: {exc}") from exc
        if resp.status_code >= 400:
            raise _remote_error(resp, f"{method} {url}")
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError as exc:
            raise UpstreamError(f"{method} {url} answered with a body that is not JSON") from exc

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.request("POST", path, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.request("DELETE", path, **kw)

    def close(self) -> None:
        self.session.close()


class UpstreamAnswer(UpstreamError):
    """A peer's error answer that is our upstream's problem, not our caller's (401/403: it refused our credentials;
    5xx: it failed, or is not the instance to ask; any answer not in our error shape): passed on as 502
    `upstream_error`, with what the peer answered kept in `answered_status` and `answered_code` (None when its body
    was not our error shape)."""

    def __init__(self, message: str, *, answered_status: int, answered_code: str | None,
                 details: Any = None) -> None:
        super().__init__(message, details=details)
        self.answered_status = answered_status
        self.answered_code = answered_code


def _remote_error(resp: requests.Response, what: str) -> Exception:
    try:
        err = resp.json()["error"]
        code, message, details = str(err["code"]), str(err["message"]), err.get("details")
    except (ValueError, KeyError, TypeError):
        return UpstreamAnswer(f"{what} answered {resp.status_code}: {resp.text[:200]}",
                              answered_status=resp.status_code, answered_code=None)
    if resp.status_code in (401, 403) or resp.status_code >= 500:
        # A peer refusing our credentials, or failing, is our upstream's problem, not the caller's.
        return UpstreamAnswer(f"{what} answered {resp.status_code} {code}: {message}",
                              answered_status=resp.status_code, answered_code=code, details=details)
    return RemoteError(resp.status_code, code, message, details)
