"""What the private stream has shown, and the one place where fills are joined to flats.

The stream's newest position update per symbol, the trades it delivered (newest 64 per symbol, `trades`), the
algo orders that placed each triggered order, and the closes left unexplained (a late fill amends them).
The trades (`TradeBook.take`: which event books each, waited for by `trades_arrived`) and `rest_closing_fill`
(the flattening fill from REST) are the two halves of the fill/flat join that closes and reconciliation both
use. The stream's health comes from the exchange port (`StreamControl`); a doubt raised by REST lives here until the
stream speaks again.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from datetime import timedelta
from decimal import Decimal

from loguru import logger

from exchange import errors as xerr
from exchange.port import Fill, OrderSnapshot, PositionSnapshot, StreamHealth
from lifecycle.causes import classify_close
from lifecycle.client_ids import parse_client_id
from lifecycle.domain import CloseCause, Position
from lifecycle.live.context import LiveContext, short
from lifecycle.live.trades import Found, SeenFill, TradeBook
from lifecycle.record_kinds import ClosureAmended
from lifecycle.retry import Backoff


class StreamView:
    """One account's private stream as seen so far (see the module docstring)."""

    def __init__(self, ctx: LiveContext) -> None:
        self.ctx = ctx
        self.live: dict[str, PositionSnapshot] = {}  # the private stream's latest position per symbol
        self.trades = TradeBook(ctx)  # the trades seen, and which event books each
        self.fill_signal: dict[str, asyncio.Event] = {}
        self.position_signal: dict[str, asyncio.Event] = {}  # set by a position update while someone waits
        self.triggered: OrderedDict[str, str] = OrderedDict()  # order id placed by an algo -> algo client id
        # Closed with cause unknown, recently: a late fill amends them (position, monotonic time of the close).
        self.unexplained: OrderedDict[str, tuple[Position, float]] = OrderedDict()
        self.doubted: str | None = None  # why REST made the private stream doubted
        self._resubscribed_generation = -1  # the client generation a doubt last recreated

    def record_order(self, order: OrderSnapshot) -> str | None:
        """Take in an order update: remember which order each algo order placed, and every fill (a waiting
        flat is woken; a close left unexplained may be amended). Returns the order's client id (for an
        order placed by one of our algo orders: that algo order's)."""
        self.spoke()
        client_id = order.client_id
        if order.algo_id is not None and order.exchange_order_id and client_id:
            if order.exchange_order_id not in self.triggered:
                self.trades.placed_by(order.symbol, order.exchange_order_id, client_id)
            self.triggered[order.exchange_order_id] = client_id
            while len(self.triggered) > 10_000:
                self.triggered.popitem(last=False)
        elif order.exchange_order_id is not None and order.exchange_order_id in self.triggered:
            client_id = self.triggered[order.exchange_order_id]
        if order.algo_id is None and order.trade is not None:
            self.trades.record(SeenFill(client_id, order, order.trade))
            self.fill_signal.setdefault(order.symbol, asyncio.Event()).set()
            if self.unexplained:
                self.amend(order, client_id)
        return client_id

    def wake(self, symbol: str) -> None:
        """A reduction or flat took trades in: whoever waits for the trades of another update rechecks."""
        signal = self.fill_signal.get(symbol)
        if signal is not None:
            signal.set()

    def spoke(self) -> None:
        """The private stream delivered something: it is not silent (any doubt is lifted)."""
        if self.doubted is not None:
            logger.info("{}: the private stream delivers again; no longer doubted", self.ctx.account)
            self.doubted = None

    def client_id_of(self, exchange_order_id: str) -> str | None:
        """The client id of an order seen on the stream (or placed by one of our conditional orders)."""
        if exchange_order_id in self.triggered:
            return self.triggered[exchange_order_id]
        return self.trades.client_id_of(exchange_order_id)

    def closed_with_cause(self, position: Position, cause: CloseCause | None, source: str) -> None:
        """Count where causes come from; remember an unexplained close, so a late fill can amend it."""
        self.ctx.stats.cause_sources[source if cause is not None else "state"] += 1
        if cause is CloseCause.UNKNOWN:
            self.unexplained[position.id] = (position, self.ctx.monotonic())
            while len(self.unexplained) > 1000:
                self.unexplained.popitem(last=False)

    async def rest_cause(self, position: Position) -> tuple[Fill, str | None] | None:
        """The flattening fill from REST, bounded in time: a REST outage must not hold up the close."""
        try:
            return await asyncio.wait_for(self.rest_closing_fill(position), self.ctx.config.cause_rest_timeout_s)
        except (TimeoutError, xerr.ExchangeError) as e:
            logger.warning("{} {} {}: the closing fill could not be read from REST ({}); cause unknown for now",
                           self.ctx.account, position.symbol, position.id, short(e) or "timeout")
            self.ctx.spawn(self.explain_later(position), f"closing fill lookup of {position.id}")
            return None

    async def explain_later(self, position: Position, tries: int = 4) -> None:
        """REST could not say what flattened the position: ask again in the background, slower and slower,
        and amend the closure (`closure_amended`) if it was recorded with cause `unknown` (chaos seed 501078:
        REST timed out under load; the fill that flattened it came before the entry was taken in, so no later
        fill update would ever amend it)."""
        slower = Backoff(step_s=self.ctx.config.cause_rest_timeout_s, max_s=30.0, doubling=True)
        for attempt in range(1, tries + 1):
            await asyncio.sleep(slower.delay(attempt))
            if position.id in self.ctx.engine.positions and not self.ctx.engine.positions[position.id].is_terminal:
                continue  # not ended yet (the flat is being committed)
            if position.id not in self.unexplained:
                return  # ended with a known cause, or amended meanwhile
            try:
                found = await asyncio.wait_for(self.rest_closing_fill(position),
                                               self.ctx.config.cause_rest_timeout_s)
            except (TimeoutError, xerr.ExchangeError):
                continue
            if found is None or position.id not in self.unexplained:
                return
            fill, client_id = found
            self._amended(position, client_id, "rest_retry", fill.order_id, fill.price, fill.realized_pnl, fill.fee)
            return

    async def cause_without_trades(self, position: Position) -> Found:
        """The fill update is late (or lost): our own conditional order saying it fired, then REST. Also while we
        close it: a stop or a liquidation may have come first (our close then finds nothing)."""
        trailing_active = position.trailing is not None and position.trailing.active
        runtime = self.ctx.peek(position.id)
        fired = runtime.fired if runtime is not None else None
        if fired is not None:
            return Found(classify_close(fired, position_id=position.id, trailing_was_active=trailing_active),
                         "algo_update")
        found = await self.rest_cause(position)
        if found is None:
            return Found()
        fill, client_id = found
        return Found(classify_close(client_id, position_id=position.id, trailing_was_active=trailing_active), "rest",
                     fill.price, fill.order_id, fill.realized_pnl, fill.fee)

    async def rest_closing_fill(self, position: Position) -> tuple[Fill, str | None] | None:
        """The newest fill on the closing side since the position was opened, with its order's client id
        (from the stream's memory, else the order by id), from REST; None when there is none. A fill this
        process took in as a reduction of the position is not its closing fill (chaos seed 300809: another
        client's partial close, then the rest vanished; the partial close was claimed as the flattening).
        Known only by order id, and only in this process: an order that reduced and later flattened the
        same position is then not found here (the flat's cause stays with the stream's fill, or unknown)."""
        # Binance answers at most 7 days per query (ccxt sends endTime = since + 7 days): the closing fill is
        # recent, so ask for the last 6 days of an older position, not for its first week.
        closing = position.side.exit_order_side
        candidates: list[Fill] = []
        for back in (timedelta(minutes=10), timedelta(days=6)):  # Binance lists oldest first from the start
            since = max(position.created_at, self.ctx.engine.clock() - back)
            fills = await self.ctx.exchange.fills(position.symbol, since)
            runtime = self.ctx.peek(position.id)  # a fill taken in as a reduction flattened nothing
            reductions = runtime.reduced_by if runtime is not None else set()
            candidates = [f for f in fills if f.side == closing and f.at >= position.created_at
                          and f.order_id not in reductions]
            if sum(f.quantity for f in candidates) >= position.quantity or since == position.created_at:
                break
        if not candidates:
            return None
        if (filled := sum(f.quantity for f in candidates)) < position.quantity:
            # Closing-side fills that do not add up to the position did not flatten it: a partial close by
            # someone else, not yet taken in, and then the rest vanished (chaos seed 300809, a second
            # interleaving). No closing fill: the absence is settled as one (phantom), not as that order's.
            logger.info("{} {} {}: closing-side fills since it opened add up to {} of its {}: none flattened it",
                        self.ctx.account, position.symbol, position.id, filled, position.quantity)
            return None
        fill = candidates[0]  # the newest; the venue lists oldest first, so of fills within one millisecond
        for later in candidates[1:]:  # the last listed (chaos seed 301378: a partial close and a liquidation)
            if later.at >= fill.at:
                fill = later
        known = self.client_id_of(fill.order_id)
        if known is not None:
            return fill, known
        order = await self.ctx.exchange.order(position.symbol, fill.order_id)
        return fill, order.client_id

    def amend(self, order: OrderSnapshot, client_id: str | None) -> None:
        """A fill that arrives after its position was closed with cause `unknown` explains that close: the
        closure is amended by a `closure_amended` record (the journal stays as it was)."""
        ours = parse_client_id(client_id)
        for position_id, (position, closed_at) in list(self.unexplained.items()):
            if position.symbol != order.symbol or order.side != position.side.exit_order_side:
                continue
            if ours is not None and ours.position_id != position_id:
                continue  # an order of another position of ours (a reversal's entry): it explains nothing here
            if self.ctx.monotonic() - closed_at > 600 or order.at < position.created_at:
                continue
            self._amended(position, client_id, "late_fill_update", order.exchange_order_id, order.average_price,
                          order.realized_pnl, order.fee)
            return

    def _amended(self, position: Position, client_id: str | None, source: str, exchange_order_id: str | None,
                 exit_price: Decimal | None, realized_pnl: Decimal | None, fee: Decimal | None) -> None:
        """A close recorded with cause `unknown` is explained by this order: a `closure_amended` record (the
        journal stays as it was). Our own close, or an order that explains nothing, amends nothing."""
        self.unexplained.pop(position.id, None)
        cause = classify_close(client_id, position_id=position.id,
                               trailing_was_active=position.trailing is not None and position.trailing.active)
        if cause in (CloseCause.BOT, CloseCause.UNKNOWN):
            return
        self.ctx.stats.closures_amended += 1
        self.ctx.engine.records.emit(ClosureAmended(
            account=self.ctx.account, symbol=position.symbol, position_id=position.id, at=self.ctx.engine.clock(),
            cause_before="unknown", cause=cause.value, cause_source=source, exchange_order_id=exchange_order_id,
            client_order_id=client_id, exit_price=exit_price, realized_pnl=realized_pnl, fee=fee))
        logger.warning("{} {} {}: closure cause amended: unknown -> {} ({})", self.ctx.account, position.symbol,
                       position.id, cause.value, source)

    async def trades_arrived(self, position: Position, snap: PositionSnapshot, deadline: float) -> bool:
        """Wait until the trades that made this update are all here (`trades_of`), until `deadline`
        (monotonic): the fill updates may come after the position's. False when they did not."""
        signal = self.fill_signal.setdefault(snap.symbol, asyncio.Event())
        while True:
            if position.id not in self.ctx.engine.positions:
                return False  # ended meanwhile (a flat took the trades): nothing to wait for
            if self.trades.trades_of(position, snap) is not None:
                return True
            remaining = deadline - self.ctx.monotonic()
            if remaining <= 0:
                return False
            signal.clear()
            await _woken(signal, remaining)

    def position_update(self, snap: PositionSnapshot) -> None:
        """The private stream's newest position for its symbol (wakes `flat_within`)."""
        self.live[snap.symbol] = snap
        signal = self.position_signal.get(snap.symbol)
        if signal is not None:
            signal.set()

    async def flat_within(self, position: Position, wait_s: float) -> bool:
        """Whether, within `wait_s`, the stream shows the position flat or it ends (True), else False."""
        deadline = self.ctx.monotonic() + wait_s
        signal = self.position_signal.setdefault(position.symbol, asyncio.Event())
        while True:
            if position.id not in self.ctx.engine.positions or self.is_flat(position):
                return True
            remaining = deadline - self.ctx.monotonic()
            if remaining <= 0:
                return False
            signal.clear()
            await _woken(signal, remaining)

    async def doubt_stream(self, reason: str, *, resubscribe: bool) -> None:
        """REST showed what the private stream did not: doubt it at once (health says so until it speaks
        again), probe its listen key (an expired key: new key and reconnect), and with `resubscribe`
        (the change is proven) resubscribe even when the key is alive: the socket may be wedged."""
        first = self.doubted is None
        self.doubted = reason
        if first:
            logger.warning("{}: the private stream is doubted: {}", self.ctx.account, reason)
        alive: bool | None
        try:
            alive = await self.ctx.exchange.probe_user_stream(reason)
        except xerr.ExchangeError as e:
            logger.warning("{}: probing the private stream failed: {}", self.ctx.account, short(e))
            alive = None
        if resubscribe and alive is not False:  # an expired key is reconnected by the adapter itself
            generation = self.ctx.exchange.generation
            if self._resubscribed_generation != generation:
                self._resubscribed_generation = generation
                logger.warning("{}: the private stream may be wedged ({}); recreating the exchange client",
                               self.ctx.account, reason)
                try:
                    await self.ctx.exchange.recreate(generation, reason)
                except xerr.ExchangeError as e:
                    logger.error("{}: could not recreate the exchange client: {}", self.ctx.account, short(e))

    def stream_doubted(self) -> str | None:
        """Why the private stream is doubted (REST showed what it did not deliver), or None."""
        return self.doubted

    def stream_healthy(self) -> bool:
        """The private position stream is connected and not known to be silent (adapter's health)."""
        return self.ctx.exchange.health.get("positions") is StreamHealth.HEALTHY

    def stream_shows(self, position: Position) -> bool | None:
        """Whether the private stream's newest update (newer than the entry) shows the position: True,
        False (flat or the other side), or None when the stream said nothing about it since."""
        live = self.live.get(position.symbol)
        entered = self.ctx.entry_at(position.id)
        if live is None or (entered is not None and live.at < entered) or self.ctx.missing(position.id):
            return None
        return live.side is position.side

    def unsettled(self) -> bool:
        """Some tracked position is known to the REST snapshot of a resync only as missing (see below)."""
        return any(r.missing is not None and pid in self.ctx.engine.positions for pid, r in self.ctx.positions.items())

    def settled(self, position_id: str) -> None:
        """Reconciliation saw the position on REST (twice): it is no longer only known as missing."""
        runtime = self.ctx.peek(position_id)
        if runtime is not None:
            runtime.missing = None

    def missing_after_resync(self, position_id: str) -> bool:
        """A resync's REST snapshot lacked this position and the stream has said nothing about it since."""
        return self.ctx.missing(position_id)

    def is_flat(self, position: Position) -> bool:
        """The private stream's newest update (newer than the entry) shows no position on this side."""
        live = self.live.get(position.symbol)
        entered = self.ctx.entry_at(position.id)
        return live is not None and live.side is not position.side and (entered is None or live.at >= entered)


async def _woken(signal: asyncio.Event, timeout_s: float) -> None:
    """Wait until `signal` is set or `timeout_s` passed. The wait runs in the caller's task (`asyncio.timeout`):
    Python 3.11's `wait_for` ran it in a task of its own, and the caller woke two turns of the loop after the
    signal (a flat waiting for its fill update: ~0.2 ms of a close, bench.closure_latency)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await signal.wait()
