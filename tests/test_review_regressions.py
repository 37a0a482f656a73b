"""Defects an attack review of the chaos fixes found (each staged against the simulator), kept as tests:

* a close of a position whose entry is still on its way: the cancel overtakes the entry, the lookup must not
  declare it "never reached" while it is being sent (it lands and fills: exposure without a stop);
* a stale REST snapshot (the previous position of the symbol) must not shrink the new position and its stop;
* an entry cancel retried during an outage must not hold up a stop of the engine or of the service;
* one reduction seen by two reconciliation passes is taken in once.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from decimal import Decimal as D
from pathlib import Path

import aiohttp

from exchange.ccxt_adapter import Secret
from exchange.sim.server import SimServer
from lifecycle.app.service import ApiBinding, Service
from lifecycle.domain import Position, Side
from lifecycle.live import OpenCommand
from lifecycle.machines.states import PositionState as S
from lifecycle.reconciler import Reconciler
from tests.crash_child import service_config
from tests.livekit import Rig
from tests.waiting import until


def _btc(quantity: str = "0.010", **kw: object) -> OpenCommand:
    return OpenCommand("BTCUSDT", Side.LONG, D(quantity), stop_loss_pct=D(1), **kw)  # type: ignore[arg-type]


async def _entry_in_flight(rig: Rig) -> tuple[asyncio.Future[Position], str]:
    """An open whose entry sits at the venue for 1.5 s; later requests are answered at once."""
    assert rig.live is not None
    rig.sim.set_faults(rest_latency_ms=1500)
    sent = rig.sim.calls["POST /fapi/v1/order"]
    opening = asyncio.ensure_future(rig.live.open(_btc()))
    await rig.until(lambda: bool(rig.live.ctx.placing))  # type: ignore[union-attr]
    position_id = next(iter(rig.live.ctx.placing))
    await rig.until(lambda: rig.sim.calls["POST /fapi/v1/order"] > sent, what="the entry at the venue")
    rig.sim.set_faults(rest_latency_ms=0)
    return opening, position_id


async def test_a_close_while_the_entry_is_on_its_way_leaves_no_untracked_exposure(rig: Rig) -> None:
    assert rig.live is not None and rig.engine is not None
    opening, position_id = await _entry_in_flight(rig)
    await rig.live.close(position_id)
    stored = await rig.ended(position_id, timeout=5)
    await opening
    await rig.live.idle()
    assert rig.sim.venue.position(rig.account, "BTCUSDT").amount == 0, "the entry filled and nobody closed it"
    assert (stored.state, stored.close_cause.value if stored.close_cause else None) == (S.CLOSED, "bot")


async def test_a_shutdown_while_the_entry_is_on_its_way_leaves_no_untracked_exposure(rig: Rig) -> None:
    assert rig.live is not None
    opening, position_id = await _entry_in_flight(rig)
    await rig.live.stop(drain_s=3.0)  # the drain closes OPENING positions (reason shutdown)
    await asyncio.gather(opening, return_exceptions=True)
    stored = await rig.stored(position_id)
    amount = rig.sim.venue.position(rig.account, "BTCUSDT").amount
    assert not (amount != 0 and stored.state.is_terminal), f"{amount} on the venue, position {stored.state.value}"


async def test_a_stale_snapshot_of_the_previous_position_does_not_shrink_the_new_one(rig: Rig) -> None:
    assert rig.live is not None and rig.engine is not None
    first = await rig.open(_btc("0.005"))
    rig.sim.set_faults(stale_positions_s=30)  # positionRisk keeps answering LONG 0.005 (the first position)
    await rig.live.close(first.id)
    await rig.ended(first.id)
    second = await rig.open(_btc("0.010"))
    await asyncio.sleep(0.4)  # outside the grace window
    report = await Reconciler.of(rig.live, grace_ms=300).sync()
    await asyncio.sleep(0.8)  # a reduction would have been taken in by now (cause wait 0.5 s)
    await rig.live.idle()
    assert report.reduced == 0
    assert rig.engine.positions[second.id].quantity == D("0.010")
    assert [a.qty for a in rig.stop_algos("BTCUSDT")] == [D("0.010")]


async def test_an_entry_cancel_retried_in_an_outage_stops_with_the_engine(rig: Rig) -> None:
    assert rig.live is not None
    p = await rig.open(_btc(entry_price=D(50000)), expect=S.OPENING)  # a resting limit entry
    rig.sim.set_faults(http_5xx=10**6)
    cancels = rig.sim.calls["DELETE /fapi/v1/order"]
    closing = asyncio.ensure_future(rig.live.close(p.id))
    await rig.until(lambda: rig.sim.calls["DELETE /fapi/v1/order"] >= cancels + 2, what="the entry cancel retried")
    await rig.live.stop(timeout=0.5, drain_s=0.5)
    before = rig.sim.calls["DELETE /fapi/v1/order"]
    await asyncio.sleep(1.0)  # time passes: no cancel may be sent once the engine has stopped
    assert rig.sim.calls["DELETE /fapi/v1/order"] == before, "cancels still sent after the engine stopped"
    rig.sim.set_faults(http_5xx=0)
    await asyncio.wait_for(closing, 2.0)


async def test_the_service_stops_promptly_while_a_close_retries_an_entry_cancel(sim: SimServer,
                                                                                tmp_path: Path) -> None:
    account = sim.venue.add_account("svc")
    config = dataclasses.replace(
        service_config(sim.ccxt_urls(), account.api_key, account.secret, f"sqlite:///{tmp_path / 's.sqlite'}",
                       tmp_path / "records", ["BTCUSDT"], drain_s=1.0),
        api=ApiBinding(token=Secret("tok"), port=0))
    service = await Service(config).start()
    live = service.accounts["crash"].live
    assert live is not None and service.api is not None
    p = await live.open(_btc(entry_price=D(50000)))
    sim.set_faults(http_5xx=10**6)

    api = service.api

    async def close_through_the_api() -> int:
        async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{api.port}/positions/{p.id}/close",
                                                        headers={"Authorization": "Bearer tok"}) as r:
            return r.status

    cancels = sim.calls["DELETE /fapi/v1/order"]
    request = asyncio.ensure_future(close_through_the_api())
    await until(lambda: sim.calls["DELETE /fapi/v1/order"] >= cancels + 2, what="the entry cancel retried")
    started = time.monotonic()
    await asyncio.wait_for(service.stop(), 60)
    took = time.monotonic() - started
    request.cancel()
    sim.set_faults(http_5xx=0)
    assert took < 15, f"the stop waited {took:.1f} s for an entry cancel retried during an outage"


async def test_one_reduction_seen_by_two_passes_is_taken_in_once(rig: Rig) -> None:
    assert rig.live is not None and rig.engine is not None
    p = await rig.open(_btc())
    rig.sim.set_faults(ws_silent=True)
    rig.sim.venue.new_order(rig.account, symbol="BTCUSDT", side="SELL", type_="MARKET", quantity=D("0.004"),
                            price=None, client_id="web_partial", reduce_only=True)
    reconciler = Reconciler.of(rig.live, grace_ms=0)
    first = await reconciler.sync()
    await asyncio.sleep(0.1)  # the first reduction still waits for its cause
    second = await reconciler.sync()
    await rig.until(lambda: rig.engine.positions[p.id].quantity == D("0.006"))  # type: ignore[union-attr]
    await rig.live.idle()
    assert first.reduced + second.reduced == 1
    assert not [m for level, m in rig.log if level in ("ERROR", "CRITICAL") or "refused" in m]
