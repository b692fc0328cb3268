"""Alembic environment of the portal: its tables, on the connection `UserStore.create_schema()` passes
(`config.attributes["connection"]`) or on the configured `sqlalchemy.url` (see `miaas.migrate.run_env`)."""

from __future__ import annotations

from frontend.store import metadata
from miaas.migrate import run_env

run_env(metadata())
