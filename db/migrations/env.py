"""Alembic environment: runs on a connection handed in by `db.engine.migrate`, or opens its own."""
from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from db.tables import metadata

config = context.config


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    from db.engine import create_engine

    async def _standalone() -> None:
        url = config.get_main_option("sqlalchemy.url")
        assert url is not None, "alembic needs sqlalchemy.url when no connection is handed in"
        engine = create_engine(url)
        async with engine.begin() as conn:
            await conn.run_sync(_run)
        await engine.dispose()

    asyncio.run(_standalone())
