"""Detection time of an external close while the private stream is down, as a function of the sync
interval in force (the fast sync interval: the stream is not healthy).

The user-data stream is cut and every reconnection refused (the simulator answers 503 to the WebSocket
upgrade), so only the scheduled REST reconciliation can see a close. N positions on N symbols are closed
by another client at uniformly random moments; the time from the close on the venue to the terminal
state committed in the database (CLOSED_EXTERNAL, cause `manual`, from the closing fill) is measured.
The grace window is 1 s here (the positions are older than that when they are closed).

Run: python -m bench.detection [--positions 20] [--intervals 0.5,1,2,5]
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from decimal import Decimal as D
from pathlib import Path

from loguru import logger

from exchange.sim.server import SimServer
from exchange.sim.venue import Venue
from lifecycle.domain import CloseCause, Side
from lifecycle.live import OpenCommand
from lifecycle.machines.states import PositionState as S
from lifecycle.reconciler import Reconciler
from scheduler.jobs import ReconciliationScheduler, ScheduleConfig
from tests.livekit import Rig, many_symbols


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_interval(interval: float, positions: int, seed: int) -> dict[str, float]:
    config = many_symbols(positions)
    sim = await SimServer(Venue(config), mark_interval_s=1.0).start()
    symbols = [s.symbol for s in config.symbols]
    rig = await Rig(sim, sim.venue.add_account("bench"), f"sqlite:///{tempfile.mkdtemp()}/detect.sqlite",
                    Path(tempfile.mkdtemp()) / "records", symbols=symbols).start()
    assert rig.live is not None and rig.engine is not None
    try:
        ids = {}
        for symbol in symbols:
            p = await rig.open(OpenCommand(symbol, Side.LONG, D(1), stop_loss_pct=D(5)))
            ids[symbol] = p.id
        ended: dict[str, float] = {}
        causes: dict[str, CloseCause | None] = {}

        def on_transition(position, outcome):
            if outcome.dest.is_terminal:
                ended[position.id] = time.perf_counter()
                causes[position.id] = position.close_cause

        rig.engine.listeners.append(on_transition)
        await asyncio.sleep(1.2)  # past the grace window
        sim.set_faults(user_stream_down=True)
        await sim.drop_streams()
        await rig.until(lambda: not rig.live.stream_healthy(), what="stream down")  # type: ignore[union-attr]
        reconciler = Reconciler.of(rig.live, grace_ms=1000)
        schedule = ScheduleConfig(sync_interval_s=max(15.0, interval), fast_sync_interval_s=interval,
                                  orphan_interval_s=600)
        scheduler = await ReconciliationScheduler(reconciler, schedule).start()
        rng = random.Random(seed)
        closed_at: dict[str, float] = {}

        async def close_later(symbol: str) -> None:
            await asyncio.sleep(rng.uniform(0, 3 * interval))
            closed_at[ids[symbol]] = time.perf_counter()
            sim.venue.force_close(rig.account, symbol, "manual")

        requests_before = sim.requests
        await asyncio.gather(*(close_later(s) for s in symbols))
        await rig.until(lambda: len(ended) == len(ids), timeout=3 * interval + 30, what="all detected")
        await scheduler.stop()
        took = [ended[pid] - closed_at[pid] for pid in ids.values()]
        wrong = [pid for pid in ids.values() if causes[pid] is not CloseCause.MANUAL]
        states = {(await rig.stored(pid)).state for pid in ids.values()}
        assert states == {S.CLOSED_EXTERNAL} and not wrong, (states, wrong)
        return {"p50": statistics.median(took), "p90": pct(took, 90), "max": max(took),
                "mean": statistics.fmean(took), "requests": sim.requests - requests_before}
    finally:
        sim.set_faults(user_stream_down=False)
        await rig.stop()
        await sim.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--positions", type=int, default=20)
    parser.add_argument("--intervals", default="0.5,1,2,5")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    logger.remove()
    logger.add(lambda m: print(m, end=""), level="ERROR")
    print(f"external closes of {args.positions} positions with the private stream down (refused), detected by "
          "the scheduled sync; close on the venue -> CLOSED_EXTERNAL committed")
    print(f"{'sync interval':>14} {'p50':>8} {'p90':>8} {'max':>8} {'mean':>8} {'REST calls':>11}")
    for interval in (float(x) for x in args.intervals.split(",")):
        r = await one_interval(interval, args.positions, args.seed)
        print(f"{interval:>12.1f} s {r['p50']:>7.2f}s {r['p90']:>7.2f}s {r['max']:>7.2f}s {r['mean']:>7.2f}s "
              f"{r['requests']:>11}")


if __name__ == "__main__":
    asyncio.run(main())
