"""HTTP client for calling other MIaaS services with the cluster token and one error mapping."""

from __future__ import annotations

from typing import Any

import requests

from miaas.errors import RemoteError, UpstreamError


class ServiceClient:
    """Calls one service; errors it answers come back as `RemoteError` with its status and code."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 10.0, user: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
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


def _remote_error(resp: requests.Response, what: str) -> Exception:
    try:
        err = resp.json()["error"]
        code, message, details = str(err["code"]), str(err["message"]), err.get("details")
    except (ValueError, KeyError, TypeError):
        return UpstreamError(f"{what} answered {resp.status_code}: {resp.text[:200]}")
    if resp.status_code in (401, 403) or resp.status_code >= 500:
        # A peer refusing our credentials, or failing, is our upstream's problem, not the caller's.
        return UpstreamError(f"{what} answered {resp.status_code} {code}: {message}", details=details)
    return RemoteError(resp.status_code, code, message, details)
