"""The live engine: one exchange account's streams and commands turned into position events.

The `Engine` keeps positions and commits transitions; this package watches the exchange (private stream
for positions and orders, mark prices) and the bot's commands, and feeds the machines. `LiveEngine` is the
account's face: it starts and stops the parts, routes every stream item and command to the part that
handles it, and answers for the account (health, protection, the stream's view). The parts, each in its
own module, imported one way (context <- stream_view <- stops <- trailing_watch, closing <- opening <-
protection, recovery, orphans <- account_faces <- engine):

* `context` -- what every part shares: engine, port, configuration, counters, per-position runtime, spawning;
* `stream_view` -- what the private stream showed: snapshots, fills, the fill/flat join, stream health;
* `stops` -- placing, moving, syncing and restoring stops under the symbol lock (`StopResult`);
* `trailing_watch` -- watermarks on marks, one stop-move worker per position;
* `closing` -- bot closes, entry cancels, flats and reductions;
* `opening` -- opens, entries, first stops, adoption;
* `protection` -- the per-tick check, the venue-wide audit and repairs, health;
* `recovery` -- restart recovery;
* `orphans` -- the sweep of working orders of ours that belong to no live position;
* `account_faces` -- the read-only view and the commands the periodic jobs get (`lifecycle.account`).

Decisions written down here (the issues were silent):
* Quantity for stops and closes is the in-memory position's, which only stream fills and stream
  position updates change (and reconciliation's reductions); nothing else is read back from REST.
* The watermark lives in memory between moves and is persisted with every stop move (and at
  activation); after a restart trailing continues from the last persisted watermark, which is never
  ahead of the stop, so the stop still never moves backwards.
* The stop-loss distance of an open command is kept in memory until the initial stop is placed; after
  a restart in between, `LiveConfig.default_stop_loss_pct` is used.
* Client ids: `lc-<position>-<purpose><attempt>`, with the attempt taken from the position's journal
  sequence, so a resumed request after a crash reuses its id and the venue refuses a duplicate.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

from loguru import logger

from exchange.port import ExchangePort, MarkPrice, OrderSnapshot, PositionSnapshot, Resynced
from lifecycle.client_ids import parse_client_id
from lifecycle.domain import CloseReason, OrderPurpose, OrderStatus, Position, Side
from lifecycle.engine import Engine
from lifecycle.errors import AccountStarting
from lifecycle.journal import Outcome
from lifecycle.live.account_faces import LiveAccountCommands, LiveAccountView
from lifecycle.live.closing import Closing
from lifecycle.live.config import LiveConfig, LiveStats, OpenCommand
from lifecycle.live.context import UNPROTECTED_GRACE_S, LiveContext, S
from lifecycle.live.opening import Opening
from lifecycle.live.orphans import Orphans
from lifecycle.live.protection import Protection
from lifecycle.live.recovery import Recovery
from lifecycle.live.stops import Stops
from lifecycle.live.stream_view import StreamView
from lifecycle.live.trailing_watch import TrailingWatch
from lifecycle.machines.states import FLATTENABLE, PROTECTED

EXPIRED_WAIT_MAX_S = 1.0  # the most a stop the venue expired waits for its flat before it is put back
COMMAND_WAIT_S = 10.0  # how long an open or close waits for the account's restart recovery before it is refused


class LiveEngine:
    """Runs one account's positions against the exchange; see the module docstring."""

    def __init__(self, engine: Engine, exchange: ExchangePort, *, account: str, symbols: list[str],
                 config: LiveConfig | None = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        if not symbols:
            raise ValueError("the live engine needs at least one symbol to watch")
        self.engine = engine
        self.exchange = exchange
        self.account = account
        self.symbols = list(dict.fromkeys(symbols))
        self.config = config or LiveConfig()
        self.monotonic = monotonic
        self.ctx = ctx = LiveContext(engine, exchange, account=account, symbols=self.symbols, config=self.config,
                                     monotonic=monotonic)
        self.view = StreamView(ctx)
        self.stops = Stops(ctx, self.view, on_result=lambda pid, result: self.closing.after_stop(pid, result))
        self.trailing = TrailingWatch(ctx, self.stops)
        self.closing = Closing(ctx, self.view, self.stops)
        self.opening = Opening(ctx, self.view, self.stops, self.trailing, self.closing)
        self.closing.protect_initial = self.opening.protect_initial
        self.closing.find_entry = self.opening.find_entry
        self.protection = Protection(ctx, self.view, self.stops, self.opening, self.closing)
        self.recovery = Recovery(ctx, self.stops, self.opening, self.closing)
        self.orphans = Orphans(ctx)
        # The periodic jobs' two faces (lifecycle.account): what they may read, and what they may do.
        self.account_view = LiveAccountView(ctx, self.view, self.opening, self.protection)
        self.commands = LiveAccountCommands(ctx, self.view, self.opening, self.closing, self.protection,
                                            self.orphans)
        self.stats: LiveStats = ctx.stats
        self.live: dict[str, PositionSnapshot] = self.view.live  # the private stream's latest position per symbol
        self.marks: dict[str, Decimal] = ctx.marks
        self.last_item_at: dict[str, float] = {}  # stream name -> monotonic time of its newest item
        # Run after a positions resync that lacks a tracked position (a Reconciler registers its pass).
        self.after_resync: list[Callable[[], Awaitable[Any]]] = ctx.after_resync
        self._streams: list[asyncio.Task[None]] = []
        self._ready = {"positions": asyncio.Event(), "orders": asyncio.Event()}
        engine.listeners.append(self._on_transition)

    # --- start and stop ---------------------------------------------------------------------------

    async def start(self, *, streams: bool = True) -> LiveEngine:
        """Watch the live positions the engine holds for this account, then subscribe to the streams."""
        loaded = [p for p in self.engine.positions.values() if p.account == self.account]
        self.ctx.loaded = {p.id for p in loaded}
        for position in loaded:
            self.trailing.watch_position(position)
        if not loaded:
            self.ctx.recovered.set()
        if streams:
            # Handlers are looked up per item, so a benchmark can time them by wrapping the attribute.
            self._streams = [
                asyncio.create_task(self._consume("positions", self.exchange.position_updates(),
                                                  lambda item: self.on_position(item))),
                asyncio.create_task(self._consume("orders", self.exchange.order_updates(),
                                                  lambda item: self.on_order(item))),
                asyncio.create_task(self._consume("marks", self.exchange.mark_prices(self.symbols),
                                                  lambda item: self.on_mark(item))),
            ]
        return self

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Until the private streams are subscribed (their first resync arrived)."""
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in self._ready.values())), timeout)

    async def stop(self, timeout: float = 5.0, *, drain_s: float = 0.0) -> None:
        """Graceful stop; stops stay on the exchange.

        First drain (up to `drain_s`): new commands are refused (`EngineStopping`) and marks no longer
        move stops, but the streams keep running, so commands in flight finish and a close already sent
        reaches its terminal state from its fill. Then the streams stop and background work in flight
        (stop moves, cleanups) finishes, up to `timeout`, before anything left is cancelled. Whatever
        the drain did not finish (a close still CLOSING_BY_BOT) is resumed by restart recovery.
        """
        self.ctx.draining = True
        if drain_s > 0:
            # An entry still resting would become exposure without a stop while nobody watches: cancel it
            # (the position ends CANCELLED, or what filled meanwhile is closed).
            for position in [p for p in self.engine.positions.values()
                             if p.account == self.account and p.state is S.OPENING]:
                logger.warning("{} {} {}: cancelling the resting entry before stopping", self.account,
                               position.symbol, position.id)
                self.ctx.spawn(self.closing.close_now(position.id, CloseReason.SHUTDOWN),
                               f"entry cancel of {position.id}")
        deadline = self.monotonic() + drain_s
        while self.ctx.commands or any(not t.done() for t in self.ctx.tasks) or self._closing_ids():
            if self.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        if drain_s > 0 and (closing := self._closing_ids()):
            logger.warning("{}: stopping with {} close(s) not yet confirmed ({}); restart recovery resumes them",
                           self.account, len(closing), ", ".join(closing))
        self.ctx.stopping = True  # from here on no new background work starts
        for task in self._streams:
            task.cancel()
        await asyncio.gather(*self._streams, return_exceptions=True)
        self._streams = []
        deadline = self.monotonic() + timeout
        while pending := [t for t in self.ctx.tasks if not t.done()]:
            remaining = deadline - self.monotonic()
            if remaining <= 0:
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                logger.warning("{}: {} background tasks cancelled at stop", self.account, len(pending))
                break
            await asyncio.wait(pending, timeout=remaining)
        self.ctx.stopped = True
        if self._on_transition in self.engine.listeners:
            self.engine.listeners.remove(self._on_transition)

    def _closing_ids(self) -> list[str]:
        """Closes in flight a drain can wait for (not those only reconciliation can settle)."""
        return [p.id for p in self.engine.positions.values()
                if p.account == self.account and p.state is S.CLOSING_BY_BOT and not self.ctx.missing(p.id)]

    async def idle(self, timeout: float = 10.0) -> None:
        """Until no background work (moves, closes, flats) is in flight; for tests and benchmarks."""
        deadline = self.monotonic() + timeout
        while any(not t.done() for t in self.ctx.tasks):
            if self.monotonic() > deadline:
                raise TimeoutError(f"{sum(not t.done() for t in self.ctx.tasks)} live-engine tasks still running")
            await asyncio.sleep(0.005)

    async def _consume(self, name: str, stream: AsyncIterator[Any], handle: Callable[[Any], None]) -> None:
        seen = self.last_item_at
        async for item in stream:
            seen[name] = self.ctx.monotonic()  # the age of the newest item, per stream (the live page shows it)
            if isinstance(item, Resynced):
                self._on_resynced(item)
                continue
            try:
                handle(item)
            except Exception as e:  # noqa: BLE001 - one bad update must not stop the stream
                logger.exception("{} {} update could not be handled: {}: {}", self.account, name, type(e).__name__, e)

    # --- stream items (synchronous: they decide, background tasks act) ------------------------------

    def _on_resynced(self, item: Resynced) -> None:
        """A (re)subscribed stream and the REST snapshot taken right after: the truth to start from.

        Changes the stream may have missed while it was down are not acted on directly (a REST snapshot
        can be stale, seed 000 and 002): a tracked position missing from it is marked flat in the live
        state and left to the reconciliation hooks (confirmation, grace window, closing fill); a tracked
        stop missing from the open orders is put back by a `sync` of the position's stop.
        """
        if item.stream in self._ready:
            self._ready[item.stream].set()
        logger.info("{} {} stream live ({})", self.account, item.stream, item.reason)
        if item.stream == "positions" and self.view.doubted is not None:
            logger.info("{}: the private stream is subscribed anew; no longer doubted", self.account)
            self.view.doubted = None
        if item.reason != "connected" and item.stream in self._ready:
            # Every resync is also checked by the protection audit (what the stream missed meanwhile).
            self.ctx.spawn(self.protection.audit_quietly("after a resync"), "protection audit after a resync")
        if item.snapshot is None:
            return
        tracked = [p for p in self.engine.positions.values() if p.account == self.account and p.state in FLATTENABLE]
        if item.stream == "positions":
            shown = set()
            for snap in item.snapshot:
                if isinstance(snap, PositionSnapshot):
                    known = self.view.live.get(snap.symbol)
                    if known is None or snap.at >= known.at:  # a stale snapshot never hides a newer update
                        self.view.live[snap.symbol] = snap
                    shown.add((snap.symbol, snap.side))
            # Not written into the live state: the snapshot may be stale. The stream no longer vouches for
            # these until it sends an update for their symbol; reconciliation settles them with evidence.
            missing = [p for p in tracked if (p.symbol, p.side) not in shown]
            now = self.engine.clock()
            for position in missing:
                self.ctx.runtime(position.id).missing = now
            if missing:
                for hook in list(self.ctx.after_resync):
                    self.ctx.spawn(hook(), "reconciliation after a resync")
        elif item.stream == "orders":
            open_ids = {o.client_id for o in item.snapshot if isinstance(o, OrderSnapshot)}
            self.protection.settle_vanished_entries({i for i in open_ids if i},
                                                    self.engine.clock() - timedelta(seconds=1))
            for position in tracked:
                lost = [o for o in position.working_orders()
                        if o.purpose is OrderPurpose.STOP and o.client_id not in open_ids]
                if lost and position.state in PROTECTED:
                    for order in lost:
                        self.ctx.gone[order.client_id] = None
                    self.ctx.spawn(self.stops.reprotect(position.id, lost[0].client_id, verify=True),
                                f"re-protection of {position.id}")

    def on_position(self, snap: PositionSnapshot) -> None:
        self.view.spoke()
        self.view.position_update(snap)
        for side in (Side.LONG, Side.SHORT):
            position = self.engine.live_position(self.account, snap.symbol, side)
            if position is None or position.state not in FLATTENABLE or position.quantity == 0:
                continue  # nothing known filled (closed while opening): its entry's own outcome decides
            runtime = self.ctx.peek(position.id)
            if runtime is not None:
                runtime.missing = None  # the stream speaks for it again
            entered = runtime.entry_at if runtime is not None else None
            if entered is not None and snap.at < entered:
                continue  # older than this position's entry: about an earlier position on the symbol
            if snap.amount == 0 or snap.side is not position.side:
                self.ctx.spawn(self.closing.on_flat(position.id, snap), f"flat of {position.id}")
            elif abs(snap.amount) < position.quantity:
                self.ctx.spawn(self.closing.on_reduced(position.id, snap), f"reduction of {position.id}")
            elif abs(snap.amount) > position.quantity and position.quantity > 0:
                logger.warning("{} {} {}: exchange size {} above ours {} (left to reconciliation)", self.account,
                               snap.symbol, position.id, abs(snap.amount), position.quantity)

    def on_order(self, order: OrderSnapshot) -> None:
        client_id = self.view.record_order(order)
        if order.late:
            return  # an earlier trade's update after a newer one of the order: its trade is all that is news
        ours = parse_client_id(client_id)
        if ours is None:
            return
        position = self.engine.positions.get(ours.position_id)
        if position is None:
            return
        if order.algo_id is not None and ours.purpose in (OrderPurpose.STOP, OrderPurpose.TAKE_PROFIT) and (
                order.exchange_order_id or order.status is OrderStatus.FILLED):
            # Our conditional order fired (TRIGGERED carries the order it placed; FINISHED is filled): if the
            # position is seen flat before that order's fill update, this is its cause.
            self.ctx.runtime(position.id).fired = client_id or ""
        if order.trade is not None and ours.purpose is not OrderPurpose.ENTRY:
            self._closed_by_our_order(position, order)
        if ours.purpose is OrderPurpose.ENTRY:
            self.opening.handle_entry_update(position.id, order)
            return
        known = position.orders.get(client_id or "")
        if order.algo_id is not None and known is not None and order.status is not known.status and (
                order.status.is_final or known.status is OrderStatus.NEW):
            self.ctx.spawn(self.ctx.set_order_status(position.id, known.client_id, order.status, lazy=True),
                           "order status")
            if (known.purpose is OrderPurpose.STOP and order.status in {OrderStatus.CANCELED, OrderStatus.EXPIRED}
                    and known.client_id not in self.ctx.own_cancels
                    and position.state in PROTECTED and position.stop_price is not None):
                # Not cancelled by a move of ours (a move places first) or by a flat (checked under the
                # lock): someone removed our stop. Put it back at its price.
                self.ctx.gone[known.client_id] = None
                while len(self.ctx.gone) > 10_000:
                    self.ctx.gone.popitem(last=False)
                again = (self._unless_flat(position, known.client_id) if order.status is OrderStatus.EXPIRED
                         else self.stops.reprotect(position.id, known.client_id))
                self.ctx.spawn(again, f"re-protection of {position.id}")

    def _closed_by_our_order(self, position: Position, order: OrderSnapshot) -> None:
        """A fill of our own stop, take-profit or close that took all we hold ends the position, also while the
        venue still holds some of the symbol: on a one-way account the venue holds one net position, and what
        another client added to ours is not ours (review, seventh session: no flat came, the stop's fill was booked
        by nothing, the audit found the position without its stop and the bot sold the other client's part at
        market). Taken as a flat of ours at once; when the venue's flat comes too (the usual case, in either
        order), whichever is second finds the position ended."""
        if position.state not in FLATTENABLE or position.quantity <= 0 or order.filled < position.quantity:
            return
        if self.view.trades.unused_of(order.symbol, order.exchange_order_id) < position.quantity:
            # Not all we hold: the order's trades a reduction booked already lowered what we hold (a close
            # filled in parts: the rest of ours is still on the venue; review of 8cfa9a7).
            return
        shown = self.view.live.get(order.symbol)
        if shown is None or shown.amount == 0:
            return  # the venue's flat is here: it ends the position
        at = max(shown.at, order.at)
        self.ctx.spawn(self.closing.on_flat(position.id, PositionSnapshot(order.symbol, Decimal(0), Decimal(0), at)),
                       f"flat of {position.id} (our order took all we hold)")

    async def _unless_flat(self, position: Position, lost_client_id: str) -> None:
        """A stop the venue expired: it does so with the flat, which the position stream may deliver after
        the order stream delivered the expiry. Wait up to `cause_wait_s` (at most 1 s) for that flat and put
        the stop back only if it does not come (bench.burst re-placed stops on positions already flat)."""
        if not await self.view.flat_within(position, min(self.ctx.config.cause_wait_s, EXPIRED_WAIT_MAX_S)):
            await self.stops.reprotect(position.id, lost_client_id)

    def _on_transition(self, position: Position, outcome: Outcome) -> None:
        """The one place where what this process knew of a position is dropped: at its terminal transition."""
        if outcome.dest.is_terminal:
            self.trailing.forget(position)
            self.ctx.drop(position.id)

    # --- commands and questions, answered by the parts ---------------------------------------------

    async def open(self, command: OpenCommand) -> Position:
        await self._after_recovery(f"open of {command.symbol}")
        return await self.opening.open(command)

    async def close(self, position_id: str, reason: CloseReason = CloseReason.OPERATOR) -> bool:
        await self._after_recovery(f"close of {position_id}")
        return await self.closing.close(position_id, reason)

    async def _after_recovery(self, what: str) -> None:
        """No order before restart recovery: a command that comes while it runs (right after a start or a
        takeover, with positions loaded) waits for it, at most COMMAND_WAIT_S, then is refused."""
        if self.ctx.recovered.is_set():
            return
        try:
            await asyncio.wait_for(self.ctx.recovered.wait(), COMMAND_WAIT_S)
        except TimeoutError:
            raise AccountStarting(f"{self.account}: restart recovery has not finished after {COMMAND_WAIT_S:g} s; "
                                  f"{what} refused, nothing sent; retry shortly") from None

    async def adopt(self, snap: PositionSnapshot) -> Position:
        return await self.opening.adopt(snap)

    async def recover(self, *, retry_s: float = 2.0) -> dict[str, int]:
        return await self.recovery.recover(retry_s=retry_s)

    def on_mark(self, mark: MarkPrice) -> None:
        self.trailing.on_mark(mark)

    def unprotected(self) -> list[Position]:
        return self.protection.unprotected()

    def unprotected_longer_than(self, grace_s: float) -> list[Position]:
        return self.protection.unprotected_longer_than(grace_s)

    async def check_protection(self, *, grace_s: float = UNPROTECTED_GRACE_S) -> list[str]:
        return await self.protection.check_protection(grace_s=grace_s)

    async def audit_protection(self, positions: list[PositionSnapshot] | None = None) -> dict[str, int]:
        return await self.protection.audit_protection(positions)

    def health_reasons(self) -> list[str]:
        return self.protection.health_reasons()

    def stream_doubted(self) -> str | None:
        return self.view.stream_doubted()

    def stream_healthy(self) -> bool:
        return self.view.stream_healthy()

    def stream_shows(self, position: Position) -> bool | None:
        return self.view.stream_shows(position)

    def unsettled(self) -> bool:
        return self.view.unsettled()
