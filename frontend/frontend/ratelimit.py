"""Login rate limiting. Pure: the caller passes the time.

`Backoff` slows one key down (a user name from one address) with a wait that doubles with each failure, so a flood
of wrong passwords from one place never locks the name itself; `RateLimiter` caps the failures of a looser key (an
address, whatever the names) in a sliding window.
"""

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


@dataclass
class Backoff:
    """After `free` failures of a key, each further attempt waits `base_s` · 2^(failures − free), at most `max_s`,
    counted from the last failure. A key's failures are forgotten `forget_s` after its last one (which must be
    longer than `max_s`, or waiting out the longest delay would start afresh); a success forgets them at once.

    In memory, per portal process.
    """

    free: int
    max_s: float
    forget_s: float
    base_s: float = 1.0
    _state: dict[str, tuple[int, float]] = field(default_factory=dict)  # key -> (failures, time of the last)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.forget_s <= self.max_s:
            raise ValueError("failures must be remembered longer than the longest wait")

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until `key` may try again; 0 when it may try now."""
        with self._lock:
            failures, last = self._current(key, now)
        if failures < self.free:
            return 0.0
        return max(0.0, last + self.delay(failures) - now)

    def delay(self, failures: int) -> float:
        """The wait after this many failures."""
        if failures < self.free:
            return 0.0
        return min(self.max_s, self.base_s * 2.0 ** min(failures - self.free, 62))

    def failed(self, key: str, now: float) -> None:
        with self._lock:
            failures, _ = self._current(key, now)
            if key not in self._state and len(self._state) >= MAX_KEYS:
                self._prune(now)
            self._state[key] = (failures + 1, now)

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._state.pop(key, None)

    def _current(self, key: str, now: float) -> tuple[int, float]:
        failures, last = self._state.get(key, (0, 0.0))
        if failures and now - last >= self.forget_s:
            del self._state[key]
            return 0, 0.0
        return failures, last

    def _prune(self, now: float) -> None:
        for key in [k for k, (_, last) in self._state.items() if now - last >= self.forget_s]:
            del self._state[key]
        while len(self._state) >= MAX_KEYS:  # still full of fresh keys: forget the oldest ones
            del self._state[next(iter(self._state))]
