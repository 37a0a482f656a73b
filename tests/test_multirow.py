"""The batch writes on SQLite are multi-row statements (db/multirow.py): a handful of statements per batch
whatever its size, and the rows they store are exactly those the one-statement-per-row path stores."""
from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path

import pytest
import sqlalchemy as sa

from db import multirow
from db.repository import Repository
from exchange.paper import PaperExchange
from lifecycle.domain import OrderPurpose, OrderRef, OrderStatus, Position
from lifecycle.engine import Engine
from lifecycle.events import EntryFilled, Event, Flat, TsActivated
from lifecycle.journal import Outcome
from lifecycle.records import JsonlRecords
from tests.conftest import FakeClock
from tests.test_group_commit import _open

TABLES = ("positions", "journal", "trailing_states", "closures", "orders")


async def _engine(path: Path, clock: FakeClock) -> tuple[Engine, Repository]:
    repo = await Repository.open(f"sqlite:///{path}")
    return Engine(repo, canceller=PaperExchange(), records=JsonlRecords(path.parent / f"{path.stem}-records"),
                  clock=clock), repo


async def _outcomes(engine: Engine, events: dict[str, Event]) -> list[tuple[Position, Outcome]]:
    out = []
    for pid, event in events.items():
        draft = engine.positions[pid].clone()
        out.append((draft, await engine.machine.apply(draft, event, engine.clock())))
    return out


def _rows(path: Path) -> dict[str, list[tuple[object, ...]]]:
    with sqlite3.connect(path) as conn:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in TABLES}


def _stop(position: Position, status: OrderStatus, now: datetime) -> OrderRef:
    return OrderRef(f"lc-{position.id}-s1", position.id, position.symbol, OrderPurpose.STOP, "sell", D(1), status,
                    trigger_price=D("90.5"), created_at=now, exchange_order_id=None, algo_id="77")


@pytest.mark.parametrize("variables", [None, 100, "unsupported"], ids=["default-limit", "chunked", "old-sqlite"])
async def test_a_batch_stores_exactly_what_one_statement_per_row_stores(tmp_path: Path, variables: int | str | None,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`chunked`: the connection allows 100 parameters per statement, so every statement of a batch is split
    (a position row has 21 values): the guard's count and the rows must come out the same. `old-sqlite`: a
    SQLite without `UPDATE ... FROM` or the JSON functions keeps executemany (review of 3ae6ac2)."""
    if variables == "unsupported":
        monkeypatch.setattr(multirow, "_supported", False)
    clock = FakeClock()
    engine, batched = await _engine(tmp_path / "batched.sqlite", clock)
    statements: list[str] = []
    if isinstance(variables, int):
        def limit(dbapi_conn: sqlite3.Connection, _record: object) -> None:
            dbapi_conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, variables)
            dbapi_conn.set_trace_callback(statements.append)

        sa.event.listen(batched.sync_engines[-1], "connect", limit)
    alone = await Repository.open(f"sqlite:///{tmp_path / 'alone.sqlite'}")
    try:
        ids = await _open(engine, 24)
        for pid in ids:  # the same positions in the second database
            stored = await batched.get_position(pid)
            assert stored is not None
            await alone.insert_positions([(stored, (await batched.journal(pid))[0])])
        now = datetime.now(UTC)
        rounds: list[dict[str, Event]] = [
            {pid: EntryFilled(quantity=D(1), price=D("100.25")) for pid in ids},  # trailing rows updated
            {pid: (Flat(exit_price=D("101.5")) if i % 2 else TsActivated(mark=D(111)))  # closures, trailing gone
             for i, pid in enumerate(ids)},
        ]
        statuses = [OrderStatus.NEW, OrderStatus.EXPIRED]  # order rows inserted, then updated (upsert)
        for events, status in zip(rounds, statuses, strict=True):
            drafts = await _outcomes(engine, events)
            orders = [_stop(draft, status, now) for draft, _ in drafts]
            # One database takes each round in batches, the other one write at a time (the single-row path).
            await asyncio.gather(*(batched.commit(d, o) for d, o in drafts),
                                 *(batched.save_order(o, now) for o in orders))
            for (d, o), order in zip(drafts, orders, strict=True):
                await alone.commit(d, o)
                await alone.save_order(order, now)
            for draft, _ in drafts:
                engine.positions[draft.id] = draft
        assert batched.batch_stats.largest > 10 and alone.batch_stats.largest == 1
        if isinstance(variables, int):  # the batches' updates of the positions did go in several statements
            assert sum(s.startswith("UPDATE positions SET") for s in statements) > 2 * batched.batch_stats.batches
    finally:
        await batched.close()
        await alone.close()
    got, expected = _rows(tmp_path / "batched.sqlite"), _rows(tmp_path / "alone.sqlite")
    assert len(expected["closures"]) == 12 and len(expected["trailing_states"]) == 12
    assert len(expected["journal"]) == 24 * 3 and len(expected["orders"]) == 24
    for table in TABLES:
        assert got[table] == expected[table], table


async def test_a_batch_is_a_few_statements_whatever_its_size(tmp_path: Path) -> None:
    """Python's sqlite3 hands the interpreter lock over at every step; an executemany steps once per row, and
    next to a busy event loop each hand-over waits (db/multirow.py)."""
    engine, repo = await _engine(tmp_path / "db.sqlite", FakeClock())
    statements: list[str] = []

    def trace(dbapi_conn: sqlite3.Connection, _record: object) -> None:
        dbapi_conn.set_trace_callback(statements.append)

    writer = repo.sync_engines[-1]  # the writer thread's engine: it connects at its first write, after this
    assert writer is not repo.engine.sync_engine
    sa.event.listen(writer, "connect", trace)
    try:
        ids = await _open(engine, 150)
        now = datetime.now(UTC)
        counts: list[tuple[int, int]] = []
        for chosen in (ids[:30], ids[30:]):
            before, batches = len(statements), repo.batch_stats.batches
            drafts = await _outcomes(engine, {pid: EntryFilled(quantity=D(1), price=D(100)) for pid in chosen})
            await asyncio.gather(*(repo.commit(d, o) for d, o in drafts),
                                 *(repo.save_order(_stop(d, OrderStatus.EXPIRED, now), now) for d, _ in drafts))
            for draft, _ in drafts:
                engine.positions[draft.id] = draft
            counts.append((len(statements) - before, repo.batch_stats.batches - batches))
    finally:
        await repo.close()
    for size, (n, batches) in zip((30, 120), counts, strict=True):
        assert batches <= 3, f"{size} transitions took {batches} transactions"
        assert n <= 12 * batches, f"{size} transitions and {size} order rows took {n} statements in {batches} batches"


def test_none_goes_through_the_columns_bind_processing_as_sqlalchemy_sends_it(tmp_path: Path) -> None:
    """A JSON column stores None as the text 'null' through SQLAlchemy; the multi-row insert must store the same
    (it skipped the processor for None: review of 3ae6ac2)."""
    meta = sa.MetaData()
    table = sa.Table("t", meta, sa.Column("id", sa.Integer, primary_key=True), sa.Column("doc", sa.JSON))
    engine = sa.create_engine(f"sqlite:///{tmp_path / 't.sqlite'}")
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 1, "doc": None}, {"id": 2, "doc": {"a": None}}])
        multirow.insert(conn, table, [{"id": 3, "doc": None}, {"id": 4, "doc": {"a": None}}])
        stored = conn.exec_driver_sql("SELECT id, doc, typeof(doc) FROM t ORDER BY id").all()
    engine.dispose()
    assert [tuple(r[1:]) for r in stored[2:]] == [tuple(r[1:]) for r in stored[:2]]
