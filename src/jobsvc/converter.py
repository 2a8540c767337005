"""The API's conversions: parsing uploads and large JSON bodies, rendering results. CPU work
on a request's data, so never on the event loop, and never in the runner's worker processes:
a process pool of its own (``JOBSVC_WORKERS`` capped at two), at the workers' lower priority.

``Converter`` is the one interface the service sees. Each process may grow by
``JOBSVC_CONVERTER_MEMORY_MB`` at most, so that an input of a shape no limit foresaw fails its
own request (``NeedsMoreMemory``) instead of taking the machine. A pool whose process died
(killed, out of memory) refuses all further work; it is replaced and the call tried once more,
so one lost process never breaks the API. A pool whose process ran out of memory is replaced
too: what it half built may stay behind.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from jobsvc import processes
from jobsvc.errors import NeedsMoreMemory
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
    def __init__(self, size: int, memory_mb: int | None = None) -> None:
        self.size = size
        self.memory_mb = memory_mb
        self._pool: ProcessPoolExecutor | None = None
        self._starting = asyncio.Lock()

    def _new(self) -> ProcessPoolExecutor:
        # Parsing a large upload is as CPU-heavy as a task: it yields to the API like one.
        return ProcessPoolExecutor(
            max_workers=self.size,
            mp_context=processes.process_context(),
            initializer=processes.start_child,
            initargs=(self.memory_mb,),
        )

    async def run(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        call = functools.partial(_convert, functools.partial(func, *args, **kwargs))
        try:
            return await self._run_once(call)
        except BrokenProcessPool:
            # Every call in the pool failed with the one that killed it: each tries once more.
            log.warning("a converter process died; starting a new pool")
        try:
            return await self._run_once(call)
        except BrokenProcessPool:
            raise self._refusal(
                "a converter process ended twice while converting this data: it most likely "
                "needs more memory"
            ) from None

    async def _run_once(self, call: Callable[[], Any]) -> Any:
        async with self._starting:
            if self._pool is None:  # the fork server may start here: in a thread
                self._pool = await asyncio.to_thread(self._new)
            pool = self._pool
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, call)
        except BrokenProcessPool:
            self._retire(pool)
            raise
        except MemoryError:
            self._retire(pool)
            raise self._refusal("this data needs more memory to convert") from None

    def _retire(self, pool: ProcessPoolExecutor) -> None:
        if self._pool is pool:  # not already replaced because of another call
            self._pool = None
            # Calls still running in it finish; then its processes exit.
            pool.shutdown(wait=False)

    def _refusal(self, what: str) -> NeedsMoreMemory:
        allowed = (
            f"JOBSVC_CONVERTER_MEMORY_MB={self.memory_mb}"
            if self.memory_mb is not None
            else "what the machine could give"
        )
        return NeedsMoreMemory(f"{what} than a conversion may take ({allowed})")

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


def _convert(call: Callable[[], Any]) -> Any:
    """In a converter process: ``call()``, and an allocation that failed as a plain
    ``MemoryError`` (numpy's and Arrow's carry arguments that need not pickle; a failed
    ``mmap`` or read is an ``OSError``)."""
    try:
        return processes.call_and_release(call)
    except MemoryError:
        raise MemoryError from None
    except OSError as error:
        if error.errno == errno.ENOMEM:
            raise MemoryError from None
        raise
