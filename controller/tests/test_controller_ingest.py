"""Folding the metrics stream cheaply: the view keeps the latest snapshot per agent, and deployment reports that
say what their record says cost no transaction, without ever hiding a report that would change something."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from controller.reports import ReportFilter
from controller.store import DeploymentRow, DeploymentStore
from controller.view import ClusterView
from miaas.schemas import AgentCapacity, AgentLoad, AgentMetrics, DeploymentReport
from miaas.schemas import DeploymentStatus as S

T0 = datetime(2026, 1, 1, tzinfo=UTC)
REPORTED = (S.PROVISIONING, S.RUNNING, S.FAILED, S.STOPPED)


def snapshot(agent_id: str, at: datetime, *reports: DeploymentReport, cpu: float = 10) -> AgentMetrics:
    return AgentMetrics(agent_id=agent_id, url="http://a:1", capacity=AgentCapacity(cpus=4, memory_mb=8192),
                        load=AgentLoad(cpu_percent=cpu, memory_percent=20), deployments=list(reports), sent_at=at)


def running(deployment_id: str, url: str = "http://a:20000") -> DeploymentReport:
    return DeploymentReport(deployment_id=deployment_id, status=S.RUNNING, url=url)


def store_with(tmp_path: Path, **rows: tuple[str, str]) -> DeploymentStore:
    """A store holding deployments id -> (status, agent)."""
    store = DeploymentStore(f"sqlite:///{tmp_path / 'c.db'}")
    for deployment_id, (status, agent_id) in rows.items():
        store.add(DeploymentRow(
            id=deployment_id, model_id="m", model_name="m", version=1, status=status, agent_id=agent_id,
            url="http://a:20000", reason=None, runtime="process", cpus=1, memory_mb=256, gpus=0, placement=[],
            created_by=None, created_at=T0, updated_at=T0,
        ))
    return store


class CountingStore:
    """The store, counting the queries the filter makes."""

    def __init__(self, store: DeploymentStore) -> None:
        self.store = store
        self.queries = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def reported_states(self, ids: Any) -> Any:
        self.queries += 1
        return self.store.reported_states(ids)


def test_the_view_keeps_the_latest_snapshot_of_each_agent_and_says_which_changed() -> None:
    view = ClusterView(suspect_after=3, lost_after_s=15, max_skew_s=30)
    batch = [snapshot("a", T0, cpu=1), snapshot("b", T0), snapshot("a", T0 + timedelta(seconds=1), cpu=2),
             snapshot("c", T0 - timedelta(minutes=5))]  # c: too old to prove anything
    folded = view.observe_many(iter(batch), T0)
    assert [(m.agent_id, m.load.cpu_percent) for m in folded] == [("a", 2), ("b", 10)]
    assert view.stale == 1
    # an older snapshot delivered late does not roll the view back
    assert view.observe_many([snapshot("a", T0, cpu=99)], T0) == []
    record = view.get("a")
    assert record is not None and record.metrics.load.cpu_percent == 2


def test_reports_that_match_their_record_are_dropped_and_the_rest_pass_in_order(tmp_path: Path) -> None:
    store = CountingStore(store_with(tmp_path, d1=("running", "a"), d2=("provisioning", "a"), d3=("running", "b")))
    reports = ReportFilter(store)  # type: ignore[arg-type]
    batch = [
        snapshot("a", T0, running("d1"), running("d2"), running("d-unknown")),
        snapshot("b", T0, running("d3", url="http://b:20001")),  # a new URL
        snapshot("c", T0, running("d1")),  # not the agent d1 is placed on: judged by the caller
    ]
    assert reports.changes(batch, REPORTED) == [
        ("d2", "a", S.RUNNING, "http://a:20000", None),
        ("d3", "b", S.RUNNING, "http://b:20001", None),
        ("d1", "c", S.RUNNING, "http://a:20000", None),
    ]
    assert store.queries == 1
    # the same batch again costs no query while the store has not written
    reports.changes(batch, REPORTED)
    assert store.queries == 1


def test_a_write_to_the_store_makes_the_filter_look_again(tmp_path: Path) -> None:
    store = CountingStore(store_with(tmp_path, d1=("running", "a")))
    reports = ReportFilter(store)  # type: ignore[arg-type]
    batch = [snapshot("a", T0, running("d1"))]
    assert reports.changes(batch, REPORTED) == []
    # when the controller marks it lost (the agent went silent), the same report now changes something
    assert store.transition("d1", S.LOST, T0) is not None
    assert reports.changes(batch, REPORTED) == [("d1", "a", S.RUNNING, "http://a:20000", None)]
    assert store.queries == 2
    # a read (even in a transaction) is not a write
    store.get("d1")
    store.transition("d1", S.LOST, T0, strict=False)  # already lost: nothing written
    reports.changes(batch, REPORTED)
    assert store.queries == 2


def test_the_filter_looks_again_after_recheck_s_whatever_the_store_says(tmp_path: Path) -> None:
    clock = [0.0]
    store = CountingStore(store_with(tmp_path, d1=("running", "a")))
    reports = ReportFilter(store, recheck_s=30, monotonic=lambda: clock[0])  # type: ignore[arg-type]
    batch = [snapshot("a", T0, running("d1"))]
    reports.changes(batch, REPORTED)
    clock[0] = 29.0
    reports.changes(batch, REPORTED)
    assert store.queries == 1
    clock[0] = 31.0
    reports.changes(batch, REPORTED)
    assert store.queries == 2
