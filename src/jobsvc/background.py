"""``DurableBackgroundTasks``: FastAPI's ``BackgroundTasks``, but every task is a stored job.

    @app.post("/process/")
    def process(data: list[dict], background_tasks: DurableBackgroundTasks):
        job = background_tasks.add_task(process_data, data)
        return {"job_id": job.id}

``add_task`` checks the function and its arguments at once (a lambda, a closure or an open
file is refused there, with the reason) and gives the job its id. The jobs are committed, in
one transaction, after the endpoint returns and before its response is sent; if the endpoint
raises, none of them is stored.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request
from starlette.routing import NoMatchFound

from jobsvc.service import Prepared

if TYPE_CHECKING:
    from jobsvc.app import JobQueue


@dataclass(frozen=True)
class QueuedJob:
    id: str
    task: str
    url: str | None  # the job's status URL, where the app mounts the jobs router


class DurableTasks:
    def __init__(self, queue: JobQueue, request: Request) -> None:
        self._queue = queue
        self._request = request
        self.pending: list[Prepared] = []

    def add_task(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> QueuedJob:
        """Queue ``func(*args, **kwargs)`` as a durable job; returns it, id and all."""
        prepared = self._queue.service.prepare_call(func, args, kwargs)
        self.pending.append(prepared)
        try:
            url: str | None = self._request.url_for("jobsvc_get_job", job_id=prepared.id).path
        except NoMatchFound:
            url = None
        return QueuedJob(id=prepared.id, task=prepared.job.task, url=url)


async def durable_background_tasks(request: Request) -> AsyncIterator[DurableTasks]:
    queue: JobQueue | None = getattr(request.app.state, "jobsvc_queue", None)
    if queue is None:
        raise RuntimeError(
            "DurableBackgroundTasks needs a running JobQueue: FastAPI(lifespan=jobs.lifespan)"
        )
    tasks = DurableTasks(queue, request)
    yield tasks
    # Reached only when the endpoint returned normally; scope="function" runs this before the
    # response goes out, so a client never holds a job id that was not committed.
    if tasks.pending:
        await queue.service.submit_prepared(tasks.pending)


DurableBackgroundTasks = Annotated[
    DurableTasks, Depends(durable_background_tasks, scope="function")
]
