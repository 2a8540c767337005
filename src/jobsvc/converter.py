"""The API's conversions: parsing uploads and large JSON bodies, rendering results. CPU work
on a request's data, so never on the event loop, and never in the runner's worker processes:
a process pool of its own (``JOBSVC_WORKERS`` capped at two), at the workers' lower priority.

``Converter`` is the one interface the service sees. A pool whose process died (killed, out
of memory) refuses all further work; this one is replaced and the call tried once more, so
one lost process never breaks the API.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from jobsvc import processes
from jobsvc.formats import Limits, ParsedUpload

log = logging.getLogger("jobsvc.converter")


class Converter(Protocol):
    async def run(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``func(*args, **kwargs)`` off the event loop; its value, or the error it raised."""
        ...

    async def check_upload(
        self, job_id: str, path: str, media_type: str, limits: Limits, digest: bool
    ) -> ParsedUpload | None:
        """Parse and check a kept CSV or NDJSON upload where job ``job_id`` will run, keeping
        its table there for it: the upload's description, or the refusal raised; None where
        that cannot be done (the caller then parses it with ``run``)."""
        ...

    async def forget_upload(self, job_id: str) -> None:
        """Let go of what ``check_upload`` kept: the job was not stored."""
        ...


class ConverterPool:
    def __init__(self, size: int) -> None:
        self.size = size
        self._pool: ProcessPoolExecutor | None = None

    def _new(self) -> ProcessPoolExecutor:
        # Parsing a large upload is as CPU-heavy as a task: it yields to the API like one.
        return ProcessPoolExecutor(
            max_workers=self.size,
            mp_context=processes.process_context(),
            initializer=processes.start_child,
        )

    async def run(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._pool is None:  # the fork server may start here: in a thread
            self._pool = await asyncio.to_thread(self._new)
        call = functools.partial(
            processes.call_and_release, functools.partial(func, *args, **kwargs)
        )
        try:
            return await loop.run_in_executor(self._pool, call)
        except BrokenProcessPool:
            log.warning("a converter process died; starting a new pool")
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = await asyncio.to_thread(self._new)
            return await loop.run_in_executor(self._pool, call)

    async def check_upload(
        self, job_id: str, path: str, media_type: str, limits: Limits, digest: bool
    ) -> ParsedUpload | None:
        return None  # a converter process does not run jobs: nothing to keep

    async def forget_upload(self, job_id: str) -> None:
        return None

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
