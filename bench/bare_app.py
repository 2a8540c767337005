"""The ceiling for accepting a job: parse the same body into a pydantic model, store nothing.

uvicorn bench.bare_app:app
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

app = FastAPI()


class Submit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=200)
    params: dict[str, Any] = Field(default_factory=dict)
    data: list[dict[str, Any]] = Field(default_factory=list)


@app.post("/jobs", status_code=202)
async def submit(body: Submit) -> JSONResponse:
    job_id = str(uuid.uuid4())
    return JSONResponse(
        {"id": job_id, "task": body.task, "status": "queued"},
        status_code=202,
        headers={"Location": f"/jobs/{job_id}"},
    )


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
