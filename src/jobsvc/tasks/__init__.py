"""Tasks: the registry, ``@task``, progress reporting and the built-in tasks."""

from jobsvc.tasks.progress import report_progress
from jobsvc.tasks.registry import Registry, Task, import_task_modules, registry, task

__all__ = ["Registry", "Task", "import_task_modules", "registry", "report_progress", "task"]
