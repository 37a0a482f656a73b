"""Transitions per second through the position machine, without and with journaling.

Each position runs: entry_filled, 6 x stop_moved, ts_activated, close_requested, flat (10 transitions,
the last one terminal with its cleanup). "sequential": one event at a time; "concurrent": every
position driven by its own task, so commits of different positions overlap.
Run: python -m bench.transitions [--positions 200] [--pg URL]
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from decimal import Decimal as D
from pathlib import Path

from db.repository import Repository
from exchange.paper import PaperExchange
from lifecycle.domain import CloseReason, Position, Side, TrailingState, new_position_id, utcnow
from lifecycle.engine import Engine
from lifecycle.events import CloseRequested, EntryFilled, Event, Flat, StopMoved, TsActivated
from lifecycle.machines.position import PositionMachine
from lifecycle.machines.states import PositionState
from lifecycle.records import JsonlRecords


def script() -> list[Event]:
    events: list[Event] = [EntryFilled(quantity=D(1), price=D(100))]
    events += [StopMoved(stop_price=D(90 + i), mark=D(100 + i)) for i in range(6)]
    events += [TsActivated(mark=D(111)), CloseRequested(reason=CloseReason.SIGNAL), Flat(exit_price=D(111))]
    return events


def trailing() -> TrailingState:
    return TrailingState(activation_price=D(110), callback_rate=D(1))


async def pure_machine(n: int) -> float:
    machine, events = PositionMachine(), script()
    started = time.perf_counter()
    for _ in range(n):
        now = utcnow()
        p = Position(id=new_position_id(), account="b", symbol="X", side=Side.LONG, state=PositionState.OPENING,
                     requested_quantity=D(1), created_at=now, updated_at=now, trailing=trailing())
        for event in events:
            await machine.apply(p, event, now)
    return n * len(events) / (time.perf_counter() - started)


async def journaled(url: str, n: int, concurrent: bool) -> float:
    repo = await Repository.open(url)
    engine = Engine(repo, canceller=PaperExchange(), records=JsonlRecords(tempfile.mkdtemp()))
    events = script()
    ids = [(await engine.open_position(account="b", symbol=f"S{i}", side=Side.LONG, quantity=D(1),
                                       trailing=trailing())).id for i in range(n)]

    async def drive(pid: str) -> None:
        for event in events:
            await engine.fire(pid, event)

    started = time.perf_counter()
    if concurrent:
        await asyncio.gather(*(drive(pid) for pid in ids))
    else:
        for pid in ids:
            await drive(pid)
    rate = n * len(events) / (time.perf_counter() - started)
    assert not engine.positions, "every position should have reached CLOSED"
    stats = getattr(repo, "batch_stats", None)
    if stats is not None and stats.batches:
        print(f"    ({stats.members:,} commits in {stats.batches:,} transactions, {stats.members / stats.batches:.1f} "
              f"per transaction, largest {stats.largest})")
    await repo.close()
    return rate


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=200)
    parser.add_argument("--default-gc", action="store_true", help="leave the garbage collector's defaults")
    parser.add_argument("--pg", help="also measure on PostgreSQL (a scratch database is made from this admin URL)")
    args = parser.parse_args()
    from loguru import logger

    logger.remove()
    if not args.default_gc:
        from lifecycle.app.service import tune_gc

        tune_gc()  # as the service does once started
        print("(garbage collector tuned as `lifecycle run` tunes it; --default-gc for CPython's defaults)")
    n = args.positions
    print(f"pure machine, no database:         {await pure_machine(n * 5):>8,.0f} transitions/s")
    for concurrent in (False, True):
        mode = "concurrent" if concurrent else "sequential"
        path = Path(tempfile.mkdtemp()) / "bench.sqlite"
        rate = await journaled(f"sqlite:///{path}", n, concurrent)
        print(f"sqlite (WAL, synchronous=FULL), {mode}: {rate:>8,.0f} transitions/s")
        if args.pg:
            from bench.pgscratch import scratch_database

            async with scratch_database(args.pg) as url:
                rate = await journaled(url, n, concurrent)
            print(f"postgresql, {mode}:              {rate:>8,.0f} transitions/s")


if __name__ == "__main__":
    asyncio.run(main())
