"""The routes: check the request, call the service, shape the answer. No SQL, no pandas.

No `from __future__ import annotations` here: the routes are defined inside factories, and
FastAPI must evaluate their annotations (local `Annotated` aliases) where they are written.
"""

from typing import Annotated, Any, Protocol

import pydantic_core
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile

from jobsvc import formats
from jobsvc.api import json_body
from jobsvc.api.auth import KeyRing
from jobsvc.api.errors import RETRY_AFTER_SECONDS, JobsvcRoute
from jobsvc.api.uploads import body_to_file, upload_to_file
from jobsvc.errors import (
    InvalidInput,
    JobsvcError,
    MalformedRequest,
    NotAcceptable,
    UnsupportedMediaType,
    problems,
)
from jobsvc.formats import JSON_MEDIA as JSON
from jobsvc.lifecycle import JobStatus
from jobsvc.metrics import CONTENT_TYPE as metrics_content_type
from jobsvc.schemas import (
    EventOut,
    Health,
    JobOut,
    JobPage,
    Problem,
    SubmitJSON,
    SubmitOptions,
    TaskOut,
)
from jobsvc.service import JobService, JobSpec, Submitted, files_unavailable
from jobsvc.settings import Settings
from jobsvc.tasks import registry


class Runtime(Protocol):
    """What the routes need from the running service (``jobsvc.app.JobQueue``)."""

    settings: Settings
    keys: KeyRing

    @property
    def service(self) -> JobService: ...

    async def wake(self) -> None: ...


_EXTENSION_TYPES = {
    ".csv": formats.CSV,
    ".ndjson": formats.NDJSON,
    ".jsonl": formats.NDJSON,
    ".parquet": formats.PARQUET,
    ".pq": formats.PARQUET,
}
_RESULT_TYPES = [formats.JSON_MEDIA, formats.CSV, formats.PARQUET]
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem} for code in (400, 404, 406, 409, 413, 415, 422, 503)
}
MAX_IDEMPOTENCY_KEY = 200
_UPLOAD_OPTIONS = ("task", "params", "priority", "max_attempts", "retry_delay", "run_at")


def _query(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema} | (
        {"description": description} if description else {}
    )


_SUBMIT_BODY = {
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "maxLength": MAX_IDEMPOTENCY_KEY},
            "description": "Replays the first job submitted with this key.",
        },
        _query("task", {"type": "string"}, "The task, for a file upload."),
        _query("params", {"type": "string"}, "A JSON object, for a file upload."),
        _query("priority", {"type": "integer"}, "For a file upload; lower runs first."),
        _query("max_attempts", {"type": "integer"}, "For a file upload."),
        _query("retry_delay", {"type": "number"}, "For a file upload: seconds."),
        _query("run_at", {"type": "string", "format": "date-time"}, "For a file upload."),
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": SubmitJSON.model_json_schema()},
            formats.CSV: {"schema": {"type": "string"}},
            formats.NDJSON: {"schema": {"type": "string"}},
            formats.PARQUET: {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "task": {"type": "string"},
                        "params": {"type": "string", "description": "a JSON object"},
                    },
                }
            },
        },
    },
}


def choose_media_type(accept: str | None, offered: list[str]) -> str:
    """The first of ``offered`` that the Accept header admits, by its q-values."""
    if not accept:
        return offered[0]
    ranges: list[tuple[float, int, str]] = []
    refused: set[str] = set()  # q=0 says "not this one", even where */* would match it
    for position, part in enumerate(accept.split(",")):
        media, *parameters = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        media = formats.normalise_media_type(media)
        if media and quality > 0:
            ranges.append((-quality, position, media))
        elif media:
            refused.add(media)
    for _, _, media in sorted(ranges):
        for candidate in offered:
            kind = candidate.split("/")[0]
            if media in (candidate, "*/*", f"{kind}/*") and candidate not in refused:
                return candidate
    raise NotAcceptable(f"the result is available as {', '.join(offered)}")


def _parse_params(text: str | None) -> dict[str, Any]:
    if text is None or text == "":
        return {}
    try:
        # pydantic's parser, as for a JSON body: the same depth limit (json.loads would
        # recurse until a RecursionError)
        value = pydantic_core.from_json(text)
    except ValueError as error:
        json_body.check_depth(str(error), "params")
        raise MalformedRequest(f"params is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise InvalidInput("params must be a JSON object")
    return value


def build_jobs_router(runtime: Runtime) -> APIRouter:
    """The job routes, bound to one running service (so two apps never share state)."""
    router = APIRouter(route_class=JobsvcRoute, tags=["jobs"], responses=_ERRORS)

    # async: a plain def dependency would cost a thread-pool round trip on every request
    async def get_service() -> JobService:
        return runtime.service

    async def get_owner(request: Request) -> str:
        return runtime.keys.owner(request)

    ServiceDep = Annotated[JobService, Depends(get_service)]
    OwnerDep = Annotated[str, Depends(get_owner)]

    url_templates: dict[str, str] = {}

    def job_url(request: Request, job_id: str) -> str:
        # Looking the route up walks every route: do it once per mount point, then format.
        root = request.scope.get("root_path", "")
        template = url_templates.get(root)
        if template is None:
            template = request.url_for("jobsvc_get_job", job_id="JOB_ID").path
            url_templates[root] = template
        return template.replace("JOB_ID", job_id)

    def job_out(request: Request, row: Any) -> JobOut:
        return JobOut.from_row(row, job_url(request, row.id))

    async def submit_upload(
        request: Request, service: JobService, owner: str, options: dict[str, Any]
    ) -> Submitted:
        media = formats.normalise_media_type(request.headers.get("content-type"))
        if media == "multipart/form-data":
            async with request.form(max_files=1, max_fields=10) as form:
                upload = form.get("file")
                if not isinstance(upload, UploadFile):
                    raise InvalidInput("multipart upload needs the file in the field 'file'")
                for name in ("task", "params"):
                    value = form.get(name)
                    if isinstance(value, str) and value:
                        options[name] = value
                media = _upload_media_type(upload)
                spec = _spec(options, request)
                job = service.new_upload(spec, owner)
                async with upload_to_file(upload.file, service.upload_path()) as path:
                    return await service.submit_file(spec, job, path, media)
        spec = _spec(options, request)
        job = service.new_upload(spec, owner)  # refused before a byte of the body is read
        max_bytes = runtime.settings.max_upload_bytes
        async with body_to_file(request, max_bytes, service.upload_path()) as path:
            return await service.submit_file(spec, job, path, media)

    @router.post(
        "",
        status_code=202,
        response_model=JobOut,
        name="jobsvc_submit_job",
        openapi_extra=_SUBMIT_BODY,
        responses={200: {"model": JobOut, "description": "An earlier submit's job (same key)"}},
    )
    async def submit_job(request: Request) -> Response:
        """Submit a job: JSON records, a CSV/NDJSON/Parquet body, or a multipart upload."""
        # Everything is read here rather than declared as parameters and dependencies (the
        # OpenAPI document lists them): FastAPI's resolution of them cost a quarter of the
        # accept rate, and a JSON submit carries its options in the body.
        service, owner = runtime.service, runtime.keys.owner(request)
        idempotency_key = request.headers.get("idempotency-key")
        if idempotency_key is not None and len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidInput(f"Idempotency-Key is longer than {MAX_IDEMPOTENCY_KEY} characters")
        media = formats.normalise_media_type(request.headers.get("content-type"))
        if media == formats.JSON_MEDIA:
            submitted = await _submit_json(
                request, service, owner, idempotency_key, runtime.settings.max_upload_bytes
            )
        elif media in formats.UPLOAD_TYPES or media == "multipart/form-data":
            options: dict[str, Any] = {
                name: request.query_params.get(name) for name in _UPLOAD_OPTIONS
            }
            options["idempotency_key"] = idempotency_key
            try:
                submitted = await submit_upload(request, service, owner, options)
            except OSError as error:  # writing the upload: a full or read-only files disk
                raise files_unavailable(error) from None
        else:
            accepted = ", ".join(("application/json", *formats.UPLOAD_TYPES, "multipart/form-data"))
            raise UnsupportedMediaType(
                f"content type {media or '(none)'!r} is not accepted; use one of {accepted}"
            )
        body = job_out(request, submitted.job).model_dump_json()
        headers = {"Location": job_url(request, submitted.job.id)}
        if not submitted.created:
            return Response(body, 200, headers, JSON)
        # Runs after the response is sent: the job row is already committed by then.
        return Response(body, 202, headers, JSON, background=BackgroundTask(runtime.wake))

    @router.get("", response_model=JobPage, name="jobsvc_list_jobs")
    async def list_jobs(
        request: Request,
        service: ServiceDep,
        owner: OwnerDep,
        status: Annotated[list[JobStatus] | None, Query()] = None,
        task: Annotated[str | None, Query(max_length=200)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, Query(max_length=64)] = None,
    ) -> JobPage:
        """Jobs, newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
        rows, next_cursor = await service.list(
            owner=owner, statuses=status or (), task=task, limit=limit, cursor=cursor
        )
        return JobPage(items=[job_out(request, row) for row in rows], next_cursor=next_cursor)

    @router.get("/{job_id}", response_model=JobOut, name="jobsvc_get_job")
    async def get_job(
        request: Request, job_id: str, service: ServiceDep, owner: OwnerDep
    ) -> JobOut:
        """The job: status, attempts, times, progress, the latest error, the result link."""
        return job_out(request, await service.get(job_id, owner))

    @router.get("/{job_id}/events", response_model=list[EventOut], name="jobsvc_job_events")
    async def job_events(job_id: str, service: ServiceDep, owner: OwnerDep) -> list[EventOut]:
        """Every status the job entered, in order, with each attempt's error."""
        return [EventOut.from_row(row) for row in await service.events(job_id, owner)]

    @router.get(
        "/{job_id}/result",
        name="jobsvc_job_result",
        response_class=Response,
        responses={
            200: {
                "content": {
                    "application/json": {},
                    formats.CSV: {},
                    formats.PARQUET: {},
                },
                "description": "The result, in the format the Accept header asks for.",
            }
        },
    )
    async def job_result(
        job_id: str,
        service: ServiceDep,
        owner: OwnerDep,
        accept: Annotated[str | None, Header()] = None,
    ) -> Response:
        """The result of a succeeded job: JSON (default), CSV or Parquet by ``Accept``."""
        stored = await service.result(job_id, owner)
        offered = _RESULT_TYPES if stored.kind == "dataframe" else [formats.JSON_MEDIA]
        media = choose_media_type(accept, offered)
        content = await service.render_result(stored, media)
        headers = {}
        if media != formats.JSON_MEDIA:
            extension = "csv" if media == formats.CSV else "parquet"
            headers["Content-Disposition"] = f'attachment; filename="{job_id}.{extension}"'
        return Response(content, media_type=media, headers=headers)

    @router.post("/{job_id}/cancel", response_model=JobOut, name="jobsvc_cancel_job")
    async def cancel_job(
        request: Request, job_id: str, service: ServiceDep, owner: OwnerDep
    ) -> JobOut:
        """Cancel a queued, retrying or running job (a running attempt is stopped)."""
        return job_out(request, await service.cancel(job_id, owner))

    @router.post("/{job_id}/retry", response_model=JobOut, name="jobsvc_retry_job")
    async def retry_job(
        request: Request, job_id: str, service: ServiceDep, owner: OwnerDep
    ) -> JobOut:
        """Queue a failed or cancelled job again, with its attempts reset to 0."""
        return job_out(request, await service.retry(job_id, owner))

    return router


def build_service_router(runtime: Runtime) -> APIRouter:
    """``/tasks`` and ``/healthz``, for the standalone service."""
    router = APIRouter(route_class=JobsvcRoute)

    @router.get("/tasks", response_model=list[TaskOut], tags=["tasks"])
    async def list_tasks() -> list[TaskOut]:
        """The registered tasks, with the JSON Schema of each one's params."""
        return [
            TaskOut(
                name=task.name,
                description=task.description,
                max_attempts=task.max_attempts,
                timeout=task.timeout,
                params_schema=task.params_schema(),
            )
            for task in registry.all()
        ]

    @router.get(
        "/metrics",
        tags=["health"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"}},
    )
    async def metrics() -> Response:
        """Prometheus metrics: jobs by state, queue depth, attempt durations, failures."""
        return Response(await runtime.service.metrics_text(), media_type=metrics_content_type)

    @router.get(
        "/healthz",
        response_model=Health,
        tags=["health"],
        responses={503: {"model": Health}},
    )
    async def healthz() -> JSONResponse:
        """Liveness, and whether the database can be read and written."""
        try:
            await runtime.service.health()
        except Exception as error:  # whatever the fault, it is the database's: 503, never 500
            reason = error.message if isinstance(error, JobsvcError) else type(error).__name__
            return JSONResponse(
                {"status": "unavailable", "database": reason},
                status_code=503,
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
        return JSONResponse({"status": "ok", "database": "ok"})

    return router


async def _submit_json(
    request: Request, service: JobService, owner: str, idempotency_key: str | None, max_bytes: int
) -> Submitted:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) <= json_body.INLINE_BYTES:
        body = json_body.read(await request.body(), service.limits)
    else:  # large, or of unknown length: parsed off the event loop
        async with body_to_file(request, max_bytes) as path:
            body = await service.convert(json_body.read_file, path, service.limits)
    if body.not_json is not None:
        raise MalformedRequest(f"the body is not valid JSON: {body.not_json}")
    if body.problems is not None:
        raise RequestValidationError(body.problems)
    assert body.options is not None
    assert body.records is not None
    return await service.submit_records(
        _to_spec(body.options, idempotency_key), body.records, owner
    )


def _to_spec(options: SubmitOptions, idempotency_key: str | None) -> JobSpec:
    return JobSpec(
        task=options.task,
        params=options.params,
        priority=options.priority,
        max_attempts=options.max_attempts,
        retry_delay=options.retry_delay,
        run_at=options.run_at,
        idempotency_key=idempotency_key,
    )


def _spec(options: dict[str, Any], request: Request) -> JobSpec:
    values = {k: v for k, v in options.items() if v is not None and k != "idempotency_key"}
    if "task" not in values:
        raise InvalidInput("a file upload needs the task: ?task=NAME (or a 'task' form field)")
    values["params"] = _parse_params(values.get("params"))
    try:
        checked = SubmitOptions.model_validate(values)
    except ValidationError as error:
        raise RequestValidationError(problems(error, "query")) from None
    return _to_spec(checked, options.get("idempotency_key"))


def _upload_media_type(upload: UploadFile) -> str:
    media = formats.normalise_media_type(upload.content_type)
    if media in formats.UPLOAD_TYPES:
        return media
    name = (upload.filename or "").lower()
    for extension, media_type in _EXTENSION_TYPES.items():
        if name.endswith(extension):
            return media_type
    raise UnsupportedMediaType(
        f"the uploaded file's type {media or '(none)'!r} is not accepted; "
        f"use one of {', '.join(formats.UPLOAD_TYPES)}"
    )


__all__ = ["Runtime", "build_jobs_router", "build_service_router", "choose_media_type"]
