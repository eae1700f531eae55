"""workers.role: which queues a worker consumes (all, train or aux)

A worker started with ``--role aux`` prepares data and trains tokenizers without training
runs; one with ``--role train`` only trains. Existing rows get ``all`` (before this revision
every worker consumed both queues). Only workers that train count for admission, readiness
and the reconciler.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 17:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(
            sa.Column("role", sa.String(length=8), nullable=False, server_default="all")
        )
        batch.create_check_constraint(
            op.f("ck_workers_role_known"), "role IN ('all', 'train', 'aux')"
        )


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_constraint(op.f("ck_workers_role_known"), type_="check")
        batch.drop_column("role")
