"""Initial schema: users, invitations, sessions, API tokens. A database made before migrations (by `create_all`)
is adopted: its tables and rows are kept, the columns and indexes they lack are added (see
`miaas.migrate.create_or_adopt`).

Revision ID: 0001
Revises:
Create Date: 2026-12-02 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from miaas.migrate import create_or_adopt

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)


def _tables() -> list[sa.Table]:
    """The tables, each after those it refers to."""
    m = sa.MetaData()
    return [
        sa.Table(
            "users", m,
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("username", sa.String(64), nullable=False, unique=True),
            sa.Column("password_hash", sa.String(255), nullable=False),
            sa.Column("role", sa.String(16), nullable=False),
            sa.Column("created_at", TZ, nullable=False),
        ),
        sa.Table(
            "invitations", m,
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
            sa.Column("role", sa.String(16), nullable=False),
            sa.Column("created_by", sa.String(64), nullable=False),
            sa.Column("created_at", TZ, nullable=False),
            sa.Column("expires_at", TZ, nullable=False),
            sa.Column("used_by", sa.String(64), nullable=True),
        ),
        sa.Table(
            "sessions", m,
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
            sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False,
                      index=True),
            sa.Column("created_at", TZ, nullable=False),
            sa.Column("last_seen_at", TZ, nullable=False),
            sa.Column("expires_at", TZ, nullable=False, index=True),
            sa.Column("idle_timeout_s", sa.Integer(), nullable=False),
        ),
        sa.Table(
            "api_tokens", m,
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
            sa.Column("prefix", sa.String(32), nullable=False),
            sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False,
                      index=True),
            sa.Column("name", sa.String(64), nullable=False),
            sa.Column("created_at", TZ, nullable=False),
            sa.Column("expires_at", TZ, nullable=True),
            sa.Column("last_used_at", TZ, nullable=True),
        ),
    ]


def upgrade() -> None:
    for table in _tables():
        create_or_adopt(table)


def downgrade() -> None:
    for table in reversed(_tables()):
        op.drop_table(table.name)
