"""A SystemExit from an engine listener in the middle of a group commit, in a process of its own (a test of
tests/test_group_commit.py runs it): every member of the batch is still answered and swapped in once, and the
writer goes on (a later transition is written). Prints OK; an assertion fails otherwise.

Usage: python -m tests.systemexit_child DB_URL
"""
from __future__ import annotations

import asyncio
import sys
import tempfile
from decimal import Decimal as D

from loguru import logger

from db.repository import Repository
from exchange.paper import PaperExchange
from lifecycle.domain import Position, Side
from lifecycle.engine import Engine
from lifecycle.events import EntryFilled, StopMoved
from lifecycle.journal import Outcome
from lifecycle.records import JsonlRecords


def main(url: str) -> None:
    logger.remove()
    loop = asyncio.new_event_loop()
    repo = loop.run_until_complete(Repository.open(url))
    try:
        engine = Engine(repo, canceller=PaperExchange(), records=JsonlRecords(tempfile.mkdtemp()))
        ids = [loop.run_until_complete(engine.open_position(account="exit", symbol=f"S{i}", side=Side.LONG,
                                                            quantity=D(1))).id for i in range(20)]
        heard: list[str] = []

        def leaving(position: Position, outcome: Outcome) -> None:
            heard.append(position.id)
            if len(heard) == 4:
                raise SystemExit("a listener leaves")

        engine.listeners.append(leaving)
        fires = [loop.create_task(engine.fire(pid, EntryFilled(quantity=D(1), price=D(100)))) for pid in ids]
        try:
            loop.run_until_complete(asyncio.wait_for(asyncio.gather(*fires), 10))
            raise AssertionError("the listener's SystemExit did not come out of the loop")
        except SystemExit:
            pass
        engine.listeners.remove(leaving)
        loop.run_until_complete(asyncio.wait_for(asyncio.gather(*fires, return_exceptions=True), 10))
        assert all(engine.positions[pid].state.value == "OPEN" for pid in ids), "a member was not swapped in"
        assert sorted(heard) == sorted(ids), "a member was not swapped in exactly once"
        # The writer is not stuck: a later transition is written, not only acknowledged by the books.
        loop.run_until_complete(asyncio.wait_for(engine.fire(ids[0], StopMoved(stop_price=D(95), mark=D(101))), 10))
        assert not engine.books.behind, "the books queued a write: the store stopped answering"
        stored = loop.run_until_complete(repo.get_position(ids[0]))
        assert stored is not None and stored.seq == 2, f"the later transition is not on disk: {stored}"
        print("OK", flush=True)
    finally:
        loop.run_until_complete(repo.close())
        loop.close()


if __name__ == "__main__":
    main(sys.argv[1])
