"""Which deployment reports of the metrics stream could change a record; the others skip the database.

Agents repeat every deployment in every metrics message (level-triggered), so nearly every report says what its
record already says, and a transaction per report would cap ingest at a few thousand messages a second.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Container, Iterable
from typing import Any

from controller.store import DeploymentStore
from miaas.schemas import AgentMetrics, DeploymentStatus

_UNREAD: Any = object()
Report = tuple[str, str, DeploymentStatus, str | None, int | None]
"""deployment id, the reporting agent, the status it reports, its URL, the placement generation it runs."""


class ReportFilter:
    """Remembers the record (status, agent, URL) of each reported deployment as the store last committed it.

    The memory is exact: it is dropped whenever the store commits a write (`DeploymentStore.commits`), and refreshed
    with one query for the deployments a batch names that it does not hold. `recheck_s` bounds how long it is
    trusted anyway, for writes made by something other than this process's store.
    """

    def __init__(self, store: DeploymentStore, *, recheck_s: float = 30.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.recheck_s = recheck_s
        self.monotonic = monotonic
        self._rows: dict[str, tuple[str, str | None, str | None] | None] = {}  # None: no such record
        self._commits = -1
        self._since = 0.0
        self._lock = threading.Lock()

    def changes(self, folded: Iterable[AgentMetrics], statuses: Container[DeploymentStatus]) -> list[Report]:
        """The reports (of `statuses`) the messages carry, in order, but those that cannot change anything: of a
        deployment without a record, or that say what the record says (same agent, status, URL: then
        `judge_report` moves nothing either). Builds nothing per report that it drops: this runs per message."""
        folded = folded if isinstance(folded, list) else list(folded)
        with self._lock:
            commits, now = self.store.commits, self.monotonic()
            if commits != self._commits or now - self._since > self.recheck_s:
                self._rows.clear()
                self._commits, self._since = commits, now
            rows = self._rows
            out: list[Report] = []
            for _ in range(2):  # a second time only after reading the records it did not hold
                missing: set[str] = set()
                for m in folded:
                    for r in m.deployments:
                        if r.status not in statuses:
                            continue
                        row = rows.get(r.deployment_id, _UNREAD)
                        if row is _UNREAD:
                            missing.add(r.deployment_id)
                        elif row is not None and (
                            row[0] != r.status or row[1] != m.agent_id or r.url not in (None, row[2])
                        ):
                            out.append((r.deployment_id, m.agent_id, r.status, r.url, r.generation))
                if not missing:
                    break
                found = self.store.reported_states(missing)
                rows.update((d, found.get(d)) for d in missing)
                out.clear()
            return out
