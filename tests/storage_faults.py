"""Real storage faults for tests: a small tmpfs mounted for a database or a files directory,
and a disk filled until it refuses. Mounting needs root: without it these tests skip, unless
JOBSVC_TEST_REQUIRE_FAULTS is set (CI), where they fail."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

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
