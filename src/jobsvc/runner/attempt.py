"""One attempt of a job, from its claim until its outcome is written."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jobsvc.runner.pool import WorkerProcess


@dataclass(eq=False)
class Attempt:
    job: Any  # the claimed row of ``jobs``
    stored: Any  # its input (``format``, ``data``, ``path``), None without one
    queue: str = "default"
    process: WorkerProcess | None = field(default=None, repr=False)
    # Its job was cancelled, or its lease taken over: nothing it produces is recorded.
    aborted: bool = False
    # Cut off by this runner's stop: handed back, uncounted.
    interrupted: bool = False
    # Claimed while every slot was busy, to start the moment one frees (``producer``).
    fetched_ahead: bool = False

    @property
    def job_id(self) -> str:
        return str(self.job.id)

    @property
    def number(self) -> int:
        return int(self.job.attempts)

    def kill(self) -> None:
        """Stop the process running this attempt now (it is replaced)."""
        if self.process is not None:
            self.process.kill()
