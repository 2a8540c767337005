"""Request bodies to files: an upload streams to disk, never held whole in memory.

An upload goes to the path the service names (in its files directory, where keeping it is a
rename) or to a temporary file; whatever is still there when the request ends is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO

import anyio
from starlette.requests import Request

from jobsvc.api.limits import too_large


@asynccontextmanager
async def temporary_path(target: Path | None = None) -> AsyncIterator[str]:
    if target is None:
        handle, path = tempfile.mkstemp(prefix="jobsvc-upload-")
        os.close(handle)
    else:
        path = str(target)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):  # kept: renamed to its job's name
            os.unlink(path)


@asynccontextmanager
async def body_to_file(
    request: Request, max_bytes: int, target: Path | None = None
) -> AsyncIterator[str]:
    """The raw request body, written to ``target`` (or a temporary file) as it arrives;
    yields its path."""
    async with temporary_path(target) as path:
        size = 0
        with open(path, "wb") as out:  # noqa: ASYNC230 - page-cache writes of 64 KiB chunks
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise too_large(max_bytes)
                out.write(chunk)
        yield path


@asynccontextmanager
async def upload_to_file(source: BinaryIO, target: Path | None = None) -> AsyncIterator[str]:
    """A multipart file part (already spooled by the form parser) copied to ``target`` (or a
    temporary file)."""
    async with temporary_path(target) as path:

        def copy() -> None:
            source.seek(0)
            with open(path, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)

        await anyio.to_thread.run_sync(copy)
        yield path
