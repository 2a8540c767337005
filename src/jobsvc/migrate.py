"""Applying the Alembic migrations from the service: ``jobsvc db upgrade|current`` and start-up.

Several instances may start at once against one database; each takes a lock first (a file lock
beside a SQLite database, an advisory lock on PostgreSQL), so one migrates and the others find
the schema current.
"""

from __future__ import annotations

import fcntl
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url

from jobsvc.settings import Settings


def migrations_dir() -> Path:
    packaged = Path(__file__).parent / "migrations"  # inside an installed wheel
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "migrations"  # a source checkout


def alembic_config(settings: Settings, out: io.StringIO | None = None) -> Config:
    config = Config(stdout=out) if out is not None else Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["settings"] = settings
    config.attributes["configure_logging"] = False
    return config


@contextmanager
def _migration_lock(settings: Settings) -> Iterator[None]:
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if not database or database == ":memory:":
            yield
            return
        lock_path = Path(database).with_name(Path(database).name + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with lock_path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    else:
        # PostgreSQL: env.py takes an advisory lock inside the migration's own transaction.
        yield


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Bring the database to ``revision`` (blocking: call it from a thread in async code)."""
    with _migration_lock(settings):
        command.upgrade(alembic_config(settings), revision)


def downgrade(settings: Settings, revision: str) -> None:
    with _migration_lock(settings):
        command.downgrade(alembic_config(settings), revision)


def current(settings: Settings) -> str:
    """The revision the database is at, as Alembic prints it ('' for an empty database)."""
    out = io.StringIO()
    command.current(alembic_config(settings, out))
    return out.getvalue().strip()


def head() -> str:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(Settings()))
    return script.get_current_head() or ""


__all__ = ["alembic_config", "current", "downgrade", "head", "upgrade"]
