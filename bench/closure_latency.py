"""Closure detection latency through the real stack: simulator -> WebSocket -> unmodified ccxt -> adapter ->
live engine -> machine -> database commit, for N closes by the exchange (liquidation) or another client
(manual), next to the simulator's own event round trip (the same update reaching the live engine).

Run: python -m bench.closure_latency [--closes 1000] [--pg postgresql://postgres@127.0.0.1:5432/postgres]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from decimal import Decimal as D
from pathlib import Path

from loguru import logger

from exchange.sim.server import SimServer
from lifecycle.domain import Side
from lifecycle.live import OpenCommand
from tests.livekit import Rig

SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
SIZES = {"BTCUSDT": D("0.01"), "ETHUSDT": D("0.1"), "SOLUSDT": D("1")}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def run(closes: int, db_url: str, tune: bool = True) -> None:
    sim = await SimServer(mark_interval_s=1.0).start()
    rig = await Rig(sim, sim.venue.add_account("bench"), db_url, Path(tempfile.mkdtemp()) / "records").start()
    assert rig.live is not None and rig.engine is not None
    if tune:
        from lifecycle.app.service import tune_gc

        tune_gc()  # as `lifecycle run` does once started (CPython's defaults paused this process 135-400 ms)
    flattened: dict[str, float] = {}  # symbol -> perf_counter when the simulator flattened it
    received: list[float] = []
    detected: list[float] = []
    current: dict[str, str] = {}

    on_position = rig.live.on_position

    def timed_on_position(snap):
        if snap.amount == 0 and snap.symbol in flattened and current.get(snap.symbol):
            received.append(time.perf_counter() - flattened[snap.symbol])
        on_position(snap)

    rig.live.on_position = timed_on_position  # type: ignore[method-assign]

    def on_transition(position, outcome):
        if outcome.dest.is_terminal and current.get(position.symbol) == position.id:
            detected.append(time.perf_counter() - flattened[position.symbol])
            current[position.symbol] = ""

    rig.engine.listeners.append(on_transition)
    started = time.perf_counter()
    for i in range(closes):
        symbol = SYMBOLS[i % len(SYMBOLS)]
        p = await rig.open(OpenCommand(symbol, Side.LONG if i % 2 else Side.SHORT, SIZES[symbol], stop_loss_pct=D(5)))
        current[symbol] = p.id
        flattened[symbol] = time.perf_counter()
        rig.sim.venue.force_close(rig.account, symbol, "manual" if i % 2 else "liquidation")
        await rig.ended(p.id)
    total = time.perf_counter() - started
    await rig.stop()
    await sim.stop()
    assert len(detected) == closes, (len(detected), closes)
    print(f"{closes} closes on {db_url.split(':')[0]} in {total:.1f} s")
    for name, values in (("simulator event round trip (flatten -> update in the live engine)", received),
                         ("closure detection (flatten -> terminal state committed, cleanup requested)", detected)):
        ms = [v * 1000 for v in values]
        print(f"  {name}: p50 {pct(ms, 50):.2f} ms  p99 {pct(ms, 99):.2f} ms  max {max(ms):.2f} ms  "
              f"mean {statistics.fmean(ms):.2f} ms  (n={len(ms)})")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--closes", type=int, default=1000)
    parser.add_argument("--pg", help="measure on a scratch PostgreSQL database made from this admin URL instead")
    parser.add_argument("--default-gc", action="store_true", help="leave the garbage collector's defaults")
    args = parser.parse_args()
    logger.remove()
    if args.pg:
        from bench.pgscratch import scratch_database

        async with scratch_database(args.pg) as url:
            await run(args.closes, url, not args.default_gc)
    else:
        await run(args.closes, f"sqlite:///{Path(tempfile.mkdtemp()) / 'bench.sqlite'}", not args.default_gc)


if __name__ == "__main__":
    asyncio.run(main())
