"""The live engine: one exchange account's streams and commands turned into position events.

The `Engine` keeps positions and commits transitions; this layer watches the exchange (private stream
for positions and orders, mark prices) and the bot's commands, and feeds the machines:

* Opening: an open command creates the position (OPENING) and sends its entry; the entry's fill (from
  the order stream or the order's own answer, whichever comes first) moves it to OPEN, and the initial
  reduce-only stop is placed at once. A stop that cannot be placed closes the position at market
  (reason `unprotected`); a stop that would already be crossed closes it with reason `stop_crossed`.
* Closure: a position update with quantity 0 is `flat`. Its cause comes from the fill that flattened
  it (`classify_close` on that order's client id); the machine and its terminal hook do the rest.
* Trailing: marks move the watermark in memory; `trail()` decides the target; moves go through the
  symbol's stop lock (`StopLockRegistry.submit`), coalesced to the newest target. The new stop is placed
  first and the old one cancelled after (no unprotected window); only if the venue refuses a second
  stop is the old one cancelled first, and that window is measured and recorded.
* Partial reductions resize the stop and are recorded. Bot closes send a reduce-only market order with
  an idempotent client id; a rejected close returns the position to its previous state and is retried.

Decisions written down here (the issue was silent):
* Quantity for stops and closes is the in-memory position's, which only stream fills and stream
  position updates change; nothing is read back from REST while running.
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
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

from loguru import logger

from exchange import errors as xerr
from exchange.port import ExchangePort, Fill, MarkPrice, OrderSnapshot, PositionSnapshot, Resynced, StreamHealth
from lifecycle.causes import classify_close
from lifecycle.client_ids import make_client_id, parse_client_id
from lifecycle.domain import CloseCause, CloseReason, OrderPurpose, OrderRef, OrderStatus, Position, Side, TrailingState
from lifecycle.engine import Engine
from lifecycle.errors import (
    EngineStopping,
    InvalidEvent,
    OrderAlreadyGone,
    PositionConflict,
    StorageUnavailable,
    TransitionRefused,
    UnknownPosition,
)
from lifecycle.events import (
    CloseFailed,
    CloseRequested,
    EntryFailed,
    EntryFilled,
    Flat,
    Reduced,
    StopMoved,
    TsActivated,
)
from lifecycle.guards.predicates import is_activation_crossed, is_stop_improvement, is_stop_on_safe_side
from lifecycle.machines.position import Outcome
from lifecycle.machines.states import PositionState
from lifecycle.trailing import trail

S = PositionState
PROTECTED = frozenset({S.OPEN, S.TS_ACTIVE})  # must have a live stop on the exchange
FLATTENABLE = frozenset({S.OPEN, S.TS_ACTIVE, S.CLOSING_BY_BOT})
# A position without a stop for less than this is one whose stop is being placed right now: not yet an alarm.
UNPROTECTED_GRACE_S = 1.0
# Binance codes meaning "no second stop here" (-4045 max stop orders, -4130 a closePosition stop exists).
TWO_STOPS_REFUSED = frozenset({-4045, -4130})


@dataclass(frozen=True)
class LiveConfig:
    default_stop_loss_pct: Decimal = Decimal("1")  # when an open command gives none (and after a restart)
    trail_min_step_pct: Decimal = Decimal("0.02")  # a trailing move must improve the stop by this % of it
    trail_min_interval_s: float = 1.0  # at most one trailing move per position per interval
    cause_wait_s: float = 0.5  # how long a flat waits for the fill that explains it
    cause_rest_timeout_s: float = 2.0  # then REST is asked for the fill, at most this long
    unprotected_close_after_s: float = 10.0  # a position no repair can protect this long is closed at market
    close_retries: int = 3  # a rejected bot close is retried this many times
    stop_retries: int = 3  # a stop placement failing transiently is retried this many times
    retry_backoff_s: float = 0.5

    def __post_init__(self) -> None:
        checks = {
            "default_stop_loss_pct": Decimal(0) < self.default_stop_loss_pct < Decimal(100),
            "trail_min_step_pct": Decimal(0) <= self.trail_min_step_pct < Decimal(100),
            "trail_min_interval_s": self.trail_min_interval_s >= 0,
            "cause_wait_s": 0 <= self.cause_wait_s <= 10,
            "cause_rest_timeout_s": 0 < self.cause_rest_timeout_s <= 60,
            "unprotected_close_after_s": 0 <= self.unprotected_close_after_s <= 3600,
            "close_retries": self.close_retries >= 0,
            "stop_retries": self.stop_retries >= 0,
            "retry_backoff_s": self.retry_backoff_s >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid live engine setting(s): {', '.join(bad)} (see LiveConfig)")


@dataclass(frozen=True)
class OpenCommand:
    symbol: str
    side: Side
    quantity: Decimal
    entry_price: Decimal | None = None  # None: market entry; else a limit entry at this price
    stop_loss_pct: Decimal | None = None  # distance of the initial stop from the entry price, percent
    trailing_activation: Decimal | None = None  # price at which the trailing stop activates
    trailing_callback_pct: Decimal | None = None  # how far behind the watermark the stop trails, percent
    take_profit: Decimal | None = None  # price of an optional reduce-only take-profit for the whole size

    def __post_init__(self) -> None:
        if not self.symbol:
            raise InvalidEvent("symbol is required")
        if not self.quantity.is_finite() or self.quantity <= 0:
            raise InvalidEvent(f"quantity must be > 0, got {self.quantity}")
        for name in ("entry_price", "trailing_activation", "take_profit"):
            value = getattr(self, name)
            if value is not None and (not value.is_finite() or value <= 0):
                raise InvalidEvent(f"{name} must be > 0, got {value}")
        if self.stop_loss_pct is not None and not (Decimal(0) < self.stop_loss_pct < Decimal(100)):
            raise InvalidEvent(f"stop_loss_pct must be in (0, 100), got {self.stop_loss_pct}")
        if (self.trailing_activation is None) != (self.trailing_callback_pct is None):
            raise InvalidEvent("trailing_activation and trailing_callback_pct go together")

    def trailing(self) -> TrailingState | None:
        if self.trailing_activation is None or self.trailing_callback_pct is None:
            return None
        try:
            return TrailingState(activation_price=self.trailing_activation, callback_rate=self.trailing_callback_pct)
        except ValueError as e:
            raise InvalidEvent(str(e)) from None


@dataclass(slots=True)
class _Watch:
    """Per position: the in-memory watermark and the stop-move worker with its newest wanted target."""

    position_id: str
    watermark: Decimal | None
    activating: bool = False
    deferred: bool = False  # a target was held back by the minimum interval: re-evaluate on every mark
    want: tuple[Decimal, Decimal] | None = None  # (target, watermark), newest wins
    worker: asyncio.Task[None] | None = None


@dataclass(slots=True)
class _SeenFill:
    client_id: str | None
    order: OrderSnapshot
    used: bool = False


@dataclass
class Tally:
    """A bounded running summary (count, sum, max, the newest `keep` values): never grows with the run."""

    keep: int = 1000
    count: int = 0
    total: float = 0.0
    largest: float = 0.0
    recent: deque[float] = field(default_factory=deque)

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.largest = max(self.largest, value)
        self.recent.append(value)
        while len(self.recent) > self.keep:
            self.recent.popleft()


@dataclass
class LiveStats:
    stop_moves: int = 0
    stop_move_failures: int = 0
    stops_crossed: int = 0
    exchange_errors: int = 0
    unprotected_ms: Tally = field(default_factory=Tally)  # one value per cancel-then-place fallback
    calls_per_move: Tally = field(default_factory=Tally)
    protection_repairs: Counter[str] = field(default_factory=Counter)  # what the protection audit repaired
    audits: int = 0
    cause_sources: Counter[str] = field(default_factory=Counter)  # where closure causes came from
    closures_amended: int = 0


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
        self.stats = LiveStats()
        self.live: dict[str, PositionSnapshot] = {}  # the private stream's latest position per symbol
        self.marks: dict[str, Decimal] = {}
        self._watch: dict[str, dict[str, _Watch]] = {}  # symbol -> position id -> watch
        self._plans: dict[str, OpenCommand] = {}  # open commands whose initial stop is not placed yet
        self._open_locks: dict[str, asyncio.Lock] = {}  # symbol -> held from an open's checks to its live row
        self._placing: set[str] = set()  # positions whose entry is being sent (no answer yet)
        self._reducing: dict[str, int] = {}  # positions with a reduction being taken in (how many)
        self._close_found_flat: set[str] = set()  # our close refused as reduce-only: the position was already flat
        self._entry_lookups: set[str] = set()  # positions whose entry is being looked up by its client id
        self._entries_done: set[str] = set()
        self._entry_tasks: dict[str, asyncio.Task[Any]] = {}  # entry fills being taken in
        self._entry_fills: dict[str, OrderSnapshot] = {}  # the newest fill seen of each entry
        self._unprotected_since: dict[str, float] = {}  # position id -> monotonic time first seen unprotected
        self._repairs: dict[str, asyncio.Task[Any]] = {}  # protection repairs in flight, by position
        self._loaded: set[str] = set()  # positions loaded from the database at start (the books may be behind)
        self._doubted: str | None = None  # why REST made the private stream doubted
        self._resubscribed_generation = -1  # the client generation a doubt last recreated
        self._trimming: set[str] = set()  # partly filled entries whose rest is being cancelled
        self._entry_at: dict[str, datetime] = {}  # exchange time of the entry fill, per position
        self._reduced_by: dict[str, set[str]] = {}  # position -> exchange order ids taken in as reductions
        self._fills: dict[str, deque[_SeenFill]] = {}
        self._fill_signal: dict[str, asyncio.Event] = {}
        self._triggered: OrderedDict[str, str] = OrderedDict()  # order id placed by an algo -> algo client id
        self._fired: dict[str, str] = {}  # position id -> client id of our stop / take-profit that fired
        # Closed with cause unknown, recently: a late fill amends them (position, monotonic time of the close).
        self._unexplained: OrderedDict[str, tuple[Position, float]] = OrderedDict()
        self._ticks: dict[str, Decimal] = {}
        self._single_stop: set[str] = set()  # symbols where the venue refused a second stop
        self._gone: OrderedDict[str, None] = OrderedDict()  # our stops the stream reported cancelled/expired
        self._own_cancels: OrderedDict[str, None] = OrderedDict()  # client ids we cancelled ourselves
        self._tasks: set[asyncio.Task[Any]] = set()
        self._streams: list[asyncio.Task[None]] = []
        self._stopping = False
        self._draining = False  # shutting down: no new commands, no new trailing moves; fills still apply
        self._commands = 0  # open / close / adopt calls in flight
        self._stopped = False  # stop() finished: nothing at all starts any more
        # Restart recovery must reconcile before any order: with positions loaded at start, trailing moves
        # and stop re-placements wait until recover() has run (set at once when nothing was loaded).
        self._recovered = asyncio.Event()
        self._attempts: dict[tuple[str, OrderPurpose], int] = {}  # newest client-id attempt used here
        self._missing: dict[str, datetime] = {}  # position id -> when a resync's REST snapshot lacked it
        self._ready = {"positions": asyncio.Event(), "orders": asyncio.Event()}
        # Run after a positions resync that lacks a tracked position (a Reconciler registers its pass).
        self.after_resync: list[Callable[[], Awaitable[Any]]] = []
        self._min_interval = timedelta(seconds=self.config.trail_min_interval_s)
        engine.listeners.append(self._on_transition)

    # --- start and stop ---------------------------------------------------------------------------

    async def start(self, *, streams: bool = True) -> LiveEngine:
        """Watch the live positions the engine holds for this account, then subscribe to the streams."""
        loaded = [p for p in self.engine.positions.values() if p.account == self.account]
        self._loaded = {p.id for p in loaded}
        for position in loaded:
            self._watch_position(position)
        if not loaded:
            self._recovered.set()
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
        self._draining = True
        if drain_s > 0:
            # An entry still resting would become exposure without a stop while nobody watches: cancel it
            # (the position ends CANCELLED, or what filled meanwhile is closed).
            for position in [p for p in self.engine.positions.values()
                             if p.account == self.account and p.state is S.OPENING]:
                logger.warning("{} {} {}: cancelling the resting entry before stopping", self.account,
                               position.symbol, position.id)
                self._spawn(self._close(position.id, CloseReason.SHUTDOWN), f"entry cancel of {position.id}")
        deadline = self.monotonic() + drain_s
        while self._commands or any(not t.done() for t in self._tasks) or self._closing():
            if self.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        if drain_s > 0 and (closing := self._closing()):
            logger.warning("{}: stopping with {} close(s) not yet confirmed ({}); restart recovery resumes them",
                           self.account, len(closing), ", ".join(closing))
        self._stopping = True  # from here on no new background work starts
        for task in self._streams:
            task.cancel()
        await asyncio.gather(*self._streams, return_exceptions=True)
        self._streams = []
        deadline = self.monotonic() + timeout
        while pending := [t for t in self._tasks if not t.done()]:
            remaining = deadline - self.monotonic()
            if remaining <= 0:
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                logger.warning("{}: {} background tasks cancelled at stop", self.account, len(pending))
                break
            await asyncio.wait(pending, timeout=remaining)
        self._stopped = True
        if self._on_transition in self.engine.listeners:
            self.engine.listeners.remove(self._on_transition)

    def _closing(self) -> list[str]:
        """Closes in flight a drain can wait for (not those only reconciliation can settle)."""
        return [p.id for p in self.engine.positions.values()
                if p.account == self.account and p.state is S.CLOSING_BY_BOT and p.id not in self._missing]

    def _command(self, what: str) -> None:
        if self._draining:
            raise EngineStopping(f"{self.account}: the engine is stopping; {what} refused")

    async def idle(self, timeout: float = 10.0) -> None:
        """Until no background work (moves, closes, flats) is in flight; for tests and benchmarks."""
        deadline = self.monotonic() + timeout
        while any(not t.done() for t in self._tasks):
            if self.monotonic() > deadline:
                raise TimeoutError(f"{sum(not t.done() for t in self._tasks)} live-engine tasks still running")
            await asyncio.sleep(0.005)

    async def _consume(self, name: str, stream: AsyncIterator[Any], handle: Callable[[Any], None]) -> None:
        async for item in stream:
            if isinstance(item, Resynced):
                self._on_resynced(item)
                continue
            try:
                handle(item)
            except Exception as e:  # one bad update must not stop the stream
                logger.exception("{} {} update could not be handled: {}: {}", self.account, name, type(e).__name__, e)

    def _spoke(self) -> None:
        """The private stream delivered something: it is not silent (any doubt is lifted)."""
        if self._doubted is not None:
            logger.info("{}: the private stream delivers again; no longer doubted", self.account)
            self._doubted = None

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
        if item.stream == "positions" and self._doubted is not None:
            logger.info("{}: the private stream is subscribed anew; no longer doubted", self.account)
            self._doubted = None
        if item.reason != "connected" and item.stream in self._ready:
            # Every resync is also checked by the protection audit (what the stream missed meanwhile).
            self._spawn(self._audit_quietly("after a resync"), "protection audit after a resync")
        if item.snapshot is None:
            return
        tracked = [p for p in self.engine.positions.values() if p.account == self.account and p.state in FLATTENABLE]
        if item.stream == "positions":
            shown = set()
            for snap in item.snapshot:
                if isinstance(snap, PositionSnapshot):
                    known = self.live.get(snap.symbol)
                    if known is None or snap.at >= known.at:  # a stale snapshot never hides a newer update
                        self.live[snap.symbol] = snap
                    shown.add((snap.symbol, snap.side))
            # Not written into the live state: the snapshot may be stale. The stream no longer vouches for
            # these until it sends an update for their symbol; reconciliation settles them with evidence.
            missing = [p for p in tracked if (p.symbol, p.side) not in shown]
            now = self.engine.clock()
            for position in missing:
                self._missing[position.id] = now
            if missing:
                for hook in list(self.after_resync):
                    self._spawn(hook(), "reconciliation after a resync")
        elif item.stream == "orders":
            open_ids = {o.client_id for o in item.snapshot if isinstance(o, OrderSnapshot)}
            self._settle_vanished_entries({i for i in open_ids if i}, self.engine.clock() - timedelta(seconds=1))
            for position in tracked:
                lost = [o for o in position.working_orders()
                        if o.purpose is OrderPurpose.STOP and o.client_id not in open_ids]
                if lost and position.state in PROTECTED:
                    for order in lost:
                        self._gone[order.client_id] = None
                    self._spawn(self._reprotect(position.id, lost[0].client_id, verify=True),
                                f"re-protection of {position.id}")

    def _spawn(self, work: Awaitable[Any], what: str, *, essential: bool = False) -> asyncio.Task[Any] | None:
        """Run `work` in the background. Once stopping, only `essential` work (a safety close, a stop put
        back) still starts, until stop() has finished."""
        if self._stopping and (not essential or self._stopped):
            if asyncio.iscoroutine(work):
                work.close()
            logger.info("{}: stopping, not starting {}", self.account, what)
            return None
        task = asyncio.ensure_future(work)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                e = t.exception()
                logger.error("{} {} failed: {}: {}", self.account, what, type(e).__name__, e)

        task.add_done_callback(done)
        return task

    # --- commands ---------------------------------------------------------------------------------

    async def open(self, command: OpenCommand) -> Position:
        """Create the position and send its entry; the fill and the initial stop follow on their own.

        A definite rejection ends the position CANCELLED and is raised. An answer that never came (timeout,
        5xx) may hide an order the venue accepted: the position stays OPENING, the order is looked up by
        its client id in the background, and the position is returned. Refused while stopping.
        """
        self._command(f"opening {command.symbol}")
        self._commands += 1
        try:
            return await self._open(command)
        finally:
            self._commands -= 1

    async def _open(self, command: OpenCommand) -> Position:
        # One open at a time per symbol until its position is live in memory: two concurrent opens (of either
        # side) must not both pass the checks before either is recorded, and net on the venue.
        lock = self._open_locks.setdefault(command.symbol, asyncio.Lock())
        async with lock:
            self._check_open(command)  # before any row: a refused command leaves nothing behind
            position = await self.engine.open_position(account=self.account, symbol=command.symbol,
                                                       side=command.side, quantity=command.quantity,
                                                       trailing=command.trailing())
        self._plans[position.id] = command
        client_id = make_client_id(position.id, OrderPurpose.ENTRY, 0)
        ref = OrderRef(client_id, position.id, command.symbol, OrderPurpose.ENTRY, _entry_side(command.side),
                       command.quantity, OrderStatus.NEW, trigger_price=command.entry_price)
        try:
            await self.engine.track_order(position.id, ref)  # known before it is sent: a crash can look it up
            if self.engine.books.behind:  # the entry's row is not in the database: take no new exposure
                raise StorageUnavailable(f"the database is failing ({self.engine.books.failing}); entry not sent")
            self._placing.add(position.id)
            try:
                answer = await self.exchange.place_entry(command.symbol, command.side, command.quantity, client_id,
                                                         command.entry_price)
            finally:
                self._placing.discard(position.id)
        except xerr.Retryable as e:
            self.stats.exchange_errors += 1
            logger.warning("{} {} {} entry not confirmed ({}); looking it up by its client id", self.account,
                           command.symbol, position.id, _short(e))
            self._spawn(self._find_entry(position.id, ref), f"entry lookup of {position.id}")
            return position
        except asyncio.CancelledError:  # the entry may be on its way: look it up rather than assume
            self._spawn(self._find_entry(position.id, ref), f"entry lookup of {position.id}", essential=True)
            raise
        except Exception as e:
            # Rejected, refused before sending, or a failure of our own: nothing is working on the venue for
            # it (a Retryable above is the only answer that may hide an accepted order), so it ends CANCELLED
            # and never blocks the symbol.
            if isinstance(e, xerr.ExchangeError):
                self.stats.exchange_errors += 1
                logger.error("{} {} {} entry rejected: {}", self.account, command.symbol, position.id, e)
            else:
                logger.error("{} {} {} entry not sent: {}: {}", self.account, command.symbol, position.id,
                             type(e).__name__, _short(e))
            self._plans.pop(position.id, None)
            await asyncio.shield(self._entry_not_sent(position.id, client_id, _short(e)))
            raise
        self._handle_entry_update(position.id, answer)
        return position

    async def _entry_not_sent(self, position_id: str, client_id: str, why: str) -> None:
        await self._set_order_status(position_id, client_id, OrderStatus.REJECTED)
        await self.engine.fire_if(position_id, EntryFailed(reason=why[:200] or "entry not sent"),
                                  only_in={S.OPENING})

    def _check_open(self, command: OpenCommand) -> None:
        """Refuse what the venue would refuse, or what would hurt, before anything is created or sent."""
        if command.symbol not in self.symbols:
            raise InvalidEvent(f"{command.symbol} is not one of the watched symbols {self.symbols}")
        other = Side.SHORT if command.side is Side.LONG else Side.LONG
        held = self.engine.live_position(self.account, command.symbol, other)
        if held is not None:
            # One-way mode nets a symbol's orders: this entry would reduce or flip our own position.
            raise PositionConflict(f"{self.account} {command.symbol}: a {other.value} position of ours is live "
                                   f"({held.id}, {held.state.value}); the venue nets one symbol in one-way mode, so "
                                   f"a {command.side.value} cannot be opened until it has ended")
        rules = self.exchange.order_rules(command.symbol)
        quantity = command.quantity
        if rules.max_quantity is not None and quantity > rules.max_quantity:
            raise InvalidEvent(f"quantity {quantity} is above {command.symbol}'s maximum {rules.max_quantity}")
        if rules.min_quantity is not None and quantity < rules.min_quantity:
            raise InvalidEvent(f"quantity {quantity} is below {command.symbol}'s minimum {rules.min_quantity}")
        if rules.step is not None and rules.step > 0 and not _multiple(quantity, rules.step):
            raise InvalidEvent(f"quantity {quantity} is not a multiple of {command.symbol}'s step {rules.step}")
        for name in ("entry_price", "take_profit", "trailing_activation"):
            price = getattr(command, name)
            if price is None:
                continue
            if rules.max_price is not None and price > rules.max_price:
                raise InvalidEvent(f"{name} {price} is above {command.symbol}'s maximum price {rules.max_price}")
            if rules.min_price is not None and price < rules.min_price:
                raise InvalidEvent(f"{name} {price} is below {command.symbol}'s minimum price {rules.min_price}")
        if command.entry_price is not None and not _multiple(command.entry_price, rules.tick):
            raise InvalidEvent(f"entry_price {command.entry_price} is not a multiple of {command.symbol}'s tick "
                               f"{rules.tick}")
        mark = self.marks.get(command.symbol)
        reference = command.entry_price or mark
        if reference is not None:
            pct = command.stop_loss_pct if command.stop_loss_pct is not None else self.config.default_stop_loss_pct
            factor = 1 - pct / 100 if command.side is Side.LONG else 1 + pct / 100
            stop = self._round_stop(command.side, command.symbol, reference * factor)
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

    async def _find_entry(self, position_id: str, ref: OrderRef) -> None:
        """After an unconfirmed entry: the venue's answer for its client id decides (stream updates may too).

        "Not found" several times in a row, spaced out, means it never arrived (CANCELLED). Lookups that
        fail go on with a growing delay (capped at 30 s) until the entry is settled: an entry of unknown
        state may be exposure without a stop, so it is never given up on.
        """
        if position_id in self._entry_lookups:
            return  # one lookup per entry is enough
        self._entry_lookups.add(position_id)
        try:
            await self._look_up_entry(position_id, ref)
        finally:
            self._entry_lookups.discard(position_id)

    async def _look_up_entry(self, position_id: str, ref: OrderRef) -> None:
        not_found, attempt = 0, 0
        while not self._stopping:
            attempt += 1
            await asyncio.sleep(min(max(self.config.retry_backoff_s, 0.05) * attempt, 30.0))
            if position_id in self._entries_done or position_id not in self.engine.positions:
                return
            if position_id in self._placing:
                continue  # still being sent: "not found" now says nothing (its answer settles it)
            try:
                found = await self.exchange.order_by_client_id(ref.symbol, ref.client_id)
            except OrderAlreadyGone:
                not_found += 1
                if not_found <= self.config.stop_retries:
                    continue  # a lagging venue may not list it yet
                if position_id in self._entries_done:
                    return  # the stream settled it during the lookup
                logger.warning("{} {} {}: the entry never reached the venue", self.account, ref.symbol, position_id)
                self._entries_done.add(position_id)
                await self.engine.fire_if(position_id, EntryFailed(reason="entry never reached the venue"),
                                          only_in={S.OPENING, S.CLOSING_BY_BOT})
                return
            except xerr.ExchangeError as e:
                log = logger.warning if attempt <= self.config.stop_retries else logger.error
                log("{} {} {}: entry lookup failed ({}); the entry's state is unknown, looking again",
                    self.account, ref.symbol, position_id, _short(e))
                continue
            self._handle_entry_update(position_id, found)
            return

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
        positions = await self._until_reachable("positions", self.exchange.positions, retry_s)
        orders = await self._until_reachable("open orders", self.exchange.open_orders, retry_s)
        shown = {(s.symbol, s.side) for s in positions}
        ours_by_position: dict[str, list[OrderSnapshot]] = {}
        for order in orders:
            parsed = parse_client_id(order.client_id)
            if parsed is not None:
                ours_by_position.setdefault(parsed.position_id, []).append(order)
        counts = {"positions": 0, "opening": 0, "missing": 0, "closing": 0, "protected": 0}
        now = self.engine.clock()
        for position in [p for p in self.engine.positions.values() if p.account == self.account]:
            counts["positions"] += 1
            entry = next((o for o in position.working_orders() if o.purpose is OrderPurpose.ENTRY), None)
            if position.state is S.OPENING or (position.state is S.CLOSING_BY_BOT and position.quantity == 0):
                counts["opening"] += 1
                if entry is not None and position.state is S.CLOSING_BY_BOT:
                    # A close was asked for while it opened: its entry must not stay working (cancelled, then
                    # looked up; what filled is closed).
                    self._spawn(self._cancel_entry(position.id), f"entry cancel of {position.id}")
                elif entry is not None:
                    self._spawn(self._find_entry(position.id, entry), f"entry lookup of {position.id}")
                else:  # crashed between creating the position and recording its entry (or adopting it)
                    snap = next((p for p in positions if p.symbol == position.symbol and p.side is position.side),
                                None)
                    self._spawn(self._settle_bare_opening(position.id, snap), f"settling {position.id}")
                continue
            if (position.symbol, position.side) not in shown:
                counts["missing"] += 1
                self._missing[position.id] = now
                continue
            if position.state is S.CLOSING_BY_BOT:
                counts["closing"] += 1
                self._spawn(self._resume_close(position.id), f"resumed close of {position.id}")
                continue
            counts["protected"] += 1
            open_ids = {o.client_id for o in ours_by_position.get(position.id, [])}
            for order in position.working_orders():
                if order.purpose is OrderPurpose.STOP and order.client_id not in open_ids:
                    self._gone[order.client_id] = None  # gone while we were down
                    await self._set_order_status(position.id, order.client_id, OrderStatus.EXPIRED)
            for order in ours_by_position.get(position.id, []):
                parsed = parse_client_id(order.client_id)
                if parsed is not None and parsed.purpose is OrderPurpose.STOP and order.client_id not in position.orders:
                    await self._track(position, order.client_id or "", OrderPurpose.STOP, order.quantity,
                                      order.trigger_price or Decimal(0), order)
            # A tighter stop of ours than the database knows (moved while the books were behind) stays.
            await self._adopt_venue_stop(position.id, ours_by_position.get(position.id, []))
            position = self.engine.positions.get(position.id) or position
            if position.stop_price is None:  # crashed between the entry fill and the first stop's record
                self._spawn(self._protect_initial(position.id, replace_unrecorded=True),
                            f"protection of {position.id}")
            else:
                self._spawn(self._request_stop(position.id, None, None, "sync"), f"stop check of {position.id}")
        if counts["missing"]:
            for hook in list(self.after_resync):
                self._spawn(hook(), "reconciliation after recovery")
        self._recovered.set()
        self.engine.records.emit({"event": "recovery", "account": self.account, "symbol": None, "position_id": None,
                                  "at": self.engine.clock().isoformat(), **counts})
        logger.info("{}: recovery: {}", self.account, counts)
        return counts

    async def _settle_bare_opening(self, position_id: str, snap: PositionSnapshot | None) -> None:
        """An OPENING position without an entry order: its entry was never sent (recorded before sending),
        or it was being adopted. What the exchange shows on its symbol and side decides: a position there
        is filled into it and protected (it holds the one live slot for that symbol and side, so nothing
        else would protect it); none, and it never opened (CANCELLED)."""
        if snap is None or snap.side is None:
            logger.warning("{} {}: OPENING with no entry order and nothing on the exchange: never opened",
                           self.account, position_id)
            await self.engine.fire_if(position_id, EntryFailed(reason="entry never sent"),
                                      only_in={S.OPENING, S.CLOSING_BY_BOT})
            return
        quantity = abs(snap.amount)
        logger.warning("{} {} {}: OPENING with no entry order, the exchange holds {} {}: taking it and protecting "
                       "it", self.account, snap.symbol, position_id, snap.side.value, quantity)
        self._entries_done.add(position_id)
        outcome = await self.engine.fire_if(position_id, EntryFilled(quantity=quantity, price=snap.entry_price),
                                            only_in={S.OPENING})
        if outcome is not None:
            await self._protect_initial(position_id, from_mark_if_crossed=True)

    async def _until_reachable(self, what: str, call: Callable[[], Awaitable[Any]], retry_s: float) -> Any:
        attempt = 0
        while True:
            try:
                return await call()
            except xerr.Retryable as e:
                attempt += 1
                logger.error("{}: recovery cannot read {} from the exchange ({}); nothing is done on the "
                             "database's word alone; retry {} in {}s", self.account, what, _short(e), attempt, retry_s)
                await asyncio.sleep(retry_s)

    async def _resume_close(self, position_id: str) -> None:
        position = self.engine.positions.get(position_id)
        reason = position.close_reason if position is not None and position.close_reason else CloseReason.OPERATOR
        error = await self._send_close(position_id)
        if error is None:
            return
        outcome = await self.engine.fire_if(position_id, CloseFailed(error=_short(error)), only_in={S.CLOSING_BY_BOT})
        if outcome is not None and outcome.dest in PROTECTED:
            await self._request_stop(position_id, None, None, "sync")
            await self._close(position_id, reason)

    async def adopt(self, snap: PositionSnapshot) -> Position:
        """Track a position found on the exchange (opened by hand, or before a crash) as OPEN and protect it
        with the default stop distance: from its entry price, or from the mark if that stop is already
        crossed (an adopted position is protected, not closed at once). Refused while stopping."""
        self._command(f"adopting {snap.symbol}")
        self._commands += 1
        try:
            return await self._adopt(snap)
        finally:
            self._commands -= 1

    async def _adopt(self, snap: PositionSnapshot) -> Position:
        if snap.side is None:
            raise InvalidEvent(f"{snap.symbol}: nothing to adopt (flat)")
        quantity = abs(snap.amount)
        position = await self.engine.open_position(account=self.account, symbol=snap.symbol, side=snap.side,
                                                   quantity=quantity)
        self._entries_done.add(position.id)
        await self.engine.fire(position.id, EntryFilled(quantity=quantity, price=snap.entry_price))
        logger.warning("{} {} {}: adopted an untracked {} position of {} (entry {})", self.account, snap.symbol,
                       position.id, snap.side, quantity, snap.entry_price)
        self.engine.records.emit({
            "event": "adopted", "account": self.account, "symbol": snap.symbol, "position_id": position.id,
            "at": self.engine.clock().isoformat(), "side": snap.side.value, "quantity": str(quantity),
            "entry_price": str(snap.entry_price),
        })
        await self._protect_initial(position.id, from_mark_if_crossed=True)
        return self.engine.positions.get(position.id) or position

    async def close(self, position_id: str, reason: CloseReason = CloseReason.OPERATOR) -> bool:
        """Close a position at market with a reduce-only order; False if it had already moved on.

        A position still OPENING goes to CLOSING_BY_BOT and its entry is cancelled: nothing filled ends it
        CANCELLED, a fill (late or partial) is closed at once. A rejected close returns the position to
        its previous state and is retried `close_retries` times, and for as long as it takes while the
        position has no stop on the exchange (a loop, with a delay floor: it cannot spin or recurse).
        Refused while stopping (the engine's own safety closes are not).
        """
        self._command(f"closing {position_id}")
        self._commands += 1
        try:
            return await self._close(position_id, reason)
        finally:
            self._commands -= 1

    async def _close(self, position_id: str, reason: CloseReason = CloseReason.OPERATOR) -> bool:
        position = self.engine.positions.get(position_id)
        if position is None:
            raise UnknownPosition(f"no live position {position_id}")
        allowed = PROTECTED | {S.OPENING}
        retry = 0
        while True:
            outcome = await self.engine.fire_if(position_id, CloseRequested(reason=reason), only_in=allowed)
            if outcome is None:
                return retry > 0
            if outcome.source is S.OPENING:
                await self._cancel_entry(position_id)
            error = await self._send_close(position_id)
            if error is None:
                return True
            failed = await self.engine.fire_if(position_id, CloseFailed(error=_short(error)),
                                               only_in={S.CLOSING_BY_BOT})
            if failed is None:
                return True  # ended meanwhile (the flat came first)
            current = self.engine.positions.get(position_id)
            if current is None:
                return True
            stop = next((o for o in current.working_orders() if o.purpose is OrderPurpose.STOP), None)
            if failed.dest in PROTECTED and stop is None and current.quantity > 0:
                # Filled, no stop (a late fill of an entry being closed, or the stop failed): protect it
                # while the close is retried.
                self._spawn(self._protect_initial(position_id, close_if_unprotected=False),
                            f"protection of {position_id}", essential=True)
            retry += 1
            unprotected = failed.dest in PROTECTED and stop is None
            if retry > self.config.close_retries and not unprotected:
                logger.error("{} {} close rejected {} times; the position stays {} with its stop at {}",
                             self.account, position_id, retry, failed.dest, stop.trigger_price if stop else None)
                return False
            delay = min(max(self.config.retry_backoff_s, 0.05) * max(1, retry - self.config.close_retries), 30.0)
            if retry <= self.config.close_retries:
                logger.warning("{} {} close rejected ({}); retry {} of {} in {}s", self.account, position_id,
                               _short(error), retry, self.config.close_retries, delay)
            else:
                logger.critical("{} {} UNPROTECTED: no stop on the exchange and the close was rejected {} times "
                                "({}); retrying in {}s", self.account, position_id, retry, _short(error), delay)
            await asyncio.sleep(delay)
            allowed = PROTECTED

    async def _cancel_entry(self, position_id: str) -> None:
        """Cancel the entry of a position being closed (or trimmed). An entry still on its way is waited for
        first (a cancel that overtakes it finds nothing, and the entry lands afterwards). A cancel that is not
        confirmed is sent again in the background (the caller, an API request or a stop, does not wait for
        an outage); the entry is then looked up until its outcome is known."""
        position = self.engine.positions.get(position_id)
        entry = next((o for o in position.working_orders() if o.purpose is OrderPurpose.ENTRY), None) \
            if position is not None else None
        if entry is None:
            return
        while position_id in self._placing and not self._stopped:
            await asyncio.sleep(0.02)  # the send's own answer (or its timeout) comes first
        try:
            await self.exchange.cancel_order(entry)
        except OrderAlreadyGone:  # filled meanwhile, or never arrived: its own state decides
            logger.info("{} {} {} entry already ended; its fill decides", self.account, entry.symbol, position_id)
        except xerr.Retryable as e:
            self.stats.exchange_errors += 1
            logger.warning("{} {} {} entry cancel not confirmed ({}); sending it again in the background",
                           self.account, entry.symbol, position_id, _short(e))
            self._spawn(self._cancel_entry_again(position_id, entry), f"entry cancel of {position_id}",
                        essential=True)
            return
        self._settle_entry(position_id, entry)

    async def _cancel_entry_again(self, position_id: str, entry: OrderRef) -> None:
        """A resting entry of a position being closed must not stay working (it could fill later, without a
        stop): the cancel is sent again, slower and slower, until it is confirmed or the entry has ended.
        A stopping engine leaves it to restart recovery (which cancels the entry of a closing position)."""
        attempt = 0
        while not self._stopping:
            attempt += 1
            await asyncio.sleep(min(max(self.config.retry_backoff_s, 0.05) * attempt, 30.0))
            current = self.engine.positions.get(position_id)
            if current is None or current.state not in (S.OPENING, S.CLOSING_BY_BOT) or \
                    position_id in self._entries_done:
                return
            try:
                await self.exchange.cancel_order(entry)
            except OrderAlreadyGone:
                pass
            except xerr.Retryable as e:
                self.stats.exchange_errors += 1
                logger.warning("{} {} {} entry cancel not confirmed ({}); again", self.account, entry.symbol,
                               position_id, _short(e))
                continue
            self._settle_entry(position_id, entry)
            return

    def _settle_entry(self, position_id: str, entry: OrderRef) -> None:
        """The entry's outcome (cancelled, filled, or never arrived) ends the position or closes what filled;
        the stream usually says it, but a stream that is down must not leave it CLOSING_BY_BOT with nothing
        known filled: look the entry up until it is settled."""
        if position_id not in self._entries_done:
            self._spawn(self._find_entry(position_id, entry), f"entry lookup of {position_id}", essential=True)

    async def _send_close(self, position_id: str) -> Exception | None:
        """Send the reduce-only close of a CLOSING_BY_BOT position; returns the rejection, else None."""
        position = self.engine.positions.get(position_id)
        if position is None or position.state is not S.CLOSING_BY_BOT:
            return None
        quantity = position.quantity
        if quantity <= 0:
            return None  # nothing filled yet: a late entry fill sends the close
        client_id = make_client_id(position_id, OrderPurpose.CLOSE, position.seq)
        if client_id not in position.orders:
            await self.engine.track_order(position_id, OrderRef(
                client_id, position_id, position.symbol, OrderPurpose.CLOSE, _exit_side(position.side), quantity))
        attempt = 0
        while True:
            try:
                answer = await self.exchange.close_position(position.symbol, position.side, quantity, client_id)
            except (xerr.DuplicateOrder, xerr.ReduceOnlyRejected) as e:
                # The first try arrived, or the position is already gone: the stream's flat ends it.
                logger.info("{} {} {} close {}: {}", self.account, position.symbol, position_id, client_id, _short(e))
                if isinstance(e, xerr.ReduceOnlyRejected):
                    self._close_found_flat.add(position_id)  # whatever flattened it, it was not this close
                return None
            except xerr.Retryable as e:
                # The order may have landed: never "failed", stay CLOSING_BY_BOT (the stop stays too) and
                # resend the same id (reduce-only, so a repeat can never over-close), slower and slower.
                self.stats.exchange_errors += 1
                attempt += 1
                delay = min(max(self.config.retry_backoff_s, 0.05) * attempt, 30.0)
                log = logger.warning if attempt <= self.config.close_retries else logger.error
                log("{} {} {} close {} not confirmed ({}); resending the same id in {}s", self.account,
                    position.symbol, position_id, client_id, _short(e), delay)
                await asyncio.sleep(delay)
                current = self.engine.positions.get(position_id)
                if current is None or current.state is not S.CLOSING_BY_BOT or self._stopping:
                    return None
                continue
            except xerr.ExchangeError as e:
                self.stats.exchange_errors += 1
                await self._set_order_status(position_id, client_id, OrderStatus.REJECTED)
                return e
            await self._set_order_status(position_id, client_id, answer.status)
            return None

    # --- stream handlers (synchronous: they decide, background tasks act) ------------------------

    def on_position(self, snap: PositionSnapshot) -> None:
        self._spoke()
        self.live[snap.symbol] = snap
        for side in (Side.LONG, Side.SHORT):
            position = self.engine.live_position(self.account, snap.symbol, side)
            if position is None or position.state not in FLATTENABLE:
                continue
            self._missing.pop(position.id, None)  # the stream speaks for it again
            entered = self._entry_at.get(position.id)
            if entered is not None and snap.at < entered:
                continue  # older than this position's entry: about an earlier position on the symbol
            if snap.amount == 0 or snap.side is not position.side:
                self._spawn(self._on_flat(position.id, snap), f"flat of {position.id}")
            elif abs(snap.amount) < position.quantity:
                self._spawn(self._on_reduced(position.id, snap), f"reduction of {position.id}")
            elif abs(snap.amount) > position.quantity and position.quantity > 0:
                logger.warning("{} {} {}: exchange size {} above ours {} (left to reconciliation)", self.account,
                               snap.symbol, position.id, abs(snap.amount), position.quantity)

    def on_order(self, order: OrderSnapshot) -> None:
        self._spoke()
        client_id = order.client_id
        if order.algo_id is not None and order.exchange_order_id and client_id:
            self._triggered[order.exchange_order_id] = client_id
            while len(self._triggered) > 10_000:
                self._triggered.popitem(last=False)
        elif order.exchange_order_id in self._triggered:
            client_id = self._triggered[order.exchange_order_id]
        if order.algo_id is None and order.filled > 0:
            fills = self._fills.setdefault(order.symbol, deque(maxlen=64))
            fills.append(_SeenFill(client_id, order))
            self._fill_signal.setdefault(order.symbol, asyncio.Event()).set()
            if self._unexplained:
                self._amend(order, client_id)
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
            self._fired[position.id] = client_id or ""
        if ours.purpose is OrderPurpose.ENTRY:
            self._handle_entry_update(position.id, order)
            return
        known = position.orders.get(client_id or "")
        if order.algo_id is not None and known is not None and order.status is not known.status and (
                order.status.is_final or known.status is OrderStatus.NEW):
            self._spawn(self._set_order_status(position.id, known.client_id, order.status), "order status")
            if (known.purpose is OrderPurpose.STOP and order.status in {OrderStatus.CANCELED, OrderStatus.EXPIRED}
                    and known.client_id not in self._own_cancels
                    and position.state in PROTECTED and position.stop_price is not None):
                # Not cancelled by a move of ours (a move places first) or by a flat (checked under the
                # lock): someone removed our stop. Put it back at its price.
                self._gone[known.client_id] = None
                while len(self._gone) > 10_000:
                    self._gone.popitem(last=False)
                self._spawn(self._reprotect(position.id, known.client_id), f"re-protection of {position.id}")

    def on_mark(self, mark: MarkPrice) -> None:
        self.marks[mark.symbol] = mark.price
        watches = self._watch.get(mark.symbol)
        if watches and not self._draining:  # a stopping engine starts no stop move
            for watch in list(watches.values()):
                self._follow(watch, mark.symbol, mark.price)

    def client_id_of(self, exchange_order_id: str) -> str | None:
        """The client id of an order seen on the stream (or placed by one of our conditional orders)."""
        if exchange_order_id in self._triggered:
            return self._triggered[exchange_order_id]
        for fills in self._fills.values():
            for seen in fills:
                if seen.order.exchange_order_id == exchange_order_id:
                    return seen.client_id
        return None

    # --- entry ------------------------------------------------------------------------------------

    def _handle_entry_update(self, position_id: str, order: OrderSnapshot) -> None:
        if position_id in self._entries_done:
            return
        if order.filled > 0:
            self._entry_fills[position_id] = order
        if order.status is OrderStatus.FILLED or (order.status.is_final and order.filled > 0):
            self._entries_done.add(position_id)
            self._entry_at[position_id] = order.at
            task = self._spawn(self._entry_filled(position_id, order), f"entry fill of {position_id}",
                               essential=True)
            if task is not None:
                self._entry_tasks[position_id] = task
                task.add_done_callback(lambda t: self._entry_fill_ended(position_id, t))
        elif order.status.is_final:
            self._entries_done.add(position_id)
            self._spawn(self.engine.fire_if(position_id, EntryFailed(reason=f"entry {order.status.value}"),
                                            only_in={S.OPENING, S.CLOSING_BY_BOT}), f"entry failure of {position_id}")
        elif order.filled > 0 and position_id not in self._trimming:
            # Partly filled: the filled part is exposure without a stop. Cancel the rest; the final update
            # (cancelled with a fill) then opens the position with what filled and protects it.
            self._trimming.add(position_id)
            logger.info("{} {} entry partly filled ({}); cancelling the rest", self.account, position_id, order.filled)
            self._spawn(self._cancel_entry(position_id), f"entry trim of {position_id}")

    def _entry_fill_ended(self, position_id: str, task: asyncio.Task[Any]) -> None:
        if self._entry_tasks.get(position_id) is task:
            del self._entry_tasks[position_id]
        failed = task.cancelled() or task.exception() is not None
        position = self.engine.positions.get(position_id)
        if failed and position is not None and position.state is S.OPENING:
            # Not taken in: a later update of the entry, or the protection audit, tries again.
            self._entries_done.discard(position_id)
            logger.critical("{} {} {}: the entry filled but could not be taken in; retried by the next update or "
                            "the protection audit", self.account, position.symbol, position_id)

    async def _entry_filled(self, position_id: str, order: OrderSnapshot) -> None:
        price = order.average_price or order.trigger_price
        if price is None:
            raise InvalidEvent(f"entry fill of {position_id} without a price")
        outcome = await self.engine.fire_if(position_id, EntryFilled(
            quantity=order.filled, price=price, exchange_order_id=order.exchange_order_id),
            only_in={S.OPENING, S.CLOSING_BY_BOT})
        # Protection first; the entry order's own row is bookkeeping and follows in the background.
        self._spawn(self._set_order_status(position_id, order.client_id or "", OrderStatus.FILLED),
                    f"entry status of {position_id}", essential=True)
        if outcome is None:
            return
        if outcome.dest is S.CLOSING_BY_BOT:
            reason = self.engine.positions[position_id].close_reason or CloseReason.OPERATOR
            error = await self._send_close(position_id)
            if error is not None:  # the close loop that asked for it is not running any more: start one
                await self.engine.fire_if(position_id, CloseFailed(error=_short(error)), only_in={S.CLOSING_BY_BOT})
                position = self.engine.positions.get(position_id)
                if position is not None and position.state in PROTECTED:
                    await self._protect_initial(position_id, close_if_unprotected=False)
                    await self._close(position_id, reason)
            return
        await self._protect_initial(position_id)
        self._flat_while_opening(position_id)

    def _flat_while_opening(self, position_id: str) -> None:
        """A flat the stream showed while the position was still OPENING (a liquidation right at the fill)
        was not acted on then: once the fill is taken in, the newest position update decides."""
        position = self.engine.positions.get(position_id)
        entered = self._entry_at.get(position_id)
        latest = self.live.get(position.symbol) if position is not None else None
        if position is None or position.state not in FLATTENABLE or entered is None or latest is None or \
                latest.at < entered:
            return
        if latest.amount == 0 or latest.side is not position.side:
            self._spawn(self._on_flat(position_id, latest), f"flat of {position_id}")

    async def _protect_initial(self, position_id: str, *, close_if_unprotected: bool = True,
                               from_mark_if_crossed: bool = False, replace_unrecorded: bool = False) -> None:
        """Place the first stop. `replace_unrecorded` (restart recovery): stops of ours found on the exchange
        that no StopMoved recorded (placed just before a crash) are replaced, new one first, not trusted."""
        position = self.engine.positions.get(position_id)
        if position is None or position.entry_price is None or position.stop_price is not None or (
                not replace_unrecorded and any(o.purpose is OrderPurpose.STOP for o in position.working_orders())):
            return
        if position_id in self._loaded and not replace_unrecorded:
            # Loaded from a database that may be behind the venue (a storage outage before a restart): a stop
            # of ours working there for this position is the truth to start from, not a new one at the
            # initial distance (which would loosen a stop that had trailed).
            try:
                venue = await self.exchange.open_orders(position.symbol)
            except xerr.ExchangeError as e:
                logger.warning("{} {} {}: cannot list the venue's stops before protecting ({}); placing one",
                               self.account, position.symbol, position_id, _short(e))
                venue = []
            if await self._adopt_venue_stop(position_id, venue):
                await self._request_stop(position_id, None, None, "sync")  # and no other stop of ours
                self._watch_position(self.engine.positions.get(position_id) or position)
                return
        plan = self._plans.pop(position_id, None)
        target = self._initial_target(position, plan, from_mark_if_crossed=from_mark_if_crossed)
        placed = await self._request_stop(position_id, target, None, "initial")
        if placed == "failed":
            logger.error("{} {} {}: no stop could be placed; closing at market (unprotected)", self.account,
                         position.symbol, position_id)
            if close_if_unprotected:
                await self._close(position_id, CloseReason.UNPROTECTED)
            return
        self._watch_position(self.engine.positions.get(position_id) or position)
        if plan is not None and plan.take_profit is not None and placed == "placed":
            await self._place_take_profit(position_id, plan.take_profit)

    def _initial_target(self, position: Position, plan: OpenCommand | None = None, *,
                        from_mark_if_crossed: bool = False) -> Decimal:
        """The first stop: the open command's distance (else the default) from the entry, to the tick; from
        the mark instead when asked and that stop would already be crossed."""
        assert position.entry_price is not None
        pct = plan.stop_loss_pct if plan and plan.stop_loss_pct is not None else self.config.default_stop_loss_pct
        factor = 1 - pct / 100 if position.side is Side.LONG else 1 + pct / 100
        target = self._round_stop(position.side, position.symbol, position.entry_price * factor)
        mark = self.marks.get(position.symbol)
        if from_mark_if_crossed and mark is not None and not is_stop_on_safe_side(position.side, target, mark):
            target = self._round_stop(position.side, position.symbol, mark * factor)
        return target

    async def _first_mark(self, symbol: str, wait_s: float = 3.0) -> Decimal | None:
        """The mark, waiting up to `wait_s` for the stream's first one (Binance pushes every second)."""
        deadline = self.monotonic() + wait_s
        while (mark := self.marks.get(symbol)) is None and self.monotonic() < deadline and not self._stopping:
            await asyncio.sleep(0.05)
        return mark

    async def _adopt_venue_stop(self, position_id: str, orders: list[OrderSnapshot]) -> bool:
        """Take the tightest working stop of ours for this position that the venue holds (its size, on the
        safe side of the mark, better than the recorded one) as the position's stop: tracked and recorded
        (`StopMoved`). Client ids are ours alone, so such a stop was placed by this engine: one whose record
        was lost (the books behind at a crash or stop). True if one was taken."""
        position = self.engine.positions.get(position_id)
        if position is None or position.state not in PROTECTED or position.entry_price is None:
            return False
        known_mark = await self._first_mark(position.symbol)
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
                await self._track(position, order.client_id or "", OrderPurpose.STOP, order.quantity,
                                  order.trigger_price or Decimal(0), order)
        position = self.engine.positions.get(position_id) or position
        pick = max if position.side is Side.LONG else min
        best = pick(mine, key=lambda o: o.trigger_price or Decimal(0))
        assert best.trigger_price is not None
        if best.client_id not in position.orders:
            await self._track(position, best.client_id or "", OrderPurpose.STOP, best.quantity, best.trigger_price,
                              best)
        if known_mark is None:  # recorded as "one tick beyond the stop": all the venue told us (not triggered)
            tick = self._tick(position.symbol)
            mark = best.trigger_price + tick if position.side is Side.LONG else best.trigger_price - tick
            logger.warning("{} {} {}: no mark price yet; the venue's working stop {} is taken as on the safe side",
                           self.account, position.symbol, position_id, best.trigger_price)
        else:
            mark = known_mark
        outcome = await self.engine.fire_if(position_id, StopMoved(
            stop_price=best.trigger_price, mark=mark, client_order_id=best.client_id), only_in=PROTECTED)
        if outcome is not None:
            logger.warning("{} {} {}: took the stop {} at {} that the venue holds (placed before, its record lost; "
                           "the database said {})", self.account, position.symbol, position_id, best.client_id,
                           best.trigger_price, position.stop_price)
        return outcome is not None

    async def _place_take_profit(self, position_id: str, price: Decimal) -> None:
        """Under the symbol lock too: terminal cleanup waits for it, so it cannot outlive the position."""
        position = self.engine.positions.get(position_id)
        if position is None:
            return
        await self.engine.locks.submit(self.account, position.symbol, f"{position_id}/tp", price,
                                       lambda target: self._apply_take_profit(position_id, target))

    async def _apply_take_profit(self, position_id: str, price: Decimal) -> None:
        position = self.engine.positions.get(position_id)
        if position is None or position.state not in PROTECTED:
            return
        client_id = self._next_client_id(position, OrderPurpose.TAKE_PROFIT)
        try:
            answer = await self.exchange.place_stop(position.symbol, position.side, position.quantity, price,
                                                    client_id, OrderPurpose.TAKE_PROFIT)
        except xerr.ExchangeError as e:
            self.stats.exchange_errors += 1
            logger.warning("{} {} {}: take-profit at {} not placed: {}", self.account, position.symbol,
                           position_id, price, _short(e))
            return
        try:
            await self._track(position, client_id, OrderPurpose.TAKE_PROFIT, position.quantity, price, answer)
        except UnknownPosition:
            await self._cancel_quietly(OrderRef(client_id, position_id, position.symbol, OrderPurpose.TAKE_PROFIT,
                                                _exit_side(position.side), position.quantity, OrderStatus.OPEN,
                                                price, answer.exchange_order_id, answer.algo_id))

    # --- flat and reductions ----------------------------------------------------------------------

    async def _on_flat(self, position_id: str, snap: PositionSnapshot) -> None:
        position = self.engine.positions.get(position_id)
        if position is None:
            return
        fill = await self._closing_fill(position, snap)
        current = self.live.get(snap.symbol)
        if current is not None and current.side is position.side and current.at > snap.at:
            return  # a newer update shows the position again: that flat was stale
        position = self.engine.positions.get(position_id)  # as it is now, after the wait
        if position is None:
            return
        trailing_active = position.trailing is not None and position.trailing.active
        cause: CloseCause | None = CloseCause.UNKNOWN
        source = "none"
        exit_price = order_id = realized = fee = None
        if fill is not None:
            cause = classify_close(fill.client_id, position_id=position_id, trailing_was_active=trailing_active)
            source = "fill_update"
            order = fill.order
            exit_price, order_id, realized, fee = order.average_price, order.exchange_order_id, order.realized_pnl, \
                order.fee
        else:
            # The fill update is late (or lost): our own conditional order saying it fired, then REST. Also
            # while we close it: a stop or a liquidation may have come first (our close then finds nothing).
            fired = self._fired.get(position_id)
            if fired is not None:
                cause = classify_close(fired, position_id=position_id, trailing_was_active=trailing_active)
                source = "algo_update"
            else:
                found = await self._rest_cause(position)
                late = self._unused_fill(position, snap) if found is None else None
                if late is not None:  # the fill update arrived while REST was asked
                    cause = classify_close(late.client_id, position_id=position_id, trailing_was_active=trailing_active)
                    source = "fill_update"
                    exit_price, order_id, realized, fee = late.order.average_price, late.order.exchange_order_id, \
                        late.order.realized_pnl, late.order.fee
                elif found is not None:
                    rest_fill, client_id = found
                    cause = classify_close(client_id, position_id=position_id, trailing_was_active=trailing_active)
                    source = "rest"
                    exit_price, order_id, realized, fee = rest_fill.price, rest_fill.order_id, \
                        rest_fill.realized_pnl, rest_fill.fee
        refused_flat = position_id in self._close_found_flat
        self._close_found_flat.discard(position_id)
        if position.state is S.CLOSING_BY_BOT and cause is CloseCause.UNKNOWN and not refused_flat:
            cause, source = None, "none"  # our close is in flight, nothing else found: the state's default (bot)
        elif cause is CloseCause.BOT and position.state is not S.CLOSING_BY_BOT:
            cause = CloseCause.UNKNOWN  # our close order, but not in flight: do not claim it
        outcome = await self.engine.fire_if(position_id, Flat(
            cause=cause, exit_price=exit_price, exchange_order_id=order_id, realized_pnl=realized, fee=fee,
            exchange_ts_ms=int(snap.at.timestamp() * 1000), cause_source=source), only_in=FLATTENABLE)
        if outcome is not None:
            self._closed_with_cause(position, cause, source)

    def _closed_with_cause(self, position: Position, cause: CloseCause | None, source: str) -> None:
        """Count where causes come from; remember an unexplained close, so a late fill can amend it."""
        self.stats.cause_sources[source if cause is not None else "state"] += 1
        if cause is CloseCause.UNKNOWN:
            self._unexplained[position.id] = (position, self.monotonic())
            while len(self._unexplained) > 1000:
                self._unexplained.popitem(last=False)

    async def _rest_cause(self, position: Position) -> tuple[Fill, str | None] | None:
        """The flattening fill from REST, bounded in time: a REST outage must not hold up the close."""
        try:
            return await asyncio.wait_for(self.rest_closing_fill(position), self.config.cause_rest_timeout_s)
        except (xerr.ExchangeError, asyncio.TimeoutError) as e:
            logger.warning("{} {} {}: the closing fill could not be read from REST ({}); cause unknown for now",
                           self.account, position.symbol, position.id, _short(e) or "timeout")
            return None

    async def rest_closing_fill(self, position: Position) -> tuple[Fill, str | None] | None:
        """The newest fill on the closing side since the position was opened, with its order's client id
        (from the stream's memory, else the order by id), from REST; None when there is none. A fill this
        process took in as a reduction of the position is not its closing fill (chaos seed 300809: another
        client's partial close, then the rest vanished; the partial close was claimed as the flattening).
        Known only by order id, and only in this process: an order that reduced and later flattened the
        same position is then not found here (the flat's cause stays with the stream's fill, or unknown)."""
        # Binance answers at most 7 days per query (ccxt sends endTime = since + 7 days): the closing fill is
        # recent, so ask for the last 6 days of an older position, not for its first week.
        closing = _exit_side(position.side)
        candidates: list[Fill] = []
        for back in (timedelta(minutes=10), timedelta(days=6)):  # Binance lists oldest first from the start
            since = max(position.created_at, self.engine.clock() - back)
            fills = await self.exchange.fills(position.symbol, since)
            reductions = self._reduced_by.get(position.id, ())  # a fill taken in as a reduction flattened nothing
            candidates = [f for f in fills if f.side == closing and f.at >= position.created_at
                          and f.order_id not in reductions]
            if candidates or since == position.created_at:
                break
        if not candidates:
            return None
        fill = max(candidates, key=lambda f: f.at)
        known = self.client_id_of(fill.order_id)
        if known is not None:
            return fill, known
        order = await self.exchange.order(position.symbol, fill.order_id)
        return fill, order.client_id

    def _amend(self, order: OrderSnapshot, client_id: str | None) -> None:
        """A fill that arrives after its position was closed with cause `unknown` explains that close: the
        closure is amended by a `closure_amended` record (the journal stays as it was)."""
        ours = parse_client_id(client_id)
        for position_id, (position, closed_at) in list(self._unexplained.items()):
            if position.symbol != order.symbol or order.side != _exit_side(position.side):
                continue
            if ours is not None and ours.position_id != position_id:
                continue  # an order of another position of ours (a reversal's entry): it explains nothing here
            if self.monotonic() - closed_at > 600 or order.at < position.created_at:
                continue
            del self._unexplained[position_id]
            cause = classify_close(client_id, position_id=position_id,
                                   trailing_was_active=position.trailing is not None and position.trailing.active)
            if cause in (CloseCause.BOT, CloseCause.UNKNOWN):
                return
            self.stats.closures_amended += 1
            self.engine.records.emit({
                "event": "closure_amended", "account": self.account, "symbol": position.symbol,
                "position_id": position_id, "at": self.engine.clock().isoformat(), "cause_before": "unknown",
                "cause": cause.value, "cause_source": "late_fill_update", "exchange_order_id": order.exchange_order_id,
                "client_order_id": client_id, "exit_price": _s(order.average_price),
                "realized_pnl": _s(order.realized_pnl), "fee": _s(order.fee),
            })
            logger.warning("{} {} {}: closure cause amended: unknown -> {} (the fill update came late)",
                           self.account, position.symbol, position_id, cause.value)
            return

    def _unused_fill(self, position: Position, snap: PositionSnapshot) -> _SeenFill | None:
        """The newest unused fill seen on the closing side of the symbol, no older than the update."""
        closing = _exit_side(position.side)
        earliest = snap.at - timedelta(seconds=1)
        entered = self._entry_at.get(position.id)
        if entered is not None and entered > earliest:
            earliest = entered  # a fill before this position's entry is about an earlier position
        for seen in reversed(self._fills.get(snap.symbol, ())):
            ours = parse_client_id(seen.client_id)
            if ours is not None and ours.purpose is OrderPurpose.ENTRY:
                continue  # an entry opens a position, it never flattens one (one way: no flips of ours)
            if not seen.used and seen.order.side == closing and seen.order.at >= earliest:
                seen.used = True
                return seen
        return None

    async def _closing_fill(self, position: Position, snap: PositionSnapshot) -> _SeenFill | None:
        """The fill that flattened the position: the newest unused fill on the closing side of the symbol,
        no older than the update, waiting up to `cause_wait_s` for it (the order update may come after)."""
        deadline = self.monotonic() + self.config.cause_wait_s
        signal = self._fill_signal.setdefault(snap.symbol, asyncio.Event())
        while True:
            found = self._unused_fill(position, snap)
            if found is not None:
                return found
            remaining = deadline - self.monotonic()
            if remaining <= 0:
                return None
            signal.clear()
            try:
                await asyncio.wait_for(signal.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def take_reduction(self, position_id: str, snap: PositionSnapshot) -> bool:
        """A reduction seen on REST only (reconciliation): taken in as the stream's would have been, in the
        background (its cause wait must not hold up the reconciliation pass); not while one is being taken
        (False then)."""
        if position_id in self._reducing:
            return False
        self._reducing[position_id] = 0  # pending from now, not from when the task starts
        if self._spawn(self._on_reduced(position_id, snap), f"reduction of {position_id}") is None:
            del self._reducing[position_id]
            return False
        return True

    def entry_time(self, position_id: str) -> datetime | None:
        """When this position's entry filled, by the venue's clock (None: not known in this process)."""
        return self._entry_at.get(position_id)

    async def _on_reduced(self, position_id: str, snap: PositionSnapshot) -> None:
        self._reducing[position_id] = self._reducing.get(position_id, 0) + 1
        try:
            await self._take_reduced(position_id, snap)
        finally:
            self._reducing[position_id] -= 1
            if not self._reducing[position_id]:
                del self._reducing[position_id]

    async def _take_reduced(self, position_id: str, snap: PositionSnapshot) -> None:
        position = self.engine.positions.get(position_id)
        if position is None:
            return
        before = position.quantity
        remaining = abs(snap.amount)
        fill = await self._closing_fill(position, snap)
        order = fill.order if fill is not None else None
        current = self.engine.positions.get(position_id)
        if current is None or not 0 < remaining < current.quantity:
            return  # taken in meanwhile (the stream and reconciliation can both see one reduction)
        outcome = await self.engine.fire_if(position_id, Reduced(
            remaining=remaining, price=order.average_price if order else None,
            realized_pnl=order.realized_pnl if order else None, fee=order.fee if order else None),
            only_in=FLATTENABLE)
        if outcome is None:
            return
        if order is not None and order.exchange_order_id:
            self._reduced_by.setdefault(position_id, set()).add(order.exchange_order_id)
        now = self.engine.clock()
        self.engine.records.emit({
            "event": "reduced", "account": self.account, "symbol": position.symbol, "position_id": position_id,
            "at": now.isoformat(), "side": position.side.value, "closed_quantity": str(before - remaining),
            "remaining": str(remaining), "price": _s(order.average_price if order else None),
            "realized_pnl": _s(order.realized_pnl if order else None), "fee": _s(order.fee if order else None),
            "cause": classify_close(fill.client_id if fill else None, position_id=position_id,
                                    trailing_was_active=False).value,
            "duration_s": round((now - position.created_at).total_seconds(), 3),
        })
        logger.info("{} {} {} reduced {} -> {}", self.account, position.symbol, position_id, before, remaining)
        if outcome.dest in PROTECTED:
            await self._request_stop(position_id, None, None, "sync")

    async def _reprotect(self, position_id: str, lost_client_id: str, *, verify: bool = False) -> None:
        """Put a removed stop back. `verify`: the removal was only inferred from a REST snapshot after a
        resync; re-place only if a targeted REST query shows the position (else reconciliation decides)."""
        await self._recovered.wait()  # no order before restart recovery (which checks every stop itself)
        position = self.engine.positions.get(position_id)
        if position is None or position.stop_price is None:
            return
        if verify:
            try:
                shown = await self.exchange.positions([position.symbol])
            except xerr.ExchangeError as e:
                logger.warning("{} {} {}: cannot verify a missing stop ({}); re-placing it", self.account,
                               position.symbol, position_id, _short(e))
            else:
                if not any(s.symbol == position.symbol and s.side is position.side for s in shown):
                    return
        result = await self._request_stop(position_id, None, None, "sync")
        if result == "placed":
            logger.warning("{} {} {}: stop {} was removed on the exchange; placed again at {}", self.account,
                           position.symbol, position_id, lost_client_id, position.stop_price)

    # --- trailing ---------------------------------------------------------------------------------

    def _watch_position(self, position: Position) -> None:
        if position.trailing is None or position.state not in PROTECTED:
            return
        # deferred: the first mark evaluates the rule even without a new extreme, so a move that was due
        # when the process stopped (activated, stop not yet moved) is made at once after a restart.
        self._watch.setdefault(position.symbol, {})[position.id] = _Watch(position.id, position.trailing.watermark,
                                                                         deferred=True)

    def _on_transition(self, position: Position, outcome: Outcome) -> None:
        if outcome.dest.is_terminal:
            watches = self._watch.get(position.symbol)
            if watches is not None:
                watches.pop(position.id, None)
            self._plans.pop(position.id, None)
            self._entries_done.discard(position.id)
            self._trimming.discard(position.id)
            self._entry_at.pop(position.id, None)
            self._reduced_by.pop(position.id, None)
            self._missing.pop(position.id, None)
            self._fired.pop(position.id, None)
            self._entry_fills.pop(position.id, None)
            self._unprotected_since.pop(position.id, None)
            for purpose in OrderPurpose:
                self._attempts.pop((position.id, purpose), None)

    def _follow(self, watch: _Watch, symbol: str, mark: Decimal) -> None:
        """The hot path, once per mark per trailing position: cheap unless the watermark improves."""
        position = self.engine.positions.get(watch.position_id)
        if position is None:
            self._watch.get(symbol, {}).pop(watch.position_id, None)
            return
        trailing = position.trailing
        if trailing is None:
            return
        if position.state is S.OPEN:
            if not watch.activating and is_activation_crossed(position.side, trailing.activation_price, mark):
                watch.activating = True
                self._spawn(self._activate(watch, mark), f"trailing activation of {position.id}")
            return
        if position.state is not S.TS_ACTIVE:
            return
        best = watch.watermark
        if best is None or (mark > best if position.side is Side.LONG else mark < best):
            watch.watermark = best = mark
        elif not watch.deferred:
            return
        now = self.engine.clock()
        if not self._recovered.is_set():
            watch.deferred = True  # no order before restart recovery; the first mark after it decides
            return
        decision = trail(position.side, trailing, position.stop_price, best, now, tick=self._tick(symbol),
                         min_step=(position.stop_price or best) * self.config.trail_min_step_pct / 100,
                         min_interval=self._min_interval)
        if decision.target is None:
            watch.deferred = trailing.last_moved_at is not None and now - trailing.last_moved_at < self._min_interval
            return
        watch.deferred = False
        self._want_stop(watch, decision.target, decision.watermark)

    async def _activate(self, watch: _Watch, mark: Decimal) -> None:
        try:
            outcome = await self.engine.fire_if(watch.position_id, TsActivated(mark=mark), only_in={S.OPEN})
        finally:
            watch.activating = False
        if outcome is not None:
            position = self.engine.positions[watch.position_id]
            logger.info("{} {} {} trailing stop active at mark {}", self.account, position.symbol, position.id, mark)
            watch.watermark = mark
            watch.deferred = True  # evaluate at once with the newest mark
            self._follow(watch, position.symbol, self.marks.get(position.symbol, mark))

    def _want_stop(self, watch: _Watch, target: Decimal, watermark: Decimal) -> None:
        watch.want = (target, watermark)
        if watch.worker is None or watch.worker.done():
            watch.worker = self._spawn(self._move_worker(watch), f"stop mover of {watch.position_id}")

    async def _move_worker(self, watch: _Watch) -> None:
        while watch.want is not None:
            target, watermark = watch.want
            watch.want = None
            await self._request_stop(watch.position_id, target, watermark, "trail")

    # --- placing and moving stops (under the symbol's lock) ---------------------------------------

    async def _request_stop(self, position_id: str, target: Decimal | None, watermark: Decimal | None,
                            mode: str) -> str:
        """Set the position's stop under the symbol lock: placed / skipped / failed / crossed.

        Modes: `initial` (first stop at `target`), `trail` (a better stop at `target`; dropped when no
        longer better or too soon), `sync` (make the exchange match the position: exactly one working stop
        at the position's current stop price and size, read under the lock; after a reduction, or when our
        stop was removed on the exchange; not a machine event). Trail and sync requests coalesce separately
        (different owners), so neither drops the other.
        """
        position = self.engine.positions.get(position_id)
        if position is None:
            return "skipped"
        owner = position_id if mode != "sync" else f"{position_id}/sync"
        if self.engine.locks.is_released(position_id):
            return "skipped"
        result = await self.engine.locks.submit(
            self.account, position.symbol, owner, (target, watermark, mode),
            lambda request: self._apply_stop(position_id, *request))
        return result.result if result.applied and result.result else "skipped"

    async def _apply_stop(self, position_id: str, target: Decimal | None, watermark: Decimal | None,
                          mode: str) -> str:
        position = self.engine.positions.get(position_id)
        if position is None or position.state not in PROTECTED:
            return "skipped"
        symbol, side = position.symbol, position.side
        if mode == "sync":
            target = position.stop_price
            if target is None or self._is_flat(position):
                return "skipped"  # nothing to match yet, or flat (the flat event ends it)
            working = [o for o in position.working_orders()
                       if o.purpose is OrderPurpose.STOP and o.client_id not in self._gone]
            if len(working) == 1 and working[0].trigger_price == target and working[0].quantity == position.quantity:
                return "skipped"  # the exchange already matches
        if mode == "trail":
            if not is_stop_improvement(side, position.stop_price, target):
                return "skipped"  # overtaken by a move that already went further
            moved = position.trailing.last_moved_at if position.trailing is not None else None
            if moved is not None and self.engine.clock() - moved < self._min_interval:
                watch = self._watch.get(symbol, {}).get(position_id)
                if watch is not None:
                    watch.deferred = True  # the next mark after the interval moves it
                return "skipped"
        assert target is not None
        mark = self.marks.get(symbol) or position.entry_price
        assert mark is not None
        if not is_stop_on_safe_side(side, target, mark):
            return await self._stop_crossed(position, target, mark, "mark already beyond it")
        quantity = position.quantity
        old = [o for o in position.working_orders() if o.purpose is OrderPurpose.STOP]
        client_id = self._next_client_id(position, OrderPurpose.STOP)
        calls, window_ms, how = 0, 0.0, "place_then_cancel" if old else "place"
        started = self.monotonic()
        answer: OrderSnapshot | None = None
        fallback = bool(old) and symbol in self._single_stop  # learnt: this venue takes one stop per symbol
        for attempt in range(0 if fallback else self.config.stop_retries + 1):
            calls += 1
            try:
                answer = await self.exchange.place_stop(symbol, side, quantity, target, client_id)
                break
            except xerr.StopWouldTrigger:
                return await self._stop_crossed(position, target, mark, "the exchange answered -2021")
            except xerr.DuplicateOrder as e:
                # An order with this id is open: an earlier attempt whose answer was lost. It is the answer
                # only if it is this stop; else (an older stop of ours under a reused id) it is tracked as
                # what it is, cancelled after the new one, and the new one gets a fresh id.
                found = await self._open_order_by_client_id(symbol, client_id)
                if found is None:
                    return self._stop_failed(position, target, mode, e)
                if found.trigger_price == target and found.quantity == quantity:
                    answer = found
                    break
                old.append(await self._track_foreign_stop(position, client_id, found, target, quantity))
                position = self.engine.positions.get(position_id) or position
                client_id = self._next_client_id(position, OrderPurpose.STOP)
            except xerr.Rejected as e:
                if e.code in TWO_STOPS_REFUSED and old:
                    self._single_stop.add(symbol)
                    fallback = True
                    break
                return self._stop_failed(position, target, mode, e)
            except xerr.Retryable as e:
                self.stats.exchange_errors += 1
                if attempt == self.config.stop_retries:
                    # Every answer lost: the stop may be working all the same. Found: that is the answer;
                    # found at another price: tracked (so it is cancelled, never left behind), and failed.
                    found = await self._open_order_by_client_id(symbol, client_id)
                    if found is not None and found.trigger_price == target and found.quantity == quantity:
                        answer = found
                        break
                    if found is not None:
                        await self._track_foreign_stop(position, client_id, found, target, quantity)
                        self._spawn(self._request_stop(position_id, None, None, "sync"), f"stop check of {position_id}")
                    return self._stop_failed(position, target, mode, e)
                await asyncio.sleep(self.config.retry_backoff_s * (attempt + 1))
                # The attempt may have landed (a lost answer): that is the answer, never a second order.
                found = await self._open_order_by_client_id(symbol, client_id)
                current = self.engine.positions.get(position_id)
                if current is None or current.state not in PROTECTED or self._is_flat(current):
                    # Ended (or closing, or flat) during the wait: no stop for it now; one that landed is
                    # cancelled rather than left to act on the symbol's next position.
                    if found is not None:
                        await self._cancel_quietly(OrderRef(client_id, position_id, symbol, OrderPurpose.STOP,
                                                            _exit_side(side), quantity, OrderStatus.OPEN, target,
                                                            found.exchange_order_id, found.algo_id))
                    return "skipped"
                if found is not None and found.trigger_price == target and found.quantity == quantity:
                    answer = found
                    break
            except xerr.ExchangeError as e:
                return self._stop_failed(position, target, mode, e)
        if fallback:
            try:
                answer, extra, window_ms = await self._cancel_then_place(position, old, target, client_id)
            except xerr.StopWouldTrigger:
                return await self._stop_crossed(position, target, mark, "the exchange answered -2021")
            except xerr.ExchangeError as e:
                return self._stop_failed(position, target, mode, e)
            calls += extra
            how, old = "cancel_then_place", []
        if answer is None:
            return self._stop_failed(position, target, mode, RuntimeError("no answer"))
        try:
            await self._track(position, client_id, OrderPurpose.STOP, quantity, target, answer)
        except UnknownPosition:  # ended while the order was in flight and its cleanup is done: undo
            await self._cancel_quietly(OrderRef(client_id, position_id, symbol, OrderPurpose.STOP,
                                                _exit_side(side), quantity, OrderStatus.OPEN, target,
                                                answer.exchange_order_id, answer.algo_id))
            return "skipped"
        for previous in old:
            calls += 1
            await self._cancel_tracked(previous)
        latency_ms = round((self.monotonic() - started) * 1000, 3)
        if mode != "sync":
            try:
                moved = await self.engine.fire_if(position_id, StopMoved(
                    stop_price=target, mark=mark, watermark=watermark, client_order_id=client_id), only_in=PROTECTED)
            except TransitionRefused as e:  # logged by the engine; the order is tracked and stays
                logger.warning("{} {} {}: stop {} placed but not recorded as moved: {}", self.account, symbol,
                               position_id, target, e)
                return "failed"
            if moved is None:
                return "skipped"  # the position ended meanwhile; its cleanup cancels the new stop
        self.stats.stop_moves += 1
        self.stats.calls_per_move.add(calls)
        if how == "cancel_then_place":
            self.stats.unprotected_ms.add(window_ms)
        self.engine.records.emit({
            "event": "stop_move", "account": self.account, "symbol": symbol, "position_id": position_id,
            "at": self.engine.clock().isoformat(), "mode": mode, "how": how, "side": side.value,
            "old_price": _s(position.stop_price), "new_price": str(target), "quantity": str(quantity),
            "mark": str(mark), "watermark": _s(watermark), "client_order_id": client_id,
            "unprotected_ms": window_ms, "exchange_calls": calls, "latency_ms": latency_ms,
        })
        logger.info("{} {} {} stop {} {} -> {} ({}, {} calls, {} ms)", self.account, symbol, position_id, mode,
                    position.stop_price, target, how, calls, latency_ms)
        return "placed"

    async def _cancel_then_place(self, position: Position, old: list[OrderRef], target: Decimal,
                                 client_id: str) -> tuple[OrderSnapshot, int, float]:
        """The venue refuses a second stop: cancel first, then place. The window is measured from before the
        first cancel is sent to the new stop's acknowledgement (an upper bound of the venue-side gap); the
        bookkeeping of the cancelled orders waits until the new stop is in place."""
        calls = 0
        gap_started = self.monotonic()
        cancelled = []
        for previous in old:
            calls += 1
            self._cancelling(previous)
            self._gone[previous.client_id] = None  # from here on it protects nothing: health and audit know
            try:
                await self.exchange.cancel_order(previous)
            except OrderAlreadyGone:
                pass
            cancelled.append(previous)
        calls += 1
        try:
            answer = await self.exchange.place_stop(position.symbol, position.side, position.quantity, target,
                                                    client_id)
        except xerr.ExchangeError as e:
            await self._restore_stop(position, cancelled, client_id, e)
            raise
        finally:
            for previous in cancelled:
                await self._set_order_status(previous.position_id, previous.client_id, OrderStatus.CANCELED)
        window_ms = round((self.monotonic() - gap_started) * 1000, 3)
        logger.warning("{} {} {}: the venue refuses a second stop; cancelled first, unprotected for {} ms",
                       self.account, position.symbol, position.id, window_ms)
        return answer, calls, window_ms

    async def _restore_stop(self, position: Position, cancelled: list[OrderRef], failed_client_id: str,
                            error: BaseException) -> None:
        """The old stop is cancelled and the new one failed: put the old price back, or close at market."""
        if isinstance(error, xerr.StopWouldTrigger) or not cancelled or position.stop_price is None:
            return  # the caller closes at market (stop_crossed)
        failed = parse_client_id(failed_client_id)
        client_id = make_client_id(position.id, OrderPurpose.STOP, (failed.attempt if failed else position.seq) + 1)
        try:
            answer = await self.exchange.place_stop(position.symbol, position.side, position.quantity,
                                                    position.stop_price, client_id)
            await self._track(position, client_id, OrderPurpose.STOP, position.quantity, position.stop_price, answer)
            logger.error("{} {} {}: new stop failed after the old was cancelled ({}); old stop {} restored",
                         self.account, position.symbol, position.id, _short(error), position.stop_price)
        except Exception as e:  # noqa: BLE001 - whatever it was, the position is unprotected now
            logger.error("{} {} {}: UNPROTECTED, stop could not be restored ({}); closing at market",
                         self.account, position.symbol, position.id, _short(e))
            self._spawn(self._close(position.id, CloseReason.UNPROTECTED), f"unprotected close of {position.id}",
                        essential=True)

    async def _stop_crossed(self, position: Position, target: Decimal, mark: Decimal, why: str) -> str:
        self.stats.stops_crossed += 1
        logger.warning("{} {} {}: stop {} not sent ({}; mark {}); closing at market", self.account, position.symbol,
                       position.id, target, why, mark)
        self._spawn(self._close(position.id, CloseReason.STOP_CROSSED), f"stop-crossed close of {position.id}",
                    essential=True)
        return "crossed"

    def _stop_failed(self, position: Position, target: Decimal, mode: str, error: BaseException) -> str:
        self.stats.stop_move_failures += 1
        self.stats.exchange_errors += 1
        logger.error("{} {} {}: stop {} to {} FAILED, the stop stays at {}: {}", self.account, position.symbol,
                     position.id, mode, target, position.stop_price, _short(error))
        return "failed"

    def _cancelling(self, order: OrderRef) -> None:
        """Mark an order as cancelled by us: its CANCELED update is not a removal to repair."""
        self._own_cancels[order.client_id] = None
        while len(self._own_cancels) > 10_000:
            self._own_cancels.popitem(last=False)

    # --- protection audit and health -----------------------------------------------------------

    def unprotected(self) -> list[Position]:
        """Positions of ours that memory knows to hold exposure without a working stop of ours: OPEN or
        TS_ACTIVE without one, or OPENING with an entry fill that was not taken in."""
        out = []
        for position in list(self.engine.positions.values()):
            if position.account != self.account:
                continue
            if position.state in PROTECTED:
                if not any(o.purpose is OrderPurpose.STOP and o.client_id not in self._gone
                           for o in position.working_orders()):
                    out.append(position)
            elif position.state is S.OPENING and position.id in self._entry_fills \
                    and position.id not in self._entry_tasks:
                out.append(position)
        return out

    def unprotected_longer_than(self, grace_s: float) -> list[Position]:
        """`unprotected()`, less the positions first seen so less than `grace_s` ago (a stop being placed
        right now, an entry filled a moment ago)."""
        now = self.monotonic()
        found = self.unprotected()
        ids = {p.id for p in found}
        for pid in [pid for pid in self._unprotected_since if pid not in ids]:
            del self._unprotected_since[pid]
        return [p for p in found if now - self._unprotected_since.setdefault(p.id, now) >= grace_s]

    async def check_protection(self, *, grace_s: float = UNPROTECTED_GRACE_S) -> list[str]:
        """Every sync tick: a CRITICAL line for each position unprotected longer than `grace_s` (repeated
        while it lasts), and a repair under the symbol lock. Returns the ids found unprotected."""
        now = self.monotonic()
        late = []
        for position in self.unprotected_longer_than(grace_s):
            since = self._unprotected_since[position.id]
            late.append(position.id)
            logger.critical("{} {} {}: UNPROTECTED for {:.1f} s: {} {} with no working stop of ours; repairing",
                            self.account, position.symbol, position.id, now - since, position.state.value,
                            position.quantity)
        if not self._recovered.is_set() or self._stopped:
            return late
        for position_id in late:
            running = self._repairs.get(position_id)
            if running is not None and not running.done():
                continue  # still at it (a placement that hangs, a lock held): never two at once
            # In the background: a repair waits for the symbol's lock and the venue, and must never hold up
            # the tick that checks every other position.
            task = self._spawn(self._repair_quietly(position_id), f"protection repair of {position_id}",
                               essential=True)
            if task is not None:
                self._repairs[position_id] = task
                task.add_done_callback(lambda t, pid=position_id: self._repairs.pop(pid, None)
                                       if self._repairs.get(pid) is t else None)
        return late

    async def _repair_quietly(self, position_id: str) -> None:
        try:
            await self._repair_protection(position_id, "no working stop known")
        except Exception as e:  # noqa: BLE001 - the next tick tries again; the CRITICAL line goes on
            logger.error("{} {}: protection repair failed: {}: {}", self.account, position_id, type(e).__name__,
                         _short(e))

    async def audit_protection(self, positions: list[PositionSnapshot] | None = None) -> dict[str, int]:
        """The protection audit: for every position of ours the venue shows, exactly one working stop of
        ours at the recorded price and size; what is not so is repaired under the symbol lock (missing:
        placed; extra: cancelled; wrong price or size: synced; an entry fill not taken in: taken in and
        protected), each repair recorded. Uses the venue's own lists, not memory."""
        counts = {"checked": 0, "repaired": 0}
        if not self._recovered.is_set() or self._stopped:
            return counts
        self.stats.audits += 1
        listed_at = self.engine.clock()
        snapshot = positions if positions is not None else await self.exchange.positions()
        shown = {(s.symbol, s.side) for s in snapshot}
        stops: dict[str, list[OrderSnapshot]] = {}
        listing = await self.exchange.open_orders()
        for order in listing:
            ours = parse_client_id(order.client_id)
            if ours is not None and ours.purpose is OrderPurpose.STOP:
                stops.setdefault(ours.position_id, []).append(order)
        self._settle_vanished_entries({o.client_id for o in listing if o.client_id}, listed_at)
        for position in [p for p in list(self.engine.positions.values()) if p.account == self.account]:
            if (position.symbol, position.side) not in shown:
                continue  # absence is reconciliation's to settle
            counts["checked"] += 1
            if position.state is S.OPENING:
                if await self._audit_opening(position):
                    counts["repaired"] += 1
                continue
            if position.state not in PROTECTED:
                continue  # a close in flight keeps its stop until the flat
            mine = stops.get(position.id, [])
            recorded = {o.client_id for o in position.working_orders() if o.purpose is OrderPurpose.STOP}
            if len(mine) == 1 and mine[0].client_id in recorded and position.stop_price is not None and \
                    mine[0].trigger_price == position.stop_price and mine[0].quantity == position.quantity:
                continue
            moved = position.updated_at >= listed_at - timedelta(seconds=1)  # a transition (a move) since
            if mine and recorded and moved and all(o.client_id in recorded or o.client_id in self._own_cancels
                                                   for o in mine):
                continue  # a move since the listing began explains it (its stops are ours, known); looked at again
                # by the next audit. A stop nobody here knows is repaired whatever moved.
            why = (f"{len(mine)} working stop(s) of ours on the venue, recorded {position.stop_price} x "
                   f"{position.quantity}")
            if await self._repair_protection(position.id, why):
                counts["repaired"] += 1
        return counts

    def _settle_vanished_entries(self, working: set[str], listed_at: datetime) -> None:
        """Entries our books have working that the venue no longer lists (filled or cancelled while the stream
        was down, or an update lost): their own state, looked up by client id, settles the position. Not an
        entry being sent, nor one placed after the listing began."""
        for position in list(self.engine.positions.values()):
            if position.account != self.account or position.id in self._entries_done or position.id in \
                    self._placing or position.id in self._entry_lookups or position.quantity > 0 or \
                    position.state not in (S.OPENING, S.CLOSING_BY_BOT):
                continue
            entry = next((o for o in position.working_orders() if o.purpose is OrderPurpose.ENTRY), None)
            if entry is None or entry.client_id in working or position.created_at >= listed_at - timedelta(seconds=1):
                continue
            logger.info("{} {} {}: entry {} no longer listed by the venue; looking it up", self.account,
                        position.symbol, position.id, entry.client_id)
            self._spawn(self._find_entry(position.id, entry), f"entry lookup of {position.id}")

    async def _audit_quietly(self, when: str) -> None:
        await self._recovered.wait()
        try:
            counts = await self.audit_protection()
        except xerr.ExchangeError as e:
            logger.warning("{}: protection audit {} failed on the exchange: {}", self.account, when, _short(e))
            return
        if counts["repaired"]:
            logger.warning("{}: protection audit {}: {}", self.account, when, counts)

    async def _audit_opening(self, position: Position) -> bool:
        """The venue shows a position where ours is still OPENING: if its entry filled and nothing is taking
        that fill in (an update lost, or a failure while taking it in), take it in now (it gets its stop)."""
        if position.id in self._entry_tasks or self.engine.clock() - position.created_at < timedelta(seconds=2):
            return False  # being taken in, or the stream is about to deliver it
        entry = next((o for o in position.orders.values() if o.purpose is OrderPurpose.ENTRY), None)
        fill = self._entry_fills.get(position.id)
        if entry is not None and (fill is None or not fill.status.is_final):
            try:  # the venue's word now: a partial fill may have ended meanwhile, or a fill been missed
                found = await self.exchange.order_by_client_id(position.symbol, entry.client_id)
            except (xerr.ExchangeError, OrderAlreadyGone) as e:
                logger.warning("{} {} {}: audit: entry lookup failed: {}", self.account, position.symbol,
                               position.id, _short(e))
                found = None
            if found is not None and found.filled > 0:
                fill = found
        if fill is None or position.id in self._entry_tasks:
            return False
        if not fill.status.is_final:
            self._trimming.discard(position.id)  # a cancel of the rest that failed: send it again
        kind = "entry_taken_in" if fill.status.is_final else "entry_rest_cancelled"
        self._repaired(position, kind, f"entry {fill.client_id} filled {fill.filled}, position OPENING")
        self._entries_done.discard(position.id)
        self._handle_entry_update(position.id, fill)
        return True

    async def _repair_protection(self, position_id: str, why: str) -> bool:
        """Under the symbol lock (no move in flight): compare with the venue's open orders for the symbol and
        make it one working stop at the recorded price and size. True if something was repaired."""
        position = self.engine.positions.get(position_id)
        if position is None:
            return False
        if position.state is S.OPENING:
            return await self._audit_opening(position)
        async with self.engine.locks.exclusive(self.account, position.symbol):
            position = self.engine.positions.get(position_id)
            if position is None or position.state not in PROTECTED:
                return False
            fresh = [o for o in await self.exchange.open_orders(position.symbol)
                     if (ours := parse_client_id(o.client_id)) is not None and ours.position_id == position_id
                     and ours.purpose is OrderPurpose.STOP]
            on_venue = {o.client_id for o in fresh}
            for order in [o for o in position.working_orders() if o.purpose is OrderPurpose.STOP]:
                if order.client_id not in on_venue:  # recorded, not working on the venue any more
                    self._gone[order.client_id] = None
                    await self._set_order_status(position_id, order.client_id, OrderStatus.EXPIRED)
            for order in fresh:
                if order.client_id not in position.orders:  # working, never recorded (or the record was lost)
                    await self._track(position, order.client_id or "", OrderPurpose.STOP, order.quantity,
                                      order.trigger_price or Decimal(0), order)
            position = self.engine.positions.get(position_id)
            if position is None or position.state not in PROTECTED:
                return False
            matching = [o for o in fresh if position.stop_price is not None and
                        o.trigger_price == position.stop_price and o.quantity == position.quantity]
            if len(fresh) == 1 and matching:
                return False  # the venue matches now (a move finished between the listing and the lock)
            if matching:
                keep = matching[0].client_id
                for order in [o for o in position.working_orders()
                              if o.purpose is OrderPurpose.STOP and o.client_id != keep]:
                    await self._cancel_tracked(order)
                self._repaired(position, "extra_cancelled", f"{why}; kept {keep}, cancelled {len(fresh) - 1}")
                return True
            if position.stop_price is None:
                target = self._initial_target(position, from_mark_if_crossed=True)
                result = await self._apply_stop(position_id, target, None, "initial")
                kind = "placed"
            else:
                result = await self._apply_stop(position_id, None, None, "sync")
                kind = "placed" if not fresh else "synced"
        if result in ("failed", "skipped"):
            kind = "failed"
            self._escalate(position, why)
        self._repaired(position, kind, f"{why}: {result}")
        return kind != "failed"

    def _escalate(self, position: Position, why: str) -> None:
        """A repair that cannot put a stop back: once the position has been unprotected for
        `unprotected_close_after_s`, it is closed at market (reason `unprotected`), as an initial stop that
        cannot be placed is: exposure nobody can protect is not kept."""
        since = self._unprotected_since.get(position.id)
        if since is None or self.monotonic() - since < self.config.unprotected_close_after_s:
            return
        logger.critical("{} {} {}: UNPROTECTED for {:.0f} s and no stop can be placed ({}); closing at market",
                        self.account, position.symbol, position.id, self.monotonic() - since, why)
        self._spawn(self._close(position.id, CloseReason.UNPROTECTED), f"unprotected close of {position.id}",
                    essential=True)

    def _repaired(self, position: Position, kind: str, detail: str) -> None:
        self.stats.protection_repairs[kind] += 1
        logger.warning("{} {} {}: protection audit repaired: {} ({})", self.account, position.symbol, position.id,
                       kind, detail)
        self.engine.records.emit({
            "event": "protection_repair", "account": self.account, "symbol": position.symbol,
            "position_id": position.id, "at": self.engine.clock().isoformat(), "repair": kind, "detail": detail,
            "state": position.state.value, "stop_price": _s(position.stop_price), "quantity": str(position.quantity),
        })

    async def doubt_stream(self, reason: str, *, resubscribe: bool) -> None:
        """REST showed what the private stream did not: doubt it at once (health says so until it speaks
        again), probe its listen key (an expired key: new key and reconnect), and with `resubscribe`
        (the change is proven) resubscribe even when the key is alive: the socket may be wedged."""
        first = self._doubted is None
        self._doubted = reason
        if first:
            logger.warning("{}: the private stream is doubted: {}", self.account, reason)
        probe = getattr(self.exchange, "probe_user_stream", None)
        alive: bool | None = True
        if probe is not None:
            try:
                alive = await probe(reason)
            except xerr.ExchangeError as e:
                logger.warning("{}: probing the private stream failed: {}", self.account, _short(e))
                alive = None
        if resubscribe and alive is not False:  # an expired key is reconnected by the adapter itself
            generation = getattr(self.exchange, "generation", 0)
            recreate = getattr(self.exchange, "recreate", None)
            if recreate is not None and self._resubscribed_generation != generation:
                self._resubscribed_generation = generation
                logger.warning("{}: the private stream may be wedged ({}); recreating the exchange client",
                               self.account, reason)
                try:
                    await recreate(generation, reason)
                except xerr.ExchangeError as e:
                    logger.error("{}: could not recreate the exchange client: {}", self.account, _short(e))

    def stream_doubted(self) -> str | None:
        """Why the private stream is doubted (REST showed what it did not deliver), or None."""
        return self._doubted

    def health_reasons(self) -> list[str]:
        """Why this account is not `ok` (empty when it is): storage, records, protection, streams, key."""
        reasons = []
        books = self.engine.books
        if books.behind:
            reasons.append(f"storage failing: {books.failing or 'catching up'} ({books.behind} write(s) waiting)")
        records_failing = getattr(self.engine.records, "failing", None)
        if records_failing:
            reasons.append(f"records not written: {records_failing}")
        for position in self.unprotected_longer_than(UNPROTECTED_GRACE_S):
            reasons.append(f"unprotected: {position.symbol} {position.id} ({position.state.value})")
        health = getattr(self.exchange, "health", {}) or {}
        for name in ("positions", "orders", "marks"):
            state = health.get(name)
            if state is not None and state is not StreamHealth.HEALTHY:
                reasons.append(f"stream {name} {state.value}")
        if self._doubted is not None:
            reasons.append(f"stream doubted: {self._doubted}")
        auth = getattr(self.exchange, "auth_failure", None)
        if auth:
            reasons.append(f"exchange key refused: {auth}")
        return reasons

    def stream_healthy(self) -> bool:
        """The private position stream is connected and not known to be silent (adapter's health)."""
        health = getattr(self.exchange, "health", {}) or {}
        return health.get("positions") is StreamHealth.HEALTHY

    def stream_shows(self, position: Position) -> bool | None:
        """Whether the private stream's newest update (newer than the entry) shows the position: True,
        False (flat or the other side), or None when the stream said nothing about it since."""
        live = self.live.get(position.symbol)
        entered = self._entry_at.get(position.id)
        if live is None or (entered is not None and live.at < entered) or position.id in self._missing:
            return None
        return live.side is position.side

    def unsettled(self) -> bool:
        """Some tracked position is known to the REST snapshot of a resync only as missing (see below)."""
        return any(pid in self.engine.positions for pid in self._missing)

    def settled(self, position_id: str) -> None:
        """Reconciliation saw the position on REST (twice): it is no longer only known as missing."""
        self._missing.pop(position_id, None)

    def missing_after_resync(self, position_id: str) -> bool:
        """A resync's REST snapshot lacked this position and the stream has said nothing about it since."""
        return position_id in self._missing

    def _is_flat(self, position: Position) -> bool:
        """The private stream's newest update (newer than the entry) shows no position on this side."""
        live = self.live.get(position.symbol)
        entered = self._entry_at.get(position.id)
        return live is not None and live.side is not position.side and (entered is None or live.at >= entered)

    async def _cancel_tracked(self, order: OrderRef) -> None:
        self._cancelling(order)
        try:
            await self.exchange.cancel_order(order)
        except OrderAlreadyGone:
            pass
        except xerr.ExchangeError as e:
            self.stats.exchange_errors += 1
            logger.error("{} {} {}: old stop {} not cancelled ({}); a looser reduce-only stop is left",
                         self.account, order.symbol, order.position_id, order.client_id, _short(e))
            return
        await self._set_order_status(order.position_id, order.client_id, OrderStatus.CANCELED)

    async def _cancel_quietly(self, order: OrderRef) -> None:
        self._cancelling(order)
        try:
            await self.exchange.cancel_order(order)
        except OrderAlreadyGone:
            pass
        except xerr.ExchangeError as e:
            logger.error("{} {}: stop {} of an ended position not cancelled: {}", self.account, order.symbol,
                         order.client_id, _short(e))

    async def _track_foreign_stop(self, position: Position, client_id: str, found: OrderSnapshot,
                                  target: Decimal, quantity: Decimal) -> OrderRef:
        logger.warning("{} {} {}: open stop {} is at {} x {}, not {} x {}; tracked (to be cancelled)", self.account,
                       position.symbol, position.id, client_id, found.trigger_price, found.quantity, target, quantity)
        return await self._track(position, client_id, OrderPurpose.STOP, found.quantity,
                                 found.trigger_price or target, found)

    async def _open_order_by_client_id(self, symbol: str, client_id: str) -> OrderSnapshot | None:
        try:
            return next((o for o in await self.exchange.open_orders(symbol) if o.client_id == client_id), None)
        except xerr.ExchangeError as e:
            logger.warning("{} {}: looking up order {} failed: {}", self.account, symbol, client_id, _short(e))
            return None

    def _next_client_id(self, position: Position, purpose: OrderPurpose) -> str:
        """Attempt = the journal sequence, or past any id of ours already used for this purpose: tracked,
        or tried by this process (a failed or unanswered attempt leaves no record)."""
        attempt = max(position.seq, self._attempts.get((position.id, purpose), -1) + 1)
        for client_id in position.orders:
            ours = parse_client_id(client_id)
            if ours is not None and ours.purpose is purpose and ours.attempt >= attempt:
                attempt = ours.attempt + 1
        self._attempts[(position.id, purpose)] = attempt
        return make_client_id(position.id, purpose, attempt)

    def _round_stop(self, side: Side, symbol: str, raw: Decimal) -> Decimal:
        """Away from the mark, to the tick: a long's stop rounds down, a short's up."""
        tick = self._tick(symbol)
        rounding = ROUND_FLOOR if side is Side.LONG else ROUND_CEILING
        return (raw / tick).to_integral_value(rounding=rounding) * tick

    def _tick(self, symbol: str) -> Decimal:
        tick = self._ticks.get(symbol)
        if tick is None:
            tick = self._ticks[symbol] = self.exchange.tick_size(symbol)
        return tick

    async def _track(self, position: Position, client_id: str, purpose: OrderPurpose, quantity: Decimal,
                     price: Decimal, answer: OrderSnapshot) -> OrderRef:
        ref = OrderRef(client_id, position.id, position.symbol, purpose, _exit_side(position.side), quantity,
                       answer.status if answer.status is not OrderStatus.NEW else OrderStatus.OPEN,
                       trigger_price=price, exchange_order_id=answer.exchange_order_id, algo_id=answer.algo_id)
        await self.engine.track_order(position.id, ref)
        return ref

    async def _set_order_status(self, position_id: str, client_id: str, status: OrderStatus) -> None:
        position = self.engine.positions.get(position_id)
        known = position.orders.get(client_id) if position is not None else None
        if known is None or known.status is status:
            return
        try:
            await self.engine.track_order(position_id, replace(known, status=status))
        except UnknownPosition:
            pass  # ended meanwhile; its cleanup saw the order


def _multiple(value: Decimal, step: Decimal) -> bool:
    """`value` is a whole number of `step`s (False where the division is out of Decimal's range)."""
    try:
        return value % step == 0
    except ArithmeticError:
        return False


def _entry_side(side: Side) -> str:
    return "buy" if side is Side.LONG else "sell"


def _exit_side(side: Side) -> str:
    return "sell" if side is Side.LONG else "buy"


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _s(value: Decimal | None) -> str | None:
    return str(value) if value is not None else None
