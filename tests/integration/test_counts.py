"""The counts by status (``job_counts``, kept by triggers) stay exact through every change of a
job's status, and through the fold that sums their rows."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select

from jobsvc import repository as repo
from jobsvc.db import Database
from jobsvc.lifecycle import CANCELLABLE, RETRYABLE, AttemptError, JobStatus, ResultData
from jobsvc.models import job_counts, jobs
from jobsvc.runner.maintenance import CountFolder
from jobsvc.submission import NewJob
from tests.conftest import make_settings

OWNERS = ("", "key-b")
WORKER = "test-host:1:a"


async def grouped(db: Database, owner: str | None) -> dict[str, int]:
    """The counts as a GROUP BY over the jobs themselves says they are."""
    query = select(jobs.c.status, func.count()).group_by(jobs.c.status)
    if owner is not None:
        query = query.where(jobs.c.owner == owner)
    counts = {status.value: 0 for status in JobStatus}
    async with db.read() as conn:
        counts.update({status: count for status, count in (await conn.execute(query)).all()})
    return counts


async def assert_exact(db: Database) -> dict[str, int]:
    for owner in (None, *OWNERS):
        async with db.read() as conn:
            kept = await repo.count_by_status(conn, owner)
        assert kept == await grouped(db, owner), f"owner {owner!r}"
    return await grouped(db, None)


async def submit(db: Database, owner: str, count: int, max_attempts: int = 3) -> list[str]:
    async with db.write() as conn:
        rows = await repo.insert_jobs(
            conn, [(new_job(owner, max_attempts), None)] * count, db.now()
        )
    return [row.id for row in rows]


def new_job(owner: str = "", max_attempts: int = 3) -> NewJob:
    return NewJob(
        task="double", params={}, max_attempts=max_attempts, retry_delay_seconds=0, owner=owner
    )


async def claim(db: Database, count: int, lease: timedelta = timedelta(minutes=1)) -> list[str]:
    """Claim ``count`` jobs for WORKER (through the claim that also reads the inputs, as the
    producer does: on PostgreSQL the claim is then a CTE)."""
    now = db.now()
    async with db.write() as conn:
        claimed = await repo.claim_with_inputs(conn, WORKER, now, now + lease, count)
    assert len(claimed) == count
    return [job.id for job, _ in claimed]


async def test_counts_stay_exact_through_every_transition(db: Database) -> None:
    mine = await submit(db, "", 8)
    theirs = await submit(db, "key-b", 4, max_attempts=1)
    assert (await assert_exact(db))["queued"] == 12

    running = await claim(db, 6)
    assert (await assert_exact(db))["running"] == 6

    # Each outcome of an attempt, written as the completer writes it.
    succeeded, retrying, failed, handed_back = running[:4]
    error = AttemptError("ValueError", "no")
    async with db.write() as conn:
        now = db.now()
        result = ResultData(kind="json", value={"a": 1})
        assert await repo.finish_succeeded(conn, succeeded, WORKER, 1, result, now)
        assert await repo.finish_failed_attempt(conn, retrying, WORKER, 1, error, now, now)
        assert await repo.finish_failed_attempt(conn, failed, WORKER, 1, error, now, None)
        assert await repo.release(conn, handed_back, WORKER, 1, now)  # a stop hands it back
    counts = await assert_exact(db)
    assert (counts["succeeded"], counts["retrying"], counts["failed"]) == (1, 1, 1)

    # The end of a stop: every job still held goes back.
    async with db.write() as conn:
        assert await repo.release_all(conn, WORKER, db.now()) == 2
    assert (await assert_exact(db))["running"] == 0

    # Leases that ran out: back to the queue, or failed when no attempt remains.
    lost = await claim(db, 8, lease=timedelta(seconds=-1))
    async with db.write() as conn:
        rescued = await repo.reclaim_lost(conn, db.now())
    assert {job_id for job_id, _ in rescued} == set(lost)
    assert {status for _, status in rescued} == {JobStatus.QUEUED, JobStatus.FAILED}
    await assert_exact(db)

    # A user's retry (of a failed job of each owner) and cancel.
    async with db.write() as conn:
        now = db.now()
        for job_id, owner in ((failed, ""), (theirs[0], "key-b")):
            again = await repo.transition(
                conn, job_id, owner=owner, allowed_from=RETRYABLE, status=JobStatus.QUEUED, now=now
            )
            assert again is not None
        for job_id in (mine[-1], theirs[0]):
            cancelled = await repo.transition(
                conn,
                job_id,
                owner=None,
                allowed_from=CANCELLABLE,
                status=JobStatus.CANCELLED,
                now=now,
                values={"finished_at": now},
            )
            assert cancelled is not None
    await assert_exact(db)

    # Retention deletes the finished jobs.
    async with db.write() as conn:
        deleted, _ = await repo.prune_finished(conn, db.now() + timedelta(seconds=1), 100)
    assert deleted > 0
    counts = await assert_exact(db)
    assert counts["succeeded"] == counts["failed"] == counts["cancelled"] == 0


async def test_a_fold_leaves_a_row_per_owner_and_status(db: Database) -> None:
    await submit(db, "", 5)
    await submit(db, "key-b", 3)
    await claim(db, 2)
    before = await assert_exact(db)

    folder = CountFolder(db)
    folder.FOLD_ABOVE = 4  # the rows of 8 submits and 2 claims are more than that
    await folder.run_once()

    assert await assert_exact(db) == before
    async with db.read() as conn:
        rows = (await conn.execute(select(job_counts.c.owner, job_counts.c.status))).all()
    # The first submits were claimed first.
    assert sorted(rows) == [("", "queued"), ("", "running"), ("key-b", "queued")]
    # A status nobody is in any more leaves no row behind.
    async with db.write() as conn:
        await repo.release_all(conn, WORKER, db.now())
        await repo.fold_counts(conn)
        rows = (await conn.execute(select(job_counts.c.owner, job_counts.c.status))).all()
    assert sorted(rows) == [("", "queued"), ("key-b", "queued")]
    await assert_exact(db)


async def test_a_fold_keeps_the_changes_that_commit_meanwhile(pg_database_url: str) -> None:
    """On PostgreSQL, writers do not wait for a fold, nor a fold for them: a change committed
    while a fold runs, before or after it, is counted once."""
    db = Database(make_settings(pg_database_url))
    try:
        await submit(db, "", 3)
        # A submit uncommitted while the fold runs and commits.
        async with db.write() as writer:
            await repo.insert_jobs(writer, [(new_job(), None)], db.now())
            async with db.write() as folder:
                assert await repo.fold_counts(folder) is not None
        assert (await assert_exact(db))["queued"] == 4
        # A submit committed while the fold is not yet.
        async with db.write() as folder:
            assert await repo.fold_counts(folder) is not None
            async with db.write() as writer:
                await repo.insert_jobs(writer, [(new_job(), None)], db.now())
        assert (await assert_exact(db))["queued"] == 5
        # Two folds at once: the second leaves it to the first.
        async with db.write() as first, db.write() as second:
            assert await repo.fold_counts(first) is not None
            assert await repo.fold_counts(second) is None
        assert (await assert_exact(db))["queued"] == 5
    finally:
        await db.dispose()
