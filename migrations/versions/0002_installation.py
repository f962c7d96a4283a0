"""installation: the random token that names a database (the prefix of its Redis job streams)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 15:10:00
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    installation = op.create_table(
        "installation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_installation_one_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_installation")),
    )
    # a database migrated from 0001 is named now; its earlier jobs' streams (under job:{id}) are left to expire
    op.bulk_insert(
        installation, [{"id": 1, "token": secrets.token_hex(8), "created_at": dt.datetime.now(dt.timezone.utc)}]
    )


def downgrade() -> None:
    op.drop_table("installation")
