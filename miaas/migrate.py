"""Alembic upgrades of a service's database, run by the service at start: one at a time, adopting old databases.

Glossary:
- **Version table**: where a service's database records its revision. Each service names its own
  (`alembic_version_controller`, ...), so that services may share one PostgreSQL database without reading each
  other's revision.
- **One at a time**: services on one PostgreSQL database (two controllers starting together) upgrade under a
  PostgreSQL advisory lock taken in the upgrade's own transaction; the second waits for the first to commit and then
  finds the database at head. SQLite serves one host, where one process starts at a time.
- **Adoption**: a database made before the service had migrations (by `create_all`, with rows) has its tables but
  no version table. The initial revision keeps each table it finds, adds the columns and indexes it lacks, creates
  the tables that are missing, and records itself: no row is lost, and later revisions apply as to any database.

A service's `env.py` is `run_env(target_metadata)`; its store calls `upgrade_to_head(engine, config, key)`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from alembic import command, context, op
from alembic.config import Config
from sqlalchemy import MetaData, Table, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.schema import CreateColumn

from miaas.db import make_engine

log = logging.getLogger(__name__)
_upgrading = threading.Lock()


def alembic_config(script_location: Path, version_table: str, url: str | None = None) -> Config:
    """An Alembic config built in code (no alembic.ini); `url` for the command-line way, without a connection."""
    config = Config()
    config.set_main_option("script_location", str(script_location))
    config.set_main_option("version_table", version_table)
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def lock_key(name: str) -> int:
    """The advisory lock key of a service's upgrades: a stable signed 64-bit number from its name."""
    return int.from_bytes(hashlib.sha256(f"miaas-migrations:{name}".encode()).digest()[:8], "big", signed=True)


def upgrade_to_head(engine: Engine, config: Config, key: int) -> None:
    """`alembic upgrade head` on `engine`, in one transaction; on PostgreSQL under the advisory lock `key`, which
    the transaction's end releases. One upgrade at a time in a process: Alembic's `context` and `op` are globals."""
    with _upgrading, engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        config.attributes["connection"] = connection
        try:
            command.upgrade(config, "head")
        finally:
            del config.attributes["connection"]


def current_revision(engine: Engine, version_table: str) -> str | None:
    """The revision a database records in `version_table`; None for a database without one."""
    with engine.connect() as connection:
        if not inspect(connection).has_table(version_table):
            return None
        return connection.execute(text(f"SELECT version_num FROM {version_table}")).scalar_one_or_none()


def run_env(target_metadata: MetaData | Sequence[MetaData]) -> None:
    """The body of a service's `env.py`: migrate the connection the config carries (`upgrade_to_head`), or else
    the configured `sqlalchemy.url`."""
    config = context.config
    version_table = config.get_main_option("version_table") or "alembic_version"
    if context.is_offline_mode():
        raise RuntimeError("these migrations inspect the database they adopt: they have no offline (--sql) form")

    def run(connection: Connection) -> None:
        context.configure(
            connection=connection, target_metadata=target_metadata, version_table=version_table,
            render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()

    connection = config.attributes.get("connection")
    if connection is not None:
        run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError(f"no connection and no sqlalchemy.url given to the migrations in "
                           f"{config.get_main_option('script_location')}")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            run(conn)
            conn.commit()
    finally:
        engine.dispose()


def create_or_adopt(table: Table) -> None:
    """In a revision: create `table`, or, where a database made before migrations has it, keep it with its rows
    and add the columns and indexes it lacks.

    An initial revision calls this for each of its tables; what it does to a table must never change, or the
    revisions already run would differ from a new run of them. A missing column that could not be added to a table
    with rows (NOT NULL without a server default) is refused with the table and the column named.
    """
    bind = op.get_bind()
    inspector = inspect(bind)
    if not inspector.has_table(table.name):
        table.create(bind)
        return
    present = {c["name"] for c in inspector.get_columns(table.name)}
    added = []
    for column in table.columns:
        if column.name in present:
            continue
        if not column.nullable and column.server_default is None:
            raise RuntimeError(f"table {table.name!r} made before migrations lacks column {column.name!r}, which has "
                               "no default: it cannot be adopted; add the column by hand or start on a new database")
        ddl = CreateColumn(column).compile(dialect=bind.dialect)
        bind.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {ddl}")
        added.append(column.name)
    indexes = {i["name"] for i in inspector.get_indexes(table.name)}
    made = []
    for index in table.indexes:
        if index.name not in indexes:
            index.create(bind)
            made.append(str(index.name))
    log.warning("adopted table %s made before migrations, rows kept; columns added: %s; indexes added: %s",
                table.name, ", ".join(added) or "none", ", ".join(made) or "none")
