"""How long a silent private stream can hide a close, by kind of silence; and how long a fill waits for its
stop while the database cannot be written.

Silences (one episode per close: the silence starts, a position is closed by another client at a random
moment within two fast-sync intervals, the close is detected, the stream is healed before the next one):

* `expired key, no notice`: the listen key expires; the socket stays open and nothing arrives;
* `expired key, notice`: the same, with Binance's `listenKeyExpired` event pushed on the socket;
* `wedged socket`: connected, key alive (keepalive answers), nothing delivered;
* `dropped, reconnects refused`: the socket is cut and every new one refused (503).

The idle probe (`user_probe_after_s`) is set far away (600 s), so only what the engine does about silence
is measured: the REST positions check on every fast-sync tick, the doubt it raises, the probe and the
resubscription. Measured: close on the venue -> terminal state committed (CLOSED_EXTERNAL, cause `manual`).

Storage: a limit entry fills while the SQLite file's disk is full (a small tmpfs, filled; needs root to mount
it): fill on the venue -> the stop working on the venue.

Run: python -m bench.silence [--closes 20] [--fast-sync 2] [--fills 20]
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from decimal import Decimal as D
from pathlib import Path
from typing import Any

from loguru import logger

from exchange.sim.server import SimServer
from exchange.sim.venue import Venue
from lifecycle.domain import CloseCause, Side
from lifecycle.live import OpenCommand
from lifecycle.machines.states import PositionState as S
from lifecycle.reconciler import Reconciler
from scheduler.jobs import ReconciliationScheduler, ScheduleConfig
from tests.livekit import Rig, many_symbols, settings_for


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def _user_stream_down(sim: SimServer) -> None:
    sim.set_faults(user_stream_down=True)
    await sim.drop_streams()


async def _user_stream_up(sim: SimServer) -> None:
    sim.set_faults(user_stream_down=False)


async def _expire_quietly(sim: SimServer) -> None:
    sim.expire_listen_keys()


async def _expire_with_notice(sim: SimServer) -> None:
    sim.expire_listen_keys(notice=True)


async def _wedge(sim: SimServer) -> None:
    sim.set_faults(ws_silent=True)


async def _unwedge(sim: SimServer) -> None:
    sim.set_faults(ws_silent=False)


async def _nothing(sim: SimServer) -> None:
    return None


Fault = Callable[[SimServer], Awaitable[None]]
SILENCES: list[tuple[str, Fault, Fault]] = [
    ("expired key, no notice", _expire_quietly, _nothing),
    ("expired key, notice", _expire_with_notice, _nothing),
    ("wedged socket", _wedge, _unwedge),
    ("dropped, reconnects refused", _user_stream_down, _user_stream_up),
]


async def one_silence(name: str, start: Fault, heal: Fault, closes: int, fast: float, seed: int) -> dict[str, Any]:
    config = many_symbols(closes)
    sim = await SimServer(Venue(config), mark_interval_s=1.0).start()
    symbols = [s.symbol for s in config.symbols]
    account = sim.venue.add_account("bench")
    settings = replace(settings_for(sim, account), user_probe_after_s=600.0)
    rig = await Rig(sim, account, f"sqlite:///{tempfile.mkdtemp()}/silence.sqlite",
                    Path(tempfile.mkdtemp()) / "records", symbols=symbols, settings=settings).start()
    assert rig.live is not None and rig.engine is not None
    ended: dict[str, float] = {}
    causes: dict[str, CloseCause | None] = {}

    def on_transition(position: Any, outcome: Any) -> None:
        if outcome.dest.is_terminal:
            ended[position.id] = time.perf_counter()
            causes[position.id] = position.close_cause

    rig.engine.listeners.append(on_transition)
    schedule = ScheduleConfig(sync_interval_s=max(15.0, fast), fast_sync_interval_s=fast, orphan_interval_s=600)
    scheduler = await ReconciliationScheduler(Reconciler.of(rig.live, grace_ms=1000), schedule).start()
    rng = random.Random(seed)
    took: list[float] = []
    requests_before = sim.requests
    try:
        ids = [(await rig.open(OpenCommand(symbol, Side.LONG, D(1), stop_loss_pct=D(5)))).id for symbol in symbols]
        await asyncio.sleep(1.2)  # past the grace window
        for symbol, pid in zip(symbols, ids, strict=True):
            await start(sim)
            await asyncio.sleep(rng.uniform(0, 2 * fast))
            closed_at = time.perf_counter()
            sim.venue.force_close(rig.account, symbol, "manual")
            await rig.until(lambda: pid in ended, timeout=60, what=f"the close of {symbol}")  # noqa: B023
            took.append(ended[pid] - closed_at)
            await heal(sim)
            await rig.until(lambda: rig.live.stream_healthy() and rig.live.stream_doubted() is None,  # type: ignore[union-attr]
                            timeout=30, what="the stream healthy again")
        states = {(await rig.stored(pid)).state for pid in ids}
        wrong = [pid for pid in ids if causes[pid] is not CloseCause.MANUAL]
        assert states == {S.CLOSED_EXTERNAL} and not wrong, (states, wrong)
        logger.debug("took {}", took)
        return {"p50": statistics.median(took), "p99": pct(took, 99), "max": max(took), "n": len(took),
                "requests": sim.requests - requests_before}
    finally:
        await scheduler.stop()
        await _user_stream_up(sim)
        await _unwedge(sim)
        await rig.stop()
        await sim.stop()


async def fill_during_outage(fills: int) -> list[float] | str:
    """Fill -> stop on the venue while the database's disk is full; a reason string when it cannot run."""
    import pytest

    from tests.storage_faults import SmallDisk

    disk = SmallDisk(Path(tempfile.mkdtemp()) / "small")
    try:
        disk.mount()
    except pytest.skip.Exception as e:  # the same check the tests use
        return str(e)
    config = many_symbols(fills)
    sim = await SimServer(Venue(config), mark_interval_s=1.0).start()
    symbols = [s.symbol for s in config.symbols]
    rig = await Rig(sim, sim.venue.add_account("bench"), f"sqlite:///{disk.path / 'outage.sqlite'}",
                    Path(tempfile.mkdtemp()) / "records", symbols=symbols).start()
    took: list[float] = []
    try:
        assert rig.live is not None and rig.engine is not None
        for spec in config.symbols:
            price = (spec.mark * D("0.99")).quantize(spec.tick)
            p = await rig.live.open(OpenCommand(spec.symbol, Side.LONG, D(1), entry_price=price, stop_loss_pct=D(5)))
            await rig.until(lambda: bool(sim.venue.open_orders(rig.account, spec.symbol)),  # noqa: B023
                            what="the entry resting")
            disk.fill()
            filled_at = time.perf_counter()
            rig.set_mark(spec.symbol, price - spec.tick)
            await rig.until(lambda: bool(rig.stop_algos(spec.symbol)), timeout=10,  # noqa: B023
                            what="the stop on the venue")
            took.append(time.perf_counter() - filled_at)
            logger.debug("fill -> stop {}", took[-1])
            assert rig.state(p.id) is S.OPEN and rig.engine.books.behind > 0
            disk.free()
            await rig.until(lambda: rig.engine.books.behind == 0, timeout=30,  # type: ignore[union-attr]
                            what="the books caught up")
        return took
    finally:
        disk.free()
        await rig.stop()
        await sim.stop()
        disk.unmount()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--closes", type=int, default=20)
    parser.add_argument("--fast-sync", type=float, default=2.0)
    parser.add_argument("--fills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--only", default="", help="run only the silences whose name contains this")
    args = parser.parse_args()
    logger.remove()
    logger.add(lambda m: print(m, end=""), level="DEBUG" if args.verbose else "CRITICAL")
    print(f"close on the venue -> terminal state committed, one silence per close, {args.closes} closes each, "
          f"fast_sync_interval_s = {args.fast_sync:g}")
    print(f"{'silence':>30} {'p50':>8} {'p99':>8} {'max':>8} {'REST calls':>11}")
    for name, start, heal in SILENCES:
        if args.only and args.only not in name:
            continue
        r = await one_silence(name, start, heal, args.closes, args.fast_sync, args.seed)
        print(f"{name:>30} {r['p50']:>7.2f}s {r['p99']:>7.2f}s {r['max']:>7.2f}s {r['requests']:>11}")
    if args.fills:
        result = await fill_during_outage(args.fills)
        if isinstance(result, str):
            print(f"fill during a storage outage: skipped ({result})")
        else:
            print(f"fill -> stop on the venue while the SQLite disk is full, {len(result)} fills: "
                  f"p50 {statistics.median(result) * 1000:.1f} ms, p99 {pct(result, 99) * 1000:.1f} ms, "
                  f"max {max(result) * 1000:.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
