"""Mark-price throughput of the live engine's hot path: N open positions (one per symbol: one account holds
one position per symbol and side) with active trailing stops, marks that need no stop move, handled one by
one as the mark stream hands them over (`LiveEngine.on_mark`). Two cases: `below` (marks under each long's
watermark: the common case) and `rising` (every mark a new high, but the stop moved less than the minimum
interval ago, so `trail()` runs for every update and holds the move back). The baseline is the same loop
without the engine (the mark only stored).

The positions are real: created in a SQLite file and rehydrated into the engine, as after a restart.
Run: python -m bench.marks [--positions 1000] [--updates 500000]
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path

from loguru import logger

from db.repository import Repository
from exchange.paper import PaperExchange
from exchange.port import MarkPrice
from lifecycle.domain import Position, Side, TrailingState, new_position_id, utcnow
from lifecycle.engine import Engine
from lifecycle.journal import CREATED, JournalEntry, creation_payload
from lifecycle.live import LiveConfig, LiveEngine
from lifecycle.machines.states import PositionState
from lifecycle.records import JsonlRecords


class _Ticks:
    """The one exchange call the no-move path could make (the tick size, cached); no network here."""

    def tick_size(self, symbol: str) -> D:
        return D("0.01")


async def seeded_engine(n: int) -> tuple[Engine, list[str], Repository]:
    url = f"sqlite:///{Path(tempfile.mkdtemp()) / 'marks.sqlite'}"
    repo = await Repository.open(url)
    now = utcnow()
    items = []
    for i in range(n):
        p = Position(id=new_position_id() + f"{i:06x}"[-6:], account="bench", symbol=f"S{i}USDT",
                     side=Side.LONG, state=PositionState.TS_ACTIVE, requested_quantity=D(1), created_at=now,
                     updated_at=now, quantity=D(1), entry_price=D(100), stop_price=D("110.21"),
                     trailing=TrailingState(activation_price=D(105), callback_rate=D("0.8"), active=True,
                                            watermark=D("111.1"), last_moved_at=now))
        items.append((p, JournalEntry(p.id, 0, CREATED, None, p.state, now, None, creation_payload(p))))
    await repo.insert_positions(items)
    engine = Engine(repo, canceller=PaperExchange(), records=JsonlRecords(tempfile.mkdtemp()))
    await engine.rehydrate()
    return engine, sorted({p.symbol for p, _ in items}), repo


async def run(n: int, case: str, updates: int) -> None:
    engine, symbols, repo = await seeded_engine(n)
    config = LiveConfig(trail_min_interval_s=3600)  # the stops moved "just now": every move is held back
    live = await LiveEngine(engine, _Ticks(), account="bench", symbols=symbols,  # type: ignore[arg-type]
                            config=config).start(streams=False)
    at = datetime.now(UTC)
    if case == "below":  # 110.50..110.99: under the watermark 111.1
        marks = [MarkPrice(symbols[i % len(symbols)], D("110.5") + D(i % 50) / 100, at) for i in range(updates)]
    else:  # each symbol's mark one cent higher every round: a new watermark on every update
        marks = [MarkPrice(symbols[i % len(symbols)], D("111.2") + D(i // len(symbols)) / 100, at)
                 for i in range(updates)]

    started = time.perf_counter()
    store: dict[str, D] = {}
    for m in marks:  # the baseline: the same loop, the mark only stored
        store[m.symbol] = m.price
    baseline = time.perf_counter() - started

    started = time.perf_counter()
    on_mark = live.on_mark
    for m in marks:
        on_mark(m)
    elapsed = time.perf_counter() - started
    moved = sum(1 for p in engine.positions.values() if p.stop_price != D("110.21"))
    assert moved == 0 and not live.ctx.tasks, "the no-move path moved a stop"
    await live.stop()
    await repo.close()
    print(f"{case:>6}: {n} trailing positions, {updates:,} marks: {updates / elapsed:,.0f} updates/s through the "
          f"engine; baseline loop {updates / baseline:,.0f}/s; engine/baseline time {elapsed / baseline:.1f}x")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--positions", type=int, default=1000)
    parser.add_argument("--updates", type=int, default=500_000)
    args = parser.parse_args()
    logger.remove()
    for case in ("below", "rising"):
        await run(args.positions, case, args.updates)


if __name__ == "__main__":
    asyncio.run(main())
