"""Restart recovery: the venue's word, before any order, on every position loaded from the database."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from loguru import logger

from exchange import errors as xerr
from exchange.port import OrderSnapshot
from lifecycle.client_ids import parse_client_id
from lifecycle.domain import OrderPurpose, OrderStatus
from lifecycle.live.closing import Closing
from lifecycle.live.context import LiveContext, S, short
from lifecycle.live.opening import Opening
from lifecycle.live.stops import Stops
from lifecycle.record_kinds import Recovery as RecoveryRecord
from lifecycle.retry import Backoff, until_done


class Recovery:
    """One account's restart recovery (see `recover`)."""

    def __init__(self, ctx: LiveContext, stops: Stops, opening: Opening, closing: Closing) -> None:
        self.ctx = ctx
        self.stops = stops
        self.opening = opening
        self.closing = closing

    async def recover(self, *, retry_s: float = 2.0) -> dict[str, int]:
        """Restart recovery, before any order is sent: compare the positions loaded from the database with
        a REST snapshot of positions and open orders (regular and conditional), then

        * OPENING: the entry is looked up by its client id (filled: protected; never arrived: CANCELLED);
        * not on the exchange: marked missing; the attached Reconciler settles it with evidence (a closing
          fill ends it with its cause; REST alone never ends it);
        * CLOSING_BY_BOT: the close is resumed with the same client id (a duplicate is refused by the venue);
          closed while still opening (nothing filled): its entry is cancelled, then looked up;
        * OPEN / TS_ACTIVE: stops of ours for the position that the database does not know (placed just
          before a crash) are taken into tracking, then a stop `sync` leaves exactly one working stop at
          the recorded price and size: a missing stop is placed again, duplicates are cancelled.

        If the exchange cannot be reached it says so and retries every `retry_s`: nothing is done on the
        database's word alone.
        """
        positions = await self.until_reachable("positions", self.ctx.exchange.positions, retry_s)
        orders = await self.until_reachable("open orders", self.ctx.exchange.open_orders, retry_s)
        shown = {(s.symbol, s.side) for s in positions}
        ours_by_position: dict[str, list[OrderSnapshot]] = {}
        for order in orders:
            parsed = parse_client_id(order.client_id)
            if parsed is not None:
                ours_by_position.setdefault(parsed.position_id, []).append(order)
        counts = {"positions": 0, "opening": 0, "missing": 0, "closing": 0, "protected": 0}
        now = self.ctx.engine.clock()
        # Only what was loaded from the database: a position opened by a command since the start is this
        # process's own, its entry in flight (taken for "crashed before its entry was recorded", it was once
        # cancelled in the books while its entry filled on the venue, unprotected: tests/test_scale_out.py).
        loaded = self.ctx.loaded
        for position in [p for p in self.ctx.engine.positions.values()
                         if p.account == self.ctx.account and p.id in loaded]:
            counts["positions"] += 1
            entry = next((o for o in position.working_orders() if o.purpose is OrderPurpose.ENTRY), None)
            if position.state is S.OPENING or (position.state is S.CLOSING_BY_BOT and position.quantity == 0):
                counts["opening"] += 1
                if entry is not None and position.state is S.CLOSING_BY_BOT:
                    # A close was asked for while it opened: its entry must not stay working (cancelled, then
                    # looked up; what filled is closed).
                    self.ctx.spawn(self.closing.cancel_entry(position.id), f"entry cancel of {position.id}")
                elif entry is not None:
                    self.ctx.spawn(self.opening.find_entry(position.id, entry), f"entry lookup of {position.id}")
                else:  # crashed between creating the position and recording its entry (or adopting it)
                    snap = next((p for p in positions if p.symbol == position.symbol and p.side is position.side),
                                None)
                    self.ctx.spawn(self.opening.settle_bare_opening(position.id, snap), f"settling {position.id}")
                continue
            if (position.symbol, position.side) not in shown:
                counts["missing"] += 1
                self.ctx.runtime(position.id).missing = now
                continue
            if position.state is S.CLOSING_BY_BOT:
                counts["closing"] += 1
                self.ctx.spawn(self.closing.resume_close(position.id), f"resumed close of {position.id}")
                continue
            counts["protected"] += 1
            open_ids = {o.client_id for o in ours_by_position.get(position.id, [])}
            for order in position.working_orders():
                if order.purpose is OrderPurpose.STOP and order.client_id not in open_ids:
                    self.ctx.gone[order.client_id] = None  # gone while we were down
                    await self.ctx.set_order_status(position.id, order.client_id, OrderStatus.EXPIRED)
            for order in ours_by_position.get(position.id, []):
                parsed = parse_client_id(order.client_id)
                if (parsed is not None and parsed.purpose is OrderPurpose.STOP
                        and order.client_id not in position.orders):
                    await self.ctx.track(position, order.client_id or "", OrderPurpose.STOP, order.quantity,
                                      order.trigger_price or Decimal(0), order)
            # A tighter stop of ours than the database knows (moved while the books were behind) stays.
            await self.stops.adopt_venue_stop(position.id, ours_by_position.get(position.id, []))
            position = self.ctx.engine.positions.get(position.id) or position
            if position.stop_price is None:  # crashed between the entry fill and the first stop's record
                self.ctx.spawn(self.opening.protect_initial(position.id, replace_unrecorded=True),
                            f"protection of {position.id}")
            else:
                self.ctx.spawn(self.stops.request(position.id, None, None, "sync"), f"stop check of {position.id}")
        if counts["missing"]:
            for hook in list(self.ctx.after_resync):
                self.ctx.spawn(hook(), "reconciliation after recovery")
        self.ctx.recovered.set()
        self.ctx.engine.records.emit(RecoveryRecord(account=self.ctx.account, symbol=None, position_id=None,
                                              at=self.ctx.engine.clock(), **counts))
        logger.info("{}: recovery: {}", self.ctx.account, counts)
        return counts

    async def until_reachable(self, what: str, call: Callable[[], Awaitable[Any]], retry_s: float) -> Any:
        return await until_done(call, retry_on=(xerr.Retryable,), backoff=Backoff.fixed(retry_s),
                                on_retry=lambda attempt, e, delay: logger.error(
                                    "{}: recovery cannot read {} from the exchange ({}); nothing is done on the "
                                    "database's word alone; retry {} in {}s", self.ctx.account, what, short(e),
                                    attempt, delay))
