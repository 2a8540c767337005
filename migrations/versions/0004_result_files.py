"""Large DataFrame results kept as files: job_results.path.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job_results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("path", sa.String(length=255), nullable=True))


def downgrade() -> None:
    # A result kept as a file has no bytes to put back in the row: the row goes.
    op.execute("DELETE FROM job_results WHERE path IS NOT NULL")
    with op.batch_alter_table("job_results", schema=None) as batch_op:
        batch_op.drop_column("path")
