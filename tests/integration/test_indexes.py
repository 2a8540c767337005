"""The claim reads the next due job from a partial index, however many jobs wait or are done."""

from __future__ import annotations

from sqlalchemy import update

from jobsvc import repository as repo
from jobsvc.db import Database
from jobsvc.lifecycle import JobStatus
from jobsvc.models import jobs
from jobsvc.submission import NewJob


async def plan_of(db: Database, sql: str) -> str:
    async with db.write() as conn:  # write: SET LOCAL lasts only for this transaction
        if db.is_sqlite:
            rows = (await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")).all()
            return "\n".join(str(row[-1]) for row in rows)
        # With few rows a sequential scan is cheaper; forbid it to learn whether the index
        # can serve the query at all (a partial index whose condition does not match cannot).
        await conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        rows = (await conn.exec_driver_sql(f"EXPLAIN {sql}")).all()
        return "\n".join(str(row[0]) for row in rows)


async def test_the_claim_reads_the_due_index(db: Database) -> None:
    job = NewJob(task="double", params={}, max_attempts=3, retry_delay_seconds=0)
    async with db.write() as conn:
        rows = await repo.insert_jobs(conn, [(job, None)] * 50, db.now())
        done = [row.id for row in rows[:25]]
        await conn.execute(
            update(jobs).where(jobs.c.id.in_(done)).values(status=JobStatus.SUCCEEDED)
        )
    query = repo.due_jobs(db.now(), 1)
    async with db.read() as conn:
        sql = str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    plan = await plan_of(db, sql)
    assert "ix_jobs_due" in plan, plan
    # Read in claim order: no sort of every waiting job.
    assert "TEMP B-TREE" not in plan, plan
    assert "Sort" not in plan, plan
    async with db.write() as conn:
        now = db.now()
        claimed = await repo.claim(conn, "w:1:x", now, now, limit=30)
    assert [row.id for row in claimed] == [row.id for row in rows[25:]]
