"""Sweeps, tags and notes: ``sweeps`` and ``sweep_trials``; runs gain ``tags``, ``note``,
``sweep_id``, ``sweep_params`` and ``cancel_reason``

Existing runs get no tags, no note and no sweep; a run cancelled before this revision has no
recorded reason (``cancel_reason`` NULL).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 20:30:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONDoc = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
CANCEL_REASONS = ("requested", "pruned", "sweep_cancelled", "no_worker")


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "running",
                "finished",
                "failed",
                "cancelled",
                name="status",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("metric_name", sa.String(length=64), nullable=False),
        sa.Column("metric_goal", sa.String(length=16), nullable=False),
        sa.Column("max_runs", sa.Integer(), nullable=True),
        sa.Column("max_concurrent", sa.Integer(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=True),
        sa.Column("spec", JSONDoc, nullable=False),
        sa.Column("end_reason", sa.Text(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("controller_id", sa.String(length=200), nullable=True),
        sa.Column("controller_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "method IN ('grid', 'random', 'tpe')", name=op.f("ck_sweeps_method_known")
        ),
        sa.CheckConstraint(
            "metric_goal IN ('minimize', 'maximize')", name=op.f("ck_sweeps_metric_goal_known")
        ),
        sa.CheckConstraint("max_concurrent >= 1", name=op.f("ck_sweeps_max_concurrent_positive")),
        sa.CheckConstraint(
            "max_runs IS NULL OR max_runs >= 1", name=op.f("ck_sweeps_max_runs_positive")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sweeps")),
        sa.UniqueConstraint(
            "owner", "idempotency_key", name=op.f("uq_sweeps_owner_idempotency_key")
        ),
    )
    op.create_index(op.f("ix_sweeps_created_at"), "sweeps", ["created_at"])
    op.create_table(
        "sweep_trials",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sweep_id", sa.Uuid(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("params", JSONDoc, nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("run_id", sa.Uuid(), nullable=True),
        sa.Column("errors", JSONDoc, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "state IN ('created', 'skipped')", name=op.f("ck_sweep_trials_state_known")
        ),
        sa.CheckConstraint("number >= 0", name=op.f("ck_sweep_trials_number_nonnegative")),
        sa.ForeignKeyConstraint(
            ["sweep_id"],
            ["sweeps.id"],
            name=op.f("fk_sweep_trials_sweep_id_sweeps"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_sweep_trials_run_id_runs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sweep_trials")),
        sa.UniqueConstraint("sweep_id", "number", name=op.f("uq_sweep_trials_sweep_id_number")),
    )
    op.create_index(op.f("ix_sweep_trials_run_id"), "sweep_trials", ["run_id"])
    with op.batch_alter_table("runs") as batch:
        batch.add_column(
            sa.Column(
                "cancel_reason",
                sa.Enum(
                    *CANCEL_REASONS,
                    name="cancel_reason",
                    native_enum=False,
                    create_constraint=False,
                    length=32,
                ),
                nullable=True,
            )
        )
        batch.add_column(sa.Column("tags", JSONDoc, nullable=False, server_default="[]"))
        batch.add_column(sa.Column("note", sa.Text(), nullable=True))
        batch.add_column(sa.Column("sweep_id", sa.Uuid(), nullable=True))
        batch.add_column(sa.Column("sweep_params", JSONDoc, nullable=True))
        batch.create_check_constraint(
            op.f("ck_runs_cancel_reason"),
            "cancel_reason IN (" + ", ".join(f"'{r}'" for r in CANCEL_REASONS) + ")",
        )
        batch.create_foreign_key(
            op.f("fk_runs_sweep_id_sweeps"), "sweeps", ["sweep_id"], ["id"], ondelete="SET NULL"
        )
        batch.create_index(op.f("ix_runs_sweep_id"), ["sweep_id"])


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_index(op.f("ix_runs_sweep_id"))
        batch.drop_constraint(op.f("fk_runs_sweep_id_sweeps"), type_="foreignkey")
        batch.drop_constraint(op.f("ck_runs_cancel_reason"), type_="check")
        batch.drop_column("sweep_params")
        batch.drop_column("sweep_id")
        batch.drop_column("note")
        batch.drop_column("tags")
        batch.drop_column("cancel_reason")
    op.drop_index(op.f("ix_sweep_trials_run_id"), table_name="sweep_trials")
    op.drop_table("sweep_trials")
    op.drop_index(op.f("ix_sweeps_created_at"), table_name="sweeps")
    op.drop_table("sweeps")
