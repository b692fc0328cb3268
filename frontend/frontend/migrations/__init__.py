"""Alembic migrations of the portal's database; `UserStore.create_schema()` runs them up to head."""

from __future__ import annotations

from pathlib import Path

MIGRATIONS = Path(__file__).parent
VERSION_TABLE = "alembic_version_frontend"
"""The portal's own version table: it may share a PostgreSQL database with other services."""
