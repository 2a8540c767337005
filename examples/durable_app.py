"""The same app made durable: one import and one parameter type changed, plus the queue.

Each task is a job stored in JOBSVC_DATABASE_URL before the response is sent; it runs in a
worker process, survives restarts, retries on failure, and its status is at /jobs/{id}.

    JOBSVC_DATABASE_URL=sqlite+aiosqlite:///./app.db uvicorn examples.durable_app:app
"""

from typing import Any

from fastapi import FastAPI

from examples.processing import process_data
from jobsvc import DurableBackgroundTasks, JobQueue

jobs = JobQueue()  # settings from JOBSVC_* environment variables; nothing connects yet
app = FastAPI(lifespan=jobs.lifespan)
app.include_router(jobs.router, prefix="/jobs")


@app.post("/process/")
def process_endpoint(
    data: list[dict[str, Any]], batch: str, background_tasks: DurableBackgroundTasks
) -> dict[str, str]:
    job = background_tasks.add_task(process_data, data, batch)
    return {"message": "Data is being processed", "job_id": job.id}
