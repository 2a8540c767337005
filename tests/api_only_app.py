"""The job API with no workers, as an ASGI app for ``LiveApp`` (a helper, not tests).

The stop tests submit and inspect jobs through it while the process under test (``jobsvc
serve`` or ``jobsvc worker``) is the only one running them, and while that process is stopped.
Its settings come from the environment (``server_env``), as the CLI's would.
"""

from __future__ import annotations

from fastapi import FastAPI

from jobsvc.app import JobQueue
from jobsvc.settings import Settings

queue = JobQueue(Settings(), migrate_on_start=False, run_workers=False)
app = FastAPI(lifespan=queue.lifespan)
app.include_router(queue.router, prefix="/jobs")
