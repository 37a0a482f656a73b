"""A cascade on the private stream: every update reaches the engine, however many arrive at once (issue 13).

bench/burst.py with 500 positions lost hundreds of fills and flats: ccxt keeps the order updates not yet
handed to `watch_orders` in a cache of 1,000 by default, and a cascade of more within one turn of the
consumer pushed the oldest out before they were delivered. And `watch_positions` hands over only the positions
of the message that resolved it: the rest stay in ccxt's cache, which the adapter swept only 64 entries deep,
so the flats of a cascade over more symbols than that waited for the REST sync.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from decimal import Decimal as D

import pytest

from exchange.ccxt_adapter import CcxtExchange
from exchange.port import OrderSnapshot, PositionSnapshot, Resynced
from exchange.sim.server import SimServer
from exchange.sim.venue import Account, SimOrder, Venue, VenueConfig
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


async def test_a_cascade_larger_than_ccxts_cache_is_noticed_and_resynced_from_rest(
        sim: SimServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """ccxt's order cache is bounded (its linear search makes a huge one slow): more updates in one turn than
    it holds cannot all be delivered, so the stream says so and hands the engine a REST snapshot (a Resynced
    with the open orders) instead of losing them silently. (Binance's order updates are read past ccxt now, see
    the next test; this holds for every frame left to ccxt: here all of them.)"""
    import exchange.ccxt_adapter as adapter

    monkeypatch.setattr(adapter, "STREAM_CACHE", 300)
    monkeypatch.setattr(adapter, "_TAPPED", frozenset())
    account = sim.venue.add_account("overflow")
    venue = await CcxtExchange(settings_for(sim, account)).start()
    orders = Collector(venue.order_updates())
    try:
        await orders.wait_for(lambda item: not isinstance(item, OrderSnapshot))  # subscribed (its resync)
        _cascade(sim, account, 900)
        resync = await orders.wait_for(lambda item: isinstance(item, Resynced) and item.reason == "cache overflow")
        assert isinstance(resync, Resynced) and resync.snapshot is not None  # the open orders from REST
    finally:
        await orders.stop()
        await venue.close()


async def test_order_updates_read_past_ccxt_arrive_whole_however_many_come_at_once(
        sim: SimServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Binance's order updates are read straight from the frames (exchange/binance_user_stream.py): three times
    ccxt's cache at once, every one is delivered, in order, and nothing is taken for an overflow."""
    import exchange.ccxt_adapter as adapter

    monkeypatch.setattr(adapter, "STREAM_CACHE", 300)
    account = sim.venue.add_account("tapped")
    venue = await CcxtExchange(settings_for(sim, account)).start()
    orders = Collector(venue.order_updates())
    try:
        await orders.wait_for(lambda item: not isinstance(item, OrderSnapshot))  # subscribed (its resync)
        _cascade(sim, account, 900)

        def seen() -> int:
            return sum(isinstance(item, OrderSnapshot) for item in orders.items)
        assert await _until_count(seen, 900) == 900
        ids = [item.client_id for item in orders.items if isinstance(item, OrderSnapshot)]
        assert ids == [f"web_cascade{i}" for i in range(900)]
        assert not [item for item in orders.items if isinstance(item, Resynced) and item.reason == "cache overflow"]
    finally:
        await orders.stop()
        await venue.close()


def _cascade(sim: SimServer, account: Account, count: int) -> None:
    for i in range(count):  # one turn of the simulator's loop: the updates back to back
        order = SimOrder(20_000 + i, f"web_cascade{i}", "BTCUSDT", "SELL", "MARKET", D("0.001"),
                         reduce_only=True, account=account.name)
        sim.venue._emit_order(account, order, "NEW", D(0), D(0))


async def test_a_cascade_of_flats_on_300_symbols_in_one_go_is_delivered_whole() -> None:
    count = 300
    sim = await SimServer(Venue(VenueConfig.with_symbols(count))).start()
    account = sim.venue.add_account("flats")
    venue = await CcxtExchange(settings_for(sim, account)).start()
    positions = Collector(venue.position_updates())
    try:
        await positions.wait_for(lambda item: not isinstance(item, PositionSnapshot))  # subscribed (its resync)
        symbols = [spec.symbol for spec in sim.venue.config.symbols]
        for symbol in symbols:  # one turn of the simulator's loop: 300 ACCOUNT_UPDATEs back to back
            sim.venue._emit(account, sim.venue._account_update(account, symbol, "ORDER"))

        def seen() -> int:
            return len({item.symbol for item in positions.items if isinstance(item, PositionSnapshot)})
        delivered = await _until_count(seen, count)
        assert delivered == count, f"{count - delivered} of {count} position updates never reached the engine"
    finally:
        await positions.stop()
        await venue.close()
        await sim.stop()


async def _until_count(orders: Collector | Callable[[], int], count: int, timeout: float = 20.0) -> int:
    import asyncio

    def cascade() -> int:
        assert isinstance(orders, Collector)
        return orders.count(lambda item: isinstance(item, OrderSnapshot) and (item.client_id or "").startswith(
            "web_cascade"))
    seen = orders if not isinstance(orders, Collector) else cascade

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


def test_the_sweep_walks_past_updates_that_change_an_entry_but_not_its_key() -> None:
    """An algo's TRIGGERING has the key of its NEW (nothing new by key) but is a changed cache entry: the walk
    back through ccxt's cache must go on past a run of them to the fill behind (the review found a FILLED
    update left unswept behind 64 such updates)."""
    from ccxt.async_support.base.ws.cache import ArrayCacheBySymbolById

    from exchange.ccxt_adapter import _Fresh

    def key(item: tuple[str, str]) -> tuple[str, str]:
        return item[0], "open" if item[1] == "triggering" else item[1]

    fresh = _Fresh("orders", lambda raw: (raw["id"], raw["status"]), key, None, lambda *_: None)
    cache = ArrayCacheBySymbolById(1000)
    for i in range(200):
        cache.append({"symbol": "X", "id": str(i), "status": "open", "info": {"n": i}})
    assert len(fresh.take([], [cache])) == 200
    cache.append({"symbol": "X", "id": "0", "status": "closed", "info": {"fill": 0}})
    for i in range(100, 170):
        cache.append({"symbol": "X", "id": str(i), "status": "triggering", "info": {"trigger": i}})
    assert ("0", "closed") in fresh.take([], [cache])


def test_marks_are_read_whole_not_by_recency() -> None:
    """The marks part lists one ticker per symbol in symbol order, not by recency: a new mark for an early
    symbol behind 64 unchanged later ones is still read."""
    from exchange.ccxt_adapter import _Fresh

    fresh = _Fresh("marks", lambda raw: (raw["symbol"], raw["markPrice"]), lambda m: m, None, lambda *_: None)
    tickers = [{"symbol": f"S{i:03d}", "markPrice": 1, "info": {"n": i}} for i in range(100)]
    assert len(fresh.take([], [tickers])) == 100
    tickers[0] = {"symbol": "S000", "markPrice": 2, "info": {"n": "new"}}
    assert fresh.take([], [tickers]) == [("S000", 2)]

