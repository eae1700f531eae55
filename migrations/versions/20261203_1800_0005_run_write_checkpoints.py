"""runs.write_checkpoints: whether the run's training writes checkpoints

The worker decided this from the run's preset (none for ``smoke-test``); the run now says it
itself, set when it is created. Existing rows get true, smoke-test runs false (what the worker
did for them).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 18:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(
            sa.Column("write_checkpoints", sa.Boolean(), nullable=False, server_default=sa.true())
        )
    runs = sa.table("runs", sa.column("preset", sa.String), sa.column("write_checkpoints"))
    op.execute(
        runs.update().where(runs.c.preset == "smoke-test").values(write_checkpoints=sa.false())
    )


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("write_checkpoints")
