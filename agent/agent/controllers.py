"""Which controller the agent talks to (joins, renewals, revocations) when AGENT_CONTROLLER_URL names several.

Of the controllers of a cluster one leads (controller/leader.py); the others stand by on the same database. A
join, a renewal and the revocation list work on any of them, so the agent asks each in turn for its `/health`
(public, no credential needed) and goes to the leader, else to any that answers, else to the first (whose error
then names it). The choice is kept for `cache_s`, so a dead controller costs one probe per period, not one per
call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import requests

log = logging.getLogger(__name__)


class ControllerUrls:
    """A locator (`() -> URL`) over several controllers: the leader's URL, found by asking their `/health`."""

    def __init__(self, urls: Sequence[str], *, cache_s: float = 5.0, timeout_s: float = 2.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if not urls:
            raise ValueError("at least one controller URL is needed")
        self.urls = list(urls)
        self.cache_s = cache_s
        self.timeout_s = timeout_s
        self.monotonic = monotonic
        self._chosen: tuple[float, str] | None = None
        self._lock = threading.Lock()

    def __call__(self) -> str:
        if len(self.urls) == 1:
            return self.urls[0]
        with self._lock:
            chosen = self._chosen
            if chosen is not None and self.monotonic() - chosen[0] < self.cache_s:
                return chosen[1]
            url = self._probe()
            if chosen is None or chosen[1] != url:
                log.info("controller: %s (of %s)", url, ", ".join(self.urls))
            self._chosen = (self.monotonic(), url)
            return url

    def forget(self) -> None:
        """Ask again at the next call (the chosen controller stopped answering)."""
        with self._lock:
            self._chosen = None

    def _probe(self) -> str:
        answering: str | None = None
        with requests.Session() as session:
            session.trust_env = False
            for url in self.urls:
                try:
                    resp = session.get(f"{url}/health", timeout=self.timeout_s)
                    role = resp.json().get("role") if resp.ok else None
                except (requests.RequestException, ValueError, AttributeError):
                    continue
                if role == "leader":
                    return url
                if resp.ok and answering is None:
                    answering = url
        return answering or self.urls[0]
