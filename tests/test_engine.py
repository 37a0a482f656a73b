"""The engine around the machine: refusals counted, cancellation never splits memory from the database."""
from __future__ import annotations

import asyncio
import random
from decimal import Decimal as D

import pytest

from db.repository import Repository
from exchange.paper import PaperExchange
from lifecycle.domain import CloseCause, OrderPurpose, OrderRef, Side
from lifecycle.engine import Engine
from lifecycle.errors import GuardRefused, UndefinedTransition, UnknownPosition
from lifecycle.events import EntryFailed, EntryFilled, Flat, StopMoved, TsActivated
from lifecycle.machines.states import PositionState


async def test_refusals_through_the_engine_are_counted_and_change_nothing(engine: Engine, repo: Repository) -> None:
    p = await engine.open_position(account="acct", symbol="BTCUSDT", side=Side.LONG, quantity=D(1))
    with pytest.raises(UndefinedTransition):
        await engine.fire(p.id, TsActivated(mark=D(120)))
    await engine.fire(p.id, EntryFilled(quantity=D(1), price=D(100)))
    with pytest.raises(GuardRefused):
        await engine.fire(p.id, StopMoved(stop_price=D(101), mark=D(100)))  # above the mark for a long
    await engine.fire(p.id, Flat(cause=CloseCause.MANUAL))
    with pytest.raises(UnknownPosition):
        await engine.fire(p.id, Flat())
    assert dict(engine.metrics.refused) == {
        ("OPENING", "ts_activated", "undefined"): 1,
        ("OPEN", "stop_moved", "guard"): 1,
        ("-", "flat", "unknown_position"): 1,
    }
    assert [e.event for e in await repo.journal(p.id)] == ["created", "entry_filled", "flat"]


async def test_an_event_maker_that_finds_its_news_stale_under_the_lock_changes_nothing(
        engine: Engine, repo: Repository) -> None:
    """`fire_if` with a function that makes the event under the position's lock: None from it (what it saw is no
    longer news there) applies nothing, journals nothing and counts no refusal."""
    p = await engine.open_position(account="acct", symbol="BTCUSDT", side=Side.LONG, quantity=D(1))
    await engine.fire(p.id, EntryFilled(quantity=D(1), price=D(100)))
    asked: list[PositionState] = []

    def stale() -> StopMoved | None:
        asked.append(engine.positions[p.id].state)
        return None

    assert await engine.fire_if(p.id, stale, only_in={PositionState.OPEN}) is None
    assert asked == [PositionState.OPEN] and not engine.metrics.refused
    assert [e.event for e in await repo.journal(p.id)] == ["created", "entry_filled"]
    outcome = await engine.fire_if(p.id, lambda: StopMoved(stop_price=D(95), mark=D(100)), only_in={PositionState.OPEN})
    assert outcome is not None and engine.positions[p.id].stop_price == D(95)


@pytest.mark.parametrize("seed", range(3))
async def test_cancelling_a_caller_at_any_moment_never_splits_memory_from_the_database(
    engine: Engine, repo: Repository, exchange: PaperExchange, seed: int
) -> None:
    rng = random.Random(seed)
    for i in range(40):
        p = await engine.open_position(account="acct", symbol=f"S{i}", side=Side.LONG, quantity=D(1))
        stop = await exchange.place_order(OrderRef(client_id=f"s{i}", position_id=p.id, symbol=p.symbol,
                                                   purpose=OrderPurpose.ENTRY, side="buy", quantity=D(1)))
        await engine.track_order(p.id, stop)
        event = EntryFailed(reason="expired") if i % 2 else EntryFilled(quantity=D(1), price=D(100))
        task = asyncio.create_task(engine.fire(p.id, event))
        await asyncio.sleep(rng.uniform(0, 0.004))  # lands anywhere, also while the driver thread commits
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        stored = await repo.get_position(p.id)
        assert stored is not None
        if stored.state is PositionState.CANCELLED:  # committed: every cleanup step happened too
            assert p.id not in engine.positions and exchange.open_orders(p.id) == []
            assert await repo.closure(p.id) is not None and engine.locks.is_released(p.id)
        else:  # OPENING (not committed) or OPEN (committed): memory agrees with the database
            assert engine.positions[p.id] == stored
