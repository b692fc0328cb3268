"""The portal's schema comes from Alembic migrations, on SQLite and PostgreSQL (every test here runs on both, see
`ON_BOTH_DATABASES`): the migrated database matches the store's tables, a database made by the old `create_all`
is adopted with its users, sessions and tokens, portals starting together on PostgreSQL upgrade it one at a time,
and the portal may share one database with the controller."""

from __future__ import annotations

import hashlib
import multiprocessing
from collections.abc import Iterator
from datetime import timedelta
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from pydantic import ValidationError
from sqlalchemy import Engine, MetaData, create_engine, inspect, text

from conftest import T0, TEST_SCRYPT_N
from controller.migrations import VERSION_TABLE as CONTROLLER_VERSION_TABLE
from controller.store import DeploymentStore
from frontend.migrations import MIGRATIONS, VERSION_TABLE
from frontend.passwords import PasswordHasher
from frontend.settings import FrontendSettings
from frontend.store import Role, UserStore, alembic_config, metadata
from miaas.migrate import current_revision
from miaas.testing import postgres_schema

TABLES = ["api_tokens", "invitations", "sessions", "users"]
HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()
HASHER = PasswordHasher(n=TEST_SCRYPT_N)
PASSWORD = "an old and long password"
SESSION = "an-old-session-id"
TOKEN = "miaas_pat_an-old-token"


@pytest.fixture
def store(database_url: str) -> Iterator[UserStore]:
    """The portal's store on a fresh database, migrated."""
    made = UserStore(database_url, HASHER)
    yield made
    made.close()


def differences(engine: Engine, target: MetaData | None = None) -> list[object]:
    """What autogenerate would change to make the database match the portal's tables (others' tables aside)."""
    target = target or metadata()

    def ours(_obj: Any, name: str | None, kind: str, _reflected: bool, _compare_to: Any) -> bool:
        return kind != "table" or name in target.tables

    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "version_table": VERSION_TABLE, "include_object": ours})
        return list(compare_metadata(context, target))


def tables(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(inspect(conn).get_table_names())


def sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def test_an_empty_database_is_migrated_to_the_store_tables(store: UserStore, database_url: str) -> None:
    assert tables(store.engine) == sorted([*TABLES, VERSION_TABLE])
    assert current_revision(store.engine, VERSION_TABLE) == HEAD
    assert differences(store.engine) == []
    if database_url.startswith("postgresql"):  # each test has a schema of its own, first on the search path
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT current_schema()").scalar_one().startswith("portal_")


def test_a_second_start_changes_nothing_and_keeps_the_users(store: UserStore, database_url: str) -> None:
    # given a migrated database with a user
    store.create_user("ada", PASSWORD, Role.DEVELOPER, T0)
    # when the portal starts again on it, and upgrades once more
    again = UserStore(database_url, HASHER)
    try:
        again.create_schema()
        # then it is at the same revision, matches the models, and the user logs in
        assert current_revision(again.engine, VERSION_TABLE) == HEAD
        assert differences(again.engine) == []
        assert again.authenticate("ada", PASSWORD) is not None
    finally:
        again.close()


def test_a_database_made_by_create_all_is_adopted_with_its_rows(database_url: str) -> None:
    # given a database as the portal made it before migrations, with a user, a session, a token and an invitation
    engine = create_engine(database_url)
    try:
        metadata().create_all(engine)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO users (id, username, password_hash, role, created_at) "
                              "VALUES (7, 'ada', :h, 'developer', :t)"), {"h": HASHER.hash(PASSWORD), "t": T0})
            conn.execute(text("INSERT INTO sessions (token_sha256, user_id, created_at, last_seen_at, expires_at, "
                              "idle_timeout_s) VALUES (:s, 7, :t, :t, :e, 3600)"),
                         {"s": sha256(SESSION), "t": T0, "e": T0 + timedelta(hours=8)})
            conn.execute(text("INSERT INTO api_tokens (token_sha256, prefix, user_id, name, created_at) "
                              "VALUES (:s, 'miaas_pat_an-', 7, 'ci', :t)"), {"s": sha256(TOKEN), "t": T0})
            conn.execute(text("INSERT INTO invitations (token_sha256, role, created_by, created_at, expires_at) "
                              "VALUES (:s, 'viewer', 'ada', :t, :e)"), {"s": sha256("inv"), "t": T0,
                                                                      "e": T0 + timedelta(days=3)})
        assert current_revision(engine, VERSION_TABLE) is None
    finally:
        engine.dispose()
    # when the portal starts on it
    store = UserStore(database_url, HASHER)
    try:
        # then it is at the newest revision, matches the models, and every row still works
        assert current_revision(store.engine, VERSION_TABLE) == HEAD
        assert differences(store.engine) == []
        assert store.authenticate("ada", PASSWORD) is not None
        found = store.session(SESSION, T0 + timedelta(minutes=1), timedelta(minutes=5))
        assert found is not None and found[0].username == "ada"
        token = store.token_user(TOKEN, T0, timedelta(minutes=5))
        assert token is not None and token[1].name == "ci"
        assert store.invitation("inv", T0) is not None
        # and new rows can be added beside them
        assert store.create_user("bob", PASSWORD, Role.VIEWER, T0).id != 7
    finally:
        store.close()


def test_the_portal_and_the_controller_share_one_database_each_with_its_own_revision(database_url: str) -> None:
    # when a portal and a controller start on the same database (one PostgreSQL database for the cluster)
    portal = UserStore(database_url, HASHER)
    controller = DeploymentStore(database_url)
    try:
        # then each finds its own tables at its own head, and neither took the other's version table for its own
        assert current_revision(portal.engine, VERSION_TABLE) == HEAD
        assert current_revision(controller.engine, CONTROLLER_VERSION_TABLE) == "0001"
        assert differences(portal.engine) == []
        assert {*TABLES, VERSION_TABLE, CONTROLLER_VERSION_TABLE, "deployments"} <= set(tables(portal.engine))
        portal.create_schema()  # and a restart of the portal still finds its database at head
        assert current_revision(portal.engine, VERSION_TABLE) == HEAD
    finally:
        portal.close()
        controller.engine.dispose()


def start_portal(url: str, barrier: Barrier, results: Queue[str]) -> None:
    """In a process of its own: wait for the others, then start a portal's store on `url`."""
    barrier.wait()
    try:
        UserStore(url, PasswordHasher(n=TEST_SCRYPT_N)).close()
        results.put("started")
    except Exception as exc:  # noqa: BLE001 - the parent reports what failed
        results.put(f"{type(exc).__name__}: {exc}")


def test_portals_starting_together_on_postgresql_upgrade_one_at_a_time(request: pytest.FixtureRequest) -> None:
    # given a fresh PostgreSQL database and three portal processes released at the same instant
    with postgres_schema(request.getfixturevalue("postgres_url"), "portalrace") as url:
        spawn = multiprocessing.get_context("spawn")
        barrier, results = spawn.Barrier(3), spawn.Queue()
        processes = [spawn.Process(target=start_portal, args=(url, barrier, results)) for _ in range(3)]
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


def test_the_migrations_are_one_linear_history_inside_the_package() -> None:
    script = ScriptDirectory.from_config(alembic_config())
    assert (MIGRATIONS / "env.py").is_file() and (MIGRATIONS / "script.py.mako").is_file()
    assert len(script.get_heads()) == 1
    assert [r.revision for r in script.walk_revisions()][-1] == "0001"


def test_the_initial_revision_can_be_downgraded_and_upgraded_again_by_url(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'frontend.db'}"
    command.upgrade(alembic_config(url), "head")
    engine = create_engine(url)
    try:
        command.downgrade(alembic_config(url), "base")
        assert tables(engine) == [VERSION_TABLE]
        command.upgrade(alembic_config(url), "head")
        assert differences(engine) == []
    finally:
        engine.dispose()


@pytest.mark.parametrize(("given", "kept"), [
    ("sqlite:///.miaas/frontend.db", "sqlite:///.miaas/frontend.db"),
    ("postgresql+psycopg://portal:pw@db.example:5432/miaas", "postgresql+psycopg://portal:pw@db.example:5432/miaas"),
    ("postgresql://portal:s%40cret@db.example/miaas", "postgresql+psycopg://portal:s%40cret@db.example/miaas"),
    ("postgres://portal@db.example/miaas", "postgresql+psycopg://portal@db.example/miaas"),
])
def test_the_settings_take_sqlite_and_postgresql_urls(settings: FrontendSettings, given: str, kept: str) -> None:
    # the plain postgresql:// name would pick psycopg2, which is not installed: it means psycopg
    assert FrontendSettings(**{**dict(settings), "database_url": given}).database_url == kept


@pytest.mark.parametrize(("given", "says"), [
    ("mysql://portal:s3cret@db.example/miaas", "must be sqlite:///PATH or postgresql"),
    ("postgresql+psycopg2://portal@db.example/miaas", "must be sqlite:///PATH or postgresql"),
    ("not a url", "not a database URL"),
    ("", "not a database URL"),
])
def test_the_settings_refuse_other_databases_by_name(settings: FrontendSettings, given: str, says: str) -> None:
    with pytest.raises(ValidationError, match="FRONTEND_DATABASE_URL") as refused:
        FrontendSettings(**{**dict(settings), "database_url": given})
    assert says in str(refused.value)
    assert "s3cret" not in str(refused.value)
