"""Tasks: the registry, ``@task``, progress reporting and the built-in tasks."""

from jobsvc.tasks.progress import report_progress
from jobsvc.tasks.registry import (
    PermanentError,
    Registry,
    Task,
    import_task_modules,
    registry,
    task,
)

__all__ = [
    "PermanentError",
    "Registry",
    "Task",
    "import_task_modules",
    "registry",
    "report_progress",
    "task",
]
