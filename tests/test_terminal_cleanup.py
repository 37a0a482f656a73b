"""Every terminal state, however reached, runs the one cleanup hook (seed 000)."""
from __future__ import annotations

import asyncio
from dataclasses import replace
from decimal import Decimal as D

import pytest

from db.repository import Repository
from exchange.paper import PaperExchange
from lifecycle.domain import OrderPurpose, OrderRef, OrderStatus, Side, TrailingState
from lifecycle.engine import Engine
from lifecycle.events import PositionEvent
from lifecycle.guards.stop_lock import MutationStatus
from lifecycle.machines.states import PositionState
from lifecycle.records import JsonlRecords
from tests.conftest import FakeClock
from tests.scenarios import good_event, path_for_edge
from tests.test_transition_table import EXPECTED, Row
from tests.waiting import until

TERMINAL = [s for s in PositionState if s.is_terminal]
# Every edge of the expected table into a terminal state, so each path into each terminal state is exercised.
INTO_TERMINAL = [row for row in EXPECTED if PositionState(row.dest).is_terminal]


async def _order(engine: Engine, exchange: PaperExchange, pid: str, purpose: OrderPurpose, n: int) -> OrderRef:
    placed = await exchange.place_order(
        OrderRef(client_id=f"t{pid}{purpose.value[0]}{n}", position_id=pid, symbol="BTCUSDT", purpose=purpose,
                 side="sell", quantity=D(1), trigger_price=D(90) + n)
    )
    await engine.track_order(pid, placed)
    return placed


@pytest.mark.parametrize("edge", INTO_TERMINAL, ids=lambda e: f"{e.source}-{e.event}-{e.dest}")
async def test_every_path_into_a_terminal_state_runs_the_cleanup_hook(
    edge: Row, engine: Engine, repo: Repository, exchange: PaperExchange, records: JsonlRecords, clock: FakeClock
) -> None:
    p = await engine.open_position(account="acct", symbol="BTCUSDT", side=Side.LONG, quantity=D(1),
                                   trailing=TrailingState(activation_price=D(110), callback_rate=D(1)))
    ours = [await _order(engine, exchange, p.id, OrderPurpose.ENTRY, 0)]
    event, dest = PositionEvent(edge.event), PositionState(edge.dest)
    for name in path_for_edge(edge.source, edge.guards):
        clock.advance(seconds=1)
        await engine.fire(p.id, good_event(name, engine.positions[p.id]))
        if name is PositionEvent.ENTRY_FILLED:
            exchange.orders[ours[0].client_id].status = OrderStatus.FILLED
            await engine.track_order(p.id, replace(ours[0], status=OrderStatus.FILLED))
            ours = [await _order(engine, exchange, p.id, OrderPurpose.STOP, 1),
                    await _order(engine, exchange, p.id, OrderPurpose.TAKE_PROFIT, 2)]
    assert await repo.trailing_state_exists(p.id)

    # A stop move in flight (it will place a new stop) and a newer one waiting, when the end comes.
    running, proceed = asyncio.Event(), asyncio.Event()

    async def slow_move(target: D) -> D:
        running.set()
        await proceed.wait()
        ours.append(await _order(engine, exchange, p.id, OrderPurpose.STOP, 9))  # placed and tracked mid-close
        return target

    async def must_not_run(target: D) -> D:
        raise AssertionError("a stop mutation ran after its position became terminal")

    in_flight = asyncio.create_task(engine.locks.submit("acct", "BTCUSDT", p.id, D(96), slow_move))
    await running.wait()
    waiting = asyncio.create_task(engine.locks.submit("acct", "BTCUSDT", p.id, D(97), must_not_run))
    await asyncio.sleep(0)  # one step of the loop: the newer request is queued behind the one in flight

    clock.advance(hours=1)
    closing = asyncio.create_task(engine.fire(p.id, good_event(event, engine.positions[p.id])))

    async def committed() -> bool:
        stored = await repo.get_position(p.id)
        assert stored is not None
        return stored.state is dest

    await until(committed, what=f"{dest} committed")
    await asyncio.sleep(0.05)  # time passes: the cleanup must NOT finish while the move is in flight
    assert not closing.done()  # committed, and its cleanup waits for the move in flight
    proceed.set()
    outcome = await closing
    assert outcome.dest is dest

    assert (await in_flight).status is MutationStatus.APPLIED
    assert (await waiting).status is MutationStatus.RELEASED
    assert not engine.locks.is_held("acct", "BTCUSDT")
    assert engine.locks.held_keys() == set()

    assert not await repo.trailing_state_exists(p.id)
    assert sorted(exchange.cancel_calls) == sorted(o.client_id for o in ours)
    assert exchange.open_orders(p.id) == []
    stored = await repo.get_position(p.id)
    assert stored is not None and stored.state is dest and stored.trailing is None
    assert stored.orders == {}  # every order of ours is final in the database too
    closure = await repo.closure(p.id)
    assert closure is not None and closure["state"] == edge.dest
    assert [r["position_id"] for r in records.read("closure")] == [p.id]
    assert p.id not in engine.positions and engine.live_position("acct", "BTCUSDT", Side.LONG) is None


@pytest.mark.parametrize("terminal", TERMINAL, ids=str)
def test_every_terminal_state_from_the_enum_has_a_path_and_the_hook(terminal: PositionState) -> None:
    from lifecycle.machines.position import PositionMachine

    machine = PositionMachine()._machine
    assert [e for e in INTO_TERMINAL if e.dest == terminal.value], f"no edge leads into {terminal}"
    on_enter = machine.get_state(terminal).on_enter
    assert [getattr(cb, "__name__", cb) for cb in on_enter] == ["_on_enter_terminal"]


async def test_a_failed_cancel_does_not_undo_the_close_and_is_counted(
    engine: Engine, repo: Repository, exchange: PaperExchange, clock: FakeClock
) -> None:
    p = await engine.open_position(account="acct", symbol="ETHUSDT", side=Side.LONG, quantity=D(1))
    await engine.fire(p.id, good_event(PositionEvent.ENTRY_FILLED, p))
    stop = await _order(engine, exchange, p.id, OrderPurpose.STOP, 1)
    exchange.down = True
    await engine.fire(p.id, good_event(PositionEvent.FLAT, engine.positions[p.id]))
    stored = await repo.get_position(p.id)
    assert stored is not None and stored.state is PositionState.CLOSED_EXTERNAL
    assert engine.metrics.action_failures["cancel_order"] == 1
    # Still open in the database: the orphan sweep will find it; nothing pretends it was cancelled.
    assert stop.client_id in stored.orders


def test_the_closure_record_goes_out_before_the_cancellations_and_memory_is_dropped_last() -> None:
    """Issue 13: in a cascade the cleanup cancels queue behind the venue's rate limit for seconds; the record
    of a committed closure must not wait for them."""
    from lifecycle.actions import CancelWorkingOrders, DropPosition, EmitClosure, ReleaseStopLock
    from lifecycle.domain import CloseCause, Position, Side, utcnow
    from lifecycle.guards.cleanup import terminal_cleanup
    from lifecycle.machines.states import PositionState

    now = utcnow()
    position = Position(id="p1", account="a", symbol="BTCUSDT", side=Side.LONG, state=PositionState.CLOSED_EXTERNAL,
                        requested_quantity=D(1), created_at=now, updated_at=now, close_cause=CloseCause.LIQUIDATION)
    kinds = [type(a) for a in terminal_cleanup(position, now)]
    assert kinds == [ReleaseStopLock, EmitClosure, CancelWorkingOrders, DropPosition]
