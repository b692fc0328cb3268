"""The health watch of a running deployment: probes, restarts in place with backoff, gives up after too many.

Once a deployment runs, a thread of its own (`HealthWatch`) asks every `interval_s` whether its process or VM
still runs (the runtime's `status`) and, when meta.json names a `health_path`, whether `GET health_path` answers
2xx within `timeout_s`. After `failures` failed probes in a row, or at once when the model exited, it restarts the
deployment in place (the same id, port and generation: the runtime's stop, then its start again), waiting first
`delay_s` doubling per restart up to `max_delay_s` (Nomad's restart block). After `attempts` restarts within
`window_s`, the next failure fails the deployment with a reason naming that failure. A stop cancels the watch at
once, in a backoff too (the manager sets `cancelled` before it stops anything).
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from agent.errors import ProvisionCancelled, ProvisionFailed
from miaas.schemas import DeploymentStatus

if TYPE_CHECKING:  # agent.runtimes imports the settings, which import this module
    from agent.runtimes.base import RuntimeState

log = logging.getLogger(__name__)

Health = Literal["passing", "failing", "unknown"]


@dataclass(frozen=True)
class HealthPolicy:
    """How deployments are watched and restarted (AGENT_HEALTH_*, AGENT_RESTART_*)."""

    interval_s: float = 5.0
    timeout_s: float = 2.0
    failures: int = 3
    delay_s: float = 1.0
    max_delay_s: float = 60.0
    attempts: int = 5
    window_s: float = 300.0

    def delay(self, restarts_in_window: int) -> float:
        """Seconds to wait before the next restart, after `restarts_in_window` recent ones: 1, 2, 4 … up to max."""
        return float(min(self.delay_s * (2 ** min(restarts_in_window, 62)), self.max_delay_s))


def probe(port: int, health_path: str, timeout_s: float, host: str = "127.0.0.1") -> str | None:
    """None when `GET health_path` answers 2xx within `timeout_s`; else what went wrong, in words."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", health_path)
        status = conn.getresponse().status
    except TimeoutError:
        return f"GET {health_path} on port {port} did not answer within {timeout_s:g} s"
    except (OSError, http.client.HTTPException) as exc:
        return f"GET {health_path} on port {port} failed: {exc.__class__.__name__}: {exc}"
    finally:
        conn.close()
    return None if 200 <= status < 300 else f"GET {health_path} on port {port} answered {status}"


class Watched(Protocol):
    """What the watch needs of the manager for one deployment."""

    deployment_id: str
    port: int

    def watching(self) -> bool:
        """True while the deployment is running here (not stopping, stopped or failed)."""
        ...

    def liveness(self) -> RuntimeState:
        """The runtime's view: RUNNING, or FAILED with a reason when the process or VM ended by itself."""
        ...

    def health_path(self) -> str | None:
        """meta.json's health_path (None: liveness only)."""
        ...

    def set_health(self, health: Health) -> None: ...

    def kill(self) -> None:
        """Stop the runtime's copy before a restart (the ports stay held)."""
        ...

    def begin_restart(self, reason: str) -> bool:
        """Count a restart unless the deployment is being stopped (False: do not start it)."""
        ...

    def start(self) -> None:
        """The runtime's start again, with the same spec; raises like Runtime.start."""
        ...

    def give_up(self, reason: str) -> None:
        """Fail the deployment (unless it is being stopped) and clean up after it."""
        ...


class HealthWatch:
    """The thread watching one deployment; `cancel()` ends it, `nudge()` makes it look now."""

    def __init__(self, target: Watched, policy: HealthPolicy, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.target = target
        self.policy = policy
        self.clock = clock
        self.cancelled = threading.Event()
        self._wake = threading.Event()
        self._restarts: deque[float] = deque()
        self.thread = threading.Thread(target=self._run, name=f"health-{target.deployment_id}", daemon=True)

    def start(self) -> HealthWatch:
        self.thread.start()
        return self

    def cancel(self) -> None:
        self.cancelled.set()
        self._wake.set()

    def nudge(self) -> None:
        """Look now rather than at the next interval (a query saw the model die)."""
        self._wake.set()

    def join(self, timeout: float) -> None:
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # noqa: BLE001 - a broken watch must say so, never take the agent down
            log.exception("the health watch of %s failed; it no longer watches", self.target.deployment_id)

    def _loop(self) -> None:
        target, policy = self.target, self.policy
        failed = 0
        while True:
            self._wake.wait(policy.interval_s)
            self._wake.clear()
            if self.cancelled.is_set() or not target.watching():
                return
            state = target.liveness()
            if state.status is DeploymentStatus.FAILED:
                failed = 0
                target.set_health("failing")
                reason = state.reason or "the model stopped by itself"
                log.warning("deployment %s: the model is no longer running: %s", target.deployment_id,
                            _headline(reason))
                if not self._restart(reason):
                    return
                continue
            if state.status is not DeploymentStatus.RUNNING:
                continue  # being stopped or started by someone else: look again later
            path = target.health_path()
            if path is None:
                target.set_health("passing")
                continue
            problem = probe(target.port, path, policy.timeout_s)
            if problem is None:
                if failed:
                    log.info("deployment %s: health check passes again after %d failure(s)",
                             target.deployment_id, failed)
                failed = 0
                target.set_health("passing")
                continue
            failed += 1
            target.set_health("failing")
            log.warning("deployment %s: health check failed (%d of %d in a row): %s", target.deployment_id,
                        failed, policy.failures, problem)
            if failed >= policy.failures:
                failed = 0
                if not self._restart(f"{policy.failures} health checks failed in a row; the last: {problem}"):
                    return

    def _restart(self, reason: str) -> bool:
        """Restart in place after a backoff, again while the restart itself fails; False: the watch ends (given up,
        cancelled, or the deployment no longer runs)."""
        target, policy = self.target, self.policy
        while True:
            now = self.clock()
            while self._restarts and now - self._restarts[0] > policy.window_s:
                self._restarts.popleft()
            recent = len(self._restarts)
            if recent >= policy.attempts:
                if policy.attempts:
                    reason = (f"{reason} (gave up: {recent} restart(s) within {policy.window_s:g} s, "
                              f"AGENT_RESTART_ATTEMPTS={policy.attempts})")
                log.error("deployment %s: giving up, failed: %s", target.deployment_id, _headline(reason))
                target.give_up(reason)
                return False
            delay = policy.delay(recent)
            log.warning("deployment %s: restarting in place in %g s (restart %d of at most %d within %g s): %s",
                        target.deployment_id, delay, recent + 1, policy.attempts, policy.window_s,
                        _headline(reason))
            target.kill()
            if self.cancelled.wait(delay):
                return False
            if not target.begin_restart(reason):
                return False
            self._restarts.append(self.clock())
            try:
                target.start()
            except ProvisionCancelled:
                return False
            except ProvisionFailed as exc:
                reason = f"the restart failed: {exc.message}"
            except Exception as exc:  # noqa: BLE001 - any failure of a restart counts as one
                log.exception("restarting %s failed", target.deployment_id)
                reason = f"the restart failed: agent error: {exc.__class__.__name__}: {exc}"
            else:
                if self.cancelled.is_set():
                    return False
                target.set_health("unknown")
                log.info("deployment %s: restarted in place on port %d", target.deployment_id, target.port)
                return True
            target.set_health("failing")
            log.warning("deployment %s: %s", target.deployment_id, _headline(reason))


def _headline(reason: str) -> str:
    """The first line of a reason, without the announcement of the log lines that follow it."""
    line = reason.splitlines()[0] if reason else reason
    return line.removesuffix("; last log lines:").removesuffix(":")
