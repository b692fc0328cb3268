"""Client side of the service registry: register with heartbeats, and find other services by name."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import requests
from urllib3.exceptions import ConnectTimeoutError

from miaas.client import ServiceClient, UpstreamAnswer
from miaas.errors import MiaasError, RemoteError, Unavailable
from miaas.identity import Credential, CredentialSource

log = logging.getLogger(__name__)
T = TypeVar("T")
NOT_THE_ONE = ("not_leader", "stale_leader")  # codes of an instance that is not the one to ask
LOOKUPS_PAST_AVOIDED = 3  # the registry takes turns among instances: asking again finds another
CAUSES_LOOKED_AT = 4  # an error, what it was raised from, and so on


class Discovery:
    """Finds services through the service registry, caching each answer for a short time. An instance that did
    not answer, or said it is not the one to ask (a standby controller: `not_leader`), is avoided for `avoid_s`:
    the registry may list a dead leader until its registration expires."""

    def __init__(self, registry_url: str, credential: Credential | CredentialSource, *, cache_s: float = 2.0,
                 timeout: float = 5.0, avoid_s: float = 15.0) -> None:
        self.client = ServiceClient(registry_url, credential, timeout=timeout)
        self.cache_s = cache_s
        self.avoid_s = avoid_s
        self._cache: dict[str, tuple[float, str]] = {}
        self._avoided: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def lookup(self, name: str) -> str:
        """The URL of a live instance of `name` (one not avoided, while the registry offers another); 503 when
        none is registered."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(name)
            if hit and now - hit[0] < self.cache_s:
                return hit[1]
        url = ""
        for _ in range(LOOKUPS_PAST_AVOIDED):
            try:
                info = self.client.get("/getServiceInfo", params={"name": name})
            except RemoteError as exc:
                if exc.status == 404:
                    raise Unavailable(f"no live instance of service '{name}' is registered") from exc
                raise
            url = str(info["url"])
            with self._lock:
                if self._avoided.get((name, url), 0.0) <= now:
                    self._avoided.pop((name, url), None)
                    break
        with self._lock:
            self._cache[name] = (now, url)
        return url

    def forget(self, name: str, url: str | None = None) -> None:
        """Drop a cached answer, e.g. after the instance stopped answering; with `url`, avoid that instance for
        `avoid_s` in the lookups that follow."""
        with self._lock:
            self._cache.pop(name, None)
            if url is not None:
                self._avoided[(name, url)] = time.monotonic() + self.avoid_s

    def call(self, name: str, fn: Callable[[str], T], *, resend: bool = True) -> T:
        """`fn(url)` on an instance of `name`; when it cannot be reached or answers `not_leader`, that instance is
        forgotten (and avoided) and `fn` is called once more on another one found anew.

        `resend=False` (a write that must not be made twice, a body that can be sent only once): a connection
        that broke once the request may have been sent is not retried, only one never made (and a refusal)."""
        url = self.lookup(name)
        try:
            return fn(url)
        except (requests.ConnectionError, MiaasError) as exc:
            if not _gone(exc, resend):
                raise
            log.info("%s at %s did not serve (%s); looking it up again", name, url, exc)
            self.forget(name, url)
        return fn(self.lookup(name))


def _gone(exc: BaseException, resend: bool = True) -> bool:
    """A failure that says to ask another instance: no connection, or a standby's (or deposed leader's)
    `not_leader` / `stale_leader`, as a `RemoteError` or as the `UpstreamAnswer` `ServiceClient` makes of a 503;
    looked for in `exc` and the exceptions it was raised from (a caller's own error wrapping ours)."""
    seen: BaseException | None = exc
    for _ in range(CAUSES_LOOKED_AT):
        if seen is None:
            return False
        if isinstance(seen, RemoteError) and seen.code in NOT_THE_ONE:
            return True
        if isinstance(seen, UpstreamAnswer) and seen.answered_code in NOT_THE_ONE:
            return True
        if isinstance(seen, requests.ConnectionError):
            return resend or _never_connected(seen)
        seen = seen.__cause__
    return False


def _never_connected(exc: requests.ConnectionError) -> bool:
    """The connection was not made (refused, no route, name not found, connect timeout): nothing was sent."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, ConnectTimeoutError)  # NewConnectionError and NameResolutionError are ones too


class Registration:
    """Keeps one instance registered: registers, renews with heartbeats, re-registers if forgotten."""

    def __init__(
        self,
        registry_url: str,
        credential: Credential | CredentialSource,
        *,
        name: str,
        url: str,
        metadata: dict[str, Any] | None = None,
        instance_id: str | None = None,
        interval_s: float = 5.0,
    ) -> None:
        self.client = ServiceClient(registry_url, credential, timeout=5.0)
        self.body: dict[str, Any] = {"name": name, "url": url, "metadata": metadata or {}}
        if instance_id:
            self.body["instance_id"] = instance_id
        self.interval_s = interval_s
        self.instance_id: str | None = instance_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"registration-{name}", daemon=True)

    def register(self) -> None:
        answer = self.client.post("/register", json=self.body)
        self.instance_id = answer["instance_id"]
        self.body["instance_id"] = self.instance_id

    def start(self) -> None:
        """Register now (retrying in the background if the registry is not up yet) and keep renewing."""
        try:
            self.register()
        except MiaasError as exc:
            log.warning("service registry not reachable yet (%s); retrying in the background", exc.message)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if self.instance_id is None:
                    self.register()
                else:
                    self.client.post("/heartbeat", json={"instance_id": self.instance_id})
            except RemoteError as exc:
                if exc.status == 404:
                    log.info("service registry forgot %s; registering again", self.instance_id)
                    self._try_register()
                else:
                    log.warning("heartbeat refused: %s", exc.message)
            except MiaasError as exc:
                log.warning("heartbeat failed: %s", exc.message)

    def _try_register(self) -> None:
        try:
            self.register()
        except MiaasError as exc:
            log.warning("registration failed: %s", exc.message)

    def stop(self) -> None:
        """Stop renewing and remove the instance from the registry."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        if self.instance_id:
            try:
                self.client.delete(f"/register/{self.instance_id}", timeout=2)
            except MiaasError as exc:
                log.info("could not deregister %s: %s", self.instance_id, exc.message)
