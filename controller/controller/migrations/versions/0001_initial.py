"""Initial schema: deployments, idempotency keys, identities (certificates, join tokens, revocations), the leader
lease. A database made before migrations (by `create_all`) is adopted: its tables and rows are kept, the columns
and indexes they lack are added (see `miaas.migrate.create_or_adopt`).

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
    m = sa.MetaData()
    return [
        sa.Table(
            "deployments", m,
            sa.Column("id", sa.String(64), primary_key=True),
            sa.Column("model_id", sa.String(128), nullable=False, index=True),
            sa.Column("model_name", sa.String(128), nullable=False),
            sa.Column("version", sa.Integer(), nullable=False),
            sa.Column("status", sa.String(16), nullable=False, index=True),
            sa.Column("agent_id", sa.String(128), nullable=True, index=True),
            sa.Column("url", sa.String(512), nullable=True),
            sa.Column("reason", sa.Text(), nullable=True),
            sa.Column("runtime", sa.String(32), nullable=False),
            sa.Column("cpus", sa.Float(), nullable=False),
            sa.Column("memory_mb", sa.Integer(), nullable=False),
            sa.Column("gpus", sa.Integer(), nullable=False),
            sa.Column("placement", sa.JSON(), nullable=False),
            sa.Column("created_by", sa.String(128), nullable=True),
            sa.Column("created_at", TZ, nullable=False),
            sa.Column("updated_at", TZ, nullable=False),
            # Columns an older controller's database may lack: each has a server default or may be NULL.
            sa.Column("priority", sa.Integer(), nullable=False, server_default=sa.text("1"), index=True),
            sa.Column("generation", sa.Integer(), nullable=False, server_default=sa.text("0")),
            sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
            sa.Column("next_attempt_at", TZ, nullable=True),
            sa.Column("requeue", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        ),
        sa.Table(
            "idempotency_keys", m,
            sa.Column("caller", sa.String(128), primary_key=True),
            sa.Column("key", sa.String(255), primary_key=True),
            sa.Column("fingerprint", sa.String(64), nullable=False),
            sa.Column("deployment_id", sa.String(64), nullable=False),
            sa.Column("created_at", TZ, nullable=False),
            sa.Column("expires_at", TZ, nullable=False, index=True),
        ),
        sa.Table(
            "issued_certificates", m,
            sa.Column("serial", sa.String(64), primary_key=True),
            sa.Column("subject", sa.String(128), nullable=False, index=True),
            sa.Column("role", sa.String(32), nullable=False),
            sa.Column("url", sa.String(512), nullable=True),
            sa.Column("public_key", sa.String(64), nullable=False),
            sa.Column("issued_at", TZ, nullable=False),
            sa.Column("not_after", TZ, nullable=False, index=True),
        ),
        sa.Table(
            "join_tokens", m,
            sa.Column("serial", sa.String(64), primary_key=True),
            sa.Column("uses", sa.Integer(), nullable=False),
            sa.Column("used", sa.Integer(), nullable=False),
            sa.Column("expires_at", TZ, nullable=False),
        ),
        sa.Table(
            "revocations", m,
            sa.Column("serial", sa.String(64), primary_key=True),
            sa.Column("subject", sa.String(128), nullable=True, index=True),
            sa.Column("reason", sa.Text(), nullable=False),
            sa.Column("revoked_at", TZ, nullable=False),
            sa.Column("expires_at", TZ, nullable=True, index=True),
        ),
        sa.Table(
            "leader_lease", m,
            sa.Column("name", sa.String(64), primary_key=True),
            sa.Column("holder_id", sa.String(128), nullable=True),
            sa.Column("holder_url", sa.String(512), nullable=True),
            sa.Column("epoch", sa.Integer(), nullable=False),
            sa.Column("expires_at", TZ, nullable=False),
        ),
    ]


def upgrade() -> None:
    for table in _tables():
        create_or_adopt(table)


def downgrade() -> None:
    for table in reversed(_tables()):
        op.drop_table(table.name)
