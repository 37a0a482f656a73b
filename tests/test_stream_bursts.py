"""A cascade on the private stream: every update reaches the engine, however many arrive at once (issue 13).

bench/burst.py with 500 positions lost hundreds of fills and flats: ccxt keeps the order updates not yet
handed to `watch_orders` in a cache of 1,000 by default, and a cascade of more within one turn of the
consumer pushed the oldest out before they were delivered.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal as D

import pytest

from exchange.ccxt_adapter import CcxtExchange
from exchange.port import OrderSnapshot
from exchange.sim.server import SimServer
from exchange.sim.venue import SimOrder
from tests.livekit import settings_for
from tests.test_ccxt_adapter import Collector


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    server = await SimServer().start()
    yield server
    await server.stop()


async def test_a_cascade_of_1500_order_updates_in_one_go_is_delivered_whole(sim: SimServer) -> None:
    account = sim.venue.add_account("cascade")
    venue = await CcxtExchange(settings_for(sim, account)).start()
    orders = Collector(venue.order_updates())
    try:
        await orders.wait_for(lambda item: not isinstance(item, OrderSnapshot))  # subscribed (its resync)
        count = 1500
        for i in range(count):  # one turn of the simulator's loop: the frames reach ccxt back to back
            order = SimOrder(10_000 + i, f"web_cascade{i}", "BTCUSDT", "SELL", "MARKET", D("0.001"),
                             reduce_only=True, account=account.name)
            sim.venue._emit_order(account, order, "NEW", D(0), D(0))
        delivered = await _until_count(orders, count)
        assert delivered == count, f"{count - delivered} of {count} order updates never reached the engine"
    finally:
        await orders.stop()
        await venue.close()


async def _until_count(orders: Collector, count: int, timeout: float = 20.0) -> int:
    import asyncio

    def seen() -> int:
        return orders.count(lambda item: isinstance(item, OrderSnapshot) and (item.client_id or "").startswith(
            "web_cascade"))

    loop = asyncio.get_running_loop()
    deadline, last, quiet_since = loop.time() + timeout, -1, loop.time()
    while loop.time() < deadline:
        now = seen()
        if now >= count:
            return now
        if now != last:
            last, quiet_since = now, loop.time()
        elif loop.time() - quiet_since > 3.0:  # nothing new for 3 s: what is missing is not coming
            return now
        await asyncio.sleep(0.05)
    return seen()
