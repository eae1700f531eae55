"""a failure count apart from the attempt (fencing token), and the failure reason no_space

``runs.failures`` counts the attempts that failed; ``MOEJOBS_MAX_ATTEMPTS`` now bounds it,
while ``attempt`` keeps counting every claim (graceful stops included). Existing runs start
at 0, except failed runs, which count one failure (the one that ended them).

``no_space`` joins the failure reasons: the CHECK constraints of ``runs.failure_reason`` and
``run_events.reason`` are rebuilt with it (SQLite: batch mode copies the tables; the rows
are kept).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 11:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD = ("invalid_config", "invalid_data", "out_of_memory", "killed", "crashed", "lost_worker")
_NEW = (
    "invalid_config",
    "invalid_data",
    "out_of_memory",
    "no_space",
    "killed",
    "crashed",
    "lost_worker",
)


def _in_list(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _reasons(values: Sequence[str]) -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_constraint(op.f("ck_runs_failure_reason"), type_="check")
        batch.create_check_constraint(
            op.f("ck_runs_failure_reason"), _in_list("failure_reason", values)
        )
    with op.batch_alter_table("run_events") as batch:
        batch.drop_constraint(op.f("ck_run_events_reason"), type_="check")
        batch.create_check_constraint(op.f("ck_run_events_reason"), _in_list("reason", values))


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("failures", sa.Integer(), server_default="0", nullable=False))
        batch.create_check_constraint(op.f("ck_runs_failures_nonnegative"), "failures >= 0")
    op.execute("UPDATE runs SET failures = 1 WHERE status = 'failed'")
    _reasons(_NEW)


def downgrade() -> None:
    op.execute("UPDATE runs SET failure_reason = 'crashed' WHERE failure_reason = 'no_space'")
    op.execute("UPDATE run_events SET reason = 'crashed' WHERE reason = 'no_space'")
    _reasons(_OLD)
    with op.batch_alter_table("runs") as batch:
        batch.drop_constraint(op.f("ck_runs_failures_nonnegative"), type_="check")
        batch.drop_column("failures")
