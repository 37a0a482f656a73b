"""Stops: placed, moved, kept in step with the venue, put back; and the take-profit.

Every change of a stop runs under the symbol's stop lock (`StopLockRegistry`), through `request` (which
coalesces requests per owner) or `apply` (for a caller that already holds the lock). The new stop is placed
first and the old one cancelled after (no unprotected window); where the venue refuses a second stop
(Binance -4045 / -4130), the old one is cancelled first and the window measured and recorded. Initial, synced
and restored stops are `protective` requests (ahead of others at the rate limiter; trailing moves are not).
The outcome is a `StopResult`; this module never closes a position: a stop that cannot be sent because the mark
is beyond it (CROSSED), or a position left with no stop at all (LOST), goes to `on_result` (the closing side).
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal
from enum import Enum

from loguru import logger

from exchange import errors as xerr
from exchange.port import OrderSnapshot, protective
from lifecycle.client_ids import make_client_id, parse_client_id
from lifecycle.domain import OrderPurpose, OrderRef, OrderStatus, Position, Side
from lifecycle.errors import OrderAlreadyGone, TransitionRefused, UnknownPosition
from lifecycle.events import StopMoved
from lifecycle.guards.predicates import is_stop_improvement, is_stop_on_safe_side
from lifecycle.live.config import OpenCommand
from lifecycle.live.context import LiveContext, short
from lifecycle.live.stream_view import StreamView
from lifecycle.machines.states import PROTECTED
from lifecycle.record_kinds import StopMove

# Binance codes meaning "no second stop here" (-4045 max stop orders, -4130 a closePosition stop exists).
TWO_STOPS_REFUSED = frozenset({-4045, -4130})


class StopResult(str, Enum):  # noqa: UP042 - a StrEnum would change what str() and f-strings show in logs
    """What a stop request came to (a str: the values are what logs and records say)."""

    PLACED = "placed"  # the stop is working at the target (and recorded)
    SKIPPED = "skipped"  # nothing to do, or no longer wanted (overtaken, ended, already matching)
    TOO_SOON = "too_soon"  # a trailing move within the minimum interval: the next mark after it moves it
    FAILED = "failed"  # not placed; the previous stop (if any) stays
    CROSSED = "crossed"  # not sent: the mark is already beyond it (the position is to be closed)
    LOST = "lost"  # the old stop was cancelled first and nothing could be placed or restored


class StopLost(Exception):
    """Cancel-then-place: the new stop failed and the old one could not be restored."""


class Stops:
    """One account's stop mover (see the module docstring)."""

    def __init__(self, ctx: LiveContext, view: StreamView, on_result: Callable[[str, StopResult], None]) -> None:
        self.ctx = ctx
        self.view = view
        self.on_result = on_result
        self.single_stop: set[str] = set()  # symbols where the venue refused a second stop

    async def request(self, position_id: str, target: Decimal | None, watermark: Decimal | None,
                      mode: str) -> StopResult:
        """Set the position's stop under the symbol lock (see `StopResult`).

        Modes: `initial` (first stop at `target`), `trail` (a better stop at `target`; dropped when no
        longer better or too soon), `sync` (make the exchange match the position: exactly one working stop
        at the position's current stop price and size, read under the lock; after a reduction, or when our
        stop was removed on the exchange; not a machine event). Trail and sync requests coalesce separately
        (different owners), so neither drops the other.
        """
        position = self.ctx.engine.positions.get(position_id)
        if position is None:
            return StopResult.SKIPPED
        owner = position_id if mode != "sync" else f"{position_id}/sync"
        if self.ctx.engine.locks.is_released(position_id):
            return StopResult.SKIPPED
        result = await self.ctx.engine.locks.submit(
            self.ctx.account, position.symbol, owner, (target, watermark, mode),
            lambda request: self.apply(position_id, *request))
        return result.result if result.applied and result.result else StopResult.SKIPPED

    async def apply(self, position_id: str, target: Decimal | None, watermark: Decimal | None,
                    mode: str) -> StopResult:
        """`request`'s work, for a caller that holds the symbol's lock. A stop that could not be sent because
        the mark is beyond it (CROSSED), or a position left with no stop at all (LOST), is reported to
        `on_result`: the stop mover never closes a position itself."""
        result = await self._apply(position_id, target, watermark, mode)
        if result in (StopResult.CROSSED, StopResult.LOST):
            self.on_result(position_id, result)
        return result

    async def _apply(self, position_id: str, target: Decimal | None, watermark: Decimal | None,
                     mode: str) -> StopResult:
        position = self.ctx.engine.positions.get(position_id)
        if position is None or position.state not in PROTECTED:
            return StopResult.SKIPPED
        symbol, side = position.symbol, position.side
        if mode == "sync":
            target = position.stop_price
            if target is None or self.view.is_flat(position):
                return StopResult.SKIPPED  # nothing to match yet, or flat (the flat event ends it)
            working = [o for o in position.working_orders()
                       if o.purpose is OrderPurpose.STOP and o.client_id not in self.ctx.gone]
            if len(working) == 1 and working[0].trigger_price == target and working[0].quantity == position.quantity:
                return StopResult.SKIPPED  # the exchange already matches
        if mode == "trail":
            assert target is not None  # a trailing move always names its stop
            if not is_stop_improvement(side, position.stop_price, target):
                return StopResult.SKIPPED  # overtaken by a move that already went further
            last_moved = position.trailing.last_moved_at if position.trailing is not None else None
            if last_moved is not None and self.ctx.engine.clock() - last_moved < self.ctx.min_interval:
                return StopResult.TOO_SOON  # the next mark after the interval moves it
        assert target is not None
        mark = self.ctx.marks.get(symbol) or position.entry_price
        assert mark is not None
        if not is_stop_on_safe_side(side, target, mark):
            return await self.stop_crossed(position, target, mark, "mark already beyond it")
        quantity = position.quantity
        old = [o for o in position.working_orders() if o.purpose is OrderPurpose.STOP]
        client_id = self.ctx.next_client_id(position, OrderPurpose.STOP)
        calls, window_ms, how = 0, 0.0, "place_then_cancel" if old else "place"
        started = self.ctx.monotonic()
        answer: OrderSnapshot | None = None
        fallback = bool(old) and symbol in self.single_stop  # learnt: this venue takes one stop per symbol
        with protective(mode != "trail"):  # look-ups of lost answers too; a trailing move waits (the old stop holds)
            for attempt in range(0 if fallback else self.ctx.config.stop_retries + 1):
                calls += 1
                try:
                    answer = await self.ctx.exchange.place_stop(symbol, side, quantity, target, client_id)
                    break
                except xerr.StopWouldTrigger:
                    return await self.stop_crossed(position, target, mark, "the exchange answered -2021")
                except xerr.DuplicateOrder as e:
                    # An order with this id is open: an earlier attempt whose answer was lost. It is the answer
                    # only if it is this stop; else (an older stop of ours under a reused id) it is tracked as
                    # what it is, cancelled after the new one, and the new one gets a fresh id.
                    found = await self.ctx.open_order_by_client_id(symbol, client_id)
                    if found is None:
                        return self.stop_failed(position, target, mode, e)
                    if found.trigger_price == target and found.quantity == quantity:
                        answer = found
                        break
                    old.append(await self.ctx.track_foreign_stop(position, client_id, found, target, quantity))
                    position = self.ctx.engine.positions.get(position_id) or position
                    client_id = self.ctx.next_client_id(position, OrderPurpose.STOP)
                except xerr.Rejected as e:
                    if e.code in TWO_STOPS_REFUSED and old:
                        self.single_stop.add(symbol)
                        fallback = True
                        break
                    return self.stop_failed(position, target, mode, e)
                except xerr.Retryable as e:
                    self.ctx.stats.exchange_errors += 1
                    if attempt == self.ctx.config.stop_retries:
                        # Every answer lost: the stop may be working all the same. Found: that is the answer;
                        # found at another price: tracked (so it is cancelled, never left behind), and failed.
                        found = await self.ctx.open_order_by_client_id(symbol, client_id)
                        if found is not None and found.trigger_price == target and found.quantity == quantity:
                            answer = found
                            break
                        if found is not None:
                            await self.ctx.track_foreign_stop(position, client_id, found, target, quantity)
                            self.ctx.spawn(self.request(position_id, None, None, "sync"), f"stop check {position_id}")
                        return self.stop_failed(position, target, mode, e)
                    await asyncio.sleep(self.ctx.stop_backoff.delay(attempt + 1))
                    # The attempt may have landed (a lost answer): that is the answer, never a second order.
                    found = await self.ctx.open_order_by_client_id(symbol, client_id)
                    current = self.ctx.engine.positions.get(position_id)
                    if current is None or current.state not in PROTECTED or self.view.is_flat(current):
                        # Ended (or closing, or flat) during the wait: no stop for it now; one that landed is
                        # cancelled rather than left to act on the symbol's next position.
                        if found is not None:
                            await self.ctx.cancel_quietly(OrderRef(client_id, position_id, symbol, OrderPurpose.STOP,
                                                                side.exit_order_side, quantity, OrderStatus.OPEN,
                                                                target, found.exchange_order_id, found.algo_id))
                        return StopResult.SKIPPED
                    if found is not None and found.trigger_price == target and found.quantity == quantity:
                        answer = found
                        break
                except xerr.ExchangeError as e:
                    return self.stop_failed(position, target, mode, e)
        if fallback:
            try:
                answer, extra, window_ms = await self.cancel_then_place(position, old, target, client_id)
            except xerr.StopWouldTrigger:
                return await self.stop_crossed(position, target, mark, "the exchange answered -2021")
            except StopLost as e:
                self.stop_failed(position, target, mode, e.__cause__ or e)
                return StopResult.LOST
            except xerr.ExchangeError as e:
                return self.stop_failed(position, target, mode, e)
            calls += extra
            how, old = "cancel_then_place", []
        if answer is None:
            return self.stop_failed(position, target, mode, RuntimeError("no answer"))
        try:
            await self.ctx.track(position, client_id, OrderPurpose.STOP, quantity, target, answer)
        except UnknownPosition:  # ended while the order was in flight and its cleanup is done: undo
            await self.ctx.cancel_quietly(OrderRef(client_id, position_id, symbol, OrderPurpose.STOP,
                                                side.exit_order_side, quantity, OrderStatus.OPEN, target,
                                                answer.exchange_order_id, answer.algo_id))
            return StopResult.SKIPPED
        for previous in old:
            calls += 1
            await self.ctx.cancel_tracked(previous)
        latency_ms = round((self.ctx.monotonic() - started) * 1000, 3)
        if mode != "sync":
            try:
                moved = await self.ctx.engine.fire_if(position_id, StopMoved(
                    stop_price=target, mark=mark, watermark=watermark, client_order_id=client_id), only_in=PROTECTED)
            except TransitionRefused as e:  # logged by the engine; the order is tracked and stays
                logger.warning("{} {} {}: stop {} placed but not recorded as moved: {}", self.ctx.account, symbol,
                               position_id, target, e)
                return StopResult.FAILED
            if moved is None:
                return StopResult.SKIPPED  # the position ended meanwhile; its cleanup cancels the new stop
        self.ctx.stats.stop_moves += 1
        self.ctx.stats.calls_per_move.add(calls)
        if how == "cancel_then_place":
            self.ctx.stats.unprotected_ms.add(window_ms)
        self.ctx.engine.records.emit(StopMove(
            account=self.ctx.account, symbol=symbol, position_id=position_id, at=self.ctx.engine.clock(), mode=mode,
            how=how, side=side.value, old_price=position.stop_price, new_price=target, quantity=quantity, mark=mark,
            watermark=watermark, client_order_id=client_id, unprotected_ms=window_ms, exchange_calls=calls,
            latency_ms=latency_ms))
        logger.info("{} {} {} stop {} {} -> {} ({}, {} calls, {} ms)", self.ctx.account, symbol, position_id, mode,
                    position.stop_price, target, how, calls, latency_ms)
        return StopResult.PLACED

    async def cancel_then_place(self, position: Position, old: list[OrderRef], target: Decimal,
                                 client_id: str) -> tuple[OrderSnapshot, int, float]:
        """The venue refuses a second stop: cancel first (protective requests), then place. The window: from the first
        cancel to the new stop's acknowledgement. The cancelled orders' bookkeeping waits for the new stop."""
        calls = 0
        gap_started = self.ctx.monotonic()
        cancelled = []
        with protective():  # every request of it: the position is unprotected from the first cancel on
            for previous in old:
                calls += 1
                self.ctx.cancelling(previous)
                self.ctx.gone[previous.client_id] = None  # from here on it protects nothing: health and audit know
                try:
                    await self.ctx.exchange.cancel_order(previous)
                except OrderAlreadyGone:
                    pass
                cancelled.append(previous)
            calls += 1
            try:
                answer = await self.ctx.exchange.place_stop(position.symbol, position.side, position.quantity,
                                                            target, client_id)
            except xerr.ExchangeError as e:
                if not await self.restore_stop(position, cancelled, client_id, e):
                    raise StopLost(f"{position.id}: the old stop is cancelled and none could be placed") from e
                raise
            finally:
                for previous in cancelled:
                    await self.ctx.set_order_status(previous.position_id, previous.client_id, OrderStatus.CANCELED)
        window_ms = round((self.ctx.monotonic() - gap_started) * 1000, 3)
        logger.warning("{} {} {}: the venue refuses a second stop; cancelled first, unprotected for {} ms",
                       self.ctx.account, position.symbol, position.id, window_ms)
        return answer, calls, window_ms

    async def restore_stop(self, position: Position, cancelled: list[OrderRef], failed_client_id: str,
                           error: BaseException) -> bool:
        """The old stop is cancelled and the new one failed: put the old price back (False: no stop at all, LOST)."""
        if isinstance(error, xerr.StopWouldTrigger) or not cancelled or position.stop_price is None:
            return True  # crossed: the caller reports it; nothing cancelled: the old stop still works
        failed = parse_client_id(failed_client_id)
        client_id = make_client_id(position.id, OrderPurpose.STOP, (failed.attempt if failed else position.seq) + 1)
        try:
            answer = await self.ctx.exchange.place_stop(position.symbol, position.side, position.quantity,
                                                    position.stop_price, client_id)
            await self.ctx.track(position, client_id, OrderPurpose.STOP, position.quantity, position.stop_price, answer)
            logger.error("{} {} {}: new stop failed after the old was cancelled ({}); old stop {} restored",
                         self.ctx.account, position.symbol, position.id, short(error), position.stop_price)
            return True
        except Exception as e:  # noqa: BLE001 - whatever it was, the position is unprotected now
            logger.error("{} {} {}: UNPROTECTED, stop could not be restored ({}); closing at market",
                         self.ctx.account, position.symbol, position.id, short(e))
            return False

    async def stop_crossed(self, position: Position, target: Decimal, mark: Decimal, why: str) -> StopResult:
        self.ctx.stats.stops_crossed += 1
        logger.warning("{} {} {}: stop {} not sent ({}; mark {}); closing at market", self.ctx.account,
                       position.symbol, position.id, target, why, mark)
        return StopResult.CROSSED

    def stop_failed(self, position: Position, target: Decimal, mode: str, error: BaseException) -> StopResult:
        self.ctx.stats.stop_move_failures += 1
        self.ctx.stats.exchange_errors += 1
        logger.error("{} {} {}: stop {} to {} FAILED, the stop stays at {}: {}", self.ctx.account, position.symbol,
                     position.id, mode, target, position.stop_price, short(error))
        return StopResult.FAILED

    async def reprotect(self, position_id: str, lost_client_id: str, *, verify: bool = False) -> None:
        """Put a removed stop back. `verify`: the removal was only inferred from a REST snapshot after a
        resync; re-place only if a targeted REST query shows the position (else reconciliation decides)."""
        await self.ctx.recovered.wait()  # no order before restart recovery (which checks every stop itself)
        position = self.ctx.engine.positions.get(position_id)
        if position is None or position.stop_price is None:
            return
        if verify:
            try:
                shown = await self.ctx.exchange.positions([position.symbol])
            except xerr.ExchangeError as e:
                logger.warning("{} {} {}: cannot verify a missing stop ({}); re-placing it", self.ctx.account,
                               position.symbol, position_id, short(e))
            else:
                if not any(s.symbol == position.symbol and s.side is position.side for s in shown):
                    return
        result = await self.request(position_id, None, None, "sync")
        if result is StopResult.PLACED:
            logger.warning("{} {} {}: stop {} was removed on the exchange; placed again at {}", self.ctx.account,
                           position.symbol, position_id, lost_client_id, position.stop_price)

    async def adopt_venue_stop(self, position_id: str, orders: list[OrderSnapshot]) -> bool:
        """Take the tightest working stop of ours for this position that the venue holds (its size, on the
        safe side of the mark, better than the recorded one) as the position's stop: tracked and recorded
        (`StopMoved`). Client ids are ours alone, so such a stop was placed by this engine: one whose record
        was lost (the books behind at a crash or stop). True if one was taken."""
        position = self.ctx.engine.positions.get(position_id)
        if position is None or position.state not in PROTECTED or position.entry_price is None:
            return False
        known_mark = await self.ctx.first_mark(position.symbol)
        every = [o for o in orders if (ours := parse_client_id(o.client_id)) is not None
                 and ours.position_id == position_id and ours.purpose is OrderPurpose.STOP
                 and o.trigger_price is not None]
        # With no mark yet (recovery runs before the first one), a stop still working on the venue has not
        # triggered: the venue itself says it is on the safe side.
        mine = [o for o in every if o.quantity == position.quantity and o.trigger_price is not None
                and (known_mark is None or is_stop_on_safe_side(position.side, o.trigger_price, known_mark))
                and is_stop_improvement(position.side, position.stop_price, o.trigger_price)]
        if not mine:
            return False
        for order in every:  # all of ours tracked, so the sync that follows cancels all but the one kept
            if order.client_id not in position.orders:
                await self.ctx.track(position, order.client_id or "", OrderPurpose.STOP, order.quantity,
                                  order.trigger_price or Decimal(0), order)
        position = self.ctx.engine.positions.get(position_id) or position
        pick = max if position.side is Side.LONG else min
        best = pick(mine, key=lambda o: o.trigger_price or Decimal(0))
        assert best.trigger_price is not None
        if best.client_id not in position.orders:
            await self.ctx.track(position, best.client_id or "", OrderPurpose.STOP, best.quantity, best.trigger_price,
                              best)
        if known_mark is None:  # recorded as "one tick beyond the stop": all the venue told us (not triggered)
            tick = self.ctx.tick(position.symbol)
            mark = best.trigger_price + tick if position.side is Side.LONG else best.trigger_price - tick
            logger.warning("{} {} {}: no mark price yet; the venue's working stop {} is taken as on the safe side",
                           self.ctx.account, position.symbol, position_id, best.trigger_price)
        else:
            mark = known_mark
        outcome = await self.ctx.engine.fire_if(position_id, StopMoved(
            stop_price=best.trigger_price, mark=mark, client_order_id=best.client_id), only_in=PROTECTED)
        if outcome is not None:
            logger.warning("{} {} {}: took the stop {} at {} that the venue holds (placed before, its record lost; "
                           "the database said {})", self.ctx.account, position.symbol, position_id, best.client_id,
                           best.trigger_price, position.stop_price)
        return outcome is not None

    async def place_take_profit(self, position_id: str, price: Decimal) -> None:
        """Under the symbol lock too: terminal cleanup waits for it, so it cannot outlive the position."""
        position = self.ctx.engine.positions.get(position_id)
        if position is None:
            return
        await self.ctx.engine.locks.submit(self.ctx.account, position.symbol, f"{position_id}/tp", price,
                                       lambda target: self.apply_take_profit(position_id, target))

    async def apply_take_profit(self, position_id: str, price: Decimal) -> None:
        position = self.ctx.engine.positions.get(position_id)
        if position is None or position.state not in PROTECTED:
            return
        client_id = self.ctx.next_client_id(position, OrderPurpose.TAKE_PROFIT)
        try:
            answer = await self.ctx.exchange.place_stop(position.symbol, position.side, position.quantity, price,
                                                    client_id, OrderPurpose.TAKE_PROFIT)
        except xerr.ExchangeError as e:
            self.ctx.stats.exchange_errors += 1
            logger.warning("{} {} {}: take-profit at {} not placed: {}", self.ctx.account, position.symbol,
                           position_id, price, short(e))
            return
        try:
            await self.ctx.track(position, client_id, OrderPurpose.TAKE_PROFIT, position.quantity, price, answer)
        except UnknownPosition:
            await self.ctx.cancel_quietly(OrderRef(client_id, position_id, position.symbol, OrderPurpose.TAKE_PROFIT,
                                                position.side.exit_order_side, position.quantity, OrderStatus.OPEN,
                                                price, answer.exchange_order_id, answer.algo_id))

    def initial_target(self, position: Position, plan: OpenCommand | None = None, *,
                        from_mark_if_crossed: bool = False) -> Decimal:
        """The first stop: the open command's distance (else the default) from the entry, to the tick; from
        the mark instead when asked and that stop would already be crossed."""
        assert position.entry_price is not None
        pct = plan.stop_loss_pct if plan and plan.stop_loss_pct is not None else self.ctx.config.default_stop_loss_pct
        factor = 1 - pct / 100 if position.side is Side.LONG else 1 + pct / 100
        target = self.ctx.round_stop(position.side, position.symbol, position.entry_price * factor)
        mark = self.ctx.marks.get(position.symbol)
        if from_mark_if_crossed and mark is not None and not is_stop_on_safe_side(position.side, target, mark):
            target = self.ctx.round_stop(position.side, position.symbol, mark * factor)
        return target
