"""A process that commits transitions of many positions at once (group commit), for a SIGKILL test.

Usage: python -m tests.batch_crash_child DB_URL POSITIONS. Opens POSITIONS positions, prints `READY`, then
drives every position concurrently through a long script of events and prints `ACK <position> <seq>` (flushed)
as soon as each transition is acknowledged (its commit returned). It never ends by itself: the test kills it.
"""
from __future__ import annotations

import asyncio
import sys
import tempfile
from decimal import Decimal as D

from loguru import logger

from db.repository import Repository
from exchange.paper import PaperExchange
from lifecycle.domain import Side
from lifecycle.engine import Engine
from lifecycle.events import EntryFilled, StopMoved
from lifecycle.records import JsonlRecords


async def main(url: str, n: int) -> None:
    logger.remove()
    repo = await Repository.open(url)
    engine = Engine(repo, canceller=PaperExchange(), records=JsonlRecords(tempfile.mkdtemp()))
    ids = [(await engine.open_position(account="crash", symbol=f"S{i}", side=Side.LONG, quantity=D(1))).id
           for i in range(n)]
    print("READY", flush=True)

    async def drive(position_id: str) -> None:
        outcome = await engine.fire(position_id, EntryFilled(quantity=D(1), price=D(100)))
        print(f"ACK {position_id} {outcome.journal.seq}", flush=True)
        step = 0
        while True:  # the stop moves up forever, one tick at a time
            step += 1
            outcome = await engine.fire(position_id, StopMoved(stop_price=D(50) + D(step) / 100, mark=D(100)))
            print(f"ACK {position_id} {outcome.journal.seq}", flush=True)

    await asyncio.gather(*(drive(pid) for pid in ids))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
