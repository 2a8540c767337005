"""The idle-work policy: the API's CPU work (parsing an upload, a large JSON body, rendering a
result) runs on one of the runner's worker processes when one is idle, and on the converter's
own processes only when none is. ``IdleWorkConverter`` is a ``converter.Converter``: the
service asks it as it would ask the converter pool, and never sees a worker process.

Why: a worker process that is idle anyway does the work, so converter processes (each with
pandas loaded, ~100 MiB) are started only while every worker is busy; and a CSV or NDJSON
upload checked on an idle worker stays there as a parsed table for its job, which the runner
then starts on that same process (``pool.take``), so the upload is parsed once and no parsed
copy is written and read back. Measured with ``make bench``: big data 1.70x-1.75x plain pandas
without this policy, and its peak RSS 741-746 MiB (see docs/benchmarks.md for the figures with it).

A held table lasts until the process is sent anything else: its job's run, another job, a
conversion, or a ``forget`` when the submit did not store the job. A job due later is never
checked this way (its table would wait in memory), nor is anything while the runner stops.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from jobsvc.converter import Converter
from jobsvc.formats import Limits, ParsedUpload
from jobsvc.runner.pool import ProcessGone, ProcessPool, WorkerProcess
from jobsvc.runner.protocol import CheckRequest, ConvertRequest, ForgetRequest


class IdleWorkConverter:
    def __init__(
        self, pool: ProcessPool, fallback: Converter, stopping: Callable[[], bool]
    ) -> None:
        self.pool = pool
        self.fallback = fallback
        self._stopping = stopping

    async def run(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        process = self._idle_process()
        if process is not None:
            call = functools.partial(func, *args, **kwargs)
            reply = await self._ask(process, ConvertRequest(call))
            if reply is not None:
                self.pool.give_back(process)
                kind, payload = reply
                # The worker's own memory cap is no fault of the data: the converter tries.
                if kind == "ok":
                    return payload
                if not isinstance(payload, MemoryError):
                    raise payload
        return await self.fallback.run(func, *args, **kwargs)

    async def check_upload(
        self, job_id: str, path: str, media_type: str, limits: Limits, digest: bool
    ) -> ParsedUpload | None:
        process = self._idle_process()
        if process is None:
            return await self.fallback.check_upload(job_id, path, media_type, limits, digest)
        reply = await self._ask(process, CheckRequest(job_id, path, media_type, limits, digest))
        if reply is None:  # the process died (out of memory, say): the caller parses elsewhere
            return None
        kind, payload = reply
        if kind == "ok":
            process.held_job = job_id  # until it is sent anything else
        self.pool.give_back(process)
        if kind != "ok":
            raise payload
        parsed: ParsedUpload = payload
        return parsed

    async def forget_upload(self, job_id: str) -> None:
        process = self.pool.holder_of(job_id)
        if process is not None and await self._ask(process, ForgetRequest()) is not None:
            self.pool.give_back(process)

    def _idle_process(self) -> WorkerProcess | None:
        return None if self._stopping() else self.pool.take_now()

    async def _ask(self, process: WorkerProcess, request: object) -> tuple[str, Any] | None:
        """Send ``request`` and read the one reply; None if the process died meanwhile (it is
        back in the pool then, which replaces it)."""
        try:
            await process.send(request)
            return await process.receive()
        except ProcessGone:
            await process.join(5)
            self.pool.give_back(process)
            return None
        except BaseException:
            # Stopped while it works (the service shutting down): its reply would be read as
            # the answer to the next request, so the process goes.
            process.kill()
            self.pool.give_back(process)
            raise
