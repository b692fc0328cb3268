"""The controller's records on SQLite and PostgreSQL: legal moves only, guarded changes, and databases made by an
older controller gain the new columns at start."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from controller.store import DeploymentRow, DeploymentStore
from miaas.errors import Conflict
from miaas.schemas import DeploymentStatus as S
from miaas.testing import postgres_schema

T0 = datetime(2026, 1, 1, tzinfo=UTC)

OLD_TABLE = """CREATE TABLE deployments (
    id VARCHAR(64) PRIMARY KEY, model_id VARCHAR(128), model_name VARCHAR(128), version INTEGER,
    status VARCHAR(16), agent_id VARCHAR(128), url VARCHAR(512), reason TEXT, runtime VARCHAR(32), cpus FLOAT,
    memory_mb INTEGER, gpus INTEGER, placement JSON, created_by VARCHAR(128),
    created_at TIMESTAMP WITH TIME ZONE, updated_at TIMESTAMP WITH TIME ZONE)"""


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'controller.db'}"
        return
    with postgres_schema(request.getfixturevalue("postgres_url"), "controller") as url:
        yield url


def row(deployment_id: str = "d-1", status: S = S.RUNNING) -> DeploymentRow:
    return DeploymentRow(id=deployment_id, model_id="m", model_name="m", version=1, status=status.value,
                         agent_id="a", url=None, reason=None, runtime="process", cpus=1, memory_mb=256, gpus=0,
                         placement=[], created_by=None, created_at=T0, updated_at=T0, priority=2, generation=1)


def test_a_database_from_an_older_controller_gains_the_new_columns(database_url: str) -> None:
    # given a deployments table as the controller wrote it before priorities and generations
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text(OLD_TABLE))
        conn.execute(text("INSERT INTO deployments (id, model_id, model_name, version, status, agent_id, runtime, "
                          "cpus, memory_mb, gpus, placement, created_at, updated_at) VALUES ('d-old', 'm', 'm', 1, "
                          "'running', 'a', 'process', 1, 256, 0, '[]', :t, :t)"), {"t": T0})
    engine.dispose()
    # when the controller starts on it
    store = DeploymentStore(database_url)
    # then the old record reads with the defaults, and the new columns work
    old = store.get("d-old")
    assert (old.priority, old.generation, old.attempts, old.status) == ("normal", 0, 0, S.RUNNING)
    assert store.change("d-old", T0, requeue=True, next_attempt_at=T0 + timedelta(seconds=5)) is not None
    record = store.records_of(["d-old"])["d-old"]
    assert record.requeue and record.next_attempt_at == T0 + timedelta(seconds=5)
    store.engine.dispose()


def test_only_legal_guarded_changes_are_persisted(database_url: str) -> None:
    store = DeploymentStore(database_url)
    store.add(row())
    # an illegal move is refused (strict: 409; guarded: nothing changes)
    with pytest.raises(Conflict):
        store.transition("d-1", S.PROVISIONING, T0)
    assert store.change("d-1", T0, status=S.PENDING) is None
    # a guard that no longer holds changes nothing
    assert store.change("d-1", T0, when=lambda r: r.generation == 7, status=S.LOST) is None
    # a legal, guarded move is persisted, and repeating it changes nothing
    moved = store.change("d-1", T0, when=lambda r: r.generation == 1, status=S.LOST, reason="agent a is lost")
    assert moved is not None and (moved.status, moved.reason, moved.priority) == (S.LOST, "agent a is lost", "high")
    assert store.change("d-1", T0, status=S.LOST, reason="agent a is lost") is None
    assert [r.deployment_id for r in store.records(frozenset({S.LOST}))] == ["d-1"]
    assert set(store.records_of(["d-1", "d-404"])) == {"d-1"}
    store.engine.dispose()
