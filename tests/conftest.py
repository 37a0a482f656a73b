"""Shared fixtures: real SQLite files, real PostgreSQL databases, the paper exchange, a clock."""
from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from loguru import logger

from db.engine import create_engine, migrate
from db.repository import Repository
from exchange.paper import PaperExchange
from exchange.sim.server import SimServer
from lifecycle.engine import Engine
from lifecycle.records import JsonlRecords
from tests.livekit import Rig

PG_ADMIN_URL = os.environ.get("LIFECYCLE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


class FakeClock:
    """A controllable clock: starts at a fixed UTC instant, moves only when told to."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


@pytest.fixture(autouse=True)
def _loguru_to_captured_stderr() -> Iterator[None]:
    """Send the engine's log lines where pytest captures them (shown only for failing tests)."""
    import sys

    def to_stderr(message: str) -> None:  # `sys.stderr` looked up per line: pytest swaps it per test
        sys.stderr.write(message)

    logger.remove()
    sink = logger.add(to_stderr, level="INFO")
    yield
    logger.remove(sink)


def _pg_dsn(database: str | None = None) -> str:
    base = PG_ADMIN_URL.replace("postgresql+asyncpg://", "postgresql://")
    return base if database is None else base.rsplit("/", 1)[0] + "/" + database


async def _pg_admin(*statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(_pg_dsn(), timeout=3)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated PostgreSQL database that each test clones; skips when the server is absent."""
    name = f"lc_tmpl_{uuid.uuid4().hex[:10]}"
    try:
        asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    except (TimeoutError, OSError) as e:
        reason = (f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({type(e).__name__}: {e}); start it with "
                  "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`")
        if os.environ.get("LIFECYCLE_REQUIRE_POSTGRES") == "1":  # CI: a skipped backend is a failure
            pytest.fail(reason)
        pytest.skip(reason)

    async def migrate_template() -> None:
        engine = create_engine(_pg_dsn(name))
        try:
            await migrate(engine)
        finally:
            await engine.dispose()

    asyncio.run(migrate_template())
    yield name
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    name = f"lc_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"'))
    yield _pg_dsn(name)
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'lifecycle.sqlite'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """Run the test once on a SQLite file and once on a PostgreSQL database."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture
async def repo(db_url: str) -> AsyncIterator[Repository]:
    repository = await Repository.open(db_url)
    yield repository
    await repository.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def exchange() -> PaperExchange:
    return PaperExchange()


@pytest.fixture
def records(tmp_path: Path) -> JsonlRecords:
    return JsonlRecords(tmp_path / "records")


@pytest.fixture
def engine(repo: Repository, exchange: PaperExchange, records: JsonlRecords, clock: FakeClock) -> Engine:
    return Engine(repo, canceller=exchange, records=records, clock=clock)


# The venue simulator (marks every 0.2 s) and a live engine wired to it on a SQLite file (tests.livekit.Rig):
# the shared world of the live-engine tests; a file that needs other settings defines its own.
@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    server = await SimServer(mark_interval_s=0.2).start()
    yield server
    await server.stop()


@pytest.fixture
async def rig(sim: SimServer, tmp_path: Path) -> AsyncIterator[Rig]:
    r = await Rig(sim, sim.venue.add_account("alice"), f"sqlite:///{tmp_path / 'live.sqlite'}",
                  tmp_path / "records").start()
    yield r
    await r.stop()
