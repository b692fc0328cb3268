"""The controller's fence, as this agent has seen it: commands of a deposed controller are refused.

Of the controllers on one database only the holder of the leader lease commands agents (controller/leader.py);
each command carries the lease's epoch as `fence` in its signed body. The agent keeps the highest fence it has
accepted in a small file under its state folder, written atomically before the command is carried out, so it
survives a restart. A lower fence, or none once any was seen, is a deposed controller's late command: 409
`stale_leader`, and the controller that sent it stops acting.

Glossary:
- **fence**: a positive integer, the epoch of the lease the sending controller held (a takeover adds one).
- **fence file**: `<AGENT_STATE_DIR>/controller-fence.json`, `{"fence": N}`; absent until the first fenced command.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from agent.errors import AgentError

FENCE_FILE = "controller-fence.json"
MAX_FENCE = 2**63 - 1  # the epoch is a database integer


class StaleLeader(AgentError):
    """A command from a controller that no longer leads (its fence is lower than one this agent accepted)."""

    status, code = 409, "stale_leader"


class FenceFileError(AgentError):
    """The fence file cannot be read: the agent refuses to start rather than forget which controller leads."""

    code = "fence_file"


class Fence:
    """The highest fence accepted, read from and written to `path`; `check` is called for every command."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.highest: int | None = self._load()

    def _load(self) -> int | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise FenceFileError(f"the controller fence file {self.path} cannot be read: {exc}") from exc
        try:
            value = json.loads(text)["fence"]
        except (ValueError, KeyError, TypeError) as exc:
            raise FenceFileError(
                f"the controller fence file {self.path} does not hold {{\"fence\": N}} ({exc.__class__.__name__}); "
                "it is written atomically, so something else changed it: remove it to accept the current leader's "
                "commands again") from exc
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_FENCE:
            raise FenceFileError(f"the controller fence file {self.path} holds {value!r}, not a fence "
                                 f"(an integer from 1 to {MAX_FENCE}); remove it to accept the current leader's "
                                 "commands again")
        return value

    def check(self, fence: int | None, what: str) -> None:
        """Accept a command carrying `fence` (remembered, on disk, when higher than any before) or refuse it with
        StaleLeader: lower than the highest accepted, or missing once one was."""
        with self._lock:
            highest = self.highest
            if fence is None:
                if highest is not None:
                    raise StaleLeader(
                        f"{what} carries no fence, but this agent has accepted commands of the leader at fence "
                        f"{highest}: only the current leader commands it", details={"fence": None, "highest": highest})
                return
            if highest is not None and fence < highest:
                raise StaleLeader(
                    f"{what} comes from a deposed controller: its fence {fence} is lower than {highest}, which this "
                    f"agent accepted from the leader since (if the controllers' database was replaced, remove "
                    f"{self.path})", details={"fence": fence, "highest": highest})
            if highest is None or fence > highest:
                self._write(fence)
                self.highest = fence

    def _write(self, fence: int) -> None:
        """Atomically: a crash leaves the old file or the new one, never half of one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump({"fence": fence}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
