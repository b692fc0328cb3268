"""A database records which model store it owns (the id in the store's .miaas-store.json), so that a registry
started on a fresh database never mistakes a populated store for leftovers, nor an unmounted store for a new one.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # An existing database gets no row: at its next start the registry claims its store when the two agree (the
    # store holds versions the database records), and refuses to start otherwise.
    op.create_table(
        "store_owner",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("store_id", sa.String(length=64), nullable=False),
        sa.Column("root", sa.String(length=1024), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("store_owner")
