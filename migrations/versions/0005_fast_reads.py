"""Reads that stay fast at any size: list indexes in id order, and counts kept by triggers.

The list's indexes were on its filters alone ((owner, status), (task)): a page read every
matching job and sorted them, 456 ms for the first page of 1,000,000 finished jobs on SQLite.
Each index here ends with the id, so a page reads its rows in order and stops. Counts by status
read the whole table (197 ms); ``job_counts`` keeps them instead, a row per change written by
the triggers below in the changing transaction, folded now and then by the runner. Retention
finds the finished jobs to delete through ``ix_jobs_finished`` instead of reading every job.

The triggers are not in the models (Alembic does not compare them). On SQLite, a later
migration that rebuilds ``jobs`` in batch mode (copy, drop, rename) drops them with the old
table, and must create them again.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

IS_FINISHED = "status IN ('succeeded', 'failed', 'cancelled')"
LIST_INDEXES = {
    "ix_jobs_owner_id": ["owner", "id"],
    "ix_jobs_owner_status_id": ["owner", "status", "id"],
    "ix_jobs_owner_task_id": ["owner", "task", "id"],
    "ix_jobs_owner_status_task_id": ["owner", "status", "task", "id"],
}
# The UPDATE trigger fires only when the status (or the owner) changes: a heartbeat or a
# progress write adds nothing.
CHANGED = "OLD.status IS DISTINCT FROM NEW.status OR OLD.owner IS DISTINCT FROM NEW.owner"
SQLITE_TRIGGERS = (
    """CREATE TRIGGER jobs_counted_insert AFTER INSERT ON jobs BEGIN
        INSERT INTO job_counts (owner, status, n) VALUES (NEW.owner, NEW.status, 1);
    END""",
    f"""CREATE TRIGGER jobs_counted_update AFTER UPDATE OF status, owner ON jobs
    WHEN {CHANGED.replace("IS DISTINCT FROM", "IS NOT")} BEGIN
        INSERT INTO job_counts (owner, status, n)
        VALUES (OLD.owner, OLD.status, -1), (NEW.owner, NEW.status, 1);
    END""",
    """CREATE TRIGGER jobs_counted_delete AFTER DELETE ON jobs BEGIN
        INSERT INTO job_counts (owner, status, n) VALUES (OLD.owner, OLD.status, -1);
    END""",
)
POSTGRES_TRIGGERS = (
    """CREATE FUNCTION jobs_counted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP <> 'INSERT' THEN
            INSERT INTO job_counts (owner, status, n) VALUES (OLD.owner, OLD.status, -1);
        END IF;
        IF TG_OP <> 'DELETE' THEN
            INSERT INTO job_counts (owner, status, n) VALUES (NEW.owner, NEW.status, 1);
        END IF;
        RETURN NULL;
    END
    $$""",
    """CREATE TRIGGER jobs_counted_insert AFTER INSERT ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_counted()""",
    f"""CREATE TRIGGER jobs_counted_update AFTER UPDATE OF status, owner ON jobs
    FOR EACH ROW WHEN ({CHANGED}) EXECUTE FUNCTION jobs_counted()""",
    """CREATE TRIGGER jobs_counted_delete AFTER DELETE ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_counted()""",
)
TRIGGERS = ("jobs_counted_insert", "jobs_counted_update", "jobs_counted_delete")


def upgrade() -> None:
    op.create_table(
        "job_counts",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_counts")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_owner_status")
        batch_op.drop_index("ix_jobs_task")
        for name, columns in LIST_INDEXES.items():
            batch_op.create_index(name, columns, unique=False)
        batch_op.create_index(
            "ix_jobs_finished",
            ["finished_at"],
            unique=False,
            sqlite_where=sa.text(IS_FINISHED),
            postgresql_where=sa.text(IS_FINISHED),
        )
    for statement in SQLITE_TRIGGERS if _is_sqlite() else POSTGRES_TRIGGERS:
        op.execute(statement)
    # After the triggers: on PostgreSQL, making them locked the table against writes until
    # this transaction commits (SQLite's migration holds the write lock throughout), so no
    # change falls between the count and the first trigger.
    op.execute(
        "INSERT INTO job_counts (owner, status, n) "
        "SELECT owner, status, COUNT(*) FROM jobs GROUP BY owner, status"
    )


def downgrade() -> None:
    for name in TRIGGERS:
        op.execute(f"DROP TRIGGER {name}" + ("" if _is_sqlite() else " ON jobs"))
    if not _is_sqlite():
        op.execute("DROP FUNCTION jobs_counted()")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_jobs_finished",
            sqlite_where=sa.text(IS_FINISHED),
            postgresql_where=sa.text(IS_FINISHED),
        )
        for name in LIST_INDEXES:
            batch_op.drop_index(name)
        batch_op.create_index("ix_jobs_task", ["task"], unique=False)
        batch_op.create_index("ix_jobs_owner_status", ["owner", "status"], unique=False)
    op.drop_table("job_counts")


def _is_sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"
