"""A lone write on SQLite goes to the driver's connection (db/driver_sql.py): the rows it stores are the ones
SQLAlchemy's own execution stores; an engine whose statements someone watches runs them through SQLAlchemy; the
compiled statements go with the repository."""
from __future__ import annotations

import sqlite3
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from db import driver_sql
from db.repository import Repository
from db.types import ExactDecimal, UTCDateTime
from exchange.paper import PaperExchange
from lifecycle.domain import CloseCause, CloseReason, OrderPurpose, OrderRef, OrderStatus, Side, TrailingState
from lifecycle.engine import Engine
from lifecycle.events import CloseRequested, EntryFilled, Flat, Reduced, StopMoved, TsActivated
from lifecycle.records import JsonlRecords
from tests.conftest import FakeClock

TABLES = ("positions", "journal", "trailing_states", "closures", "orders")


async def _one_life(path: Path) -> tuple[dict[str, list[tuple[Any, ...]]], int]:
    """One position's whole life, one transition at a time (each goes alone: the lone path), and its order rows;
    returns every stored row (the position's id replaced) after the trailing stop's activation and at the end, and
    how many statements went to the driver directly."""
    path.parent.mkdir(parents=True)
    repo = await Repository.open(f"sqlite:///{path}")
    rows: dict[str, list[tuple[Any, ...]]] = {}
    direct_before = driver_sql.statements_run
    clock = FakeClock()
    engine = Engine(repo, canceller=PaperExchange(), records=JsonlRecords(path.parent / "records"), clock=clock)
    try:
        p = await engine.open_position(account="acct", symbol="BTCUSDT", side=Side.LONG, quantity=D("0.5"),
                                       trailing=TrailingState(activation_price=D(110), callback_rate=D("0.8")))
        stop = OrderRef(f"lc-{p.id}-s1", p.id, "BTCUSDT", OrderPurpose.STOP, "sell", D("0.5"), OrderStatus.NEW,
                        trigger_price=D("95.5"), created_at=clock())
        for step in (EntryFilled(quantity=D("0.5"), price=D("100.25")),
                     StopMoved(stop_price=D("97.125"), mark=D(104)),
                     Reduced(remaining=D("0.3"), price=D("105.5"), realized_pnl=D("1.05"), fee=D("0.0211")),
                     TsActivated(mark=D(111)),
                     CloseRequested(reason=CloseReason.SIGNAL),
                     Flat(cause=CloseCause.BOT, exit_price=D("110.75"), realized_pnl=D("3.15"), fee=D("0.0332"),
                          exchange_order_id="778", exchange_ts_ms=1_767_225_600_000, cause_source="fill_update")):
            clock.advance(seconds=1.5)
            await engine.fire(p.id, step)
            if isinstance(step, EntryFilled):
                await engine.track_order(p.id, stop)  # an insert
            elif isinstance(step, StopMoved):
                await engine.order_status(p.id, replace(stop, trigger_price=D("97.125")))  # an update
            elif isinstance(step, TsActivated):
                rows = _rows(path, p.id, "trailing active")  # the trailing row goes with the close
    finally:
        await repo.close()
    rows.update(_rows(path, p.id))
    return rows, driver_sql.statements_run - direct_before


def _rows(path: Path, position_id: str, when: str = "end") -> dict[str, list[tuple[Any, ...]]]:
    rows: dict[str, list[tuple[Any, ...]]] = {}
    db = sqlite3.connect(path)
    try:
        for table in TABLES:
            found = db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            rows[f"{table} ({when})"] = [  # the id (also inside the client ids): the one thing that differs
                tuple(value.replace(position_id, "P") if isinstance(value, str) else value for value in row)
                for row in found]
    finally:
        db.close()
    return rows


async def test_a_lone_write_stores_the_rows_sqlalchemy_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    direct, direct_count = await _one_life(tmp_path / "direct" / "db.sqlite")
    monkeypatch.setattr(driver_sql, "applies", lambda _conn: False)  # the same writes through SQLAlchemy
    through, through_count = await _one_life(tmp_path / "through" / "db.sqlite")
    assert len(direct) == 2 * len(TABLES) and direct.keys() == through.keys()
    assert direct["trailing_states (trailing active)"] and not direct["trailing_states (end)"]
    assert all(direct[f"{t} (end)"] for t in TABLES if t != "trailing_states")
    for key in direct:  # money as exact text, UTC times as text, the payload's JSON: byte for byte
        assert direct[key] == through[key], key
    # Six transitions of three or four statements and three order writes went to the driver; none the second time.
    assert direct_count >= 20 and through_count == 0, (direct_count, through_count)


async def test_an_engine_whose_statements_are_watched_runs_them_through_sqlalchemy(tmp_path: Path) -> None:
    """A `before_cursor_execute` listener (the tests' storage faults, a tracer) sees each statement with its
    SQLAlchemy execution context, its `after_cursor_execute` pair is called, and a failure it raises fails the write
    as a whole: nothing of the transition is stored, and the connection writes again afterwards."""
    repo = await Repository.open(f"sqlite:///{tmp_path / 'db.sqlite'}")
    engine = Engine(repo, canceller=PaperExchange(), records=JsonlRecords(tmp_path / "records"))
    try:
        p = await engine.open_position(account="acct", symbol="BTCUSDT", side=Side.LONG, quantity=D(1))
        draft = p.clone()
        outcome = await engine.machine.apply(draft, EntryFilled(quantity=D(1), price=D(100)), engine.clock())
        failing = [True]
        seen: list[tuple[str, bool]] = []

        def before(_conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, _many: bool) -> None:
            seen.append(("before " + statement.split(" (")[0], context is not None))
            if failing and statement.startswith("INSERT INTO journal"):  # the second statement: the first undone
                raise sqlite3.OperationalError("injected: disk I/O error")

        def after(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            seen.append(("after " + statement.split(" (")[0], True))

        [writer] = [e for e in repo.sync_engines if e is not repo.engine.sync_engine]
        sa.event.listen(writer, "before_cursor_execute", before)  # (installed before the writer's first write)
        sa.event.listen(writer, "after_cursor_execute", after)
        direct_before = driver_sql.statements_run
        with pytest.raises(sa.exc.OperationalError, match="injected: disk I/O error"):
            await repo.commit(draft, outcome)
        stored = await repo.get_position(p.id)
        assert stored is not None and stored.seq == 0 and stored.entry_price is None
        failing.clear()
        await repo.commit(draft, outcome)  # the connection is fine afterwards
        stored = await repo.get_position(p.id)
        assert stored is not None and stored.seq == 1 and stored.entry_price == D(100)
        assert driver_sql.statements_run == direct_before  # all of it through SQLAlchemy
        assert all(with_context for _, with_context in seen)
        befores = [s for s, _ in seen if s.startswith("before UPDATE positions")]
        afters = [s for s, _ in seen if s.startswith("after UPDATE positions")]
        assert len(befores) == 2 and len(afters) == 2, seen
    finally:
        await repo.close()


async def test_the_compiled_statements_go_with_the_repository(tmp_path: Path) -> None:
    """They live in the writer's pooled connection: a repository closed leaves no dialect or statement behind (a
    cache keyed by the dialect kept every closed repository's dialect alive, ~47 KiB each; review)."""
    import gc
    import weakref

    dialects = []
    for i in range(3):
        repo = await Repository.open(f"sqlite:///{tmp_path / f'db{i}.sqlite'}")
        engine = Engine(repo, canceller=PaperExchange(), records=JsonlRecords(tmp_path / "records"))
        p = await engine.open_position(account="acct", symbol="BTCUSDT", side=Side.LONG, quantity=D(1))
        before = driver_sql.statements_run
        await engine.fire(p.id, EntryFilled(quantity=D(1), price=D(100)))
        assert driver_sql.statements_run > before  # it went to the driver, so something was compiled
        [writer] = [e for e in repo.sync_engines if e is not repo.engine.sync_engine]
        dialects.append(weakref.ref(writer.dialect))
        await repo.close()
        del repo, engine, writer, p
    gc.collect()
    assert [d() for d in dialects] == [None, None, None]


@pytest.mark.parametrize("value", [{"at": datetime(2026, 1, 1)}, {"money": 1.5}])  # naive time; money as a float
def test_a_value_its_type_refuses_is_a_statement_error_both_ways(tmp_path: Path, value: dict[str, Any]) -> None:
    """SQLAlchemy raises a StatementError around the type's ValueError; the driver path raised the bare ValueError
    (review of f7ec545). Both say it the same way now, and nothing is stored."""
    table = sa.Table("t", sa.MetaData(), sa.Column("at", UTCDateTime), sa.Column("money", ExactDecimal))
    engine = sa.create_engine(f"sqlite:///{tmp_path / 't.sqlite'}")
    table.metadata.create_all(engine)
    row = {"at": datetime(2026, 1, 1, tzinfo=UTC), "money": D("1.5"), **value}
    errors = []
    insert = table.insert()
    for run in (lambda conn: conn.execute(insert, row), lambda conn: driver_sql.execute(conn, insert, row)):
        with engine.begin() as conn:
            assert driver_sql.applies(conn)
            with pytest.raises(sa.exc.StatementError) as caught:
                run(conn)
            errors.append((type(caught.value.orig), str(caught.value.orig)))
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() == 0
    assert errors[0] == errors[1] and errors[0][0] is ValueError
    engine.dispose()
