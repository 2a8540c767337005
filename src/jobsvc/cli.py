"""The ``jobsvc`` command: run the service (``serve``, ``worker``), talk to it (``submit``,
``jobs ...``) and manage its database (``db ...``).

The client commands speak HTTP to ``JOBSVC_URL``. A user's mistake (a missing file, a server
that does not answer, a request the API refuses, a failed job) ends with one line on stderr and
exit status 1, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.json import JSON
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from jobsvc.lifecycle import TERMINAL, JobStatus
from jobsvc.settings import Settings

DEFAULT_URL = "http://127.0.0.1:8000"
POLL_SECONDS = 0.2
PREVIEW_ROWS = 10
UPLOAD_TYPES = {
    ".csv": "text/csv",
    ".ndjson": "application/x-ndjson",
    ".jsonl": "application/x-ndjson",
    ".parquet": "application/vnd.apache.parquet",
    ".pq": "application/vnd.apache.parquet",
}

app = typer.Typer(
    name="jobsvc",
    help="A durable job service for pandas work.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
jobs_app = typer.Typer(help="Inspect and change jobs.", no_args_is_help=True)
db_app = typer.Typer(help="The database schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(db_app, name="db")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


# --- failing cleanly ---------------------------------------------------------------------------


def fail(message: str) -> NoReturn:
    """One line on stderr, exit status 1."""
    # Plain echo, not rich: rich would wrap a long message over several lines.
    typer.echo(" ".join(message.split()), err=True)
    raise typer.Exit(1)


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        problems = "; ".join(
            f"JOBSVC_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in error.errors()
        )
        fail(f"bad setting: {problems}")


@contextmanager
def database_errors(settings: Settings) -> Iterator[None]:
    """A database that cannot be opened is the user's setting, not a bug: say so in one line."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (SQLAlchemyError, OSError) as error:
        first = str(getattr(error, "orig", None) or error).splitlines()[0]
        fail(f"cannot use the database at {settings.database_url}: {first}")


def describe_detail(detail: Any) -> str:
    """The API's ``detail``: a string, or FastAPI's list of ``{"loc", "msg"}`` problems."""
    if isinstance(detail, list):
        parts = []
        for problem in detail:
            if isinstance(problem, dict):
                loc = ".".join(str(part) for part in problem.get("loc", []))
                msg = str(problem.get("msg", problem))
                parts.append(f"{loc}: {msg}" if loc else msg)
            else:
                parts.append(str(problem))
        return "; ".join(parts)
    return str(detail)


class Client:
    """The HTTP API at ``JOBSVC_URL``; every failure becomes ``fail(...)``."""

    def __init__(self) -> None:
        self.url = os.environ.get("JOBSVC_URL", DEFAULT_URL).rstrip("/")
        key = os.environ.get("JOBSVC_API_KEY")  # for a server that has JOBSVC_API_KEYS set
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        # Uploads may be large and a result may take a while to render: no read timeout.
        self.http = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(10.0, read=None)
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            fail(f"cannot reach jobsvc at {self.url}: {error or type(error).__name__}")
        if response.is_error:
            try:
                detail = describe_detail(response.json()["detail"])
            except (ValueError, KeyError, TypeError):
                detail = response.text[:200] or response.reason_phrase
            fail(f"jobsvc answered {response.status_code}: {detail}")
        try:
            return response.json()
        except ValueError:
            fail(f"{self.url} did not answer with JSON; is JOBSVC_URL a jobsvc server?")


# --- running the service -----------------------------------------------------------------------


def configure_logging(level: str, fmt: str) -> None:
    from jobsvc import logs

    logs.configure(level, fmt)


def prepare_to_run(log_level: str) -> Settings:
    """Settings, logging, and the schema brought up to date (under the migration lock)."""
    from jobsvc import migrate

    settings = load_settings()
    configure_logging(log_level, settings.log_format)
    with database_errors(settings):
        migrate.upgrade(settings)
    return settings


STOPPING_AT_ONCE = (
    "second signal: stopping at once; the jobs still running will be recovered as after a crash"
)


def stop_at_once(runner: Any) -> NoReturn:
    """The second stop signal: kill the worker processes and exit, writing nothing."""
    logging.getLogger("jobsvc").warning(STOPPING_AT_ONCE)
    if runner is not None:
        runner.kill_now()
    logging.shutdown()
    os._exit(1)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="The address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The port to listen on.")] = 8000,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the HTTP API and its workers (migrating the database first).

    SIGINT or SIGTERM (Ctrl-C, systemctl stop) stops it gracefully: running jobs get
    JOBSVC_SHUTDOWN_GRACE seconds, then go back to the queue uncounted. A second signal stops
    it at once.
    """
    import uvicorn

    from jobsvc.api.clients import with_header_deadline
    from jobsvc.app import create_app

    settings = prepare_to_run(log_level)
    application = create_app(settings, migrate_on_start=False)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit:
                stop_at_once(application.state.queue.runner)
            logging.getLogger("jobsvc").info(
                "%s: stopping; running jobs get %g s to finish (signal again to stop at once)",
                signal.Signals(sig).name,
                settings.shutdown_grace,
            )
            # Not recorded as uvicorn's captured signal: it would raise it again at the end,
            # and a graceful stop would end in a KeyboardInterrupt's traceback.
            self.should_exit = True

    # log_config=None: uvicorn's own lines go through the same (text or JSON) handler.
    config = uvicorn.Config(
        application,
        host=host,
        port=port,
        log_level=log_level,
        log_config=None,
        http=with_header_deadline(settings.request_idle_seconds),
    )
    Server(config).run()


async def run_worker(settings: Settings) -> None:
    """Workers without the HTTP API, until SIGTERM or SIGINT; then a graceful stop, or an
    immediate one at a second signal."""
    from jobsvc.db import Database
    from jobsvc.runner.runner import Runner
    from jobsvc.tasks import import_task_modules

    import_task_modules(settings.task_modules)
    db = Database(settings)
    runner = Runner(settings, db)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: signal.Signals) -> None:
        if stop.is_set():
            stop_at_once(runner)
        logging.getLogger("jobsvc").info(
            "%s: stopping; running jobs get %g s to finish (signal again to stop at once)",
            signum.name,
            settings.shutdown_grace,
        )
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await runner.start()
        logging.getLogger("jobsvc").info("worker ready on %s", settings.database_url)
        await stop.wait()
        await runner.stop()
    finally:
        await db.dispose()


@app.command()
def worker(
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run workers only (no HTTP API), for more machines on the same database. Stops as
    ``serve`` does."""
    asyncio.run(run_worker(prepare_to_run(log_level)))


# --- submitting ---------------------------------------------------------------------------------


def parse_param(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise typer.BadParameter(f"{text!r} is not NAME=VALUE", param_hint="--param")
    try:
        return name, json.loads(raw)
    except json.JSONDecodeError:
        return name, raw  # not JSON: a plain string, so `--param column=price` just works


def read_records(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as error:
        fail(f"{path} is not valid JSON: {error}")
    if not isinstance(data, list):
        fail(f"{path} must hold a JSON list of records")
    return data


def upload(
    client: Client, path: Path, task: str, params: dict[str, Any], options: dict[str, Any]
) -> Any:
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            body = {"task": task, "params": params, "data": read_records(path), **options}
            return client.request("POST", "/jobs", json=body)
        if suffix not in UPLOAD_TYPES:
            known = ", ".join(sorted({".json", *UPLOAD_TYPES}))
            fail(f"{path}: unsupported file type {suffix or '(none)'!r}; use one of {known}")
        query = {"task": task, "params": json.dumps(params), **options}
        with path.open("rb") as file:
            # A file object is sent in chunks: a large upload is never read whole here.
            return client.request(
                "POST",
                "/jobs",
                params=query,
                content=file,
                headers={"Content-Type": UPLOAD_TYPES[suffix]},
            )
    except OSError as error:
        fail(f"cannot read {path}: {error.strerror or error}")


def one_line_error(job: dict[str, Any]) -> str:
    error = job.get("error")
    if job["status"] == JobStatus.CANCELLED:
        return f"job {job['id']} was cancelled"
    reason = f"{error['type']}: {error['message']}" if error else "no error recorded"
    return f"job {job['id']} failed after {job['attempts']} attempt(s): {reason}"


def wait_for(client: Client, job: dict[str, Any]) -> dict[str, Any]:
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        # Scripts and logs want the outcome line, not a redrawn bar.
        disable=not err.is_terminal,
    ) as progress:
        bar = progress.add_task(f"{job['task']}: {job['status']}", total=1.0)
        while job["status"] not in TERMINAL:
            time.sleep(POLL_SECONDS)
            job = client.request("GET", f"/jobs/{job['id']}")
            done = 1.0 if job["status"] == JobStatus.SUCCEEDED else job["progress"] or 0.0
            progress.update(bar, completed=done, description=f"{job['task']}: {job['status']}")
    return job


def records_table(rows: list[dict[str, Any]]) -> Table:
    table = Table()
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    for column in columns:
        table.add_column(Text(str(column)), overflow="fold")
    for row in rows:
        # Text, not str: a cell such as "[red]" is data, not rich markup.
        table.add_row(*(Text(format_cell(row.get(column))) for column in columns))
    return table


def format_cell(value: Any) -> str:
    return "" if value is None else str(value)


def show_result(client: Client, job: dict[str, Any]) -> None:
    result = client.request("GET", f"/jobs/{job['id']}/result")
    if isinstance(result, list):
        out.print(f"{len(result)} rows")
        if result:
            out.print(records_table(result[:PREVIEW_ROWS]))
        if len(result) > PREVIEW_ROWS:
            out.print(f"… {len(result) - PREVIEW_ROWS} more; GET {client.url}{job['result_url']}")
    elif result is None:
        out.print("no result data (the task returned nothing)")
    else:
        out.print(JSON.from_data(result))


@app.command()
def submit(
    file: Annotated[
        Path, typer.Argument(metavar="FILE", help=".csv, .ndjson/.jsonl, .parquet or .json.")
    ],
    task: Annotated[str, typer.Option("--task", "-t", help="The task to run.")],
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="NAME=VALUE; VALUE is read as JSON when it parses."),
    ] = None,
    priority: Annotated[int | None, typer.Option(help="Lower runs first.")] = None,
    max_attempts: Annotated[int | None, typer.Option(help="Attempts before it fails.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until it ends.")] = False,
) -> None:
    """Submit FILE as a job's input data; print the job id."""
    params = dict(parse_param(text) for text in param or [])
    options = {
        name: value
        for name, value in (("priority", priority), ("max_attempts", max_attempts))
        if value is not None
    }
    if not file.is_file():
        fail(f"{file}: {'not a file' if file.exists() else 'no such file'}")
    with Client() as client:
        job = upload(client, file, task, params, options)
        typer.echo(job["id"])
        if not wait:
            return
        job = wait_for(client, job)
        if job["status"] != JobStatus.SUCCEEDED:
            fail(one_line_error(job))
        elapsed = ""
        if job["started_at"] and job["finished_at"]:
            seconds = (
                parse_time(job["finished_at"]) - parse_time(job["started_at"])
            ).total_seconds()
            elapsed = f" in {seconds:.1f} s"
        out.print(f"succeeded{elapsed} (attempt {job['attempts']})")
        show_result(client, job)


# --- jobs ---------------------------------------------------------------------------------------


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def format_time(text: str | None, *, zone: bool = True) -> str:
    if not text:
        return "-"
    return parse_time(text).strftime("%Y-%m-%d %H:%M:%S") + (" UTC" if zone else "")


@jobs_app.command("list")
def list_jobs(
    status: Annotated[
        list[JobStatus] | None, typer.Option("--status", "-s", help="Only these statuses.")
    ] = None,
    task: Annotated[str | None, typer.Option("--task", "-t", help="Only this task.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="At most this many.")] = 50,
) -> None:
    """Jobs, newest first."""
    query: dict[str, Any] = {"limit": limit, "status": [s.value for s in status or []]}
    if task:
        query["task"] = task
    with Client() as client:
        page = client.request("GET", "/jobs", params=query)
    if not page["items"]:
        out.print("no jobs")
        return
    # The id is what a user copies into the next command and the status what they look for:
    # never wrapped or shortened. The error folds; on a terminal too narrow for all of it (80
    # columns), the creation time is left out (the jobs come newest first; `show` has it).
    with_time = out.width >= 100
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("id", no_wrap=True, min_width=36)
    table.add_column("task", no_wrap=True, max_width=24)
    table.add_column("status", no_wrap=True)
    table.add_column("attempts", no_wrap=True, justify="right")
    if with_time:
        table.add_column("created (UTC)", no_wrap=True)
    table.add_column("error", overflow="fold", min_width=8)
    for job in page["items"]:
        cells = [job["id"], job["task"], job["status"], f"{job['attempts']}/{job['max_attempts']}"]
        if with_time:
            cells.append(format_time(job["created_at"], zone=False))
        cells.append(job["error"]["type"] if job["error"] else "")
        table.add_row(*cells)
    out.print(table)
    if page["next_cursor"]:
        out.print(f"(more jobs than {limit}; raise --limit or filter)")


@jobs_app.command("show")
def show_job(job_id: Annotated[str, typer.Argument(help="The job's id.")]) -> None:
    """A job: its state, params, latest error and every event."""
    with Client() as client:
        job = client.request("GET", f"/jobs/{job_id}")
        events = client.request("GET", f"/jobs/{job_id}/events")
    progress = "-" if job["progress"] is None else f"{job['progress']:.0%}"
    error = job["error"]
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold")
    fields.add_column(overflow="fold")
    for name, value in (
        ("id", job["id"]),
        ("task", job["task"]),
        ("status", job["status"]),
        ("attempts", f"{job['attempts']} of {job['max_attempts']}"),
        ("progress", progress),
        ("created", format_time(job["created_at"])),
        ("started", format_time(job["started_at"])),
        ("finished", format_time(job["finished_at"])),
        ("params", json.dumps(job["params"])),
        ("error", f"{error['type']}: {error['message']}" if error else "-"),
    ):
        fields.add_row(name, Text(value))
    out.print(fields)
    if error and error.get("traceback"):
        out.print(Text(error["traceback"].rstrip()), soft_wrap=True)  # lines kept whole
    table = Table("at", "status", "attempt", "error", title="events", title_justify="left")
    table.columns[3].overflow = "fold"
    for event in events:
        problem = event["error"]
        table.add_row(
            format_time(event["at"]),
            event["status"],
            str(event["attempt"]),
            Text(f"{problem['type']}: {problem['message']}" if problem else ""),
        )
    out.print(table)


@jobs_app.command("cancel")
def cancel_job(job_id: Annotated[str, typer.Argument(help="The job's id.")]) -> None:
    """Cancel a queued, retrying or running job."""
    with Client() as client:
        job = client.request("POST", f"/jobs/{job_id}/cancel")
    out.print(f"job {job['id']} {job['status']}")


@jobs_app.command("retry")
def retry_job(job_id: Annotated[str, typer.Argument(help="The job's id.")]) -> None:
    """Queue a failed or cancelled job again, with its attempts reset."""
    with Client() as client:
        job = client.request("POST", f"/jobs/{job_id}/retry")
    out.print(f"job {job['id']} {job['status']}")


# --- database -----------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply pending migrations to JOBSVC_DATABASE_URL."""
    from jobsvc import migrate

    settings = load_settings()
    with database_errors(settings):
        migrate.upgrade(settings)
        out.print(migrate.current(settings) or "(empty database)")


@db_app.command("current")
def db_current() -> None:
    """Print the database's revision."""
    from jobsvc import migrate

    settings = load_settings()
    with database_errors(settings):
        out.print(migrate.current(settings) or "(empty database)")


@db_app.command("prune")
def db_prune(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Age of finished jobs to delete: 30d, 12h, 90m.")
    ] = "",
) -> None:
    """Delete finished jobs (and their inputs, results, events) older than an age
    (default: JOBSVC_RETENTION_DAYS)."""
    from datetime import timedelta

    from jobsvc import retention
    from jobsvc.db import Database
    from jobsvc.files import FileStore

    settings = load_settings()
    try:
        age = (
            retention.parse_age(older_than)
            if older_than
            else timedelta(days=settings.retention_days)
        )
    except ValueError as error:
        fail(str(error))

    async def run() -> int:
        db = Database(settings)
        try:
            return await retention.prune(db, age, FileStore.for_settings(settings))
        finally:
            await db.dispose()

    with database_errors(settings):
        deleted = asyncio.run(run())
    out.print(f"deleted {deleted} jobs that finished more than {retention.describe_age(age)} ago")


if __name__ == "__main__":
    app()
