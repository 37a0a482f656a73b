"""Async engines for SQLite (the embedded default) and PostgreSQL, and migrations to head."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg"}


class DatabaseConfigError(ValueError):
    """The database URL is not one this project can use; the message names what to change."""


def normalize_url(url: str) -> sa.URL:
    """Accept `sqlite:///file.db` or `postgresql://user@host/db` and pick the async driver."""
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise DatabaseConfigError(f"database url {_redact(url)!r} is not a URL: {e}") from None
    except ValueError:  # e.g. a port that is not a number; the message could carry parts of the URL
        raise DatabaseConfigError("database url is not a valid URL (check the host, port and database)") from None
    backend = parsed.get_backend_name()
    if backend not in _DRIVERS:
        raise DatabaseConfigError(
            f"database url scheme {parsed.drivername!r} is not supported; use sqlite:///path.db or postgresql://..."
        )
    driver = _DRIVERS[backend]
    if parsed.drivername not in (backend, driver):
        raise DatabaseConfigError(f"driver {parsed.drivername!r} is not supported; use {driver}")
    parsed = parsed.set(drivername=driver)
    if driver.startswith("sqlite") and parsed.database in (None, "", ":memory:"):
        raise DatabaseConfigError("an in-memory SQLite database loses everything on a crash; give a file path")
    return parsed


def safe_url(url: str) -> str:
    """The URL with its password hidden, for messages."""
    return _redact(url)


def _redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "<unparseable>"


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_async_engine(parsed, **kwargs)
        sa.event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(parsed, pool_pre_ping=True, **kwargs)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: readers never block the writer. synchronous=FULL: a commit survives power loss, not
    # only a process crash; the cost is measured in bench/transitions.py.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", normalize_url(url).render_as_string(hide_password=False))
    return cfg


# Any constant shared by every process of this project; pg_advisory_xact_lock takes a bigint.
_MIGRATION_LOCK_ID = 0x6C6966656379636C  # "lifecycl"


async def migrate(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the schema to `revision` on an open engine (alembic runs on its connection).

    On PostgreSQL the migration holds a transaction-scoped advisory lock, so processes starting
    together migrate one after the other instead of racing on CREATE TABLE. SQLite is the embedded,
    one-process database; its single writer lock serialises the DDL.
    """

    def run(connection: sa.Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)

    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
        await conn.run_sync(run)
