"""Queries read indexes, not the table, however many jobs wait or are done: the claim reads the
next due job from a partial index; a page of the list reads its rows in id order from an index
and stops; counts, the oldest waiting job and retention read what they need and no more."""

from __future__ import annotations

import itertools
import re
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from jobsvc import repository as repo
from jobsvc.db import Database
from jobsvc.lifecycle import JobStatus
from jobsvc.models import jobs
from jobsvc.submission import NewJob


async def plan_of(db: Database, sql: str, *, sorts: bool = True) -> str:
    """The plan of ``sql``; on PostgreSQL, with sorts forbidden too unless ``sorts``."""
    async with db.write() as conn:  # write: SET LOCAL lasts only for this transaction
        if db.is_sqlite:
            rows = (await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")).all()
            return "\n".join(str(row[-1]) for row in rows)
        # With few rows a sequential scan is cheaper; forbid it to learn whether the index
        # can serve the query at all (a partial index whose condition does not match cannot).
        await conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        if not sorts:  # likewise: is there a plan that reads the rows in order?
            await conn.exec_driver_sql("SET LOCAL enable_sort = off")
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


async def literal_sql(db: Database, query: Any) -> str:
    async with db.read() as conn:
        return str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))


async def fill(db: Database) -> None:
    """Jobs of two owners and three tasks, in every status."""
    async with db.write() as conn:
        for owner, task in itertools.product(("", "key-b"), ("double", "boom", "summarize")):
            job = NewJob(task=task, params={}, max_attempts=3, retry_delay_seconds=0, owner=owner)
            rows = await repo.insert_jobs(conn, [(job, None)] * 12, db.now())
            for row, status in zip(rows, itertools.cycle(JobStatus), strict=False):
                await conn.execute(update(jobs).where(jobs.c.id == row.id).values(status=status))
    if not db.is_sqlite:
        # The statistics autovacuum would gather: with none, PostgreSQL takes every filter
        # for a match of one row, and any index of the owner for as good as another.
        async with db.write() as conn:
            await conn.exec_driver_sql("ANALYZE jobs")


FILTERS = [
    pytest.param((), None, id="all"),
    pytest.param(("failed",), None, id="status"),
    pytest.param((), "boom", id="task"),
    pytest.param(("failed",), "boom", id="status-task"),
    pytest.param(("failed", "succeeded"), None, id="statuses"),
    pytest.param(("queued", "running", "retrying"), "boom", id="statuses-task"),
]


@pytest.mark.parametrize("owner", ["", "key-b"])
@pytest.mark.parametrize(("statuses", "task"), FILTERS)
@pytest.mark.parametrize("cursor", [False, True], ids=["first", "next"])
async def test_a_page_reads_an_index_in_id_order(
    db: Database, owner: str, statuses: tuple[str, ...], task: str | None, cursor: bool
) -> None:
    await fill(db)
    before = "ffffffff-ffff-7fff-bfff-ffffffffffff" if cursor else None
    query = repo.page_query(owner, statuses, task, 51, before)
    plan = await plan_of(db, await literal_sql(db, query), sorts=False)
    # The index of exactly these filters, once for each status asked for.
    index = "_".join(
        ["ix_jobs_owner", *(["status"] if statuses else []), *(["task"] if task else []), "id"]
    )
    assert plan.count(index) == max(1, len(statuses)), plan
    if db.is_sqlite:
        assert "SCAN jobs" not in plan, plan  # a search of the index, in id order
        lines = plan.splitlines()
        sorts = [n for n, line in enumerate(lines) if "TEMP B-TREE" in line]
        if len(statuses) > 1:
            assert "MERGE (UNION ALL)" in plan, plan
            # Only each status's page is sorted again: its own few rows, read in order.
            assert all(lines[n - 1].startswith("SCAN anon_") for n in sorts), plan
        else:
            assert not sorts, plan
    else:
        assert "Seq Scan" not in plan, plan
        assert not re.search(r"Sort\s+\(", plan), plan  # no Sort node ("Sort Key" merges)
        assert "Index Scan Backward" in plan, plan
        if len(statuses) > 1:
            assert "Merge Append" in plan, plan
    async with db.read() as conn:
        rows = (await conn.execute(query)).all()
    assert rows, "the filters match some jobs"
    assert [row.id for row in rows] == sorted((row.id for row in rows), reverse=True)
    assert all(row.owner == owner and (not task or row.task == task) for row in rows)
    assert all(not statuses or row.status in statuses for row in rows)


async def test_counts_and_upkeep_read_no_job_they_do_not_need(db: Database) -> None:
    await fill(db)
    for owner in (None, ""):
        plan = await plan_of(db, await literal_sql(db, repo.status_counts(owner)))
        assert "job_counts" in plan, plan
        assert " jobs" not in plan, plan  # never the jobs themselves
    plan = await plan_of(db, await literal_sql(db, repo.oldest_waiting()))
    assert "ix_jobs_due" in plan, plan  # the waiting jobs only
    week_ago = db.now() - timedelta(days=7)
    plan = await plan_of(db, await literal_sql(db, repo.prunable(week_ago, 500)))
    assert "ix_jobs_finished" in plan, plan  # the oldest finished jobs, and no others
    assert "TEMP B-TREE" not in plan, plan
