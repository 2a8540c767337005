"""Fault hooks: the places where a test (or an operator's chaos drill) makes the runner itself
fail, as a bug or a fault of the machine would. Each hook is called with the job's id and may
raise; unset, it costs nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Hook = Callable[[str], None]


@dataclass
class FaultHooks:
    # Before an attempt's request is built and sent: a fault of the runner, not the task.
    before_request: Hook | None = None
    # Before each try at writing an attempt's outcome (raise StorageUnavailable to act as a
    # database that cannot take writes).
    before_record: Hook | None = None

    def fire(self, hook: Hook | None, job_id: str) -> None:
        if hook is not None:
            hook(job_id)
