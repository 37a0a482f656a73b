"""Round trips through the unmodified ccxt client against the simulator on localhost: the floor that
later latency figures compare with. Run: python -m bench.sim_rtt [--rest 300] [--events 200]

REST: one signed fetch_positions through the adapter (ccxt REST, HMAC check, JSON both ways).
Stream: from the simulator moving a mark until the adapter yields that MarkPrice (WebSocket + ccxt
parse + the adapter's supervision), and from placing a market order until its fill arrives on the
user-data stream (the path a close detection takes).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from decimal import Decimal as D

from loguru import logger

from exchange.ccxt_adapter import CcxtExchange, ExchangeSettings, Secret
from exchange.port import MarkPrice, OrderSnapshot
from exchange.sim.server import SimServer
from lifecycle.domain import OrderStatus, Side


def summary(name: str, samples_s: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples_s)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"{name:<44} n={len(ms):>4}  p50 {statistics.median(ms):6.2f} ms  p99 {p99:6.2f} ms  max {ms[-1]:6.2f} ms"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rest", type=int, default=300)
    parser.add_argument("--events", type=int, default=200)
    args = parser.parse_args()
    logger.remove()
    sim = await SimServer(mark_interval_s=3600).start()  # no periodic marks: every mark seen is one we moved
    account = sim.venue.add_account("bench")
    venue = await CcxtExchange(ExchangeSettings(api_key=Secret(account.api_key), secret=Secret(account.secret),
                                                urls=sim.ccxt_urls(), market_silent_after_s=3600,
                                                rate_limit=False)).start()  # the round trip, not ccxt's pacing
    try:
        rest = []
        for _ in range(args.rest):
            started = time.perf_counter()
            await venue.positions()
            rest.append(time.perf_counter() - started)
        print(summary("REST fetch_positions (signed) through ccxt", rest))

        marks = venue.mark_prices(["BTCUSDT"])
        price = D(60000)
        await anext(marks)  # Resynced
        await asyncio.sleep(0.3)
        stream = []
        for _ in range(args.events):
            price += 1
            started = time.perf_counter()
            sim.venue.set_mark("BTCUSDT", price)
            while True:
                item = await anext(marks)
                if isinstance(item, MarkPrice) and item.price == price:
                    break
            stream.append(time.perf_counter() - started)
        print(summary("mark price: venue -> adapter (WebSocket)", stream))

        orders = venue.order_updates()
        await anext(orders)
        await asyncio.sleep(0.3)
        fills: list[float] = []
        for i in range(args.events // 2):
            side = Side.LONG if i % 2 == 0 else Side.SHORT
            client_id = f"bench-{i}"
            started = time.perf_counter()
            await venue.place_entry("BTCUSDT", side, D("0.001"), client_id)
            while True:
                update = await anext(orders)
                if (isinstance(update, OrderSnapshot) and update.client_id == client_id
                        and update.status is OrderStatus.FILLED):
                    break
            fills.append(time.perf_counter() - started)
        print(summary("market order placed -> fill on user stream", fills))
    finally:
        await venue.close()
        await sim.stop()


if __name__ == "__main__":
    asyncio.run(main())
