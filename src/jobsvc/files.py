"""Uploaded inputs and large results kept as files beside the database.

A large blob in SQLite is slow both ways (a 28 MB one took 0.44 s to commit and 0.24 s to
read back, against 0.03 s to write and fsync the same bytes as a file), so on SQLite an
uploaded table is stored as an Arrow IPC file in a directory next to the database file, and
its ``job_inputs`` row names the file. A worker maps the file instead of receiving the bytes.
A large DataFrame result is written the same way by the worker, and ``job_results`` names it.

The file is written and fsynced before the row commits. A crash between the two, or a
commit that fails (whose outcome is not always known: a connection lost during COMMIT),
leaves a file that perhaps no row names: the hourly prune removes such files once they are
older than ``ORPHAN_AGE_SECONDS``. A file known to be no one's (an upload whose
Idempotency-Key replayed an earlier job, a fenced-out attempt's result) is removed at once.

On PostgreSQL inputs and results stay in the database, which every machine can reach, unless
``JOBSVC_FILES_DIR`` names a directory that all instances share.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy.engine import make_url

from jobsvc.settings import Settings

ORPHAN_AGE_SECONDS = 3600.0
# A DataFrame result at least this large (in memory) is written as a file too; a smaller one
# is cheaper as a row than as a file and its fsync.
RESULT_FILE_MIN_BYTES = 1 << 20
_SUFFIX = ".arrow"


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def for_settings(cls, settings: Settings) -> FileStore | None:
        """The store the settings ask for, or None when inputs live in the database."""
        if settings.files_dir:
            return cls(Path(settings.files_dir))
        url = make_url(settings.database_url)
        if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
            return None
        return cls(Path(url.database).with_name(Path(url.database).name + ".files"))

    def name_for(self, job_id: str) -> str:
        return job_id + _SUFFIX

    def result_name_for(self, job_id: str, attempt: int) -> str:
        # One name per attempt: a late, fenced-out attempt never overwrites the stored one.
        return f"{job_id}.result-{attempt}{_SUFFIX}"

    def path(self, name: str) -> Path:
        # Rows hold bare names, so the database and its directory can move together.
        return self.root / Path(name).name

    def prepare(self) -> None:
        if not self.root.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            fsync_directory(self.root.parent)  # the new directory's entry, durably

    def remove(self, names: Iterable[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                self.path(name).unlink()

    def stale_names(self, older_than_seconds: float = ORPHAN_AGE_SECONDS) -> list[str]:
        """Files old enough that any row naming them has long committed."""
        if not self.root.is_dir():
            return []
        cutoff = time.time() - older_than_seconds
        return [
            entry.name
            for entry in os.scandir(self.root)
            if entry.name.endswith(_SUFFIX) and entry.stat().st_mtime < cutoff
        ]


def fsync_directory(path: Path) -> None:
    """Make a new file's directory entry durable (a file's own fsync does not)."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
