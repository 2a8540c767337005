"""Inputs kept as files: job_inputs.path, and data may be NULL.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job_inputs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("path", sa.String(length=255), nullable=True))
        batch_op.alter_column("data", existing_type=sa.LargeBinary(), nullable=True)


def downgrade() -> None:
    # A file-backed input has no bytes to put back in the row; such jobs cannot be kept.
    op.execute("DELETE FROM jobs WHERE id IN (SELECT job_id FROM job_inputs WHERE data IS NULL)")
    with op.batch_alter_table("job_inputs", schema=None) as batch_op:
        batch_op.alter_column("data", existing_type=sa.LargeBinary(), nullable=False)
        batch_op.drop_column("path")
