"""REST calls per minute at steady state for N positions (one per symbol), with the default schedule
(sync every 15 s, orphan sweep and aged check every 60 s), healthy streams, and prices moving by a
random walk so that trailing stops activate and follow; the adapter and the live engine run with their
production defaults.

Counted by the simulator per endpoint ("METHOD /path"); weights are those ccxt 4.5.90 declares for
Binance USDⓈ-M (`binance.py`, the cost of each endpoint, with and without a symbol), to compare with
Binance's budget of 2,400 request weight per minute per IP and 1,200 orders per minute per account.

Run: python -m bench.rest_budget [--positions 100] [--minutes 3]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections import Counter
from decimal import Decimal as D
from pathlib import Path

from loguru import logger

from exchange.ccxt_adapter import ExchangeSettings, Secret
from exchange.sim.server import SimServer
from exchange.sim.venue import Venue
from lifecycle.domain import Side
from lifecycle.live import LiveConfig, OpenCommand
from lifecycle.reconciler import Reconciler
from scheduler.jobs import ReconciliationScheduler, ScheduleConfig
from tests.livekit import Rig, many_symbols

# ccxt 4.5.90 binance.py costs (fapiPrivate / V3 sections); calls without a symbol use the noSymbol cost.
WEIGHT = {
    "GET /fapi/v3/positionRisk": 1, "GET /fapi/v1/openOrders": 40, "GET /fapi/v1/openAlgoOrders": 40,
    "GET /fapi/v1/userTrades": 5, "GET /fapi/v1/order": 1, "POST /fapi/v1/order": 1, "DELETE /fapi/v1/order": 1,
    "POST /fapi/v1/algoOrder": 1, "DELETE /fapi/v1/algoOrder": 1, "PUT /fapi/v1/listenKey": 1,
    "POST /fapi/v1/listenKey": 1, "GET /fapi/v1/exchangeInfo": 1, "GET /fapi/v1/leverageBracket": 2,
}
ORDERS = {"POST /fapi/v1/order", "POST /fapi/v1/algoOrder"}
LISTS = {"GET /fapi/v1/openOrders", "GET /fapi/v1/openAlgoOrders"}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--positions", type=int, default=100)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--volatility", type=float, default=0.0005, help="random-walk step per second")
    args = parser.parse_args()
    logger.remove()
    logger.add(lambda m: print(m, end=""), level=os.environ.get("BENCH_LOG_LEVEL", "ERROR"))
    config = many_symbols(args.positions)
    symbols = [s.symbol for s in config.symbols]
    sim = await SimServer(Venue(config), mark_interval_s=1.0).start()
    directory = Path(tempfile.mkdtemp(prefix="lifecycle-budget-"))
    live_config = LiveConfig()  # the defaults: 1 s between moves, 0.02 % minimum step
    account = sim.venue.add_account("bench")
    # The adapter's production defaults (listen-key probe after 30 s of silence, ccxt's rate limiting).
    settings = ExchangeSettings(api_key=Secret(account.api_key), secret=Secret(account.secret), urls=sim.ccxt_urls())
    rig = await Rig(sim, account, f"sqlite:///{directory / 'budget.sqlite'}", directory / "records",
                    config=live_config, symbols=symbols, settings=settings).start()
    assert rig.live is not None
    for spec in config.symbols:
        await rig.open(OpenCommand(spec.symbol, Side.LONG, D(1), stop_loss_pct=D(2),
                                   trailing_activation=spec.mark * D("1.001"), trailing_callback_pct=D("0.5")))
    scheduler = await ReconciliationScheduler(Reconciler.of(rig.live),
                                              ScheduleConfig(max_age_s=86400)).start()
    sim.start_random_walk(volatility=args.volatility, seed=11)
    await asyncio.sleep(5)  # past the opening
    before, moves_before = Counter(sim.calls), rig.live.stats.stop_moves
    symbol_before = Counter(sim.symbol_calls)
    started = time.monotonic()
    await asyncio.sleep(args.minutes * 60)
    minutes = (time.monotonic() - started) / 60
    calls = Counter(sim.calls)
    calls.subtract(before)
    symbol_calls = Counter(sim.symbol_calls)
    symbol_calls.subtract(symbol_before)
    moves = rig.live.stats.stop_moves - moves_before
    await scheduler.stop()
    await rig.stop()
    await sim.stop()

    total = sum(calls.values())
    def weight_of(key: str, n: int) -> float:  # a list for one symbol weighs 1 (Binance: 40 without a symbol)
        one = symbol_calls.get(key, 0) if key in LISTS else 0
        return (n - one) * WEIGHT.get(key, 1) + one

    weight = sum(weight_of(k, n) for k, n in calls.items())
    orders = sum(n for k, n in calls.items() if k in ORDERS)
    print(f"{args.positions} positions, {minutes:.1f} min at steady state, {moves} trailing stop moves "
          f"({moves / minutes:.1f}/min); scheduler: {dict(scheduler.stats.runs)}")
    print(f"{'endpoint':<30} {'calls/min':>10} {'weight/min':>11}")
    for key, n in sorted(calls.items(), key=lambda kv: -kv[1]):
        if n:
            print(f"{key:<30} {n / minutes:>10.1f} {weight_of(key, n) / minutes:>11.1f}")
    print(f"{'all':<30} {total / minutes:>10.1f} {weight / minutes:>11.1f}   (budget: 2,400 weight/min per IP)")
    print(f"orders placed: {orders / minutes:.1f}/min (budget: 1,200/min per account); without stop moves the "
          f"reconciliation and stream upkeep cost {(total - 2 * moves) / minutes:.1f} calls/min")


if __name__ == "__main__":
    asyncio.run(main())
