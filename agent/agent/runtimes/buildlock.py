"""One build of a cached artefact (a virtualenv, a wheelhouse) at a time, across threads and agent processes."""

from __future__ import annotations

import contextlib
import fcntl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from agent.errors import ProvisionCancelled, ProvisionFailed


@contextlib.contextmanager
def build_lock(path: Path, what: str, deadline: float, cancelled: threading.Event) -> Iterator[None]:
    """Hold an exclusive flock on `path` while building `what`; give up when cancelled or past `deadline`
    (a `time.monotonic()` value) rather than block a deployment's stop behind another build."""
    with path.open("a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if cancelled.is_set():
                    raise ProvisionCancelled(f"stopped while waiting for the {what}") from None
                if time.monotonic() > deadline:
                    raise ProvisionFailed(f"timed out waiting for another build of the same {what}") from None
                cancelled.wait(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
