"""Login rate limiting: failed attempts per key in a sliding window. Pure: the caller passes the time."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

MAX_KEYS = 100_000  # an attacker spraying names must not grow the table without bound


@dataclass
class RateLimiter:
    """At most `limit` failures per key within `window_s` seconds; a success clears the key.

    In memory, per portal process: behind several portal processes each counts on its own.
    """

    limit: int
    window_s: float
    _failures: dict[str, deque[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until `key` may try again; 0 when it may try now."""
        with self._lock:
            times = self._recent(key, now)
            if len(times) < self.limit:
                return 0.0
            return max(0.0, times[0] + self.window_s - now)

    def failed(self, key: str, now: float) -> None:
        with self._lock:
            if key not in self._failures and len(self._failures) >= MAX_KEYS:
                self._prune(now)
            times = self._failures.setdefault(key, deque())
            times.append(now)
            while len(times) > self.limit:
                times.popleft()

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.get(key, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def _prune(self, now: float) -> None:
        for key in [k for k, t in self._failures.items() if not t or t[-1] <= now - self.window_s]:
            del self._failures[key]
        while len(self._failures) >= MAX_KEYS:  # still full of fresh keys: forget the oldest ones
            del self._failures[next(iter(self._failures))]
