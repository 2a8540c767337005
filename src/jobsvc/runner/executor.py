"""One attempt on one worker process: send the request, relay progress, enforce the timeout,
and say how it ended (``lifecycle.Outcome``). It never writes to the database itself.

How an attempt can end, and the outcome it gives:
- the task returns: its result; the task raises: its error (type, message, traceback);
- it runs past its timeout: the process is killed, ``TimeoutError``;
- the process dies (segfault, out of memory, ``kill -9``, the task's ``SystemExit``):
  ``WorkerLost`` with the exit status;
- the runner stops (after the grace) or the job is cancelled: the process is killed, and the
  outcome says ``interrupted`` (handed back) or is not recorded at all (``aborted``);
- the runner itself fails building or sending the request: ``RunnerError``, retried.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Callable

from jobsvc.files import FileStore
from jobsvc.lifecycle import LOST, AttemptError, Outcome
from jobsvc.runner.attempt import Attempt
from jobsvc.runner.faults import FaultHooks
from jobsvc.runner.pool import ProcessGone
from jobsvc.runner.protocol import RunRequest

log = logging.getLogger("jobsvc.runner")


class Executor:
    def __init__(
        self,
        files: FileStore | None,
        on_progress: Callable[[Attempt, float], None],
        faults: FaultHooks,
    ) -> None:
        self.files = files
        self._on_progress = on_progress
        self.faults = faults
        self._removing: set[asyncio.Task[None]] = set()

    async def run(self, attempt: Attempt) -> Outcome:
        process = attempt.process
        assert process is not None, "an attempt runs on a process"
        if attempt.interrupted:  # the runner stopped before its turn: never started
            return Outcome(interrupted=True)
        try:
            self.faults.fire(self.faults.before_request, attempt.job_id)
            request = self.request_for(attempt)
        except Exception as error:  # nothing was sent: the process is as it was
            log.exception("job %s: building its request failed", attempt.job_id)
            return Outcome(error=_runner_error(error))
        timeout = attempt.job.timeout_seconds
        try:
            return await self._exchange(attempt, request, timeout)
        finally:
            if request.input_cache is not None:
                self._discard_parsed_copy(attempt.job_id)

    async def _exchange(
        self,
        attempt: Attempt,
        request: RunRequest,
        timeout: float | None,  # noqa: ASYNC109 - the task's own limit, enforced by killing
    ) -> Outcome:
        process = attempt.process
        assert process is not None
        try:
            await process.send(request)
            async with asyncio.timeout(timeout):
                while True:
                    kind, payload = await process.receive()
                    if kind == "progress":
                        self._on_progress(attempt, payload)
                    elif kind == "ok":
                        return Outcome(result=payload)
                    else:
                        return Outcome(error=payload)
        except TimeoutError:
            await process.stop_now()  # and the pool replaces it
            return Outcome(
                error=AttemptError(
                    "TimeoutError",
                    f"the task ran longer than its {timeout:g} s timeout; its worker process "
                    "was stopped",
                ),
                interrupted=attempt.interrupted,
            )
        except ProcessGone:
            await process.join(5)
            # Killed by this runner's stop, or lost while it stops: handed back uncounted.
            return Outcome(
                error=AttemptError(LOST, process.exit_description),
                interrupted=attempt.interrupted,
            )
        except Exception as error:
            # The runner's own fault, not the task's. The process may still run the job, and
            # its late reply would be read as the next job's: it goes.
            log.exception("job %s: running it failed", attempt.job_id)
            await process.stop_now()
            return Outcome(error=_runner_error(error))

    def _discard_parsed_copy(self, job_id: str) -> None:
        """The parsed copy of a kept upload is read once: its space is freed after the
        attempt (a later attempt parses the upload itself), in a thread, not waited for."""
        assert self.files is not None
        removing = asyncio.create_task(self.files.discard([self.files.cache_name_for(job_id)]))
        self._removing.add(removing)
        removing.add_done_callback(self._removing.discard)

    def request_for(self, attempt: Attempt) -> RunRequest:
        job, stored = attempt.job, attempt.stored
        input_path, input_cache = self._input_files(job.id, stored)
        return RunRequest(
            job_id=job.id,
            attempt=job.attempts,
            task=job.task,
            params=job.params,
            input_format=stored.format if stored else "json",
            input_data=stored.data if stored else None,
            input_path=input_path,
            input_cache=input_cache,
            result_path=(
                str(self.files.path(self.files.result_name_for(job.id, job.attempts)))
                if self.files is not None
                else None
            ),
        )

    def _input_files(self, job_id: str, stored: object) -> tuple[str | None, str | None]:
        """The input's file, and where the parsed copy of a kept upload would be."""
        path = getattr(stored, "path", None)
        if not path:
            return None, None
        if self.files is None:
            raise RuntimeError(f"job input {path!r} is a file, but no JOBSVC_FILES_DIR")
        return str(self.files.path(path)), str(self.files.path(self.files.cache_name_for(job_id)))


def _runner_error(error: Exception) -> AttemptError:
    return AttemptError(
        "RunnerError",
        f"the runner failed to run this attempt ({type(error).__name__}: {error})",
        traceback.format_exc(),
    )
