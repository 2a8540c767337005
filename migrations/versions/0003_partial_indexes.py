"""Partial indexes for the claim and the sweep.

The claim looked for waiting jobs through an index on (status, priority, run_at), which
cannot give "queued or retrying, by priority and due time" in order: each claim sorted every
waiting job (2.5 ms a claim with 10,000 waiting, on SQLite). An index of the waiting jobs
alone, in claim order, finds the next one at once; one of the running jobs serves the sweep.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

IS_WAITING = "status IN ('queued', 'retrying')"
IS_RUNNING = "status = 'running'"


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_status_priority_run_at")
        batch_op.create_index(
            "ix_jobs_due",
            ["priority", "run_at", "id"],
            unique=False,
            sqlite_where=sa.text(IS_WAITING),
            postgresql_where=sa.text(IS_WAITING),
        )
        batch_op.create_index(
            "ix_jobs_running",
            ["lease_owner"],
            unique=False,
            sqlite_where=sa.text(IS_RUNNING),
            postgresql_where=sa.text(IS_RUNNING),
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_running")
        batch_op.drop_index("ix_jobs_due")
        batch_op.create_index(
            "ix_jobs_status_priority_run_at", ["status", "priority", "run_at"], unique=False
        )
