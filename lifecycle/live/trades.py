"""The trades the private stream delivered, and which event books each of them (one event per trade).

An order filled in parts has one fill update per trade (Binance: `t`, `l`, `rp`, `n`), each carrying the order's
cumulative fill. A reduction or a flat is joined to the trades that made it, trade by trade, and takes them
under the position's lock (`TradeBook.take`), so that each is booked once, by the event it belongs to, in the
order the position's events are applied. Matching the orders' cumulative fills instead booked a later trade of an
order for an earlier reduction when the earlier trade's update came late; the flat then found nothing and ended
`unknown` without figures, and the earlier trade was never booked (review of f7ec545).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal

from exchange.port import OrderSnapshot, OrderTrade, PositionSnapshot
from lifecycle.client_ids import parse_client_id
from lifecycle.domain import CloseCause, OrderPurpose, Position
from lifecycle.live.context import LiveContext

FILLS_KEPT = 64  # trades remembered per symbol


@dataclass(slots=True)
class SeenFill:
    """One trade seen on the stream (an order filled in parts: one each), booked by at most one event."""

    client_id: str | None
    order: OrderSnapshot  # the update that carried it (the order's cumulative fill and average price)
    trade: OrderTrade
    used: bool = False

    @property
    def name(self) -> tuple[str, object]:
        """Which trade it is: its id, else (none given) the order's cumulative fill after it."""
        return (self.order.exchange_order_id or self.client_id or "",
                self.trade.id if self.trade.id is not None else self.order.filled)


def trade_figures(trades: Sequence[SeenFill]) -> tuple[Decimal | None, Decimal | None]:
    """The realized profit and commission of these trades together (None: none known; commissions paid in two
    currencies add up to nothing meaningful: None)."""
    realized = [t.trade.realized_pnl for t in trades if t.trade.realized_pnl is not None]
    paid = [t.trade for t in trades if t.trade.fee is not None]
    fee = sum((t.fee or Decimal(0) for t in paid), Decimal(0)) if paid else None
    if len({t.fee_currency for t in paid}) > 1:
        fee = None
    return (sum(realized, Decimal(0)) if realized else None), fee


class TradeBook:
    """The trades seen per symbol (the newest `FILLS_KEPT`), each once (a frame seen twice is one trade), and the
    join of a position update to the trades that made it."""

    def __init__(self, ctx: LiveContext) -> None:
        self.ctx = ctx
        self.fills: dict[str, deque[SeenFill]] = {}
        self._names: dict[str, set[tuple[str, object]]] = {}

    def record(self, seen: SeenFill) -> None:
        names = self._names.setdefault(seen.order.symbol, set())
        if seen.name in names:
            return
        fills = self.fills.setdefault(seen.order.symbol, deque())
        if len(fills) >= FILLS_KEPT:
            names.discard(fills.popleft().name)
        fills.append(seen)
        names.add(seen.name)

    def placed_by(self, symbol: str, exchange_order_id: str, client_id: str) -> None:
        """The order was placed by our conditional order `client_id` (its TRIGGERED update): trades of it seen
        before that update (Binance may send the fill first) are that order's, for matching and for the cause."""
        for seen in self.fills.get(symbol, ()):
            if seen.order.exchange_order_id == exchange_order_id:
                seen.client_id = client_id

    def unused_of(self, symbol: str, exchange_order_id: str | None) -> Decimal:
        """How much of this order's trades seen on the symbol no event has booked yet."""
        if not exchange_order_id:
            return Decimal(0)
        return sum((seen.trade.quantity for seen in self.fills.get(symbol, ())
                    if not seen.used and seen.order.exchange_order_id == exchange_order_id), Decimal(0))

    def client_id_of(self, exchange_order_id: str) -> str | None:
        for fills in self.fills.values():
            for seen in fills:
                if seen.order.exchange_order_id == exchange_order_id:
                    return seen.client_id
        return None

    def _candidates(self, position: Position, snap: PositionSnapshot) -> list[SeenFill]:
        """The unused trades on the closing side of the symbol that may have made this update, oldest first."""
        closing = position.side.exit_order_side
        earliest = snap.at - timedelta(seconds=1)
        entered = self.ctx.entry_at(position.id)
        if entered is not None and entered > earliest:
            earliest = entered  # a fill before this position's entry is about an earlier position
        # A reduction shown by an update is explained by a fill no newer than it (chaos seed 446: the partial
        # close's fill was lost with a stream drop, and the later stop fill was taken for the reduction).
        # (The fill's own update may be stamped a few milliseconds after the position's: 100 ms of slack.)
        latest = snap.at + timedelta(milliseconds=100) if snap.amount != 0 and snap.side is position.side else None
        found: list[SeenFill] = []
        for seen in self.fills.get(snap.symbol, ()):
            # The cheap tests first: most of the symbol's last trades are used or older than the update, and
            # reading a client id for each of them was a tenth of a close's time (bench.closure_latency).
            if seen.used or seen.order.side != closing or seen.order.at < earliest or (
                    latest is not None and seen.order.at > latest):
                continue
            ours = parse_client_id(seen.client_id)
            if ours is not None and ours.purpose is OrderPurpose.ENTRY:
                continue  # an entry opens a position, it never flattens one (one way: no flips of ours)
            found.append(seen)
        # In the order they were made: by time, then by trade id (Binance's grow per symbol); a trade of one
        # millisecond may come after a later one (soak seeds 502732, 504964). (Stable: no ids, as they came.)
        found.sort(key=lambda seen: (seen.order.at, seen.trade.id or 0))
        return found

    def trades_of(self, position: Position, snap: PositionSnapshot, *, lenient: bool = False
                  ) -> list[SeenFill] | None:
        """The trades that made this update of the position, matched trade by trade (oldest first), or None while
        they are not all here. What they add up to: what the engine holds of the position now less what the update
        shows (a flip: plus what it shows on the other side).

        * A reduction: the oldest unused trades, in the order they were made (time, then trade id), that add up to
          exactly that (a later trade may be here already: a partial close and the stop that took the rest).
        * A flat: the newest unused trades that add up to exactly that, else the oldest (a later trade may be here
          already: another client's order right after a stop whose update is late), else the oldest that reach
          the position's size or more (the venue held more than the engine: someone added to it). When our own
          stop or take-profit fired (`PositionRuntime.fired`), only trades that include its trade.
        * `lenient` (the wait is over and they never added up: a trade's update is lost): a reduction takes one
          trade of exactly that much; a flat the newest trades that reach its size or more, ours or not.

        A partial close by someone else is not what flattened the position when another trade (a settlement, a
        liquidation) took the rest and its update has not come yet (chaos soak seed 502732): they do not add up
        yet. An order filled in parts is one trade per update, and each trade is booked by one event: matching the
        orders' cumulative fills instead booked a later trade of an order for an earlier reduction when the
        earlier trade's update came late, and the flat then found nothing (review of f7ec545). The reviews of
        8e0a57e and 7dfbc37 found the flat's other cases (`tests/test_live.py`)."""
        current = self.ctx.engine.positions.get(position.id) or position  # a reduction may have been taken in
        flip = snap.amount != 0 and snap.side is not position.side
        flat = snap.amount == 0 or flip
        need = current.quantity + abs(snap.amount) if flip else current.quantity - abs(snap.amount)
        if need <= 0:
            return None
        found = self._candidates(position, snap)
        if not flat:
            run = _run(found, need)
            if run is None and lenient:
                run = next(([seen] for seen in found if seen.trade.quantity == need), None)
            return run
        runtime = self.ctx.peek(position.id)
        fired = runtime.fired if runtime is not None else None
        if fired is not None and any(seen.used and seen.client_id == fired for seen in self.fills.get(snap.symbol, ())):
            fired = None  # its trade was booked already (by a reduction): it cannot be in this flat's run
        newest = found[::-1]
        runs = [_run(newest, need), _run(found, need), _run(found, current.quantity, reaching=True)]
        run = next((r for r in runs if r is not None and (fired is None or any(t.client_id == fired for t in r))),
                   None)
        if run is None and lenient:
            run = _run(newest, current.quantity, reaching=True)
        if run is None:
            return None
        run.sort(key=lambda seen: (seen.order.at, seen.trade.id or 0))
        # A flip: the trades after the one that flattened it opened the other side, not of this position.
        return run[:run.index(flattening(run, current.quantity)) + 1]

    def take(self, position: Position, snap: PositionSnapshot, *, lenient: bool = False) -> list[SeenFill]:
        """`trades_of`, taken (under the position's lock, by the event that books them): no other event takes
        them, until `give_back`. Empty when they are not all here."""
        trades = self.trades_of(position, snap, lenient=lenient) or []
        for seen in trades:
            seen.used = True
        return trades

    @staticmethod
    def give_back(trades: Sequence[SeenFill]) -> None:
        """The event that took these trades was not applied: they are free again."""
        for seen in trades:
            seen.used = False


def _run(trades: Sequence[SeenFill], need: Decimal, *, reaching: bool = False) -> list[SeenFill] | None:
    """The first trades of `trades` that add up to exactly `need` (`reaching`: to `need` or more), else None."""
    total = Decimal(0)
    for count, seen in enumerate(trades, 1):
        total += seen.trade.quantity
        if total == need or (reaching and total > need):
            return list(trades[:count])
        if total > need:
            return None
    return None


def flattening(trades: Sequence[SeenFill], size: Decimal) -> SeenFill:
    """Of a flat's trades (oldest first), the one that took the position of `size` to nothing: its cause (of a
    flip, not a trade that opened the other side after it)."""
    total = Decimal(0)
    for seen in trades:
        total += seen.trade.quantity
        if total >= size:
            return seen
    return trades[-1]


@dataclass(slots=True)
class Found:
    """What explains a flat: its cause (None: the state's default), where that came from, and the fill's figures."""

    cause: CloseCause | None = CloseCause.UNKNOWN
    source: str = "none"
    exit_price: Decimal | None = None
    order_id: str | None = None
    realized_pnl: Decimal | None = None
    fee: Decimal | None = None


@dataclass(slots=True)
class Taking:
    """One try at booking an update's trades under the position's lock; tried again (`again`) when, under the lock,
    another event had taken trades this update counted on and the deadline is not reached."""

    arrived: bool  # the trades were all here when the wait ended
    deadline: float  # monotonic
    taken: list[SeenFill] = field(default_factory=list)
    again: bool = False
    before: Decimal = Decimal(0)  # a reduction: the size it reduced from
    seq: int = -1  # a reduction: the position's journal sequence when the event was made
    cause: CloseCause | None = None  # a flat: what it was booked with
    source: str = "none"

    def take(self, book: TradeBook, live: Position, snap: PositionSnapshot, now: float) -> bool:
        """Take the update's trades (under the position's lock); False when none are there although they had all
        arrived and the deadline is not reached: another event took trades this one counted on (`again`: wait for
        the rest). After the deadline, the lenient rule; with none, the event goes without trades."""
        self.taken = book.take(live, snap, lenient=not self.arrived)
        if not self.taken and self.arrived and now < self.deadline:
            self.again = True
            return False
        return True

    def orders(self) -> set[str]:
        return {t.order.exchange_order_id for t in self.taken if t.order.exchange_order_id}
