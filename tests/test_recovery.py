"""Restart recovery: a new engine process (new client, state from the database only) against the simulator."""
from __future__ import annotations

import asyncio
from decimal import Decimal as D

import pytest

from lifecycle.client_ids import make_client_id
from lifecycle.domain import CloseCause, CloseReason, OrderPurpose, Side
from lifecycle.errors import AccountStarting
from lifecycle.events import CloseRequested
from lifecycle.live import OpenCommand
from lifecycle.machines.states import PositionState as S
from lifecycle.reconciler import Reconciler
from tests.livekit import Rig


def btc_long() -> OpenCommand:
    return OpenCommand("BTCUSDT", Side.LONG, D("0.010"), stop_loss_pct=D(1))


async def down_then_up(rig: Rig, while_down: object = None) -> dict[str, int]:
    """Stop the engine (as a crash would, leaving everything on the exchange), let `while_down` happen,
    start a new one, attach reconciliation and recover."""
    await rig.stop()
    if callable(while_down):
        result = while_down()
        if hasattr(result, "__await__"):
            await result
    rig.exchange = rig.repo = rig.engine = rig.live = None
    await rig.start()
    assert rig.live is not None
    Reconciler.of(rig.live, grace_ms=0).attach()
    return await rig.live.recover(retry_s=0.05)


async def test_a_stop_that_filled_while_down_ends_the_position_with_its_cause(rig: Rig) -> None:
    p = await rig.open(btc_long())
    counts = await down_then_up(rig, lambda: rig.set_mark("BTCUSDT", 59300))  # our stop fills meanwhile
    assert counts["missing"] == 1
    stored = await rig.ended(p.id)
    assert (stored.state, stored.close_cause) == (S.CLOSED_EXTERNAL, CloseCause.STOP_LOSS)
    assert rig.our_open_orders() == []


async def test_a_missing_stop_is_placed_again_and_duplicates_reduced_to_one(rig: Rig) -> None:
    p = await rig.open(btc_long())
    assert rig.exchange is not None
    [stop] = rig.stop_algos("BTCUSDT")
    stray = make_client_id(p.id, OrderPurpose.STOP, 42)

    async def meanwhile() -> None:
        rig.sim.venue.cancel_algo(rig.account, stop.algo_id, None)  # our stop is gone
        # and a stop placed just before the crash, never recorded, is on the exchange twice over
        from exchange.ccxt_adapter import CcxtExchange
        from tests.livekit import settings_for

        other = await CcxtExchange(settings_for(rig.sim, rig.account)).start()
        await other.place_stop("BTCUSDT", Side.LONG, D("0.010"), D(59000), stray)
        await other.place_stop("BTCUSDT", Side.LONG, D("0.010"), D(58900), make_client_id(p.id, OrderPurpose.STOP, 43))
        await other.close()

    counts = await down_then_up(rig, meanwhile)
    assert counts["protected"] == 1
    await rig.until(lambda: [(a.trigger, a.qty) for a in rig.stop_algos("BTCUSDT")] == [(D("59400.0"), D("0.010"))],
                    what="exactly one stop at the recorded price")
    assert rig.live is not None
    await rig.live.idle()
    assert rig.state(p.id) is S.OPEN and len(rig.stop_algos("BTCUSDT")) == 1


async def test_a_close_in_flight_at_the_crash_is_resumed_with_the_same_id(rig: Rig) -> None:
    p = await rig.open(btc_long())
    assert rig.engine is not None
    await rig.engine.fire(p.id, CloseRequested(reason=CloseReason.SIGNAL))  # decided, never sent: crash
    counts = await down_then_up(rig)
    assert counts["closing"] == 1
    stored = await rig.ended(p.id)
    assert (stored.state, stored.close_cause, stored.close_reason) == (S.CLOSED, CloseCause.BOT, CloseReason.SIGNAL)
    closes = [o for o in rig.account.orders.values() if o.client_id.startswith(f"lc-{p.id}-c")]
    assert len(closes) == 1  # one close order, no duplicate


async def test_a_close_that_landed_before_the_crash_ends_closed_not_external(rig: Rig) -> None:
    p = await rig.open(btc_long())
    assert rig.engine is not None
    await rig.engine.fire(p.id, CloseRequested(reason=CloseReason.SIGNAL))
    close_id = make_client_id(p.id, OrderPurpose.CLOSE, rig.engine.positions[p.id].seq)

    def close_landed() -> None:  # the close reached the venue and filled; the process died before the flat
        rig.sim.venue.new_order(rig.account, symbol="BTCUSDT", side="SELL", type_="MARKET", quantity=D("0.010"),
                                price=None, client_id=close_id, reduce_only=True)

    counts = await down_then_up(rig, close_landed)
    assert counts["missing"] == 1
    stored = await rig.ended(p.id)
    assert (stored.state, stored.close_cause) == (S.CLOSED, CloseCause.BOT)
    assert next(o for o in rig.account.orders.values() if o.client_id.startswith(f"lc-{p.id}-c")).client_id == close_id


async def test_a_close_whose_request_the_database_lost_ends_closed_by_the_bot(rig: Rig) -> None:
    """Review, seventh session: a bot close made while the database failed, then a graceful stop: the books
    dropped the queued CLOSING_BY_BOT write, the close order filled, and after the restart the database said OPEN.
    The close was found by reconciliation with our own close order's client id, and ended CLOSED_EXTERNAL,
    `unknown` (our close order, "not in flight"). It is the bot's close: the request is written again, then the
    flat, CLOSED with cause bot."""
    p = await rig.open(btc_long())
    assert rig.engine is not None
    close_id = make_client_id(p.id, OrderPurpose.CLOSE, rig.engine.positions[p.id].seq + 1)  # as the close's

    def close_filled_request_lost() -> None:  # the database never had the close's request
        rig.sim.venue.new_order(rig.account, symbol="BTCUSDT", side="SELL", type_="MARKET", quantity=D("0.010"),
                                price=None, client_id=close_id, reduce_only=True)

    counts = await down_then_up(rig, close_filled_request_lost)
    assert counts["missing"] == 1
    stored = await rig.ended(p.id)
    assert (stored.state, stored.close_cause, stored.close_reason) == (S.CLOSED, CloseCause.BOT,
                                                                       CloseReason.FOUND_FILLED)
    assert rig.repo is not None
    assert [e.dest for e in await rig.repo.journal(p.id)][-2:] == [S.CLOSING_BY_BOT, S.CLOSED]


async def test_an_unreachable_exchange_is_retried_not_bypassed(rig: Rig) -> None:
    p = await rig.open(btc_long())
    await rig.stop()
    rig.exchange = rig.repo = rig.engine = rig.live = None
    await rig.start()
    assert rig.live is not None
    rig.sim.set_faults(http_5xx=4)  # the first REST reads fail
    counts = await rig.live.recover(retry_s=0.05)
    assert counts["protected"] == 1
    assert any("nothing is done on the database's word alone" in m for _, m in rig.alarms())
    await rig.live.idle()
    assert rig.state(p.id) is S.OPEN and len(rig.stop_algos("BTCUSDT")) == 1


async def test_recovery_leaves_alone_a_position_opened_since_the_start(rig: Rig) -> None:
    """A takeover starts an account with its API already up: an open can come before recovery has looked at
    the venue. That position is this process's own (its entry in flight, or filled after recovery's snapshot),
    not a crash leftover; recovery is about what the database held at the start. (It was once taken for "created,
    entry never recorded" and CANCELLED while its entry filled: an unprotected position, tests/test_scale_out.py.)"""
    assert rig.live is not None
    rig.sim.set_faults(stale_positions_s=60)  # recovery's snapshot shows the venue before the open
    p = await rig.open(btc_long())
    counts = await rig.live.recover(retry_s=0.05)
    rig.sim.set_faults(stale_positions_s=0)
    assert counts["positions"] == 0, counts
    assert not rig.live.ctx.missing(p.id)  # not marked missing on a snapshot older than the position
    await rig.live.idle()
    assert rig.state(p.id) is S.OPEN and len(rig.stop_algos("BTCUSDT")) == 1


async def test_a_command_waits_for_restart_recovery_and_is_refused_when_it_does_not_come(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """No order before restart recovery: with positions loaded, an open waits for recover(); without it, it is
    refused after COMMAND_WAIT_S with nothing sent."""
    import lifecycle.live.engine as live_engine

    monkeypatch.setattr(live_engine, "COMMAND_WAIT_S", 0.3)
    await rig.open(btc_long())
    await rig.stop()
    rig.exchange = rig.repo = rig.engine = rig.live = None
    await rig.start()  # the position loaded, recovery not run yet
    assert rig.live is not None
    sent = rig.sim.requests
    eth = OpenCommand("ETHUSDT", Side.LONG, D("0.10"), stop_loss_pct=D(1))
    with pytest.raises(AccountStarting, match="restart recovery has not finished"):
        await rig.live.open(eth)
    assert rig.sim.venue.open_orders(rig.account, "ETHUSDT") == [] and rig.sim.venue.position(
        rig.account, "ETHUSDT").amount == 0
    monkeypatch.setattr(live_engine, "COMMAND_WAIT_S", 30.0)  # recovery may take a while on a loaded machine
    waiting = asyncio.ensure_future(rig.live.open(eth))  # comes while recovery runs: goes through after it
    await asyncio.sleep(0)
    assert not waiting.done()
    await rig.live.recover(retry_s=0.05)
    position = await asyncio.wait_for(waiting, 30)
    await rig.until(lambda: rig.state(position.id) is S.OPEN and bool(rig.stop_algos("ETHUSDT")),
                    what="the ETH position open and protected")
    assert rig.sim.requests > sent
