"""The schema comes from Alembic migrations, and the migrated database matches the store's models exactly."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from model_registry.store import MIGRATIONS, Base, Store, alembic_config

TABLES = ["alembic_version", "aliases", "models", "store_owner", "versions"]


def _differences(store: Store) -> list[object]:
    with store.engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata))


def test_the_migrated_database_matches_the_store_models(database_url: str) -> None:
    store = Store(database_url)
    try:
        store.create_schema()
        store.create_schema()  # a second upgrade finds the database at head and changes nothing
        with store.engine.connect() as conn:
            assert sorted(inspect(conn).get_table_names()) == TABLES
            head = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all()
            if conn.dialect.name == "postgresql":  # each test has a schema of its own, first on the search path
                assert conn.exec_driver_sql("SELECT current_schema()").scalar_one().startswith("registry_")
        assert head == [ScriptDirectory.from_config(alembic_config()).get_current_head()]
        assert _differences(store) == []
    finally:
        store.close()


def test_an_in_memory_sqlite_database_is_migrated_on_the_store_engine() -> None:
    store = Store("sqlite://")
    try:
        store.create_schema()
        with store.engine.connect() as conn:
            assert sorted(inspect(conn).get_table_names()) == TABLES
        assert _differences(store) == []
        assert store.models() == []
    finally:
        store.close()


def test_the_migrations_are_one_linear_history_inside_the_package() -> None:
    script = ScriptDirectory.from_config(alembic_config())
    assert (MIGRATIONS / "env.py").is_file()
    assert len(script.get_heads()) == 1
    assert [r.revision for r in script.walk_revisions()][-1] == "0001"


def test_the_initial_revision_can_be_downgraded_and_upgraded_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    store = Store(url)
    try:
        store.create_schema()
        command.downgrade(alembic_config(url), "base")
        with store.engine.connect() as conn:
            assert inspect(conn).get_table_names() == ["alembic_version"]
        command.upgrade(alembic_config(url), "head")
        assert _differences(store) == []
    finally:
        store.close()


def test_upgrading_a_database_with_versions_continues_their_numbering(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    command.upgrade(alembic_config(url), "0001")
    store = Store(url)
    try:
        with store.engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO models (id, name, created_at) VALUES "
                                 "('m-000000000001', 'a', '2026-01-01'), ('m-000000000002', 'b', '2026-01-01')")
            for version in (1, 2, 5):
                conn.exec_driver_sql(
                    "INSERT INTO versions (model_id, version, path, sha256, size_bytes, manifest_sha256, meta_json, "
                    f"created_at) VALUES ('m-000000000001', {version}, 'p', 's', 1, 'm', '{{}}', '2026-01-01')")
        store.create_schema()
        assert store.next_version("m-000000000001") == 6
        assert store.next_version("m-000000000002") == 1
        assert _differences(store) == []
    finally:
        store.close()


def test_upgrading_a_database_from_before_store_owners_records_no_owner(tmp_path: Path) -> None:
    """Given a database at 0002 with a model, when it is upgraded, it owns no store yet (the next start claims the
    store when they share versions, see test_registry_store_ownership.py) and keeps its rows."""
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    command.upgrade(alembic_config(url), "0002")
    store = Store(url)
    try:
        with store.engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO models (id, name, created_at, last_version) VALUES "
                                 "('m-000000000001', 'a', '2026-01-01', 3)")
        store.create_schema()
        assert store.owner() is None
        assert store.has_records()
        assert store.next_version("m-000000000001") == 4
        assert _differences(store) == []
        command.downgrade(alembic_config(url), "0002")
        with store.engine.connect() as conn:
            assert "store_owner" not in inspect(conn).get_table_names()
    finally:
        store.close()
