"""The leaf of the live engine: what every part shares about one account.

`LiveContext` holds the engine, the exchange port, the configuration and counters, the marks, the
lifecycle flags (draining, stopping, stopped, recovered), background task spawning, and the small
services every part needs: client ids, tick rounding, order tracking. Per position, what the live engine
knows beyond the stored position lives in one `PositionRuntime`, dropped in one place (`drop`) at the
terminal transition. Nothing here imports another module of the package.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from loguru import logger

from exchange import errors as xerr
from exchange.port import ExchangePort, OrderSnapshot
from lifecycle.client_ids import make_client_id, parse_client_id
from lifecycle.domain import OrderPurpose, OrderRef, OrderStatus, Position, Side
from lifecycle.engine import Engine
from lifecycle.errors import EngineStopping, OrderAlreadyGone, UnknownPosition
from lifecycle.live.config import LiveConfig, LiveStats, OpenCommand
from lifecycle.machines.states import PositionState
from lifecycle.retry import Backoff

S = PositionState
# A position without a stop for less than this is one whose stop is being placed right now: not yet an alarm.
UNPROTECTED_GRACE_S = 1.0


@dataclass(slots=True)
class PositionRuntime:
    """What this process knows of one live position beyond its stored state (memory only)."""

    plan: OpenCommand | None = None  # the open command, until the initial stop is placed
    entry_done: bool = False  # the entry's outcome is known (filled, or ended): later updates of it are ignored
    trimming: bool = False  # partly filled entry: the rest is being cancelled
    entry_at: datetime | None = None  # exchange time of the entry fill
    entry_fill: OrderSnapshot | None = None  # the newest fill seen of the entry
    last_fill_at: datetime | None = None  # exchange time of the update that showed the entry's last fill
    missing: datetime | None = None  # when a resync's REST snapshot lacked it (the stream said nothing since)
    fired: str | None = None  # client id of our stop / take-profit that fired
    unprotected_since: float | None = None  # monotonic time first seen without a working stop
    reduced_by: set[str] = field(default_factory=set)  # exchange order ids taken in as reductions
    attempts: dict[OrderPurpose, int] = field(default_factory=dict)  # newest client-id attempt used here


# Up to this many symbols, venue-wide order listings go symbol by symbol (2 x weight 1 each on Binance) rather
# than once without a symbol (2 x weight 40): 20 symbols cost as much as one listing of everything.
PER_SYMBOL_LISTINGS = 20


class LiveContext:
    """Shared by every part of one account's live engine (see the module docstring)."""

    def __init__(self, engine: Engine, exchange: ExchangePort, *, account: str, symbols: list[str],
                 config: LiveConfig, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.exchange = exchange
        self.account = account
        self.symbols = symbols
        self.config = config
        self.monotonic = monotonic
        self.stats = LiveStats()
        self.marks: dict[str, Decimal] = {}
        self.min_interval = timedelta(seconds=config.trail_min_interval_s)
        # The wait before retry n of a venue call: n x retry_backoff_s, never under 50 ms, never over 30 s.
        self.backoff = Backoff(step_s=max(config.retry_backoff_s, 0.05), floor_s=0.05, max_s=30.0)
        # A stop placement failing transiently: n x retry_backoff_s exactly (no floor: a position waits for
        # its stop; `stop_retries` bounds how many).
        self.stop_backoff = Backoff(step_s=config.retry_backoff_s, max_s=math.inf)
        self.positions: dict[str, PositionRuntime] = {}
        self.loaded: set[str] = set()  # positions loaded from the database at start (the books may be behind)
        self.placing: set[str] = set()  # positions whose entry is being sent (no answer yet)
        self.gone: OrderedDict[str, None] = OrderedDict()  # our stops known not working (cancelled, expired)
        self.own_cancels: OrderedDict[str, None] = OrderedDict()  # client ids we cancelled ourselves
        self.tasks: set[asyncio.Task[Any]] = set()
        self.commands = 0  # open / close / adopt calls in flight
        self.draining = False  # shutting down: no new commands, no new trailing moves; fills still apply
        self.stopping = False  # no new background work (but essential work) starts
        self.stopped = False  # stop() finished: nothing at all starts any more
        # Restart recovery must reconcile before any order: with positions loaded at start, trailing moves
        # and stop re-placements wait until recover() has run (set at once when nothing was loaded).
        self.recovered = asyncio.Event()
        # Run after a positions resync that lacks a tracked position (a Reconciler registers its pass).
        self.after_resync: list[Callable[[], Awaitable[Any]]] = []
        self._ticks: dict[str, Decimal] = {}

    # --- per position -------------------------------------------------------------------------------

    def runtime(self, position_id: str) -> PositionRuntime:
        """The position's runtime; created for a position live in the engine. For one that is not (ended,
        or unknown), a detached runtime: what is written to it is dropped, as the position's was."""
        found = self.positions.get(position_id)
        if found is not None:
            return found
        position = self.engine.positions.get(position_id)
        fresh = PositionRuntime()
        if position is not None and not position.is_terminal:
            self.positions[position_id] = fresh
        return fresh

    def peek(self, position_id: str) -> PositionRuntime | None:
        """The position's runtime if there is one (never creates one)."""
        return self.positions.get(position_id)

    def entry_at(self, position_id: str) -> datetime | None:
        runtime = self.positions.get(position_id)
        return runtime.entry_at if runtime is not None else None

    def entry_done(self, position_id: str) -> bool:
        runtime = self.positions.get(position_id)
        return runtime is not None and runtime.entry_done

    def missing(self, position_id: str) -> bool:
        runtime = self.positions.get(position_id)
        return runtime is not None and runtime.missing is not None

    def drop(self, position_id: str) -> None:
        """The position reached a terminal state: forget what this process knew of it."""
        self.positions.pop(position_id, None)

    # --- shared services ----------------------------------------------------------------------------

    def spawn(self, work: Awaitable[Any], what: str, *, essential: bool = False) -> asyncio.Task[Any] | None:
        """Run `work` in the background. Once stopping, only `essential` work (a safety close, a stop put
        back) still starts, until stop() has finished."""
        if self.stopping and (not essential or self.stopped):
            if asyncio.iscoroutine(work):
                work.close()
            logger.info("{}: stopping, not starting {}", self.account, what)
            return None
        task = asyncio.ensure_future(work)
        self.tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self.tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                e = t.exception()
                logger.error("{} {} failed: {}: {}", self.account, what, type(e).__name__, e)

        task.add_done_callback(done)
        return task

    def command(self, what: str) -> None:
        if self.draining:
            raise EngineStopping(f"{self.account}: the engine is stopping; {what} refused")

    def next_client_id(self, position: Position, purpose: OrderPurpose) -> str:
        """Attempt = the journal sequence, or past any id of ours already used for this purpose: tracked,
        or tried by this process (a failed or unanswered attempt leaves no record)."""
        runtime = self.runtime(position.id)
        attempt = max(position.seq, runtime.attempts.get(purpose, -1) + 1)
        for client_id in position.orders:
            ours = parse_client_id(client_id)
            if ours is not None and ours.purpose is purpose and ours.attempt >= attempt:
                attempt = ours.attempt + 1
        runtime.attempts[purpose] = attempt
        return make_client_id(position.id, purpose, attempt)

    def round_stop(self, side: Side, symbol: str, raw: Decimal) -> Decimal:
        """Away from the mark, to the tick: a long's stop rounds down, a short's up."""
        return side.round_stop(raw, self.tick(symbol))

    def tick(self, symbol: str) -> Decimal:
        tick = self._ticks.get(symbol)
        if tick is None:
            tick = self._ticks[symbol] = self.exchange.tick_size(symbol)
        return tick

    async def track(self, position: Position, client_id: str, purpose: OrderPurpose, quantity: Decimal,
                    price: Decimal, answer: OrderSnapshot) -> OrderRef:
        ref = OrderRef(client_id, position.id, position.symbol, purpose, position.side.exit_order_side, quantity,
                       answer.status if answer.status is not OrderStatus.NEW else OrderStatus.OPEN,
                       trigger_price=price, exchange_order_id=answer.exchange_order_id, algo_id=answer.algo_id)
        await self.engine.track_order(position.id, ref)
        return ref

    async def set_order_status(self, position_id: str, client_id: str, status: OrderStatus, *,
                               lazy: bool = False) -> None:
        """`lazy`: a status the stream reported, which nobody waits for on a protection path (see
        `Engine.order_status`); our own cancels and refusals are written at once (a stop move waits for them
        under the symbol's stop lock)."""
        position = self.engine.positions.get(position_id)
        known = position.orders.get(client_id) if position is not None else None
        if known is None or known.status is status:
            return
        try:
            await self.engine.order_status(position_id, replace(known, status=status), lazy=lazy)
        except UnknownPosition:
            pass  # ended meanwhile; its cleanup saw the order

    def cancelling(self, order: OrderRef) -> None:
        """Mark an order as cancelled by us: its CANCELED update is not a removal to repair."""
        self.own_cancels[order.client_id] = None
        while len(self.own_cancels) > 10_000:
            self.own_cancels.popitem(last=False)

    async def cancel_tracked(self, order: OrderRef) -> None:
        self.cancelling(order)
        try:
            await self.exchange.cancel_order(order)
        except OrderAlreadyGone:
            pass
        except xerr.ExchangeError as e:
            self.stats.exchange_errors += 1
            logger.error("{} {} {}: old stop {} not cancelled ({}); a looser reduce-only stop is left",
                         self.account, order.symbol, order.position_id, order.client_id, short(e))
            return
        await self.set_order_status(order.position_id, order.client_id, OrderStatus.CANCELED)

    async def cancel_quietly(self, order: OrderRef) -> None:
        self.cancelling(order)
        try:
            await self.exchange.cancel_order(order)
        except OrderAlreadyGone:
            pass
        except xerr.ExchangeError as e:
            logger.error("{} {}: stop {} of an ended position not cancelled: {}", self.account, order.symbol,
                         order.client_id, short(e))

    async def track_foreign_stop(self, position: Position, client_id: str, found: OrderSnapshot,
                                 target: Decimal, quantity: Decimal) -> OrderRef:
        logger.warning("{} {} {}: open stop {} is at {} x {}, not {} x {}; tracked (to be cancelled)", self.account,
                       position.symbol, position.id, client_id, found.trigger_price, found.quantity, target, quantity)
        return await self.track(position, client_id, OrderPurpose.STOP, found.quantity,
                                found.trigger_price or target, found)

    async def list_open_orders(self, *, full: bool = False) -> list[OrderSnapshot]:
        """The account's working orders where ours can be: the configured symbols and those of its live
        positions, listed symbol by symbol (on Binance a listing for one symbol weighs 1, one without a symbol
        40, and the audit and the orphan sweep list twice: regular and conditional orders). `full`, or more
        symbols than PER_SYMBOL_LISTINGS: one listing of every symbol (an order of ours on a symbol we neither
        configure nor hold, left from an older configuration, shows only there)."""
        symbols = sorted({*self.symbols, *(p.symbol for p in self.engine.positions.values()
                                           if p.account == self.account)})
        if full or len(symbols) > PER_SYMBOL_LISTINGS:
            return await self.exchange.open_orders()
        listed: list[OrderSnapshot] = []
        for symbol in symbols:
            listed += await self.exchange.open_orders(symbol)
        return listed

    async def open_order_by_client_id(self, symbol: str, client_id: str) -> OrderSnapshot | None:
        try:
            return next((o for o in await self.exchange.open_orders(symbol) if o.client_id == client_id), None)
        except xerr.ExchangeError as e:
            logger.warning("{} {}: looking up order {} failed: {}", self.account, symbol, client_id, short(e))
            return None

    async def first_mark(self, symbol: str, wait_s: float = 3.0) -> Decimal | None:
        """The mark, waiting up to `wait_s` for the stream's first one (Binance pushes every second)."""
        deadline = self.monotonic() + wait_s
        while (mark := self.marks.get(symbol)) is None and self.monotonic() < deadline and not self.stopping:
            await asyncio.sleep(0.05)
        return mark


def multiple(value: Decimal, step: Decimal) -> bool:
    """`value` is a whole number of `step`s (False where the division is out of Decimal's range)."""
    try:
        return value % step == 0
    except ArithmeticError:
        return False


def short(e: BaseException) -> str:
    """An exception as one bounded line for logs and journal payloads."""
    text = str(e) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."

