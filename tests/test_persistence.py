"""Persistence, run on a SQLite file and on PostgreSQL (skipped with a reason when it is absent)."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal as D

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect

from db.repository import Repository, journal, positions
from db.tables import metadata
from db.types import UTCDateTime
from exchange.paper import PaperExchange
from lifecycle.domain import CloseCause, CloseReason, OrderPurpose, OrderRef, Side, TrailingState
from lifecycle.engine import Engine
from lifecycle.errors import ConcurrentModification, DuplicateLivePosition, StoreRefused
from lifecycle.events import CloseRequested, EntryFilled, Flat, Reduced, StopMoved, TsActivated
from lifecycle.machines.states import PositionState
from lifecycle.records import JsonlRecords
from lifecycle.replay import ReplayMismatch, replay
from tests.conftest import FakeClock


async def _filled(engine: Engine, symbol: str = "BTCUSDT", side: Side = Side.LONG, trailing: bool = True) -> str:
    p = await engine.open_position(
        account="acct", symbol=symbol, side=side, quantity=D("0.5"),
        trailing=TrailingState(activation_price=D(110), callback_rate=D("0.8")) if trailing else None,
    )
    await engine.fire(p.id, EntryFilled(quantity=D("0.5"), price=D(100)))
    return p.id


async def test_the_journal_records_every_transition_in_order_and_replays_to_the_stored_state(
    engine: Engine, repo: Repository
) -> None:
    pid = await _filled(engine)
    await engine.fire(pid, StopMoved(stop_price=D(95), mark=D(100)))
    await engine.fire(pid, TsActivated(mark=D("110.5")))
    await engine.fire(pid, StopMoved(stop_price=D("109.6"), mark=D("110.5"), watermark=D("110.5")))
    await engine.fire(pid, Reduced(remaining=D("0.2"), price=D(110)))
    entries = await repo.journal(pid)
    assert [(e.seq, e.event, e.dest.value) for e in entries] == [
        (0, "created", "OPENING"), (1, "entry_filled", "OPEN"), (2, "stop_moved", "OPEN"),
        (3, "ts_activated", "TS_ACTIVE"), (4, "stop_moved", "TS_ACTIVE"), (5, "reduced", "TS_ACTIVE"),
    ]
    stored = await repo.get_position(pid)
    replayed = await replay(entries)
    assert stored is not None
    for field in ("state", "quantity", "entry_price", "stop_price", "seq", "trailing", "side", "symbol"):
        assert getattr(replayed, field) == getattr(stored, field), field
    assert stored == engine.positions[pid]  # memory and database agree, orders included


async def test_a_journal_with_a_gap_or_a_wrong_destination_does_not_replay(engine: Engine, repo: Repository) -> None:
    pid = await _filled(engine)
    await engine.fire(pid, StopMoved(stop_price=D(95), mark=D(100)))
    entries = await repo.journal(pid)
    with pytest.raises(ReplayMismatch, match="jumps"):
        await replay([entries[0], entries[2]])
    from dataclasses import replace

    with pytest.raises(ReplayMismatch, match="dest"):
        await replay([entries[0], replace(entries[1], dest=PositionState.TS_ACTIVE)])


async def test_a_reopened_symbol_is_a_new_row_and_the_old_one_is_untouched(engine: Engine, repo: Repository) -> None:
    first = await _filled(engine)
    await engine.fire(first, CloseRequested(reason=CloseReason.SIGNAL))
    await engine.fire(first, Flat(exit_price=D(101)))
    before = await repo.get_position(first)
    second = await _filled(engine)
    assert second != first
    assert await repo.get_position(first) == before
    assert await repo.count_positions() == 2
    assert await repo.count_positions([PositionState.CLOSED]) == 1


async def test_the_database_refuses_a_second_live_position_for_one_symbol_and_side(
    repo: Repository, records: JsonlRecords
) -> None:
    # Two engines on one database stand for two processes; the in-memory check cannot see across them.
    a = Engine(repo, canceller=PaperExchange(), records=records)
    b = Engine(repo, canceller=PaperExchange(), records=records)
    await a.open_position(account="acct", symbol="SOLUSDT", side=Side.LONG, quantity=D(1))
    with pytest.raises(DuplicateLivePosition):
        await b.open_position(account="acct", symbol="SOLUSDT", side=Side.LONG, quantity=D(1))
    await b.open_position(account="acct", symbol="SOLUSDT", side=Side.SHORT, quantity=D(1))  # hedge mode: fine


async def test_a_stale_writer_cannot_overwrite_a_newer_transition_and_reloads_the_truth(
    repo: Repository, records: JsonlRecords
) -> None:
    a = Engine(repo, canceller=PaperExchange(), records=records)
    pid = await _filled(a)
    b = Engine(repo, canceller=PaperExchange(), records=records)
    await b.rehydrate()
    await a.fire(pid, StopMoved(stop_price=D(95), mark=D(100)))
    with pytest.raises(ConcurrentModification):
        await b.fire(pid, Flat(cause=CloseCause.MANUAL))
    assert [e.event for e in await repo.journal(pid)] == ["created", "entry_filled", "stop_moved"]
    assert b.positions[pid] == await repo.get_position(pid)  # b took the stored state, not its stale copy
    await b.fire(pid, Flat(cause=CloseCause.MANUAL))  # and its next event is judged against it
    assert [e.event for e in await repo.journal(pid)][-1] == "flat"


async def test_state_change_and_journal_row_commit_together_or_not_at_all(engine: Engine, repo: Repository) -> None:
    pid = await _filled(engine)
    # Another writer already took journal seq 2: our journal insert fails inside the transaction.
    async with repo.engine.begin() as conn:
        await conn.execute(journal.insert().values(
            position_id=pid, seq=2, event="stop_moved", source="OPEN", dest="OPEN",
            at=datetime(2026, 1, 1, tzinfo=UTC), cause=None, payload={}))
    live_before = engine.positions[pid].clone()
    with pytest.raises(StoreRefused):  # a failed constraint is a definite refusal: not queued, not retried
        await engine.fire(pid, Flat(cause=CloseCause.MANUAL))
    stored = await repo.get_position(pid)
    assert stored is not None and stored.state is PositionState.OPEN and stored.seq == 1
    assert await repo.closure(pid) is None
    assert await repo.trailing_state_exists(pid)
    assert engine.positions[pid] == live_before


async def test_times_come_back_timezone_aware_utc_and_naive_ones_are_refused(engine: Engine, repo: Repository) -> None:
    pid = await _filled(engine)
    stored = await repo.get_position(pid)
    assert stored is not None
    assert stored.created_at.tzinfo == UTC and stored.created_at == engine.positions[pid].created_at
    assert all(e.at.tzinfo == UTC for e in await repo.journal(pid))
    async with repo.engine.begin() as conn:
        with pytest.raises(sa.exc.StatementError, match="naive datetime"):
            await conn.execute(positions.update().where(positions.c.id == pid).values(updated_at=datetime(2026, 1, 1)))


async def test_rehydration_loads_live_positions_with_trailing_state_and_working_orders_only(
    repo: Repository, exchange: PaperExchange, records: JsonlRecords, clock: FakeClock
) -> None:
    first = Engine(repo, canceller=exchange, records=records, clock=clock)
    live = await _filled(first, "BTCUSDT")
    stop = await exchange.place_order(OrderRef(client_id="s1", position_id=live, symbol="BTCUSDT",
                                               purpose=OrderPurpose.STOP,
                                               side="sell", quantity=D("0.5"), trigger_price=D(95)))
    await first.track_order(live, stop)
    await first.fire(live, StopMoved(stop_price=D(95), mark=D(100)))
    gone = await _filled(first, "ETHUSDT")
    await first.fire(gone, Flat(cause=CloseCause.MANUAL))
    second = Engine(repo, canceller=exchange, records=records, clock=clock)
    assert await second.rehydrate() == 1
    assert second.positions[live] == first.positions[live]
    assert second.positions[live].trailing is not None and list(second.positions[live].orders) == ["s1"]
    assert second.live_position("acct", "BTCUSDT", Side.LONG) is second.positions[live]
    await second.fire(live, TsActivated(mark=D(111)))  # the rehydrated machine carries on
    assert second.positions[live].state is PositionState.TS_ACTIVE


async def test_migrations_produce_exactly_the_mapped_schema(repo: Repository) -> None:
    async with repo.engine.connect() as conn:
        diff = await conn.run_sync(lambda c: compare_metadata(MigrationContext.configure(c), metadata))
    assert diff == []


async def test_sqlite_runs_in_wal_mode_with_foreign_keys(sqlite_url: str) -> None:
    repository = await Repository.open(sqlite_url)
    try:
        async with repository.engine.connect() as conn:
            assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
            assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
    finally:
        await repository.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://root@localhost/x", "not supported"),
        ("sqlite://", "in-memory"),
        ("postgresql+psycopg2://u@h/db", "not supported"),
        ("not a url", "not a URL"),
    ],
)
def test_unusable_database_urls_are_refused_with_a_clear_message(url: str, message: str) -> None:
    from db.engine import DatabaseConfigError, normalize_url

    with pytest.raises(DatabaseConfigError, match=message):
        normalize_url(url)


async def test_rehydration_loads_only_the_accounts_this_process_owns(repo: Repository, records: JsonlRecords) -> None:
    first = Engine(repo, canceller=PaperExchange(), records=records)
    for account in ("alpha", "beta"):
        await first.open_position(account=account, symbol="BTCUSDT", side=Side.LONG, quantity=D(1))
    mine = Engine(repo, canceller=PaperExchange(), records=records)
    assert await mine.rehydrate(["alpha"]) == 1
    assert {p.account for p in mine.positions.values()} == {"alpha"}


_OFFSETS = [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]


@given(at=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),  # any offset stays in range
                       timezones=st.sampled_from(_OFFSETS)))
@settings(max_examples=2000, deadline=None)
def test_a_time_is_stored_on_sqlite_as_fixed_width_utc_text_that_parses_back(at: datetime) -> None:
    """The text SQLite stores (issue 13 made it with isoformat): for years from 1000 the very text strftime made
    before, so it sorts with rows already written; below 1000 padded to four digits (it did not parse back)."""
    bind = UTCDateTime().dialect_impl(sqlite_dialect()).bind_processor(sqlite_dialect())
    assert bind is not None
    text = bind(at)
    utc = at.astimezone(UTC)
    assert len(text) == 32 and text.endswith("+00:00")
    assert datetime.fromisoformat(text) == at
    if utc.year >= 1000:
        assert text == f"{utc:%Y-%m-%d %H:%M:%S.%f}+00:00"
