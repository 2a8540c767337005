"""The operator dashboard: server-rendered pages over the same service the JSON API uses.

``/`` lists jobs (counts by state, filters, cursor pages); ``/jobs/{id}`` shows one job with
its events and Retry / Cancel buttons (plain HTML forms). The pages refresh themselves with a
few lines of JavaScript (no CDN, no build step): every 2 s while jobs are active, the list every
5 s otherwise (to see new jobs), a finished job's page not at all; a ``<noscript>`` meta refresh
covers active pages where scripts are off.

No `from __future__ import annotations` here, for the reason given in ``routes.py``.
"""

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import jinja2
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.routing import NoMatchFound

from jobsvc.api.errors import JobsvcRoute, status_of
from jobsvc.api.routes import Runtime
from jobsvc.errors import Conflict, JobsvcError, NotFound
from jobsvc.lifecycle import ACTIVE, CANCELLABLE, RETRYABLE, JobStatus
from jobsvc.service import JobService
from jobsvc.tasks import registry

TEMPLATES_DIR = Path(__file__).parent.parent / "templates"
PAGE_SIZES = (25, 50, 100, 200)
REFRESH_SECONDS = 2
# The job list also looks for new jobs while nothing runs, only less often.
IDLE_REFRESH_SECONDS = 5
# The order the counts are shown in: the life of a job, left to right.
STATES: tuple[JobStatus, ...] = (
    JobStatus.QUEUED,
    JobStatus.RUNNING,
    JobStatus.RETRYING,
    JobStatus.SUCCEEDED,
    JobStatus.FAILED,
    JobStatus.CANCELLED,
)


def format_time(value: datetime | None) -> str:
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def format_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} m {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} m"


def job_duration(job: Any, now: datetime | None = None) -> str:
    """How long the latest attempt ran (or has been running); a dash while it waits.

    ``started_at`` is the start of the latest attempt, and survives a retry: only a running
    or finished job has a duration worth showing.
    """
    if job.started_at is None:
        return "—"
    if job.status == JobStatus.RUNNING:
        end = now or datetime.now(UTC)
    elif job.finished_at is not None and job.status != JobStatus.QUEUED:
        end = job.finished_at
    else:
        return "—"
    return format_seconds(max(0.0, (end - job.started_at).total_seconds()))


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        # Params, error messages and tracebacks are user data: everything is escaped.
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["time"] = format_time
    env.filters["duration"] = job_duration
    env.filters["pretty_json"] = pretty_json
    env.globals["STATES"] = STATES
    return env


def build_ui_router(runtime: Runtime) -> APIRouter:
    """The dashboard routes, bound to one running service; mount it at ``/ui``."""
    # JobsvcRoute only catches what the pages cannot: a service that is not running (raised
    # by the dependency, before a page exists) becomes the API's 503 rather than a 500.
    router = APIRouter(route_class=JobsvcRoute, tags=["ui"], include_in_schema=False)
    templates = Jinja2Templates(env=_environment())

    # async: a plain def dependency would cost a thread-pool round trip on every request
    async def get_service() -> JobService:
        return runtime.service

    async def get_owner(request: Request) -> str:
        """Whose jobs the pages show: the same rule as the JSON API's (``""`` on an open
        service; with API keys, the key in the request's ``Authorization`` header)."""
        return runtime.keys.owner(request)

    ServiceDep = Annotated[JobService, Depends(get_service)]
    OwnerDep = Annotated[str, Depends(get_owner)]

    def api_url(request: Request, name: str, **params: str) -> str | None:
        """A link into the JSON API, or None where this app does not mount it."""
        try:
            return request.url_for(name, **params).path
        except NoMatchFound:
            return None

    def render(
        request: Request, name: str, context: Mapping[str, Any], status_code: int = 200
    ) -> Response:
        values = {
            "home_url": request.url_for("jobsvc_ui_index").path,
            "api_url": api_url(request, "jobsvc_list_jobs"),
            "live_url": None,
            "live_every": REFRESH_SECONDS,
            "active": False,
            "notice": None,
            **context,
        }
        return templates.TemplateResponse(request, name, values, status_code=status_code)

    def error_page(request: Request, error: JobsvcError) -> Response:
        status = status_of(error)
        title = "Not found" if isinstance(error, NotFound) else "Something went wrong"
        return render(
            request,
            "error.html",
            {"title": title, "status": status, "message": error.message},
            status_code=status,
        )

    async def job_page(
        request: Request,
        service: JobService,
        owner: str,
        job_id: str,
        notice: str | None = None,
        status_code: int = 200,
    ) -> Response:
        try:
            job = await service.get(job_id, owner)
            events = await service.events(job_id, owner)
        except JobsvcError as error:
            return error_page(request, error)
        page_url = request.url_for("jobsvc_ui_job", job_id=job_id).path
        has_result = job.status == JobStatus.SUCCEEDED
        context = {
            "job": job,
            "events": events,
            "notice": notice,
            "page_url": page_url,
            "can_retry": job.status in RETRYABLE,
            "can_cancel": job.status in CANCELLABLE,
            "json_url": api_url(request, "jobsvc_get_job", job_id=job_id),
            "events_url": api_url(request, "jobsvc_job_events", job_id=job_id),
            "result_url": api_url(request, "jobsvc_job_result", job_id=job_id)
            if has_result
            else None,
            # The canonical URL, also after a refused POST rendered this page at .../retry.
            "live_url": page_url if job.status in ACTIVE else None,
            "active": job.status in ACTIVE,
        }
        return render(request, "job.html", context, status_code=status_code)

    @router.get("", name="jobsvc_ui_index")
    async def index(
        request: Request,
        service: ServiceDep,
        owner: OwnerDep,
        # Strings, not enums: the filter form sends ``status=`` for "all states".
        status: Annotated[str, Query(max_length=32)] = "",
        task: Annotated[str, Query(max_length=200)] = "",
        cursor: Annotated[str, Query(max_length=64)] = "",
        limit: Annotated[int, Query(ge=1, le=max(PAGE_SIZES))] = 50,
    ) -> Response:
        notice = None
        statuses: Sequence[str] = ()
        if status in set(JobStatus):
            statuses = (status,)
        elif status:
            notice = f"There is no state {status!r}; showing every state."
            status = ""
        try:
            rows, next_cursor = await service.list(
                owner=owner,
                statuses=statuses,
                task=task or None,
                limit=limit,
                cursor=cursor or None,
            )
            counts = await service.counts(owner)
        except JobsvcError as error:
            return error_page(request, error)

        filters = {k: v for k, v in (("status", status), ("task", task)) if v}
        if limit != 50:
            filters["limit"] = str(limit)
        base = request.url_for("jobsvc_ui_index").path

        def link(params: Mapping[str, str]) -> str:
            query = urlencode({k: v for k, v in params.items() if v})
            return f"{base}?{query}" if query else base

        active = any(counts.get(state, 0) for state in ACTIVE)
        # Looked up once, then filled in: each lookup walks every route, and one a row made
        # most of the page's time (6 of 8 ms for 50 rows).
        job_page_url = request.url_for("jobsvc_ui_job", job_id="JOB_ID").path
        context = {
            "jobs": rows,
            "job_url": lambda job_id: job_page_url.replace("JOB_ID", job_id),
            "counts": counts,
            "total": sum(counts.values()),
            "status": status,
            "task": task,
            "limit": limit,
            "page_sizes": PAGE_SIZES,
            "task_names": sorted(t.name for t in registry.all()),
            "notice": notice,
            "older_url": link({**filters, "cursor": next_cursor or ""}) if next_cursor else None,
            "newest_url": link(filters) if cursor else None,
            "state_url": {
                state.value: link({**filters, "status": state.value}) for state in STATES
            },
            "all_states_url": link({**filters, "status": ""}),
            "now": datetime.now(UTC),
            "live_url": link({**filters, "cursor": cursor}),
            "live_every": REFRESH_SECONDS if active else IDLE_REFRESH_SECONDS,
            "active": active,
        }
        return render(request, "index.html", context)

    @router.get("/jobs/{job_id}", name="jobsvc_ui_job")
    async def job_detail(
        request: Request, job_id: str, service: ServiceDep, owner: OwnerDep
    ) -> Response:
        return await job_page(request, service, owner, job_id)

    async def act(
        request: Request, service: JobService, owner: str, job_id: str, verb: str
    ) -> Response:
        try:
            if verb == "retry":
                await service.retry(job_id, owner)
            else:
                await service.cancel(job_id, owner)
        except Conflict as error:
            # The page was stale (the job moved on since it was drawn): say so, on the page.
            return await job_page(request, service, owner, job_id, error.message, 409)
        except JobsvcError as error:
            return error_page(request, error)
        target = request.url_for("jobsvc_ui_job", job_id=job_id).path
        return RedirectResponse(target, status_code=303)

    @router.post("/jobs/{job_id}/retry", name="jobsvc_ui_retry")
    async def retry_job(
        request: Request, job_id: str, service: ServiceDep, owner: OwnerDep
    ) -> Response:
        return await act(request, service, owner, job_id, "retry")

    @router.post("/jobs/{job_id}/cancel", name="jobsvc_ui_cancel")
    async def cancel_job(
        request: Request, job_id: str, service: ServiceDep, owner: OwnerDep
    ) -> Response:
        return await act(request, service, owner, job_id, "cancel")

    return router


__all__ = ["build_ui_router"]
