"""The service assembled: ``JobQueue`` (database, converter pool, runner, routes) and
``create_app``, the standalone FastAPI app that ``jobsvc serve`` runs.

Nothing connects at import time: ``JobQueue.lifespan`` starts everything and stops it again.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from jobsvc import migrate
from jobsvc.api.auth import KeyRing, RefuseCrossSite, RequireKey
from jobsvc.api.clients import IdleBodyTimeout
from jobsvc.api.limits import BodySizeLimit
from jobsvc.api.routes import build_jobs_router, build_service_router
from jobsvc.api.ui import build_ui_router
from jobsvc.converter import Converter, ConverterPool
from jobsvc.db import Database
from jobsvc.errors import StorageUnavailable
from jobsvc.metrics import Metrics
from jobsvc.runner.faults import FaultHooks
from jobsvc.runner.runner import Runner
from jobsvc.service import JobService
from jobsvc.settings import Settings
from jobsvc.tasks import import_task_modules

log = logging.getLogger("jobsvc")


class JobQueue:
    """A durable job queue on one database, with its own workers and status routes.

    ``JobQueue(settings)`` or ``JobQueue(database_url=..., workers=..., task_modules=[...])``;
    run ``lifespan`` (or ``start``/``stop``) around its use, and mount ``router`` anywhere.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        migrate_on_start: bool = True,
        run_workers: bool = True,
        faults: FaultHooks | None = None,
        **overrides: Any,
    ) -> None:
        if settings is None:
            settings = Settings(**overrides)
        elif overrides:
            settings = settings.model_copy(update=overrides)
        self.settings = settings
        self.migrate_on_start = migrate_on_start
        self.run_workers = run_workers
        self.faults = faults
        self.db: Database | None = None
        self.runner: Runner | None = None
        self._converter: ConverterPool | None = None
        self._service: JobService | None = None
        self.keys = KeyRing(settings.api_keys)
        self.metrics = Metrics()
        self.router: APIRouter = build_jobs_router(self)

    @property
    def service(self) -> JobService:
        if self._service is None:
            raise StorageUnavailable(
                "the job service is not running (its lifespan has not started)"
            )
        return self._service

    async def wake(self) -> None:
        if self.runner is not None:
            self.runner.notify()

    async def start(self) -> None:
        import_task_modules(self.settings.task_modules)
        if self.migrate_on_start:
            # Alembic runs its own event loop: give it a thread.
            await asyncio.to_thread(migrate.upgrade, self.settings)
        self.db = Database(self.settings)
        self._converter = ConverterPool(
            size=max(1, min(2, self.settings.workers)),
            memory_mb=self.settings.converter_memory_mb,
        )
        converter: Converter = self._converter
        if self.run_workers:
            self.runner = Runner(self.settings, self.db, metrics=self.metrics, faults=self.faults)
            await self.runner.start()
            converter = self.runner.idle_work(self._converter)
        self._service = JobService(self.settings, self.db, converter, self.runner, self.metrics)

    async def stop(self) -> None:
        if self._service is not None:
            await self._service.committer.close()
        self._service = None
        if self.runner is not None:
            await self.runner.stop()
            self.runner = None
        if self._converter is not None:
            self._converter.shutdown()
            self._converter = None
        if self.db is not None:
            await self.db.dispose()
            self.db = None

    async def enqueue(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> str:
        """Store a job that calls ``func(*args, **kwargs)``; its id."""
        prepared = self.service.prepare_call(func, args, kwargs)
        await self.service.submit_prepared([prepared])
        return prepared.id

    async def enqueue_in(
        self,
        session: AsyncSession | AsyncConnection,
        func: Callable[..., Any],
        /,
        *args: Any,
        **kwargs: Any,
    ) -> str:
        """Store a job in *your* transaction: it commits, or rolls back, with your own rows.

        ``session`` is your SQLAlchemy ``AsyncSession`` (or ``AsyncConnection``) on the same
        database as the queue. The job is visible to workers once you commit.
        """
        return await self.service.enqueue_in(session, func, args, kwargs)

    @asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """Start on entry, drain and stop on exit; use as ``FastAPI(lifespan=jobs.lifespan)``
        or inside an app's own lifespan: ``async with jobs.lifespan(app): ...``."""
        if app is not None:
            app.state.jobsvc_queue = self  # found there by DurableBackgroundTasks
        await self.start()
        try:
            yield
        finally:
            await self.stop()


def create_app(
    settings: Settings | None = None,
    *,
    migrate_on_start: bool = True,
    faults: FaultHooks | None = None,
) -> FastAPI:
    """The standalone service: the job routes at ``/jobs``, plus ``/tasks`` and ``/healthz``.
    ``faults``: hooks that make the runner fail where a test or a drill wants it to."""
    settings = settings or Settings()
    queue = JobQueue(settings, migrate_on_start=migrate_on_start, faults=faults)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with queue.lifespan(app):
            # Objects made at start-up live for the whole run; keeping them out of the
            # collector's full passes keeps those passes from showing up as request latency.
            gc.freeze()
            if queue.keys.open:
                log.warning("no JOBSVC_API_KEYS set: the API is open to anyone who can reach it")
            log.info("jobsvc ready on %s", settings.database_url)
            yield

    app = FastAPI(
        title="jobsvc",
        summary="Durable jobs for pandas work: submit data, poll status, fetch results.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.queue = queue
    app.include_router(queue.router, prefix="/jobs")
    app.include_router(build_service_router(queue))
    app.include_router(build_ui_router(queue), prefix="/ui")
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(RefuseCrossSite)
    # A request without a valid key is refused before anything reads its body.
    app.add_middleware(RequireKey, keys=queue.keys)
    # Outermost: every reader of a body gets its deadline, and a client's disconnect is caught
    # whichever layer noticed it.
    app.add_middleware(IdleBodyTimeout, idle_seconds=settings.request_idle_seconds)
    return app
