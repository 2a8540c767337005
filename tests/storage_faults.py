"""Real storage faults for tests: a small tmpfs mounted for a database or a files directory,
a disk filled until it refuses, and SQLite's write lock held by another process. Mounting
needs root: without it these tests skip, unless JOBSVC_TEST_REQUIRE_FAULTS is set (CI), where
they fail."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live_jobs import wait_until

REQUIRE = bool(os.environ.get("JOBSVC_TEST_REQUIRE_FAULTS"))


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def mounted(*args: str, target: Path) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    try:
        mount(*args, str(target))
    except (OSError, subprocess.CalledProcessError) as error:
        reason = f"cannot mount here ({error}); storage fault tests need root"
        if REQUIRE:
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


def fill(directory: Path) -> Path:
    """Write zeros until the filesystem refuses; returns the filler to delete later."""
    filler = directory / "filler"
    # Unbuffered: a buffered file would try the refused bytes again when it is closed.
    with filler.open("wb", buffering=0) as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 65536)
    return filler


def checkpoint_truncate(path: Path) -> None:
    """Fold the WAL into the database and cut it to nothing, so the next write must grow it
    (a WAL of some size would otherwise take small writes into space it already has)."""
    with sqlite3.connect(path, timeout=30) as conn:
        wait_until(
            lambda: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0,
            10,
            "a complete WAL checkpoint",
        )
    conn.close()


# Another process's write lock on the database: BEGIN IMMEDIATE, held until stdin closes.
_LOCK_HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
conn.execute("ROLLBACK")
"""


@contextlib.contextmanager
def write_lock_held(path: Path) -> Iterator[None]:
    """SQLite's write lock on ``path``, held by another process for the block."""
    with subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdin is not None
        assert holder.stdout is not None
        try:
            assert holder.stdout.readline().strip() == "locked"
            yield
        finally:
            holder.stdin.close()
            if holder.wait(30) != 0:
                raise AssertionError(f"the lock holder exited with {holder.returncode}")
