"""Closes: the bot's close, the entry cancel of a position closed while opening, and what the venue's flats
and reductions mean for a position.

A bot close sends a reduce-only market order with an idempotent client id; a rejected close returns the
position to its previous state and is retried. A flat (quantity 0 on the stream) ends the position with
the cause of the trades that flattened it (`TradeBook.trades_of`, then the algo order that fired, then
REST). A reduction resizes the stop. `after_stop` is where a stop that could not be placed becomes a close
(wired into `Stops` by the engine). Two callbacks into the opening side are wired by the engine too
(`protect_initial`, `find_entry`), so this module imports nothing of it.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from loguru import logger

from exchange import errors as xerr
from exchange.port import PositionSnapshot, protective
from lifecycle.causes import classify_close
from lifecycle.client_ids import make_client_id
from lifecycle.domain import CloseCause, CloseReason, OrderPurpose, OrderRef, OrderStatus
from lifecycle.errors import OrderAlreadyGone, UnknownPosition
from lifecycle.events import CloseFailed, CloseRequested, Flat, Reduced
from lifecycle.live.context import LiveContext, S, short
from lifecycle.live.stops import StopResult, Stops
from lifecycle.live.stream_view import StreamView
from lifecycle.live.trades import Found, Taking, flattening, trade_figures
from lifecycle.machines.states import FLATTENABLE, PROTECTED
from lifecycle.record_kinds import Reduction
from lifecycle.retry import RetryAbandoned, until_done


class Closing:
    """One account's closes, flats and reductions (see the module docstring)."""

    def __init__(self, ctx: LiveContext, view: StreamView, stops: Stops) -> None:
        self.ctx = ctx
        self.view = view
        self.stops = stops
        self.close_found_flat: set[str] = set()  # our close refused as reduce-only: the position was already flat
        self.reducing: dict[str, int] = {}  # positions with a reduction being taken in (how many)
        # Wired by the engine (the opening side): protect a position's first stop; look its entry up.
        self.protect_initial: Callable[..., Awaitable[None]] = _unwired
        self.find_entry: Callable[..., Awaitable[None]] = _unwired

    def after_stop(self, position_id: str, result: StopResult) -> None:
        """A stop that could not be sent (the mark is beyond it), or a position left with no stop at all:
        closed at market, whatever else is in flight (essential: also while stopping)."""
        reason = CloseReason.STOP_CROSSED if result is StopResult.CROSSED else CloseReason.UNPROTECTED
        what = "stop-crossed" if result is StopResult.CROSSED else "unprotected"
        self.ctx.spawn(self._safety_close(position_id, reason), f"{what} close of {position_id}", essential=True)

    async def _safety_close(self, position_id: str, reason: CloseReason) -> None:
        """`close_now`; a position that ended before this close started (the stop being resized filled meanwhile)
        has nothing to close: said at INFO, not an ERROR (review of d98b17f)."""
        try:
            await self.close_now(position_id, reason)
        except UnknownPosition:
            logger.info("{} {}: ended before its {} close started: nothing to close", self.ctx.account, position_id,
                        reason.value)

    async def close(self, position_id: str, reason: CloseReason = CloseReason.OPERATOR) -> bool:
        """Close a position at market with a reduce-only order; False if it had already moved on.

        A position still OPENING goes to CLOSING_BY_BOT and its entry is cancelled: nothing filled ends it
        CANCELLED, a fill (late or partial) is closed at once. A rejected close returns the position to
        its previous state and is retried `close_retries` times, and for as long as it takes while the
        position has no stop on the exchange (a loop, with a delay floor: it cannot spin or recurse).
        Refused while stopping (the engine's own safety closes are not).
        """
        self.ctx.command(f"closing {position_id}")
        self.ctx.commands += 1
        try:
            return await self.close_now(position_id, reason)
        finally:
            self.ctx.commands -= 1

    async def close_now(self, position_id: str, reason: CloseReason = CloseReason.OPERATOR) -> bool:
        position = self.ctx.engine.positions.get(position_id)
        if position is None:
            raise UnknownPosition(f"no live position {position_id}")
        allowed = PROTECTED | {S.OPENING}
        retry = 0
        while True:
            outcome = await self.ctx.engine.fire_if(position_id, CloseRequested(reason=reason), only_in=allowed)
            if outcome is None:
                return retry > 0
            if outcome.source is S.OPENING:
                await self.cancel_entry(position_id)
            error = await self.send_close(position_id)
            if error is None:
                return True
            failed = await self.ctx.engine.fire_if(position_id, CloseFailed(error=short(error)),
                                               only_in={S.CLOSING_BY_BOT})
            if failed is None:
                return True  # ended meanwhile (the flat came first)
            current = self.ctx.engine.positions.get(position_id)
            if current is None:
                return True
            stop = next((o for o in current.working_orders() if o.purpose is OrderPurpose.STOP), None)
            if failed.dest in PROTECTED and stop is None and current.quantity > 0:
                # Filled, no stop (a late fill of an entry being closed, or the stop failed): protect it
                # while the close is retried.
                self.ctx.spawn(self.protect_initial(position_id, close_if_unprotected=False),
                            f"protection of {position_id}", essential=True)
            retry += 1
            unprotected = failed.dest in PROTECTED and stop is None
            if retry > self.ctx.config.close_retries and not unprotected:
                logger.error("{} {} close rejected {} times; the position stays {} with its stop at {}",
                             self.ctx.account, position_id, retry, failed.dest, stop.trigger_price if stop else None)
                return False
            delay = self.ctx.backoff.delay(max(1, retry - self.ctx.config.close_retries))
            if retry <= self.ctx.config.close_retries:
                logger.warning("{} {} close rejected ({}); retry {} of {} in {}s", self.ctx.account, position_id,
                               short(error), retry, self.ctx.config.close_retries, delay)
            else:
                logger.critical("{} {} UNPROTECTED: no stop on the exchange and the close was rejected {} times "
                                "({}); retrying in {}s", self.ctx.account, position_id, retry, short(error), delay)
            await asyncio.sleep(delay)
            allowed = PROTECTED

    async def cancel_entry(self, position_id: str) -> None:
        """Cancel the entry of a position being closed (or trimmed). An entry still on its way is waited for
        first (a cancel that overtakes it finds nothing, and the entry lands afterwards). A cancel that is not
        confirmed is sent again in the background (the caller, an API request or a stop, does not wait for
        an outage); the entry is then looked up until its outcome is known."""
        position = self.ctx.engine.positions.get(position_id)
        entry = next((o for o in position.working_orders() if o.purpose is OrderPurpose.ENTRY), None) \
            if position is not None else None
        if entry is None:
            return
        while position_id in self.ctx.placing and not self.ctx.stopped:
            await asyncio.sleep(0.02)  # the send's own answer (or its timeout) comes first
        try:
            await self.ctx.exchange.cancel_order(entry)
        except OrderAlreadyGone:  # filled meanwhile, or never arrived: its own state decides
            logger.info("{} {} {} entry already ended; its fill decides", self.ctx.account, entry.symbol, position_id)
        except xerr.Retryable as e:
            self.ctx.stats.exchange_errors += 1
            logger.warning("{} {} {} entry cancel not confirmed ({}); sending it again in the background",
                           self.ctx.account, entry.symbol, position_id, short(e))
            self.ctx.spawn(self.cancel_entry_again(position_id, entry), f"entry cancel of {position_id}",
                        essential=True)
            return
        self.settle_entry(position_id, entry)

    async def cancel_entry_again(self, position_id: str, entry: OrderRef) -> None:
        """A resting entry of a position being closed must not stay working (it could fill later, without a
        stop): the cancel is sent again, slower and slower, until it is confirmed or the entry has ended.
        A stopping engine leaves it to restart recovery (which cancels the entry of a closing position)."""
        attempt = 0
        while not self.ctx.stopping:
            attempt += 1
            await asyncio.sleep(self.ctx.backoff.delay(attempt))
            current = self.ctx.engine.positions.get(position_id)
            if current is None or current.state not in (S.OPENING, S.CLOSING_BY_BOT) or \
                    self.ctx.entry_done(position_id):
                return
            try:
                await self.ctx.exchange.cancel_order(entry)
            except OrderAlreadyGone:
                pass
            except xerr.Retryable as e:
                self.ctx.stats.exchange_errors += 1
                logger.warning("{} {} {} entry cancel not confirmed ({}); again", self.ctx.account, entry.symbol,
                               position_id, short(e))
                continue
            self.settle_entry(position_id, entry)
            return

    def settle_entry(self, position_id: str, entry: OrderRef) -> None:
        """The entry's outcome (cancelled, filled, or never arrived) ends the position or closes what filled;
        the stream usually says it, but a stream that is down must not leave it CLOSING_BY_BOT with nothing
        known filled: look the entry up until it is settled."""
        if not self.ctx.entry_done(position_id):
            self.ctx.spawn(self.find_entry(position_id, entry), f"entry lookup of {position_id}", essential=True)

    async def send_close(self, position_id: str) -> Exception | None:
        """Send the reduce-only close of a CLOSING_BY_BOT position; returns the rejection, else None."""
        position = self.ctx.engine.positions.get(position_id)
        if position is None or position.state is not S.CLOSING_BY_BOT:
            return None
        quantity = position.quantity
        if quantity <= 0:
            return None  # nothing filled yet: a late entry fill sends the close
        client_id = make_client_id(position_id, OrderPurpose.CLOSE, position.seq)
        if client_id not in position.orders:
            await self.ctx.engine.track_order(position_id, OrderRef(
                client_id, position_id, position.symbol, OrderPurpose.CLOSE, position.side.exit_order_side, quantity))
        def resending(attempt: int, e: BaseException, delay: float) -> None:
            # The order may have landed: never "failed", stay CLOSING_BY_BOT (the stop stays too) and resend
            # the same id (reduce-only, so a repeat can never over-close), slower and slower.
            self.ctx.stats.exchange_errors += 1
            log = logger.warning if attempt <= self.ctx.config.close_retries else logger.error
            log("{} {} {} close {} not confirmed ({}); resending the same id in {}s", self.ctx.account,
                position.symbol, position_id, client_id, short(e), delay)

        def moved_on() -> bool:
            current = self.ctx.engine.positions.get(position_id)
            return current is None or current.state is not S.CLOSING_BY_BOT or self.ctx.stopping

        try:
            with protective():  # ahead of the requests waiting for the venue's rate limit (exchange.port)
                answer = await until_done(
                    lambda: self.ctx.exchange.close_position(position.symbol, position.side, quantity, client_id),
                    retry_on=(xerr.Retryable,), backoff=self.ctx.backoff, on_retry=resending, give_up=moved_on)
        except RetryAbandoned:
            return None
        except (xerr.DuplicateOrder, xerr.ReduceOnlyRejected) as e:
            # The first try arrived, or the position is already gone: the stream's flat ends it.
            logger.info("{} {} {} close {}: {}", self.ctx.account, position.symbol, position_id, client_id,
                        short(e))
            if isinstance(e, xerr.ReduceOnlyRejected):
                self.close_found_flat.add(position_id)  # whatever flattened it, it was not this close
            return None
        except xerr.ExchangeError as e:
            self.ctx.stats.exchange_errors += 1
            await self.ctx.set_order_status(position_id, client_id, OrderStatus.REJECTED)
            return e
        await self.ctx.set_order_status(position_id, client_id, answer.status)
        return None

    async def resume_close(self, position_id: str) -> None:
        position = self.ctx.engine.positions.get(position_id)
        reason = position.close_reason if position is not None and position.close_reason else CloseReason.OPERATOR
        error = await self.send_close(position_id)
        if error is None:
            return
        outcome = await self.ctx.engine.fire_if(position_id, CloseFailed(error=short(error)),
                                                only_in={S.CLOSING_BY_BOT})
        if outcome is not None and outcome.dest in PROTECTED:
            await self.stops.request(position_id, None, None, "sync")
            await self.close_now(position_id, reason)

    async def on_flat(self, position_id: str, snap: PositionSnapshot) -> None:
        """The stream shows the position flat: end it with the cause of the trades that flattened it (waited for up
        to `cause_wait_s`), else of our conditional order that fired, else of the fill REST lists. The trades are
        taken under the position's lock (`TradeBook.take`), after any reduction that took some of them; when
        another event took them meanwhile, the wait goes on until the deadline."""
        position = self.ctx.engine.positions.get(position_id)
        if position is None:
            return
        deadline = self.ctx.monotonic() + self.ctx.config.cause_wait_s
        fallback: Found | None = None  # what our conditional order that fired, or REST, said (asked once)
        while True:
            arrived = await self.view.trades_arrived(position, snap, deadline)
            current = self.view.live.get(snap.symbol)
            if current is not None and current.side is position.side and current.at > snap.at:
                return  # a newer update shows the position again: that flat was stale
            position = self.ctx.engine.positions.get(position_id)  # as it is now, after the wait
            if position is None:
                return
            if not arrived and fallback is None:
                fallback = await self.view.cause_without_trades(position)
            attempt = Taking(arrived, deadline)
            try:
                outcome = await self.ctx.engine.fire_if(
                    position_id, partial(self._flat_event, position_id, snap, attempt, fallback or Found()),
                    only_in=FLATTENABLE)
            except BaseException:
                live = self.ctx.engine.positions.get(position_id)
                if live is not None and not live.is_terminal:
                    self.view.trades.give_back(attempt.taken)  # not applied: the trades are free again
                raise
            if not attempt.again:
                break
        self.close_found_flat.discard(position_id)
        if outcome is None:
            return
        self.view.wake(snap.symbol)
        self.view.closed_with_cause(position, attempt.cause, attempt.source)

    def _flat_event(self, position_id: str, snap: PositionSnapshot, attempt: Taking, fallback: Found
                    ) -> Flat | None:
        """The flat, made under the position's lock: with the trades that flattened it (after any reduction that
        took some of them; their updates may also have come while REST was asked), else with `fallback`."""
        live = self.ctx.engine.positions[position_id]
        if not attempt.take(self.view.trades, live, snap, self.ctx.monotonic()):
            return None
        found = fallback
        if attempt.taken:
            closer = flattening(attempt.taken, live.quantity)
            trailing = live.trailing is not None and live.trailing.active
            found = Found(classify_close(closer.client_id, position_id=position_id, trailing_was_active=trailing),
                          "fill_update", closer.order.average_price, closer.order.exchange_order_id,
                          *trade_figures(attempt.taken))
        cause, source = found.cause, found.source
        if live.state is S.CLOSING_BY_BOT and cause is CloseCause.UNKNOWN and position_id not in self.close_found_flat:
            cause, source = None, "none"  # our close is in flight, nothing else found: the state's default (bot)
        elif cause is CloseCause.BOT and live.state is not S.CLOSING_BY_BOT:
            cause = CloseCause.UNKNOWN  # our close order, but not in flight: do not claim it
        attempt.cause, attempt.source = cause, source
        return Flat(cause=cause, exit_price=found.exit_price, exchange_order_id=found.order_id,
                    realized_pnl=found.realized_pnl, fee=found.fee, exchange_ts_ms=int(snap.at.timestamp() * 1000),
                    cause_source=source)

    def take_reduction(self, position_id: str, snap: PositionSnapshot) -> bool:
        """A reduction seen on REST only (reconciliation): taken in as the stream's would have been, in the
        background (its cause wait must not hold up the reconciliation pass); not while one is being taken
        (False then)."""
        if position_id in self.reducing:
            return False
        self.reducing[position_id] = 0  # pending from now, not from when the task starts
        if self.ctx.spawn(self.on_reduced(position_id, snap), f"reduction of {position_id}") is None:
            del self.reducing[position_id]
            return False
        return True

    async def on_reduced(self, position_id: str, snap: PositionSnapshot) -> None:
        self.reducing[position_id] = self.reducing.get(position_id, 0) + 1
        try:
            await self.take_reduced(position_id, snap)
        finally:
            self.reducing[position_id] -= 1
            if not self.reducing[position_id]:
                del self.reducing[position_id]

    async def take_reduced(self, position_id: str, snap: PositionSnapshot) -> None:
        """The stream (or REST) shows the position smaller: book the reduction with the trades that made it
        (waited for up to `cause_wait_s`, taken under the position's lock: `TradeBook.take`), and resize the
        stop."""
        position = self.ctx.engine.positions.get(position_id)
        if position is None:
            return
        remaining = abs(snap.amount)
        deadline = self.ctx.monotonic() + self.ctx.config.cause_wait_s
        runtime = self.ctx.runtime(position_id)
        while True:
            arrived = await self.view.trades_arrived(position, snap, deadline)
            current = self.ctx.engine.positions.get(position_id)
            if current is None or not 0 < remaining < current.quantity:
                return  # taken in meanwhile (the stream and reconciliation can both see one reduction)
            attempt = Taking(arrived, deadline)
            try:
                outcome = await self.ctx.engine.fire_if(
                    position_id, partial(self._reduced_event, position_id, snap, attempt), only_in=FLATTENABLE)
            except BaseException:
                live = self.ctx.engine.positions.get(position_id)
                if live is not None and live.seq > attempt.seq >= 0:  # committed, then cancelled: it stands
                    runtime.reduced_by.update(attempt.orders())
                else:  # refused: nothing booked (no other taker ran since: one lock)
                    self.view.trades.give_back(attempt.taken)
                raise
            if not attempt.again:
                break
        if outcome is None:
            return
        taken = attempt.taken
        runtime.reduced_by.update(attempt.orders())
        self.view.wake(snap.symbol)
        realized, fee = trade_figures(taken)
        now = self.ctx.engine.clock()
        self.ctx.engine.records.emit(Reduction(
            account=self.ctx.account, symbol=position.symbol, position_id=position_id, at=now,
            side=position.side.value, closed_quantity=attempt.before - remaining, remaining=remaining,
            price=taken[0].order.average_price if taken else None, realized_pnl=realized, fee=fee,
            cause=classify_close(taken[0].client_id if taken else None, position_id=position_id,
                                 trailing_was_active=False).value,
            duration_s=round((now - position.created_at).total_seconds(), 3)))
        logger.info("{} {} {} reduced {} -> {}", self.ctx.account, position.symbol, position_id, attempt.before,
                    remaining)
        if outcome.dest in PROTECTED:
            await self.stops.request(position_id, None, None, "sync")

    def _reduced_event(self, position_id: str, snap: PositionSnapshot, attempt: Taking) -> Reduced | None:
        """The reduction, made under the position's lock: from the size the event before left, with the trades
        that made it (taken in the order the position's events are applied)."""
        live = self.ctx.engine.positions[position_id]
        remaining = abs(snap.amount)
        if not remaining < live.quantity:
            # A newer update's reduction got the lock first and took in more than this one says (this update's
            # fill came later): this one is history, not a refusal to count and log.
            return None
        if not attempt.take(self.view.trades, live, snap, self.ctx.monotonic()):
            return None
        attempt.before, attempt.seq = live.quantity, live.seq  # (reductions side by side: each from the one before)
        realized, fee = trade_figures(attempt.taken)
        return Reduced(remaining=remaining, price=attempt.taken[0].order.average_price if attempt.taken else None,
                       realized_pnl=realized, fee=fee)


async def _unwired(*_: Any, **__: Any) -> None:
    raise RuntimeError("Closing is not wired to the opening side (LiveEngine does it)")
