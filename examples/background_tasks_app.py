"""The usual pattern: FastAPI's BackgroundTasks. A restart mid-job loses the job silently,
an exception is only a log line, and nobody can ask what happened to an upload.

    uvicorn examples.background_tasks_app:app
"""

from typing import Any

from fastapi import BackgroundTasks, FastAPI

from examples.processing import process_data

app = FastAPI()


@app.post("/process/")
def process_endpoint(
    data: list[dict[str, Any]], batch: str, background_tasks: BackgroundTasks
) -> dict[str, str]:
    background_tasks.add_task(process_data, data, batch)
    return {"message": "Data is being processed"}
