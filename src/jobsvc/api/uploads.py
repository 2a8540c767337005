"""Request bodies to temporary files: an upload streams to disk, never held whole in memory."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import BinaryIO

import anyio
from starlette.requests import Request

from jobsvc.api.limits import too_large


@asynccontextmanager
async def temporary_path() -> AsyncIterator[str]:
    handle, path = tempfile.mkstemp(prefix="jobsvc-upload-")
    os.close(handle)
    try:
        yield path
    finally:
        os.unlink(path)


@asynccontextmanager
async def body_to_file(request: Request, max_bytes: int) -> AsyncIterator[str]:
    """The raw request body, written to a temporary file as it arrives; yields its path."""
    async with temporary_path() as path:
        size = 0
        with open(path, "wb") as out:  # noqa: ASYNC230 - page-cache writes of 64 KiB chunks
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise too_large(max_bytes)
                out.write(chunk)
        yield path


@asynccontextmanager
async def upload_to_file(source: BinaryIO) -> AsyncIterator[str]:
    """A multipart file part (already spooled by the form parser) copied to a path of its own."""
    async with temporary_path() as path:

        def copy() -> None:
            source.seek(0)
            with open(path, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)

        await anyio.to_thread.run_sync(copy)
        yield path
