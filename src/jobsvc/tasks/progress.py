"""Progress reporting from inside a running task.

A task calls ``report_progress(0.5)``; in a worker process the value travels to the service,
which stores it on the job. Outside a worker (a unit test, a notebook) it does nothing.
"""

from __future__ import annotations

from collections.abc import Callable

_sink: Callable[[float], None] | None = None


def report_progress(fraction: float) -> None:
    """Record how far the current job has come, from 0 to 1."""
    if _sink is not None:
        _sink(min(1.0, max(0.0, float(fraction))))


def set_sink(sink: Callable[[float], None] | None) -> None:
    global _sink
    _sink = sink
