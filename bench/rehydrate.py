"""Rehydration time: N live positions (trailing state + a working stop order each) from the database
into a fresh engine's memory. Run: python -m bench.rehydrate [--sizes 10000 100000] [--pg URL]"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from decimal import Decimal as D
from pathlib import Path

from db.repository import Repository, orders
from exchange.paper import PaperExchange
from lifecycle.domain import OrderStatus, Position, Side, TrailingState, new_position_id, utcnow
from lifecycle.engine import Engine
from lifecycle.journal import CREATED, JournalEntry, creation_payload
from lifecycle.machines.states import PositionState
from lifecycle.records import JsonlRecords


def _positions(n: int) -> list[tuple[Position, JournalEntry]]:
    now = utcnow()
    out = []
    for i in range(n):
        p = Position(
            id=new_position_id() + f"{i:06x}"[-6:], account="bench", symbol=f"SYM{i}USDT", side=Side.LONG,
            state=PositionState.TS_ACTIVE if i % 2 else PositionState.OPEN, requested_quantity=D("1.5"),
            created_at=now, updated_at=now, quantity=D("1.5"), entry_price=D("100.25"), stop_price=D("95.5"),
            trailing=TrailingState(activation_price=D(110), callback_rate=D("0.8"), active=bool(i % 2),
                                   watermark=D("111.1") if i % 2 else None),
        )
        out.append((p, JournalEntry(p.id, 0, CREATED, None, p.state, now, None, creation_payload(p))))
    return out


async def seed(url: str, n: int) -> None:
    repo = await Repository.open(url)
    items = _positions(n)
    for start in range(0, n, 20_000):
        chunk = items[start:start + 20_000]
        await repo.insert_positions(chunk)
        async with repo.engine.begin() as conn:
            await conn.execute(orders.insert(), [
                {"client_id": f"b{p.id}", "position_id": p.id, "symbol": p.symbol, "purpose": "stop", "side": "sell",
                 "quantity": p.quantity, "status": OrderStatus.OPEN.value, "trigger_price": p.stop_price,
                 "algo_id": str(i), "created_at": p.created_at, "updated_at": p.created_at}
                for i, (p, _) in enumerate(chunk)])
    await repo.close()


async def measure(url: str, n: int) -> float:
    repo = await Repository.open(url, run_migrations=False)
    engine = Engine(repo, canceller=PaperExchange(), records=JsonlRecords(tempfile.mkdtemp()))
    started = time.perf_counter()
    loaded = await engine.rehydrate()
    elapsed = time.perf_counter() - started
    assert loaded == n == len(engine.positions), (loaded, n)
    assert all(len(p.orders) == 1 and p.trailing is not None for p in engine.positions.values())
    await repo.close()
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--pg", help="also measure on this PostgreSQL admin URL (a scratch database is made)")
    args = parser.parse_args()
    from loguru import logger

    logger.remove()
    for n in args.sizes:
        path = Path(tempfile.mkdtemp()) / "bench.sqlite"
        await seed(f"sqlite:///{path}", n)
        elapsed = await measure(f"sqlite:///{path}", n)
        print(f"sqlite      {n:>7} live positions rehydrated in {elapsed:6.3f} s ({n / elapsed:,.0f}/s)")
        if args.pg:
            from bench.pgscratch import scratch_database

            async with scratch_database(args.pg) as url:
                await seed(url, n)
                elapsed = await measure(url, n)
            print(f"postgresql  {n:>7} live positions rehydrated in {elapsed:6.3f} s ({n / elapsed:,.0f}/s)")


if __name__ == "__main__":
    asyncio.run(main())
