"""The pattern jobsvc replaces: FastAPI's ``BackgroundTasks`` running pandas in the request
thread pool, nothing stored. ``GET /jobs/{id}`` answers from memory, as cheaply as it can.

    uvicorn bench.seed_app:app
"""

from __future__ import annotations

import uuid
from typing import Any

import pandas as pd
from fastapi import BackgroundTasks, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from bench.heavy_tasks import churn_frame

app = FastAPI()
seen: dict[str, str] = {}


class Submit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=200)
    params: dict[str, Any] = Field(default_factory=dict)
    data: list[dict[str, Any]] = Field(default_factory=list)


def describe(records: list[dict[str, Any]]) -> None:
    pd.DataFrame(records).describe()


def churn(seconds: float) -> None:
    churn_frame(seconds)


@app.post("/jobs", status_code=202)
def submit(body: Submit, background_tasks: BackgroundTasks) -> JSONResponse:
    job_id = str(uuid.uuid4())
    seen[job_id] = body.task
    if body.task == "churn":
        background_tasks.add_task(churn, float(body.params.get("seconds", 5.0)))
    else:
        background_tasks.add_task(describe, body.data)
    return JSONResponse({"id": job_id, "status": "queued"}, status_code=202)


@app.get("/jobs/{job_id}")
async def get_job(job_id: str) -> dict[str, str]:
    return {"id": job_id, "task": seen.get(job_id, "unknown"), "status": "unknown"}


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
