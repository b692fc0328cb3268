"""The data plane of endpoints: Caddy (Debian's `caddy`), configured only through its admin API.

A model's stable URLs (`/m/<model>/<version or alias>/...`) are routes of one Caddy server; each route balances
over the healthy replicas of its target (least connections), retries another replica when a connection cannot be
made, bounds the request body and the upstream's time, and may require an API key. A change of routes is one
atomic PATCH of the server's route list: Caddy swaps it without a restart and without dropping the requests in
flight. What is wanted (`Endpoint`) is plain data; `Gateway.apply` makes Caddy match it and says whether it did
anything, so whoever follows the deployments can call it on every change.

Glossary:
- endpoint: one public path prefix and the replicas behind it.
- upstream: one replica, `host:port`.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

SERVER = "miaas"
PREFIX = re.compile(r"^/[A-Za-z0-9._~/-]*[A-Za-z0-9._~-]$")
UPSTREAM = re.compile(r"^[A-Za-z0-9.-]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$")


class GatewayError(Exception):
    pass


@dataclass(frozen=True)
class Endpoint:
    """One stable path prefix and the replicas that serve it."""

    prefix: str  # e.g. /m/iris/production (requests to /m/iris/production/predict reach the replica as /predict)
    upstreams: tuple[str, ...]  # host:port of each healthy replica; empty: 503 with Retry-After
    api_key: str | None = None  # required in X-Api-Key when set (held in Caddy's memory only: never persisted)
    max_body_bytes: int = 64 * 1024 * 1024
    response_timeout_s: float = 60.0
    dial_timeout_s: float = 2.0
    retry_for_s: float = 5.0  # how long a request may look for a replica that accepts its connection
    retry_after_s: int = 5

    def __post_init__(self) -> None:
        if not PREFIX.match(self.prefix) or "//" in self.prefix or "/../" in f"{self.prefix}/":
            raise GatewayError(f"endpoint prefix {self.prefix!r}: a path like /m/<model>/<version>")
        for u in self.upstreams:
            if not UPSTREAM.match(u):
                raise GatewayError(f"upstream {u!r}: host:port")
        if self.api_key is not None and not re.fullmatch(r"[A-Za-z0-9_-]{24,128}", self.api_key):
            raise GatewayError("api_key: 24 to 128 letters, digits, - or _ (no wildcard characters)")

    def route(self) -> dict[str, Any]:
        """This endpoint as a Caddy route (JSON config)."""
        inner: list[dict[str, Any]] = []
        if self.api_key is not None:
            inner.append({
                "match": [{"not": [{"header": {"X-Api-Key": [self.api_key]}}]}],
                "handle": [_static(401, "an API key is required: X-Api-Key", {})],
                "terminal": True,
            })
        # The body limit, from Content-Length before anything is read (a body of unknown length is refused: it
        # could not be bounded before it is buffered for a retry).
        # (Go's server hides Transfer-Encoding from the headers: a body-carrying method without Content-Length.)
        inner.append({"match": [{"method": ["POST", "PUT", "PATCH"], "not": [{"header": {"Content-Length": ["*"]}}]}],
                      "handle": [_static(411, "send the body with a Content-Length", {})], "terminal": True})
        inner.append({"match": [{"header_regexp": {"Content-Length": {"pattern": greater_than(self.max_body_bytes)}}}],
                      "handle": [_static(413, f"the body is larger than {self.max_body_bytes} bytes", {})],
                      "terminal": True})
        if not self.upstreams:
            inner.append({"handle": [_static(503, "no replica is running for this endpoint yet",
                                             {"Retry-After": [str(self.retry_after_s)]})]})
        else:
            inner.append({"handle": [
                {"handler": "rewrite", "strip_path_prefix": self.prefix},
                {
                    "handler": "reverse_proxy",
                    "upstreams": [{"dial": u} for u in self.upstreams],
                    # A body is read once: buffered (at most max_body_bytes, by its Content-Length checked above),
                    # a request can be sent again to another replica when its first one refused the connection.
                    # (Caddy 2.6 buffers whole bodies or none, and its request_body limit truncates a buffered
                    # body instead of refusing it: hence the Content-Length check.)
                    "buffer_requests": True,
                    "load_balancing": {"selection_policy": {"policy": "least_conn"},
                                       "try_duration": _d(self.retry_for_s), "try_interval": "100ms"},
                    "health_checks": {"passive": {"fail_duration": "10s", "max_fails": 1,
                                                  "unhealthy_request_count": 0}},
                    "transport": {"protocol": "http", "dial_timeout": _d(self.dial_timeout_s),
                                  "response_header_timeout": _d(self.response_timeout_s)},
                },
            ]})
        return {"match": [{"path": [self.prefix, f"{self.prefix}/*"]}],
                "handle": [{"handler": "subroute", "routes": inner}], "terminal": True}


def greater_than(n: int) -> str:
    """A regular expression matching exactly the decimal integers greater than `n` (leading zeros allowed)."""
    digits = str(n)
    options = [f"[1-9][0-9]{{{len(digits)},}}"]  # more digits
    for i, d in enumerate(digits):
        if d != "9":
            options.append(f"{digits[:i]}[{int(d) + 1}-9][0-9]{{{len(digits) - i - 1}}}")
    return f"^0*({'|'.join(options)})$"


def _d(seconds: float) -> str:
    return f"{int(seconds * 1000)}ms"


def _static(status: int, message: str, headers: dict[str, list[str]]) -> dict[str, Any]:
    code = {401: "unauthenticated", 404: "not_found", 411: "length_required", 413: "too_large",
            503: "unavailable"}.get(status, "error")
    body = json.dumps({"error": {"code": code, "message": message, "details": None}})
    return {"handler": "static_response", "status_code": status, "body": body,
            "headers": {"Content-Type": ["application/json"], **headers}}


@dataclass
class Gateway:
    """One Caddy process: `listen` serves the endpoints, `admin` (loopback) takes its configuration."""

    state_dir: Path
    listen: str = "127.0.0.1:8088"
    admin: str = "127.0.0.1:2019"
    process: subprocess.Popen[bytes] | None = None
    applied: str | None = field(default=None, repr=False)  # digest of the routes Caddy holds

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin}"

    def start(self, timeout: float = 20.0) -> Gateway:
        caddy = shutil.which("caddy")
        if caddy is None:
            raise GatewayError("caddy is not installed (apt-get install -y caddy)")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        config = self.state_dir / "caddy.json"
        config.write_text(json.dumps({
            "admin": {"listen": self.admin, "config": {"persist": False}},  # keys stay in memory
            "logging": {"logs": {"default": {"level": "WARN"}}},
            "apps": {"http": {"servers": {SERVER: {"listen": [self.listen], "routes": [],
                                                   "automatic_https": {"disable": True}}}}},
        }))
        env = {"HOME": str(self.state_dir), "XDG_DATA_HOME": str(self.state_dir / "data"),
               "XDG_CONFIG_HOME": str(self.state_dir / "config"), "PATH": "/usr/bin:/bin"}
        with open(self.state_dir / "caddy.log", "ab") as log:
            self.process = subprocess.Popen([caddy, "run", "--config", str(config)], stdout=log,
                                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise GatewayError(f"caddy exited with {self.process.returncode}: "
                                   + (self.state_dir / "caddy.log").read_text(errors="replace")[-800:])
            try:
                if requests.get(f"{self.admin_url}/config/", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise GatewayError(f"caddy's admin API did not answer on {self.admin} within {timeout:.0f}s")
            time.sleep(0.05)

    def apply(self, endpoints: list[Endpoint]) -> bool:
        """Make Caddy serve exactly these endpoints (longest prefix first); False when it already did."""
        prefixes = [e.prefix for e in endpoints]
        if len(set(prefixes)) != len(prefixes):
            raise GatewayError("two endpoints with one prefix")
        routes = [e.route() for e in sorted(endpoints, key=lambda e: (-len(e.prefix), e.prefix))]
        routes.append({"handle": [_static(404, "no endpoint at this path", {})]})  # Caddy's default is an empty 200
        body = json.dumps(routes, sort_keys=True)
        digest = hashlib.sha256(body.encode()).hexdigest()
        if digest == self.applied:
            return False
        resp = requests.patch(f"{self.admin_url}/config/apps/http/servers/{SERVER}/routes", data=body, timeout=10,
                              headers={"Content-Type": "application/json"})
        if resp.status_code != 200:
            raise GatewayError(f"caddy refused the routes: {resp.status_code} {resp.text[:500]}")
        self.applied = digest
        return True

    def upstreams(self) -> list[dict[str, Any]]:
        """Caddy's view of every upstream: address, requests in flight, recent failures."""
        resp = requests.get(f"{self.admin_url}/reverse_proxy/upstreams", timeout=5)
        resp.raise_for_status()
        found: list[dict[str, Any]] = resp.json() or []
        return found

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
