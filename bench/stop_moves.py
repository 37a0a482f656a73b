"""Stop moves through the real stack: the unprotected window as the simulator itself sees it (time with a
position open and no working stop on its symbol), exchange calls per move (REST requests the simulator
received), and move latency. Once with place-then-cancel (the venue accepts two stops), once with a
venue that refuses a second stop (the cancel-then-place fallback).

Run: python -m bench.stop_moves [--moves 300]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from decimal import Decimal as D
from pathlib import Path
from typing import Any

from loguru import logger

from exchange.sim.server import SimServer
from lifecycle.domain import Side
from lifecycle.live import OpenCommand
from tests.livekit import Rig


class ProtectionClock:
    """Listens to the venue: accumulates the time a position is open on the symbol without a working stop."""

    def __init__(self, sim: SimServer, account: Any, symbol: str) -> None:
        self.sim, self.account, self.symbol = sim, account, symbol
        self.unprotected_s = 0.0
        self.gaps = 0
        self._since: float | None = None
        sim.venue.user_listeners.append(self._check)

    def _check(self, account_name: str, event: dict[str, Any]) -> None:
        venue = self.sim.venue
        open_ = venue.position(self.account, self.symbol).amount != 0
        stopped = any(a.order_type == "STOP_MARKET" for a in venue.open_algos(self.account, self.symbol))
        now = time.perf_counter()
        if open_ and not stopped and self._since is None:
            self._since = now
        elif (stopped or not open_) and self._since is not None:
            self.unprotected_s += now - self._since
            self.gaps += 1
            self._since = None


async def scenario(moves: int, single_stop: bool) -> None:
    sim = await SimServer(mark_interval_s=1.0).start()
    rig = await Rig(sim, sim.venue.add_account("bench"), f"sqlite:///{Path(tempfile.mkdtemp()) / 'b.sqlite'}",
                    Path(tempfile.mkdtemp()) / "records").start()
    assert rig.live is not None
    p = await rig.open(OpenCommand("BTCUSDT", Side.LONG, D("0.01"), stop_loss_pct=D(1),
                                   trailing_activation=D(60010), trailing_callback_pct=D("0.1")))
    if single_stop:
        sim.set_faults(single_stop=True)
    clock = ProtectionClock(sim, rig.account, "BTCUSDT")
    requests_before = sim.requests
    mark = D(60010)
    for _ in range(moves + 1):  # the first step activates the trailing stop
        before = rig.live.stats.stop_moves
        mark += D(20)
        rig.set_mark("BTCUSDT", mark)
        await rig.until(lambda: rig.live.stats.stop_moves > before, timeout=5)  # type: ignore[union-attr]  # noqa: B023 - awaited in this iteration
        await rig.live.idle()
    requests = sim.requests - requests_before
    records = [r for r in rig.records.read("stop_move") if r["mode"] == "trail"]  # type: ignore[union-attr]
    assert rig.engine is not None and rig.engine.positions[p.id].stop_price == D(records[-1]["new_price"])
    await rig.stop()
    await sim.stop()
    latency = [r["latency_ms"] for r in records]
    calls = [r["exchange_calls"] for r in records]
    windows = [r["unprotected_ms"] for r in records]
    mode = "venue refuses a 2nd stop (cancel-then-place)" if single_stop else "place-then-cancel"
    print(f"{mode}: {len(records)} moves")
    print(f"  unprotected window seen by the simulator: total {clock.unprotected_s * 1000:.2f} ms over "
          f"{clock.gaps} gaps; engine-measured per move: max {max(windows):.2f} ms, "
          f"mean {statistics.fmean(windows):.2f} ms")
    print(f"  exchange calls per move: engine {statistics.fmean(calls):.2f} (max {max(calls)}); "
          f"simulator received {requests / len(records):.2f} REST requests per move")
    print(f"  move latency (decision under lock -> placed, old cancelled, committed): p50 "
          f"{statistics.median(latency):.2f} ms, max {max(latency):.2f} ms")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--moves", type=int, default=300)
    args = parser.parse_args()
    logger.remove()
    await scenario(args.moves, single_stop=False)
    await scenario(args.moves, single_stop=True)


if __name__ == "__main__":
    asyncio.run(main())
