"""what workers have (kind, host memory, free space) and the throughput table (calibration)

``workers`` gains ``kind`` (the GPU name or "cpu: <model>"), ``host_memory_bytes`` and
``free_bytes`` (free space under RUNS_DIR, renewed with heartbeats); existing rows get NULL
(not reported: such a worker never causes a refusal). ``throughput`` records the speed that
succeeded runs of one model config reached on one worker kind (``service.admission``).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 14:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("host_memory_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("free_bytes", sa.BigInteger(), nullable=True))
    op.create_table(
        "throughput",
        sa.Column("model_key", sa.String(length=64), nullable=False),
        sa.Column("worker_kind", sa.String(length=200), nullable=False),
        sa.Column("tokens_per_sec_per_device", sa.Float(), nullable=False),
        sa.Column("flops_per_sec_per_device", sa.Float(), nullable=True),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("last_run_id", sa.Uuid(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("runs >= 1", name=op.f("ck_throughput_runs_positive")),
        sa.CheckConstraint(
            "tokens_per_sec_per_device > 0", name=op.f("ck_throughput_tokens_per_sec_positive")
        ),
        sa.PrimaryKeyConstraint("model_key", "worker_kind", name=op.f("pk_throughput")),
    )


def downgrade() -> None:
    op.drop_table("throughput")
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("free_bytes")
        batch.drop_column("host_memory_bytes")
        batch.drop_column("kind")
