"""Async engines for SQLite (the embedded default) and PostgreSQL, and migrations to head."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

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
    if backend != "sqlite":
        _libpq_ssl(parsed)  # refused here, before anything connects
    return parsed


# libpq's sslmode values; asyncpg takes the same words as its `ssl` argument (and applies them as libpq does).
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# libpq's other SSL parameters: asyncpg reads them only from a DSN, so they travel in one (paths and versions;
# sslpassword is left out: a secret in the URL would show wherever the URL does).
_SSL_DSN = ("sslrootcert", "sslcert", "sslkey", "sslcrl", "sslnegotiation", "ssl_min_protocol_version",
            "ssl_max_protocol_version")


def _libpq_ssl(parsed: sa.URL) -> tuple[sa.URL, dict[str, Any]]:
    """The URL without libpq's SSL parameters, and asyncpg's connect arguments that mean the same.

    SQLAlchemy hands every query parameter to asyncpg.connect() as a keyword, and asyncpg has no `sslmode`
    keyword (it calls it `ssl`), so `?sslmode=require` would fail on the first connection.
    """
    query = dict(parsed.query)
    connect_args: dict[str, Any] = {}
    mode = query.pop("sslmode", None)
    if mode is not None:
        if not isinstance(mode, str) or mode not in SSLMODES:  # not echoed: URLs are where passwords live
            raise DatabaseConfigError(f"sslmode in the database url must be one of {', '.join(SSLMODES)}")
        if "ssl" in query:
            raise DatabaseConfigError("the database url gives both sslmode and ssl; keep sslmode")
        connect_args["ssl"] = mode
    others = {name: query.pop(name) for name in _SSL_DSN if name in query}
    for name, value in others.items():
        if not isinstance(value, str):
            raise DatabaseConfigError(f"{name} is given more than once in the database url")
    if others:
        connect_args["dsn"] = "postgresql://?" + urlencode(others)  # host, user, database come from the URL
    return parsed.set(query=query), connect_args


def _redact(url: str) -> str:
    """The URL with its password hidden: the user part's, and a query parameter's that carries a secret
    (`?password=...`: SQLAlchemy hands it to the driver as the password; `?dsn=...`, a whole URL)."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return "<unparseable>"
    hidden = {key: "***" for key in parsed.query if _secret_key(key)}
    shown = parsed.update_query_dict(hidden).render_as_string(hide_password=True)
    return shown.replace("%2A%2A%2A", "***")


def _secret_key(key: str) -> bool:
    return any(word in key.lower() for word in ("pass", "secret", "token", "key", "dsn"))  # a dsn holds a URL


# PostgreSQL: a connection attempt gives up after this long (asyncpg's default is 60 s: a stop with the
# database unreachable waited that long), and a session left idle inside a transaction this long is ended by
# the server (a process frozen or cut off in the middle of a write would otherwise hold its row locks, and so
# every takeover of its accounts, until TCP noticed: hours).
PG_CONNECT_TIMEOUT_S = 10.0
PG_IDLE_IN_TRANSACTION_S = 5.0


def create_engine(url: str, *, idle_in_transaction_s: float = PG_IDLE_IN_TRANSACTION_S, **kwargs: Any) -> AsyncEngine:
    """An engine for the URL (nothing connects yet); a PostgreSQL URL may carry libpq's sslmode."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_async_engine(parsed, **kwargs)
        sa.event.listen(engine.sync_engine, "connect", sqlite_pragmas)
        return engine
    parsed, ssl_args = _libpq_ssl(parsed)
    given = kwargs.get("connect_args", {})
    settings = {"idle_in_transaction_session_timeout": str(max(1, int(idle_in_transaction_s * 1000))),
                **given.get("server_settings", {})}
    kwargs["connect_args"] = {"timeout": PG_CONNECT_TIMEOUT_S, **ssl_args, **given, "server_settings": settings}
    return create_async_engine(parsed, pool_pre_ping=True, **kwargs)


def open_error(url: str, error: BaseException) -> str:
    """One line saying why the database at `url` could not be opened: the URL (password hidden) and the
    error's kind and first line, with a hint for a SQLite file whose directory is missing or read-only."""
    shown = _redact(url)
    if isinstance(error, sa.exc.DBAPIError) and error.orig is not None:  # the driver's own error says more
        error = error.orig.__cause__ or error.orig
    detail = str(error).splitlines()[0] if str(error) else ""
    detail = detail.replace(url, shown)
    for secret in _secrets(url):
        detail = detail.replace(secret, "***")
    line = f"cannot open {shown}: {type(error).__name__}{': ' + detail if detail else ''}"
    if type(error).__name__ == "UndefinedTableError" or detail.startswith("no such table"):
        line += " (no schema yet: run `lifecycle migrate --db URL`)"
    elif type(error).__name__ == "UndefinedColumnError" or detail.startswith("no such column"):
        line += " (an older schema: run `lifecycle migrate --db URL`, or start the service, which migrates)"
    directory = _sqlite_directory(url)
    if directory is not None:
        if not directory.is_dir():
            line += f" (the directory {directory} does not exist)"
        elif not os.access(directory, os.W_OK | os.X_OK):
            line += f" (the directory {directory} is not writable)"
    return line


def _secrets(url: str) -> list[str]:
    """The URL's password and the values of its query parameters that carry a secret."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return []
    found = [parsed.password] if parsed.password else []
    for key, value in parsed.query.items():
        if _secret_key(key):
            found += [v for v in ([value] if isinstance(value, str) else value) if v]
    return [str(secret) for secret in found]


def _sqlite_directory(url: str) -> Path | None:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return None
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database).parent


def sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
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


class SqliteInUse(DatabaseConfigError):
    """Another process serves this SQLite database."""


class SqliteLock:
    """One service process per SQLite database: an exclusive `flock` on `FILE.lock`, held while the service
    runs. The kernel releases it when the process ends, however it ends (SIGKILL included), so a crashed
    service never blocks its restart. PostgreSQL is the way to run several processes (leases, not this)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def take(cls, url: str) -> SqliteLock | None:
        """The lock for `url`'s file (None for a database that is not a SQLite file); SqliteInUse, naming the
        file and the holder's pid, when another process holds it."""
        import fcntl

        directory = _sqlite_directory(url)
        if directory is None:
            return None
        database = make_url(url).database
        assert database is not None
        resolved = Path(database).resolve()  # one lock however the file is named (relative, through a symlink)
        path = resolved.with_name(resolved.name + ".lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            if not path.parent.is_dir() or not os.access(path.parent, os.W_OK | os.X_OK):
                return None  # a missing or unwritable directory: opening the database says so, in its own words
            raise SqliteInUse(f"cannot take the lock {path} that keeps a second service off {database}: "
                              f"{e.strerror or type(e).__name__} (a lock file left by another user?)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SqliteInUse(f"{database} is used by another lifecycle service (pid {holder}); one service process "
                              "per SQLite database: stop the other one, or use PostgreSQL to run several") from None
        # (A hard link to the file is a different name the lock cannot see: one path per database.)
        # The pid is for a second service's message only; the lock is held without it. On a full disk it cannot be
        # written, and the restart after a crash must not fail on that (chaos seed 503700: a traceback, exit 1).
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

