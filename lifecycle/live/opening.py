"""Opening: the open command, the entry's fate, the first stop, and adoption.

An open command creates the position (OPENING) and sends its entry; the entry's fill (from the order
stream or the order's own answer, whichever comes first) moves it to OPEN, and the initial reduce-only
stop is placed at once. A stop that cannot be placed closes the position at market (reason
`unprotected`); one that would already be crossed closes it with reason `stop_crossed` (through
`Stops.on_result`). An entry whose answer was lost is looked up by its client id until its outcome is
known; a partly filled entry has its rest cancelled and is protected with what filled.
"""
from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from loguru import logger

from exchange import errors as xerr
from exchange.port import OrderSnapshot, PositionSnapshot
from lifecycle.client_ids import make_client_id
from lifecycle.domain import CloseReason, OrderPurpose, OrderRef, OrderStatus, Position, Side
from lifecycle.errors import InvalidEvent, OrderAlreadyGone, PositionConflict, StorageUnavailable
from lifecycle.events import CloseFailed, EntryFailed, EntryFilled
from lifecycle.live.closing import Closing
from lifecycle.live.config import OpenCommand
from lifecycle.live.context import LiveContext, S, multiple, short
from lifecycle.live.stops import StopResult, Stops
from lifecycle.live.stream_view import StreamView
from lifecycle.live.trailing_watch import TrailingWatch
from lifecycle.machines.states import FLATTENABLE, PROTECTED
from lifecycle.record_kinds import Adopted


class Opening:
    """One account's opens, entries, first stops and adoptions (see the module docstring)."""

    def __init__(self, ctx: LiveContext, view: StreamView, stops: Stops, trailing: TrailingWatch,
                 closing: Closing) -> None:
        self.ctx = ctx
        self.view = view
        self.stops = stops
        self.trailing = trailing
        self.closing = closing
        self.open_locks: dict[str, asyncio.Lock] = {}  # symbol -> held from an open's checks to its live row
        self.entry_lookups: set[str] = set()  # positions whose entry is being looked up by its client id
        self.entry_tasks: dict[str, asyncio.Task[Any]] = {}  # entry fills being taken in

    def _drop_plan(self, position_id: str) -> OpenCommand | None:
        runtime = self.ctx.peek(position_id)
        if runtime is None:
            return None
        plan, runtime.plan = runtime.plan, None
        return plan

    async def open(self, command: OpenCommand) -> Position:
        """Create the position and send its entry; the fill and the initial stop follow on their own.

        A definite rejection ends the position CANCELLED and is raised. An answer that never came (timeout,
        5xx) may hide an order the venue accepted: the position stays OPENING, the order is looked up by
        its client id in the background, and the position is returned. Refused while stopping.
        """
        self.ctx.command(f"opening {command.symbol}")
        self.ctx.commands += 1
        try:
            return await self.open_now(command)
        finally:
            self.ctx.commands -= 1

    async def open_now(self, command: OpenCommand) -> Position:
        # One open at a time per symbol until its position is live in memory: two concurrent opens (of either
        # side) must not both pass the checks before either is recorded, and net on the venue.
        lock = self.open_locks.setdefault(command.symbol, asyncio.Lock())
        async with lock:
            self.check_open(command)  # before any row: a refused command leaves nothing behind
            position = await self.ctx.engine.open_position(account=self.ctx.account, symbol=command.symbol,
                                                       side=command.side, quantity=command.quantity,
                                                       trailing=command.trailing())
        self.ctx.runtime(position.id).plan = command
        client_id = make_client_id(position.id, OrderPurpose.ENTRY, 0)
        ref = OrderRef(client_id, position.id, command.symbol, OrderPurpose.ENTRY, command.side.entry_order_side,
                       command.quantity, OrderStatus.NEW, trigger_price=command.entry_price)
        try:
            await self.ctx.engine.track_order(position.id, ref)  # known before it is sent: a crash can look it up
            if self.ctx.engine.books.behind:  # the entry's row is not in the database: take no new exposure
                raise StorageUnavailable(f"the database is failing ({self.ctx.engine.books.failing}); entry not sent")
            self.ctx.placing.add(position.id)
            try:
                answer = await self.ctx.exchange.place_entry(command.symbol, command.side, command.quantity, client_id,
                                                         command.entry_price)
            finally:
                self.ctx.placing.discard(position.id)
        except xerr.Retryable as e:
            self.ctx.stats.exchange_errors += 1
            logger.warning("{} {} {} entry not confirmed ({}); looking it up by its client id", self.ctx.account,
                           command.symbol, position.id, short(e))
            self.ctx.spawn(self.find_entry(position.id, ref), f"entry lookup of {position.id}")
            return position
        except asyncio.CancelledError:  # the entry may be on its way: look it up rather than assume
            self.ctx.spawn(self.find_entry(position.id, ref), f"entry lookup of {position.id}", essential=True)
            raise
        except Exception as e:
            # Rejected, refused before sending, or a failure of our own: nothing is working on the venue for
            # it (a Retryable above is the only answer that may hide an accepted order), so it ends CANCELLED
            # and never blocks the symbol.
            if isinstance(e, xerr.ExchangeError):
                self.ctx.stats.exchange_errors += 1
                logger.error("{} {} {} entry rejected: {}", self.ctx.account, command.symbol, position.id, e)
            else:
                logger.error("{} {} {} entry not sent: {}: {}", self.ctx.account, command.symbol, position.id,
                             type(e).__name__, short(e))
            self._drop_plan(position.id)
            await asyncio.shield(self.entry_not_sent(position.id, client_id, short(e)))
            raise
        self.handle_entry_update(position.id, answer)
        return position

    async def entry_not_sent(self, position_id: str, client_id: str, why: str) -> None:
        await self.ctx.set_order_status(position_id, client_id, OrderStatus.REJECTED)
        # Also when a close came while the entry was on its way (CLOSING_BY_BOT with nothing filled): a refused
        # entry settles it, CANCELLED (soak seeds 511134, 514702, 514745: it stayed CLOSING_BY_BOT for good).
        await self.ctx.engine.fire_if(position_id, EntryFailed(reason=why[:200] or "entry not sent"),
                                      only_in={S.OPENING, S.CLOSING_BY_BOT})

    def check_open(self, command: OpenCommand) -> None:
        """Refuse what the venue would refuse, or what would hurt, before anything is created or sent."""
        if command.symbol not in self.ctx.symbols:
            raise InvalidEvent(f"{command.symbol} is not one of the watched symbols {self.ctx.symbols}")
        other = command.side.opposite
        held = self.ctx.engine.live_position(self.ctx.account, command.symbol, other)
        if held is not None:
            # One-way mode nets a symbol's orders: this entry would reduce or flip our own position.
            raise PositionConflict(f"{self.ctx.account} {command.symbol}: a {other.value} position of ours is live "
                                   f"({held.id}, {held.state.value}); the venue nets one symbol in one-way mode, so "
                                   f"a {command.side.value} cannot be opened until it has ended")
        rules = self.ctx.exchange.order_rules(command.symbol)
        quantity = command.quantity
        if rules.max_quantity is not None and quantity > rules.max_quantity:
            raise InvalidEvent(f"quantity {quantity} is above {command.symbol}'s maximum {rules.max_quantity}")
        if rules.min_quantity is not None and quantity < rules.min_quantity:
            raise InvalidEvent(f"quantity {quantity} is below {command.symbol}'s minimum {rules.min_quantity}")
        if rules.step is not None and rules.step > 0 and not multiple(quantity, rules.step):
            raise InvalidEvent(f"quantity {quantity} is not a multiple of {command.symbol}'s step {rules.step}")
        for name in ("entry_price", "take_profit", "trailing_activation"):
            price = getattr(command, name)
            if price is None:
                continue
            if rules.max_price is not None and price > rules.max_price:
                raise InvalidEvent(f"{name} {price} is above {command.symbol}'s maximum price {rules.max_price}")
            if rules.min_price is not None and price < rules.min_price:
                raise InvalidEvent(f"{name} {price} is below {command.symbol}'s minimum price {rules.min_price}")
        if command.entry_price is not None and not multiple(command.entry_price, rules.tick):
            raise InvalidEvent(f"entry_price {command.entry_price} is not a multiple of {command.symbol}'s tick "
                               f"{rules.tick}")
        mark = self.ctx.marks.get(command.symbol)
        reference = command.entry_price or mark
        if reference is not None:
            pct = command.stop_loss_pct if command.stop_loss_pct is not None else self.ctx.config.default_stop_loss_pct
            factor = 1 - pct / 100 if command.side is Side.LONG else 1 + pct / 100
            stop = self.ctx.round_stop(command.side, command.symbol, reference * factor)
            if stop <= 0 or (rules.min_price is not None and stop < rules.min_price) or (
                    rules.max_price is not None and stop > rules.max_price):
                raise InvalidEvent(f"stop_loss_pct {pct} puts the stop at {stop}, outside {command.symbol}'s price "
                                   "filter: the position could not be protected")
        if rules.min_notional is not None and reference is not None and quantity * reference < rules.min_notional:
            raise InvalidEvent(f"order value {quantity * reference} is below {command.symbol}'s minimum "
                               f"{rules.min_notional}")
        if command.take_profit is not None:
            if mark is None:
                raise InvalidEvent(f"no mark price for {command.symbol} yet; a take-profit cannot be checked")
            sign = 1 if command.side is Side.LONG else -1
            for what, price in (("the mark", mark), ("the entry price", command.entry_price)):
                if price is not None and (command.take_profit - price) * sign <= 0:
                    raise InvalidEvent(f"take_profit {command.take_profit} is on the wrong side of {what} {price} "
                                       f"for a {command.side.value}: it would close at once")
            if not mark / 10 <= command.take_profit <= mark * 10:
                raise InvalidEvent(f"take_profit {command.take_profit} is more than ten times away from the mark "
                                   f"{mark}")
        if command.entry_price is not None and mark is not None and not mark / 10 <= command.entry_price <= mark * 10:
            raise InvalidEvent(f"entry_price {command.entry_price} is more than ten times away from the mark {mark}")

    async def find_entry(self, position_id: str, ref: OrderRef) -> None:
        """After an unconfirmed entry: the venue's answer for its client id decides (stream updates may too).

        "Not found" several times in a row, spaced out, means it never arrived (CANCELLED). Lookups that
        fail go on with a growing delay (capped at 30 s) until the entry is settled: an entry of unknown
        state may be exposure without a stop, so it is never given up on.
        """
        if position_id in self.entry_lookups:
            return  # one lookup per entry is enough
        self.entry_lookups.add(position_id)
        try:
            await self.look_up_entry(position_id, ref)
        finally:
            self.entry_lookups.discard(position_id)

    async def look_up_entry(self, position_id: str, ref: OrderRef) -> None:
        not_found, attempt = 0, 0
        while not self.ctx.stopping:
            attempt += 1
            await asyncio.sleep(self.ctx.backoff.delay(attempt))
            if self.ctx.entry_done(position_id) or position_id not in self.ctx.engine.positions:
                return
            if position_id in self.ctx.placing:
                continue  # still being sent: "not found" now says nothing (its answer settles it)
            try:
                found = await self.ctx.exchange.order_by_client_id(ref.symbol, ref.client_id)
            except OrderAlreadyGone:
                not_found += 1
                if not_found <= self.ctx.config.stop_retries:
                    continue  # a lagging venue may not list it yet
                if self.ctx.entry_done(position_id):
                    return  # the stream settled it during the lookup
                logger.warning("{} {} {}: the entry never reached the venue", self.ctx.account, ref.symbol, position_id)
                self.ctx.runtime(position_id).entry_done = True
                await self.ctx.engine.fire_if(position_id, EntryFailed(reason="entry never reached the venue"),
                                          only_in={S.OPENING, S.CLOSING_BY_BOT})
                return
            except xerr.ExchangeError as e:
                log = logger.warning if attempt <= self.ctx.config.stop_retries else logger.error
                log("{} {} {}: entry lookup failed ({}); the entry's state is unknown, looking again",
                    self.ctx.account, ref.symbol, position_id, short(e))
                continue
            self.handle_entry_update(position_id, found)
            return

    def handle_entry_update(self, position_id: str, order: OrderSnapshot) -> None:
        runtime = self.ctx.runtime(position_id)
        if runtime.entry_done:
            return
        if order.filled > 0:
            if runtime.entry_fill is None or order.filled > runtime.entry_fill.filled:
                # The entry's last fill: when the position took its size on the venue. Not the final update's
                # time: for a partly filled entry whose rest is cancelled that is the cancel's, and a reduction
                # between the fill and the cancel would look older than the position (chaos seed 400097:
                # never taken in, the stop kept the old size).
                runtime.last_fill_at = order.at
            runtime.entry_fill = order
        if order.status is OrderStatus.FILLED or (order.status.is_final and order.filled > 0):
            runtime.entry_done = True
            runtime.entry_at = runtime.last_fill_at or order.at
            task = self.ctx.spawn(self.entry_filled(position_id, order), f"entry fill of {position_id}",
                               essential=True)
            if task is not None:
                self.entry_tasks[position_id] = task
                task.add_done_callback(lambda t: self.entry_fill_ended(position_id, t))
        elif order.status.is_final:
            runtime.entry_done = True
            self.ctx.spawn(self.ctx.engine.fire_if(position_id, EntryFailed(reason=f"entry {order.status.value}"),
                                            only_in={S.OPENING, S.CLOSING_BY_BOT}), f"entry failure of {position_id}")
        elif order.filled > 0 and not runtime.trimming:
            # Partly filled: the filled part is exposure without a stop. Cancel the rest; the final update
            # (cancelled with a fill) then opens the position with what filled and protects it.
            runtime.trimming = True
            logger.info("{} {} entry partly filled ({}); cancelling the rest", self.ctx.account, position_id,
                        order.filled)
            self.ctx.spawn(self.closing.cancel_entry(position_id), f"entry trim of {position_id}")

    def entry_fill_ended(self, position_id: str, task: asyncio.Task[Any]) -> None:
        if self.entry_tasks.get(position_id) is task:
            del self.entry_tasks[position_id]
        failed = task.cancelled() or task.exception() is not None
        position = self.ctx.engine.positions.get(position_id)
        if failed and position is not None and position.state is S.OPENING:
            # Not taken in: a later update of the entry, or the protection audit, tries again.
            self.ctx.runtime(position_id).entry_done = False
            logger.critical("{} {} {}: the entry filled but could not be taken in; retried by the next update or "
                            "the protection audit", self.ctx.account, position.symbol, position_id)

    async def entry_filled(self, position_id: str, order: OrderSnapshot) -> None:
        price = order.average_price or order.trigger_price
        if price is None:
            raise InvalidEvent(f"entry fill of {position_id} without a price")
        outcome = await self.ctx.engine.fire_if(position_id, EntryFilled(
            quantity=order.filled, price=price, exchange_order_id=order.exchange_order_id),
            only_in={S.OPENING, S.CLOSING_BY_BOT})
        # Protection first; the entry order's own row is bookkeeping and follows in the background.
        self.ctx.spawn(self.ctx.set_order_status(position_id, order.client_id or "", OrderStatus.FILLED, lazy=True),
                    f"entry status of {position_id}", essential=True)
        if outcome is None:
            return
        if outcome.dest is S.CLOSING_BY_BOT:
            reason = self.ctx.engine.positions[position_id].close_reason or CloseReason.OPERATOR
            error = await self.closing.send_close(position_id)
            if error is not None:  # the close loop that asked for it is not running any more: start one
                await self.ctx.engine.fire_if(position_id, CloseFailed(error=short(error)), only_in={S.CLOSING_BY_BOT})
                position = self.ctx.engine.positions.get(position_id)
                if position is not None and position.state in PROTECTED:
                    await self.protect_initial(position_id, close_if_unprotected=False)
                    await self.closing.close_now(position_id, reason)
            return
        await self.protect_initial(position_id)
        self.flat_while_opening(position_id)

    def flat_while_opening(self, position_id: str) -> None:
        """A flat the stream showed while the position was still OPENING (a liquidation right at the fill)
        was not acted on then: once the fill is taken in, the newest position update decides."""
        position = self.ctx.engine.positions.get(position_id)
        entered = self.ctx.entry_at(position_id)
        latest = self.view.live.get(position.symbol) if position is not None else None
        if position is None or position.state not in FLATTENABLE or entered is None or latest is None or \
                latest.at < entered:
            return
        if latest.amount == 0 or latest.side is not position.side:
            self.ctx.spawn(self.closing.on_flat(position_id, latest), f"flat of {position_id}")

    async def protect_initial(self, position_id: str, *, close_if_unprotected: bool = True,
                               from_mark_if_crossed: bool = False, replace_unrecorded: bool = False) -> None:
        """Place the first stop. `replace_unrecorded` (restart recovery): stops of ours found on the exchange
        that no StopMoved recorded (placed just before a crash) are replaced, new one first, not trusted."""
        position = self.ctx.engine.positions.get(position_id)
        if position is None or position.entry_price is None or position.stop_price is not None or (
                not replace_unrecorded and any(o.purpose is OrderPurpose.STOP for o in position.working_orders())):
            return
        if position_id in self.ctx.loaded and not replace_unrecorded:
            # Loaded from a database that may be behind the venue (a storage outage before a restart): a stop
            # of ours working there for this position is the truth to start from, not a new one at the
            # initial distance (which would loosen a stop that had trailed).
            try:
                venue = await self.ctx.exchange.open_orders(position.symbol)
            except xerr.ExchangeError as e:
                logger.warning("{} {} {}: cannot list the venue's stops before protecting ({}); placing one",
                               self.ctx.account, position.symbol, position_id, short(e))
                venue = []
            if await self.stops.adopt_venue_stop(position_id, venue):
                await self.stops.request(position_id, None, None, "sync")  # and no other stop of ours
                self.trailing.watch_position(self.ctx.engine.positions.get(position_id) or position)
                return
        plan = self._drop_plan(position_id)
        target = self.stops.initial_target(position, plan, from_mark_if_crossed=from_mark_if_crossed)
        placed = await self.stops.request(position_id, target, None, "initial")
        if placed is StopResult.FAILED:
            logger.error("{} {} {}: no stop could be placed; closing at market (unprotected)", self.ctx.account,
                         position.symbol, position_id)
            if close_if_unprotected:
                await self.closing.close_now(position_id, CloseReason.UNPROTECTED)
            return
        self.trailing.watch_position(self.ctx.engine.positions.get(position_id) or position)
        if plan is not None and plan.take_profit is not None and placed is StopResult.PLACED:
            await self.stops.place_take_profit(position_id, plan.take_profit)

    async def adopt(self, snap: PositionSnapshot) -> Position:
        """Track a position found on the exchange (opened by hand, or before a crash) as OPEN and protect it
        with the default stop distance: from its entry price, or from the mark if that stop is already
        crossed (an adopted position is protected, not closed at once). Refused while stopping."""
        self.ctx.command(f"adopting {snap.symbol}")
        self.ctx.commands += 1
        try:
            return await self.adopt_now(snap)
        finally:
            self.ctx.commands -= 1

    async def adopt_now(self, snap: PositionSnapshot) -> Position:
        if snap.side is None:
            raise InvalidEvent(f"{snap.symbol}: nothing to adopt (flat)")
        quantity = abs(snap.amount)
        position = await self.ctx.engine.open_position(account=self.ctx.account, symbol=snap.symbol, side=snap.side,
                                                   quantity=quantity)
        self.ctx.runtime(position.id).entry_done = True
        await self.ctx.engine.fire(position.id, EntryFilled(quantity=quantity, price=snap.entry_price))
        logger.warning("{} {} {}: adopted an untracked {} position of {} (entry {})", self.ctx.account, snap.symbol,
                       position.id, snap.side, quantity, snap.entry_price)
        self.ctx.engine.records.emit(Adopted(
            account=self.ctx.account, symbol=snap.symbol, position_id=position.id, at=self.ctx.engine.clock(),
            side=snap.side.value, quantity=quantity, entry_price=snap.entry_price))
        await self.protect_initial(position.id, from_mark_if_crossed=True)
        return self.ctx.engine.positions.get(position.id) or position

    async def settle_bare_opening(self, position_id: str, snap: PositionSnapshot | None) -> None:
        """An OPENING position without an entry order: its entry was never sent (recorded before sending),
        or it was being adopted. What the exchange shows on its symbol and side decides: a position there
        is filled into it and protected (it holds the one live slot for that symbol and side, so nothing
        else would protect it); none, and it never opened (CANCELLED)."""
        if snap is None or snap.side is None:
            logger.warning("{} {}: OPENING with no entry order and nothing on the exchange: never opened",
                           self.ctx.account, position_id)
            await self.ctx.engine.fire_if(position_id, EntryFailed(reason="entry never sent"),
                                      only_in={S.OPENING, S.CLOSING_BY_BOT})
            return
        quantity = abs(snap.amount)
        logger.warning("{} {} {}: OPENING with no entry order, the exchange holds {} {}: taking it and protecting "
                       "it", self.ctx.account, snap.symbol, position_id, snap.side.value, quantity)
        self.ctx.runtime(position_id).entry_done = True
        outcome = await self.ctx.engine.fire_if(position_id, EntryFilled(quantity=quantity, price=snap.entry_price),
                                            only_in={S.OPENING})
        if outcome is not None:
            await self.protect_initial(position_id, from_mark_if_crossed=True)

    def entry_time(self, position_id: str) -> datetime | None:
        """When this position's entry filled, by the venue's clock (None: not known in this process)."""
        return self.ctx.entry_at(position_id)
