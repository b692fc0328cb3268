"""Never reuse a version number: models.last_version counts every version ever created, deleted ones included.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 11:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("last_version", sa.Integer(), nullable=False, server_default="0"))
    # Existing models continue after their highest version (no version was deletable before this revision).
    op.execute(
        "UPDATE models SET last_version = "
        "COALESCE((SELECT MAX(versions.version) FROM versions WHERE versions.model_id = models.id), 0)"
    )


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("last_version")
