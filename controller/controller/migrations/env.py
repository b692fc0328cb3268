"""Alembic environment of the controller: its tables, on the connection `DeploymentStore.create_schema()` passes
(`config.attributes["connection"]`) or on the configured `sqlalchemy.url` (see `miaas.migrate.run_env`)."""

from __future__ import annotations

from controller.migrations import target_metadata
from miaas.migrate import run_env

run_env(target_metadata())
