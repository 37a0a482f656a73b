"""The REST positions list with many positions open: what reading it costs the event loop.

Every sync tick (2 s) asks the venue for every position (`CcxtExchange.positions`). With hundreds of positions,
ccxt's parsing of the answer (`parse_position_risk`, Precise's text arithmetic for fields the adapter never
reads) took tens of milliseconds of the event loop at every tick: a cascade that coincided with a tick waited for
it. The adapter now reads Binance's answer itself (`exchange/binance_lean.py` `lean_position_risk`). This prints
the time of one `positions()` call both ways, against the simulator in this process (its own handling of the
request is in both figures; the difference is the reading), and of ccxt's parsing alone.

Run: python -m bench.positions_read [--positions 500] [--repeat 20]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from loguru import logger

from exchange.ccxt_adapter import CcxtExchange, ExchangeSettings, Secret
from exchange.sim.server import SimServer
from exchange.sim.venue import Venue, VenueConfig


async def run(positions: int, repeat: int) -> None:
    logger.remove()
    server = await SimServer(Venue(VenueConfig.with_symbols(positions)), mark_interval_s=3600).start()
    account = server.venue.add_account("bench")
    adapter = await CcxtExchange(ExchangeSettings(api_key=Secret(account.api_key), secret=Secret(account.secret),
                                                  urls=server.ccxt_urls(), rate_limit=False)).start()
    try:
        for spec in server.venue.config.symbols:
            quantity = spec.min_qty * 10
            server.venue.new_order(account, symbol=spec.symbol, side="BUY", type_="MARKET", quantity=quantity,
                                   price=None, client_id=f"bench-{spec.symbol}", reduce_only=False)
        figures: dict[str, list[float]] = {"lean": [], "ccxt": []}
        for _ in range(repeat):
            for way in ("lean", "ccxt"):
                adapter._lean_positions = way == "lean"
                started = time.perf_counter()
                got = await adapter.positions()
                figures[way].append((time.perf_counter() - started) * 1000)
                assert len(got) == positions, (way, len(got))
        client: Any = adapter.client
        answer = await client.fapiPrivateV3GetPositionRisk()
        parse: list[float] = []
        for _ in range(repeat):
            started = time.perf_counter()
            for entry in answer:
                client.parse_position_risk(entry)
            parse.append((time.perf_counter() - started) * 1000)
        print(f"{positions} positions open, {repeat} calls each way (median, min):")
        for way, values in figures.items():
            print(f"  positions() read the {way} way: {statistics.median(values):6.1f} ms, {min(values):6.1f} ms")
        print(f"  ccxt's parse_position_risk alone over the answer: {statistics.median(parse):6.1f} ms, "
              f"{min(parse):6.1f} ms")
    finally:
        await adapter.close()
        await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(run(args.positions, args.repeat))


if __name__ == "__main__":
    main()
