"""jobsvc: a durable job service for pandas work.

Define tasks with ``@task``, run the service with ``jobsvc serve``, or embed it in your own
FastAPI app with ``JobQueue``.
"""

from jobsvc.tasks import report_progress, task

__all__ = ["report_progress", "task"]
__version__ = "0.1.0"
