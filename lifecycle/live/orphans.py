"""The orphan sweep: working orders of ours (client id `lc-...`) whose position is not live here.

Such an order is cancelled and recorded, under the symbol's stop lock like every other stop mutation (a move
or a terminal cleanup in flight finishes first, and a position that came alive meanwhile keeps its order).
Orders outside our namespace are never touched. The database decides whether a position unknown to this
process is live elsewhere (another engine process holds it); a database that fails or hangs leaves the
order for the next sweep: the books only decide, they never hold protection up.
"""
from __future__ import annotations

import asyncio

from loguru import logger

from lifecycle.account import OrphanSweep
from lifecycle.client_ids import parse_client_id
from lifecycle.domain import OrderRef, OrderStatus
from lifecycle.errors import OrderAlreadyGone
from lifecycle.live.context import LiveContext
from lifecycle.record_kinds import OrphanCancelled

# Every this many sweeps (the first included) the listing covers every symbol, not only the account's own.
FULL_SWEEP_EVERY = 10


class Orphans:
    def __init__(self, ctx: LiveContext) -> None:
        self.ctx = ctx
        self.sweeps = 0

    def _live_here(self, position_id: str) -> bool:
        position = self.ctx.engine.positions.get(position_id)
        return position is not None and position.account == self.ctx.account and not position.is_terminal

    async def sweep(self) -> OrphanSweep:
        ctx, engine = self.ctx, self.ctx.engine
        cancelled, foreign, undecided = 0, 0, 0
        full = self.sweeps % FULL_SWEEP_EVERY == 0  # the first sweep (at start) and every tenth: every symbol
        self.sweeps += 1
        for order in await ctx.list_open_orders(full=full):
            ours = parse_client_id(order.client_id)
            if ours is None:
                foreign += 1
                continue
            if self._live_here(ours.position_id):
                continue
            try:
                stored = await asyncio.wait_for(engine.store.get_position(ours.position_id), engine.books.timeout_s)
            except Exception as e:  # noqa: BLE001 - undecided: the order stays for the next sweep
                undecided += 1
                logger.warning("{} {}: orphan sweep left order {} alone: the database could not say whether "
                               "position {} is live ({}: {})", ctx.account, order.symbol, order.client_id,
                               ours.position_id, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                continue
            if stored is not None and not stored.is_terminal:
                continue  # live in the database: another engine process holds it (or is about to)
            ref = OrderRef(order.client_id or "", ours.position_id, order.symbol, ours.purpose, order.side,
                           order.quantity, OrderStatus.OPEN, order.trigger_price, order.exchange_order_id,
                           order.algo_id)
            async with engine.locks.exclusive(ctx.account, order.symbol):
                if self._live_here(ours.position_id):
                    continue
                try:
                    await ctx.exchange.cancel_order(ref)
                except OrderAlreadyGone:
                    continue
            cancelled += 1
            ctx.stats.orphans_cancelled += 1  # counted as it happens: a sweep that fails later keeps the count
            engine.records.emit(OrphanCancelled(
                account=ctx.account, symbol=order.symbol, position_id=ours.position_id, at=engine.clock(),
                client_order_id=order.client_id, purpose=ours.purpose.value, type=order.type,
                trigger_price=order.trigger_price))
            logger.warning("{} {}: cancelled orphan {} order {} (position {} is not live)", ctx.account,
                           order.symbol, ours.purpose.value, order.client_id, ours.position_id)
        return OrphanSweep(cancelled=cancelled, foreign=foreign, undecided=undecided)
