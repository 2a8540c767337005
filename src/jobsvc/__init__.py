"""jobsvc: a durable job service for pandas work.

Define tasks with ``@task``; run the service with ``jobsvc serve``, or embed it in your own
FastAPI app with ``JobQueue`` and ``DurableBackgroundTasks``.
"""

from typing import TYPE_CHECKING, Any

from jobsvc.tasks import PermanentError, report_progress, task

if TYPE_CHECKING:
    from jobsvc.app import JobQueue, create_app
    from jobsvc.background import DurableBackgroundTasks
    from jobsvc.settings import Settings

__all__ = [
    "DurableBackgroundTasks",
    "JobQueue",
    "PermanentError",
    "Settings",
    "create_app",
    "report_progress",
    "task",
]
__version__ = "0.1.0"

# Worker processes import ``jobsvc`` for ``@task``; the web and database layers load only
# when asked for, so a task module stays cheap to import.
_LAZY = {
    "JobQueue": "jobsvc.app",
    "create_app": "jobsvc.app",
    "DurableBackgroundTasks": "jobsvc.background",
    "Settings": "jobsvc.settings",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jobsvc' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
