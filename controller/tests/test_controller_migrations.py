"""The controller's schema comes from Alembic migrations, on SQLite and PostgreSQL: the migrated database matches
every table the controller declares (records, identities, leader lease), a database made by the old `create_all`
is adopted with its rows, and controllers starting together on one PostgreSQL database upgrade it one at a time."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, MetaData, Table, create_engine, inspect, text

from controller import identities, leader
from controller.migrations import MIGRATIONS, VERSION_TABLE, target_metadata
from controller.store import Base, DeploymentStore, alembic_config
from miaas.migrate import current_revision
from miaas.testing import postgres_schema

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TABLES = ["deployments", "idempotency_keys", "issued_certificates", "join_tokens", "leader_lease", "revocations"]
LATER_COLUMNS = {"priority", "generation", "attempts", "next_attempt_at", "requeue"}
"""Columns of `deployments` that controllers before the lifecycle under failure did not make."""
HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a new schema (first on the search path) of the session's
    PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'controller.db'}"
        return
    with postgres_schema(request.getfixturevalue("postgres_url"), "ctlmig") as url:
        yield url


def differences(engine: Engine) -> list[object]:
    """What autogenerate would change to make the database match the controller's tables: nothing, if they match."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "version_table": VERSION_TABLE})
        return list(compare_metadata(context, target_metadata()))  # type: ignore[arg-type]


def tables(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(inspect(conn).get_table_names())


def schema_of(engine: Engine) -> dict[str, object]:
    """Every table's columns and indexes, as the database reports them."""
    with engine.connect() as conn:
        found = inspect(conn)
        return {t: ([(c["name"], str(c["type"]), c["nullable"]) for c in found.get_columns(t)],
                    sorted(str(i["name"]) for i in found.get_indexes(t)))
                for t in found.get_table_names()}


def old_controller_database(url: str) -> Engine:
    """A database as the controller made it before migrations: `create_all` of each module's tables, with rows in
    each of them (the engine is the caller's to dispose)."""
    engine = create_engine(url)
    for metadata in target_metadata():
        metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO deployments (id, model_id, model_name, version, status, agent_id, runtime, cpus, memory_mb, "
            "gpus, placement, created_at, updated_at, priority, generation, attempts, requeue) VALUES ('d-old', 'm', "
            "'m', 1, 'running', 'a', 'process', 1, 256, 0, '[]', :t, :t, 2, 3, 0, false)"), {"t": T0})
        conn.execute(text("INSERT INTO idempotency_keys VALUES ('portal', 'k1', 'f', 'd-old', :t, :t)"), {"t": T0})
        conn.execute(text("INSERT INTO issued_certificates VALUES ('s1', 'agent-1', 'agent', NULL, 'pk', :t, :t)"),
                     {"t": T0})
        conn.execute(text("INSERT INTO join_tokens VALUES ('j1', 3, 1, :t)"), {"t": T0})
        conn.execute(text("INSERT INTO revocations VALUES ('s0', 'agent-0', 'lost', :t, NULL)"), {"t": T0})
        conn.execute(text("INSERT INTO leader_lease VALUES ('controller', 'c1', 'http://c1', 7, :t)"), {"t": T0})
    return engine


def test_an_empty_database_is_migrated_to_every_table_the_controller_declares(database_url: str) -> None:
    # when a controller starts on an empty database
    store = DeploymentStore(database_url)
    try:
        # then it holds every table, at the newest revision, exactly as the modules declare them
        assert tables(store.engine) == sorted([*TABLES, VERSION_TABLE])
        assert current_revision(store.engine, VERSION_TABLE) == HEAD
        assert differences(store.engine) == []
        assert not inspect(store.engine).has_table("alembic_version")  # the registry's name stays free
        if database_url.startswith("postgresql"):  # each test has a schema of its own, first on the search path
            with store.engine.connect() as conn:
                assert conn.exec_driver_sql("SELECT current_schema()").scalar_one().startswith("ctlmig_")
    finally:
        store.engine.dispose()


def test_the_union_covers_every_table_of_the_three_modules() -> None:
    declared = {t for m in target_metadata() for t in m.tables}
    assert declared == set(TABLES)
    assert set(Base.metadata.tables) | set(identities.Base.metadata.tables) | {leader.lease_table.name} == declared


def test_a_second_start_changes_nothing(database_url: str) -> None:
    # given a migrated database with a record
    store = DeploymentStore(database_url)
    try:
        with store.engine.begin() as conn:
            conn.execute(text("INSERT INTO leader_lease VALUES ('controller', 'c1', NULL, 4, :t)"), {"t": T0})
        before = schema_of(store.engine)
        # when the controller starts again (and upgrades once more)
        again = DeploymentStore(database_url)
        again.create_schema()
        # then the schema, the revision and the rows are as they were
        assert schema_of(again.engine) == before
        assert current_revision(again.engine, VERSION_TABLE) == HEAD
        with again.engine.connect() as conn:
            assert conn.execute(text("SELECT holder_id, epoch FROM leader_lease")).all() == [("c1", 4)]
        again.engine.dispose()
    finally:
        store.engine.dispose()


def test_a_database_made_by_create_all_is_adopted_with_its_rows(database_url: str) -> None:
    # given a database made by the old code path, holding rows in every table, without a version table
    old = old_controller_database(database_url)
    assert current_revision(old, VERSION_TABLE) is None
    old.dispose()
    # when the controller starts on it
    store = DeploymentStore(database_url)
    try:
        # then it is at the newest revision, matches the models, and every row is there
        assert current_revision(store.engine, VERSION_TABLE) == HEAD
        assert differences(store.engine) == []
        d = store.get("d-old")
        assert (d.priority, d.generation, d.status.value) == ("high", 3, "running")
        with store.engine.connect() as conn:
            counts = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES}
            assert counts == dict.fromkeys(TABLES, 1)
            assert conn.execute(text("SELECT epoch FROM leader_lease")).scalar_one() == 7
            assert conn.execute(text("SELECT used FROM join_tokens")).scalar_one() == 1
    finally:
        store.engine.dispose()


def test_a_database_with_some_old_tables_gains_the_missing_tables_and_indexes(database_url: str) -> None:
    # given an old database with only the deployments table, without its later columns or their index
    deployments = Base.metadata.tables["deployments"]
    old = MetaData()
    Table("deployments", old, *[c._copy() for c in deployments.columns if c.name not in LATER_COLUMNS])
    engine = create_engine(database_url)
    old.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO deployments VALUES ('d-old', 'm', 'm', 1, 'pending', NULL, NULL, NULL, "
                          "'process', 1, 256, 0, '[]', NULL, :t, :t)"), {"t": T0})
    engine.dispose()
    # when the controller starts on it
    store = DeploymentStore(database_url)
    try:
        # then the columns, their index and the other tables are added, the row reads with the defaults
        assert differences(store.engine) == []
        assert tables(store.engine) == sorted([*TABLES, VERSION_TABLE])
        d = store.get("d-old")
        assert (d.priority, d.generation, d.attempts) == ("normal", 0, 0)
    finally:
        store.engine.dispose()


def test_an_old_table_lacking_a_column_without_default_is_refused_by_name(database_url: str) -> None:
    # given an old join_tokens table without its `used` column (NOT NULL, no server default), holding a row
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE join_tokens (serial VARCHAR(64) PRIMARY KEY, uses INTEGER NOT NULL, "
                          "expires_at TIMESTAMP WITH TIME ZONE NOT NULL)"))
        conn.execute(text("INSERT INTO join_tokens VALUES ('j1', 3, :t)"), {"t": T0})
    try:
        # when the controller starts on it, then it refuses, naming the table and the column
        with pytest.raises(RuntimeError, match=r"'join_tokens'.*'used'.*no default"):
            DeploymentStore(database_url)
        # and nothing was changed: no version recorded, no other table made (PostgreSQL undoes the whole upgrade)
        assert current_revision(engine, VERSION_TABLE) is None
        with engine.connect() as conn:
            assert conn.execute(text("SELECT serial, uses FROM join_tokens")).all() == [("j1", 3)]
        if database_url.startswith("postgresql"):
            assert tables(engine) == ["join_tokens"]
    finally:
        engine.dispose()


def start_controller(url: str, barrier: Barrier, results: Queue[str]) -> None:
    """In a process of its own: wait for the others, then start a controller's store on `url`."""
    barrier.wait()
    try:
        DeploymentStore(url).engine.dispose()
        results.put("started")
    except Exception as exc:  # noqa: BLE001 - the parent reports what failed
        results.put(f"{type(exc).__name__}: {exc}")


def test_controllers_starting_together_on_postgresql_upgrade_one_at_a_time(request: pytest.FixtureRequest) -> None:
    # given a fresh PostgreSQL database and three controller processes released at the same instant
    with postgres_schema(request.getfixturevalue("postgres_url"), "ctlrace") as url:
        spawn = multiprocessing.get_context("spawn")
        barrier, results = spawn.Barrier(3), spawn.Queue()
        processes = [spawn.Process(target=start_controller, args=(url, barrier, results)) for _ in range(3)]
        for process in processes:
            process.start()
        # then each one started
        outcomes = [results.get() for _ in processes]
        for process in processes:
            process.join()
        assert outcomes == ["started"] * 3
        # and the database holds one revision and every table, as declared
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                assert conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all() == [HEAD]
            assert differences(engine) == []
        finally:
            engine.dispose()


def test_stores_starting_together_in_one_process_upgrade_one_at_a_time(tmp_path: Path) -> None:
    # given threads of one process released at the same instant on one new SQLite file (Alembic's context is global)
    url = f"sqlite:///{tmp_path / 'controller.db'}"
    barrier = threading.Barrier(4)
    stores: list[DeploymentStore] = []
    errors: list[Exception] = []

    def start() -> None:
        barrier.wait()
        try:
            stores.append(DeploymentStore(url))
        except Exception as exc:  # noqa: BLE001 - the test reports every failure
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        # then every one started on a database at head
        assert errors == []
        assert len(stores) == 4
        assert current_revision(stores[0].engine, VERSION_TABLE) == HEAD
        assert differences(stores[0].engine) == []
    finally:
        for store in stores:
            store.engine.dispose()


def test_the_migrations_are_one_linear_history_inside_the_package() -> None:
    script = ScriptDirectory.from_config(alembic_config())
    assert (MIGRATIONS / "env.py").is_file() and (MIGRATIONS / "script.py.mako").is_file()
    assert len(script.get_heads()) == 1
    assert [r.revision for r in script.walk_revisions()][-1] == "0001"


def test_the_initial_revision_can_be_downgraded_and_upgraded_again_by_url(tmp_path: Path) -> None:
    # the command-line way: a config with a URL and no connection
    url = f"sqlite:///{tmp_path / 'controller.db'}"
    command.upgrade(alembic_config(url), "head")
    engine = create_engine(url)
    try:
        command.downgrade(alembic_config(url), "base")
        assert tables(engine) == [VERSION_TABLE]
        command.upgrade(alembic_config(url), "head")
        assert differences(engine) == []
    finally:
        engine.dispose()
