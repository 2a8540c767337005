"""Uploaded inputs and large results kept as files beside the database.

A large blob in SQLite is slow both ways (a 28 MB one took 0.44 s to commit and 0.24 s to
read back, against 0.03 s to write and fsync the same bytes as a file), so on SQLite an
uploaded file is kept as it came (``<job id>.csv``, ``.ndjson`` or ``.parquet``) in a
directory next to the database file, and its ``job_inputs`` row names the file. A large
DataFrame result is written by the worker as an Arrow IPC file, and ``job_results`` names it.

The upload streams into this directory and is fsynced while its check (a full parse) runs,
so that the disk's write and the parse overlap. When a worker process checked it, that
process runs the job with the table it parsed. When a converter process did (no worker was
idle), it leaves the table beside the upload as an Arrow file (``<job id>.cache-<boot>.arrow``)
that the worker maps instead of parsing again. That copy is not fsynced: it is trusted only
during the boot that wrote it (the page cache holds all of it until the machine restarts,
whatever process dies), and its name carries the kernel's boot id, so after a power loss no
one opens a torn copy; the worker parses the upload instead. The worker deletes the copy once
it has read it (a retry parses the upload); a copy never read (its job cancelled first) is
pruned like an orphan (below).

Every kept file is written and fsynced before the row commits. A crash between the two, or a
commit that fails (whose outcome is not always known: a connection lost during COMMIT),
leaves a file that perhaps no row names: the hourly prune removes such files once they are
older than ``ORPHAN_AGE_SECONDS``. A file known to be no one's (an upload whose
Idempotency-Key replayed an earlier job, a fenced-out attempt's result) is removed at once.

On PostgreSQL inputs and results stay in the database, which every machine can reach, unless
``JOBSVC_FILES_DIR`` names a directory that all instances share.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # worker processes import this module, and need neither
    from jobsvc.settings import Settings

ORPHAN_AGE_SECONDS = 3600.0
# A DataFrame result at least this large (in memory) is written as a file too; a smaller one
# is cheaper as a row than as a file and its fsync.
RESULT_FILE_MIN_BYTES = 1 << 20
_SUFFIX = ".arrow"
# The names this store gives its files; the prune touches nothing else, so a directory that
# also holds someone's own CSV files keeps them.
_OWN_NAME = re.compile(
    r"upload-[0-9a-f]{32}\.partial"
    r"|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    r"\.(?:csv|ndjson|parquet|arrow|cache-[0-9a-z]+\.arrow|result-[0-9]+\.arrow)"
)
_PARSED_KINDS = ("csv", "ndjson")  # kept uploads that are parsed, and so have a parsed copy
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@functools.cache
def boot_tag() -> str | None:
    """This boot of the machine (Linux's boot id), or None where the system does not say."""
    try:
        return _BOOT_ID.read_text().strip().replace("-", "")[:16] or None
    except OSError:
        return None


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def for_settings(cls, settings: Settings) -> FileStore | None:
        """The store the settings ask for, or None when inputs live in the database."""
        if settings.files_dir:
            return cls(Path(settings.files_dir))
        from sqlalchemy.engine import make_url  # here: worker processes need no SQLAlchemy

        url = make_url(settings.database_url)
        if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
            return None
        return cls(Path(url.database).with_name(Path(url.database).name + ".files"))

    def upload_name_for(self, job_id: str, format: str) -> str:
        """An upload kept as it came: ``format`` is 'csv', 'ndjson' or 'parquet'."""
        return f"{job_id}.{format}"

    def cache_name_for(self, job_id: str) -> str:
        """The parsed copy of an upload, valid during this boot only (see the module)."""
        return f"{job_id}.cache-{boot_tag() or 'durable'}{_SUFFIX}"

    @property
    def cache_is_durable(self) -> bool:
        """Without a boot id to name the parsed copy by, the copy must be fsynced itself."""
        return boot_tag() is None

    def new_upload_path(self) -> Path:
        """Where an upload streams to before it has a job: renamed when it is kept."""
        return self.root / f"upload-{uuid.uuid4().hex}.partial"

    def take(self, partial: Path, name: str) -> Path:
        """Give an upload its job's name: a rename, instant, not yet durable."""
        target = self.path(name)
        os.replace(partial, target)
        return target

    def make_durable(self, name: str) -> None:
        """Flush a file and its directory entry to the disk (blocking: for a thread)."""
        fsync_file(self.path(name))
        fsync_directory(self.root)

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
        """Remove these files, and with a kept upload its parsed copy."""
        for name in names:
            job_id, _, kind = name.partition(".")
            derived = [self.cache_name_for(job_id)] if kind in _PARSED_KINDS else []
            for each in (name, *derived):
                with contextlib.suppress(FileNotFoundError):
                    self.path(each).unlink()

    async def discard(self, names: Iterable[str]) -> None:
        """``remove`` in a thread: unlinking a large file takes the kernel milliseconds (36 ms
        for 47 MB in the page cache), which the event loop must not wait for."""
        await asyncio.to_thread(self.remove, list(names))

    def stale_names(self, older_than_seconds: float = ORPHAN_AGE_SECONDS) -> list[str]:
        """Files old enough that any row naming them has long committed."""
        if not self.root.is_dir():
            return []
        cutoff = time.time() - older_than_seconds
        return [
            entry.name
            for entry in os.scandir(self.root)
            if _OWN_NAME.fullmatch(entry.name) and entry.stat().st_mtime < cutoff
        ]


def fsync_file(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def fsync_directory(path: Path) -> None:
    """Make a new file's directory entry durable (a file's own fsync does not)."""
    fsync_file(path)
