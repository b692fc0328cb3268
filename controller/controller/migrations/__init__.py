"""Alembic migrations of the controller's database; `DeploymentStore.create_schema()` runs them up to head.

They cover every table of that database: the deployment records (`controller.store`), the identities
(`controller.identities`) and the leader lease (`controller.leader`): `target_metadata()` is their union.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import MetaData

MIGRATIONS = Path(__file__).parent
VERSION_TABLE = "alembic_version_controller"
"""The controller's own version table: it may share a PostgreSQL database with other services."""


def target_metadata() -> list[MetaData]:
    """The tables the migrations make, as the controller's modules declare them."""
    from controller import identities, leader, store

    return [store.Base.metadata, identities.Base.metadata, leader.metadata]
