"""Connections and transactions.

``read()`` and ``write()`` are the only ways in. Writes take turns (on SQLite one transaction
at a time, each opened with ``BEGIN IMMEDIATE``: SQLite has one write lock anyway, waiting for
it in the process costs far less than connections fighting over it, and a deferred
transaction that reads before it writes fails at once with "database is locked").

On SQLite both run on the synchronous driver in the event loop's own thread: a statement
takes microseconds there, where the async driver costs a round trip to its thread per call.
Waiting for another process's write lock never blocks the loop: the driver does not wait,
``write()`` retries asleep until the busy timeout. On PostgreSQL both use the asyncpg engine.

Driver errors that mean "cannot use the database now" become ``StorageUnavailable`` (or its
``DatabaseBusy``, ``WritesRefused``) here, so that a request answers 503, never 500. A write
gives up within the busy timeout of being asked for, its wait for this process's other writes
included: writes queued behind a locked database all fail at about the same moment instead of
one busy timeout after another.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from jobsvc.errors import DatabaseBusy, StorageUnavailable, WritesRefused
from jobsvc.settings import Settings

_BUSY = ("database is locked", "database table is locked")
_UNAVAILABLE = (
    "database or disk is full",
    "readonly database",
    "disk i/o error",
    "unable to open database file",
)


# What asyncpg says when the server goes away or is not yet back (a restart, a failover).
_CONNECTION_LOST = (
    "connection was closed",
    "connection is closed",
    "connection refused",
    "the database system is shutting down",
    "the database system is starting up",
    "terminating connection",
    "cannot connect now",
    "connection does not exist",
)
# The same by PostgreSQL's SQLSTATE: a connection exception (class 08), a shutdown by an
# administrator or a crash, a server starting up, no connection slot left.
_PG_UNREACHABLE = ("08", "57P01", "57P02", "57P03", "53300")
# A full disk, a read-only server (a standby after a failover).
_PG_WRITES_REFUSED = ("53100", "25006")

# What the drivers and the pool raise. OSError comes raw from asyncpg (a refused connect, a
# reset socket); the pool's TimeoutError is not a DBAPIError.
DRIVER_ERRORS = (DBAPIError, OSError, PoolTimeout)


def translate(error: DBAPIError | OSError | PoolTimeout) -> Exception:
    """The domain error for a driver error, or the driver error itself."""
    if isinstance(error, PoolTimeout):
        return DatabaseBusy(
            "Every connection to the database is in use; nothing was changed. Try again shortly."
        )
    if isinstance(error, OSError) or _connection_lost(error):
        reason = _first_line(error if isinstance(error, OSError) else error.orig or error)
        return StorageUnavailable(
            f"The database cannot be reached ({reason}); nothing was changed. Try again later."
        )
    text = str(error.orig).lower()
    if any(marker in text for marker in _BUSY):
        return DatabaseBusy()
    if _sqlstate(error).startswith(_PG_WRITES_REFUSED) or any(m in text for m in _UNAVAILABLE):
        reason = _first_line(error.orig or error)
        return WritesRefused(
            f"The database cannot take writes ({reason}); nothing was changed. Try again later."
        )
    return error


def _connection_lost(error: DBAPIError) -> bool:
    """A connection that broke or could not be made (a PostgreSQL restart, a network fault)."""
    if error.connection_invalidated or isinstance(error.orig, OSError):
        return True
    if _sqlstate(error).startswith(_PG_UNREACHABLE):
        return True
    text = str(error.orig).lower()
    return any(marker in text for marker in _CONNECTION_LOST)


def _sqlstate(error: DBAPIError) -> str:
    code = getattr(error.orig, "sqlstate", None)  # asyncpg's, through SQLAlchemy's adapter
    return code if isinstance(code, str) else ""


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _sqlite_pragmas(settings: Settings, busy_timeout_ms: int | None = None) -> Any:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event, not the driver, decide how transactions start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={settings.sqlite_synchronous}")
        timeout = settings.sqlite_busy_timeout_ms if busy_timeout_ms is None else busy_timeout_ms
        cursor.execute(f"PRAGMA busy_timeout={int(timeout)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return on_connect


class Database:
    def __init__(self, settings: Settings) -> None:
        self.url = settings.database_url
        self.dialect = make_url(self.url).get_backend_name()
        self.busy_timeout_seconds = settings.sqlite_busy_timeout_ms / 1000
        # The last write's failure for want of a writable disk, until a write succeeds: the
        # health check is 503 meanwhile, though reads work.
        self.write_fault: WritesRefused | None = None
        # Leases are compared across machines: on a shared server, its clock is the one that
        # counts. The offset of ours from it is measured at start and by the clock sync.
        self._clock_offset = timedelta(0)
        self._write_lock: asyncio.Lock | None = None
        self.inline_writer: Engine | None = None
        self.inline_reader: Engine | None = None
        self.engine: AsyncEngine | None = None
        self._commit_thread: ThreadPoolExecutor | None = None
        self._writer_conn: Connection | None = None
        if self.dialect != "sqlite":
            # A request waits for a free connection no longer than for a lock.
            self.engine = create_async_engine(
                self.url, pool_size=10, max_overflow=10, pool_timeout=self.busy_timeout_seconds
            )
            return
        sync_url = make_url(self.url).set(drivername="sqlite")
        self._write_lock = asyncio.Lock()
        # At synchronous=FULL a commit waits for the disk (an fsync). The driver lets go of
        # the GIL while it waits, so the commit goes to a thread and the loop serves requests
        # and worker messages meanwhile; the write lock stays held, so nothing else writes.
        self._commit_thread = _commit_thread() if settings.sqlite_synchronous == "FULL" else None
        # Waiting for another process's write lock must not block the loop, so the driver
        # never waits (busy_timeout=0): write() retries, asleep, until the busy timeout.
        self.inline_writer = create_engine(sync_url, pool_size=1, max_overflow=1)
        event.listen(self.inline_writer, "connect", _sqlite_pragmas(settings, busy_timeout_ms=0))
        # Reads in autocommit. In WAL mode a reader never waits for a writer; the short busy
        # timeout bounds the rare wait (a WAL recovery).
        self.inline_reader = create_engine(
            sync_url, pool_size=2, max_overflow=2, pool_reset_on_return=None
        )
        event.listen(self.inline_reader, "connect", _sqlite_pragmas(settings, busy_timeout_ms=50))

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    def now(self) -> datetime:
        """The current time by the database's clock (UTC)."""
        return datetime.now(UTC) + self._clock_offset

    async def sync_clock(self) -> timedelta:
        """Measure this machine's clock against the database server's (PostgreSQL)."""
        if self.is_sqlite:
            return self._clock_offset  # same machine, same clock
        async with self.read() as conn:
            before = datetime.now(UTC)
            server: datetime = (await conn.exec_driver_sql("SELECT clock_timestamp()")).scalar_one()
            after = datetime.now(UTC)
        self._clock_offset = server - (before + (after - before) / 2)
        return self._clock_offset

    @asynccontextmanager
    async def write(self, requested_at: float | None = None) -> AsyncIterator[AsyncConnection]:
        """One write transaction: committed when the block ends, rolled back if it raises.

        ``requested_at`` (``time.monotonic()``, default now): when the write was asked for. On
        SQLite, it is ``DatabaseBusy`` if it cannot start within the busy timeout of then.
        """
        try:
            if self.inline_writer is not None:
                start = time.monotonic() if requested_at is None else requested_at
                deadline = start + self.busy_timeout_seconds
                await self._take_turn(deadline)
                try:
                    async with self._inline_write(self.inline_writer, deadline) as conn:
                        yield conn
                finally:
                    assert self._write_lock is not None
                    self._write_lock.release()
            else:
                assert self.engine is not None
                try:
                    async with self.engine.begin() as conn:
                        yield conn
                except DRIVER_ERRORS as error:
                    raise await self._fault(error) from error
        except WritesRefused as error:
            self.write_fault = error
            raise
        self.write_fault = None

    async def _take_turn(self, deadline: float) -> None:
        """On SQLite, this process's writers take turns (FIFO) rather than fight over the file
        lock; the wait for a turn counts against the write's deadline."""
        assert self._write_lock is not None
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                await self._write_lock.acquire()
        except TimeoutError:
            raise DatabaseBusy() from None

    @asynccontextmanager
    async def _inline_write(
        self, engine: Engine, deadline: float
    ) -> AsyncIterator[AsyncConnection]:
        pause = 0.001
        # Writes take turns, so one connection serves them all: kept open between
        # transactions (a pool checkout and check-in cost a busy queue a tenth of each job's
        # commit), and closed after any error, so the next write starts on a fresh one.
        try:
            if self._writer_conn is None:
                self._writer_conn = engine.connect()
            sync_conn = self._writer_conn
            while True:
                try:
                    sync_conn.exec_driver_sql("BEGIN IMMEDIATE")
                    break
                except OperationalError as error:
                    if not isinstance(translate(error), DatabaseBusy):
                        raise
                    sync_conn.rollback()
                    if time.monotonic() >= deadline:
                        raise
                    await asyncio.sleep(pause)  # another process writes: wait, not block
                    pause = min(pause * 2, 0.05)
            try:
                yield cast(AsyncConnection, InlineConnection(sync_conn))
            except BaseException:
                sync_conn.exec_driver_sql("ROLLBACK")
                raise
            if self._commit_thread is None:
                sync_conn.exec_driver_sql("COMMIT")
            else:
                await _finish_in(self._commit_thread, sync_conn.exec_driver_sql, "COMMIT")
            sync_conn.commit()  # ends SQLAlchemy's own record of a transaction; SQL is done
        except BaseException as error:
            self._close_writer_connection()
            if isinstance(error, DBAPIError):
                raise _inline_fault(engine, error) from error
            raise

    def _close_writer_connection(self) -> None:
        conn, self._writer_conn = self._writer_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # a broken connection is dropped all the same
                conn.close()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads (the repository's read functions take it like any other)."""
        if self.inline_reader is not None:
            try:
                with self.inline_reader.connect() as sync_conn:
                    yield cast(AsyncConnection, InlineConnection(sync_conn))
            except DBAPIError as error:
                raise _inline_fault(self.inline_reader, error) from error
            return
        assert self.engine is not None
        try:
            async with self.engine.connect() as conn:
                yield conn
        except DRIVER_ERRORS as error:
            raise await self._fault(error) from error

    async def _fault(self, error: DBAPIError | OSError | PoolTimeout) -> Exception:
        domain = translate(error)
        if _needs_fresh_connections(domain) and self.engine is not None:
            await self.engine.dispose()
        return domain

    async def check(self) -> None:
        """Raises ``StorageUnavailable`` while the database cannot be read, or while writes
        fail for want of a writable disk (from the last write's failure until one succeeds)."""
        async with self.read() as conn:
            await conn.exec_driver_sql("SELECT 1")
        if self.write_fault is not None:
            # Has it cleared? A real write finds out (on a full disk, an empty transaction
            # succeeds): a row rewritten as it is. The service may be idle, with no write of
            # its own to clear the fault.
            async with self.write() as conn:
                await conn.exec_driver_sql("UPDATE alembic_version SET version_num = version_num")

    async def dispose(self) -> None:
        self._close_writer_connection()
        if self.engine is not None:
            await self.engine.dispose()
        for engine in (self.inline_reader, self.inline_writer):
            if engine is not None:
                engine.dispose()
        if self._commit_thread is not None:
            self._commit_thread.shutdown(wait=True)
            self._commit_thread = _commit_thread()  # disposed is not closed: usable again


def _commit_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobsvc-commit")


async def _finish_in(thread: ThreadPoolExecutor, func: Any, *args: Any) -> Any:
    """``func`` in ``thread``, awaited; if the caller is cancelled meanwhile, the call is
    still waited for (briefly, blocking), so the connection is never used by two threads."""
    running = thread.submit(func, *args)
    try:
        return await asyncio.wrap_future(running)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            running.result()
        raise


class InlineConnection:
    """A synchronous connection with the async connection's ``execute`` (see ``read`` and
    ``write``): the repository's functions take it like any other connection."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.dialect = conn.dialect

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        return self._conn.execute(statement, parameters)

    async def exec_driver_sql(self, statement: str, parameters: Any = None) -> Any:
        return self._conn.exec_driver_sql(statement, parameters)


def _inline_fault(engine: Engine, error: DBAPIError) -> Exception:
    domain = translate(error)
    if _needs_fresh_connections(domain):
        engine.dispose()
    return domain


def _needs_fresh_connections(error: Exception) -> bool:
    # A connection that met a full or read-only disk may stay read-only after the fault
    # clears: such a pool is dropped, so the next request opens fresh connections.
    return isinstance(error, StorageUnavailable) and not isinstance(error, DatabaseBusy)


def engine_for_migrations(settings: Settings) -> AsyncEngine:
    """An engine for Alembic: the same pragmas, no pooling."""
    from sqlalchemy.pool import NullPool

    engine = create_async_engine(settings.database_url, poolclass=NullPool)
    if settings.database_url.startswith("sqlite"):
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas(settings))
        event.listen(
            engine.sync_engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE")
        )
    return engine


__all__ = ["Database", "OperationalError", "engine_for_migrations", "translate"]
