"""Retention: finished jobs are deleted after ``JOBSVC_RETENTION_DAYS``, with their inputs
(rows and files), results and events. Every instance's runner prunes now and then;
``jobsvc db prune`` does it by hand."""

from __future__ import annotations

import re
from datetime import timedelta

from jobsvc import repository as repo
from jobsvc.db import Database
from jobsvc.files import FileStore

PRUNE_EVERY_SECONDS = 3600.0
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``45s`` or ``2w``; ``ValueError`` for anything else."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if match is None:
        raise ValueError(f"{text!r} is not an age like 30d, 12h, 90m, 45s or 2w")
    return timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})


def describe_age(age: timedelta) -> str:
    """``30 days``, ``12 hours``, ``90 minutes``: the largest unit that says it exactly."""
    seconds = age.total_seconds()
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds:g} second{'s' if seconds != 1 else ''}"


async def prune(
    db: Database, older_than: timedelta, files: FileStore | None = None, batch: int = 500
) -> int:
    """Delete jobs that finished more than ``older_than`` ago, in short transactions (the
    write lock is never held for long), and their input files; how many jobs were deleted.
    Files that no job names (a crash between a file's write and its row's commit) go too."""
    cutoff = db.now() - older_than
    total = 0
    while True:
        async with db.write() as conn:
            deleted, names = await repo.prune_finished(conn, cutoff, batch)
        if files is not None:
            await files.discard(names)  # after the commit: a rolled-back delete keeps its files
        total += deleted
        if deleted < batch:
            break
    if files is not None:
        stale = files.stale_names()
        for start in range(0, len(stale), batch):
            async with db.read() as conn:
                unreferenced = await repo.unreferenced_files(conn, stale[start : start + batch])
            await files.discard(unreferenced)
    return total
