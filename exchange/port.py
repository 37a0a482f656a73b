"""The narrow port between the engine and any exchange, in our own types (no ccxt types cross it)."""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, Protocol

from lifecycle.domain import OrderPurpose, OrderRef, OrderStatus, Side


@dataclass(frozen=True, slots=True)
class PositionSnapshot:
    """A position as the exchange reports it; amount is signed (0 = flat)."""

    symbol: str  # the exchange's market id, e.g. BTCUSDT
    amount: Decimal
    entry_price: Decimal
    at: datetime

    @property
    def side(self) -> Side | None:
        return None if self.amount == 0 else Side.LONG if self.amount > 0 else Side.SHORT


@dataclass(frozen=True, slots=True)
class OrderTrade:
    """The one trade a fill update is about (Binance: `t`, `l`, `rp`, `n` in `N`): an order filled in parts has
    one update per trade, each carrying the order's cumulative fill and this trade's own quantity and figures.
    Fills are joined to position updates by these, each trade once (`StreamView`)."""

    id: int | None  # the venue's trade id; None when it gave none (the order's cumulative fill then names it)
    quantity: Decimal
    realized_pnl: Decimal | None
    fee: Decimal | None
    fee_currency: str


@dataclass(frozen=True, slots=True)
class OrderSnapshot:
    """An order (regular or conditional) as the exchange reports it."""

    symbol: str
    client_id: str | None
    exchange_order_id: str | None  # regular order id; for a conditional order, the order it triggered
    algo_id: str | None  # set for conditional (Binance Algo Service) orders
    side: str  # buy / sell
    type: str  # MARKET, LIMIT, STOP_MARKET, TAKE_PROFIT_MARKET, LIQUIDATION, ...
    status: OrderStatus
    quantity: Decimal
    filled: Decimal
    average_price: Decimal | None
    trigger_price: Decimal | None
    reduce_only: bool
    at: datetime
    realized_pnl: Decimal | None = None
    fee: Decimal | None = None  # of the order's fills so far (stream: the fill updates seen, binance_user_stream)
    trade: OrderTrade | None = None  # a fill update's own trade (stream only); None for any other update
    late: bool = False  # older than an update of the order already seen: passed on for its trade only

    @property
    def is_conditional(self) -> bool:
        return self.algo_id is not None

    @property
    def key(self) -> tuple[str, str, str, str, Decimal, str]:
        """Idempotency key: the same (symbol, order, status, filled, triggered order) seen twice is one
        update. Order ids are unique per symbol only; an algo's TRIGGERED differs from NEW by the order
        it placed."""
        kind = "algo" if self.algo_id is not None else "order"
        return (self.symbol, kind, self.algo_id or self.exchange_order_id or self.client_id or "", self.status.value,
                self.filled, self.exchange_order_id or "")


@dataclass(frozen=True, slots=True)
class Fill:
    symbol: str
    order_id: str
    side: str
    price: Decimal
    quantity: Decimal
    realized_pnl: Decimal
    fee: Decimal
    at: datetime


@dataclass(frozen=True, slots=True)
class MarkPrice:
    symbol: str
    price: Decimal
    at: datetime


class StreamHealth(StrEnum):
    CONNECTING = "connecting"
    HEALTHY = "healthy"
    SILENT = "silent"  # connected but nothing arrives (e.g. expired listen key); reconciliation should speed up
    RECONNECTING = "reconnecting"


@dataclass(frozen=True, slots=True)
class Resynced:
    """Yielded by a stream after every (re)connection, once the new subscription is live.

    `snapshot` is the REST state taken right after subscribing (positions, or open orders) and is the
    truth to start from; later stream items are changes to it. None means the snapshot failed (logged):
    the consumer must not trust the stream until its own reconciliation has run.
    """

    stream: str
    reason: str
    snapshot: tuple[Any, ...] | None = None


@dataclass(frozen=True, slots=True)
class OrderRules:
    """What the venue accepts for one market (Binance: PRICE_FILTER, LOT_SIZE, MIN_NOTIONAL); None: not known."""

    tick: Decimal
    step: Decimal | None = None
    min_quantity: Decimal | None = None
    max_quantity: Decimal | None = None
    min_price: Decimal | None = None
    max_price: Decimal | None = None
    min_notional: Decimal | None = None


class StreamControl(Protocol):
    """The streams' supervision as the engine and reconciliation see it (the ccxt adapter implements it).

    `health` and `reconnects` are per stream ("positions", "orders", "marks"); `generation` counts client
    (re)creations; `doubted` holds, per stream, why REST showed what it did not deliver, until it delivers
    again or is resubscribed; `auth_failure` is why the venue refused the key on the last private call.
    """

    health: dict[str, StreamHealth]
    reconnects: dict[str, int]
    doubted: dict[str, str]
    generation: int
    auth_failure: str | None

    async def recreate(self, seen_generation: int, reason: str) -> None:
        """Replace the client and resubscribe every stream, once per generation however many ask."""
        ...

    async def probe_user_stream(self, reason: str) -> bool | None:
        """Doubt the user streams and keep their listen key alive now: True alive (a wedge is still possible),
        False expired (marked SILENT and resubscribed with a new key before returning), None unknown."""
        ...


_PROTECTIVE: ContextVar[bool] = ContextVar("protective_request", default=False)


@contextmanager
def protective(really: bool = True) -> Iterator[None]:
    """Venue requests made inside (in this task, and in tasks it starts) protect a position: an initial or a
    restored stop, the bot's close, the cancel that makes room for a stop on a venue that takes one. An adapter
    that paces its requests (ccxt's rate limiter) sends them ahead of every other waiting request, in their own
    order: an initial stop waited seconds behind a burst of entries (bench.burst: 4.2-7.0 s for 50 positions
    opened at once). Only the order changes, the pace stays the venue's. Not protective: entries, trailing moves
    and take-profits (the old stop still holds), leftover cancels, reads; they would starve each other's turn.
    `really=False`: a no-op (for a caller that decides per request)."""
    token = _PROTECTIVE.set(really or _PROTECTIVE.get())
    try:
        yield
    finally:
        _PROTECTIVE.reset(token)


def is_protective() -> bool:
    """Whether the request being made now is a protective one (see `protective`)."""
    return _PROTECTIVE.get()


class ExchangePort(StreamControl, Protocol):
    """Everything the engine uses of one venue account: REST calls, the three streams, their supervision."""

    def tick_size(self, symbol: str) -> Decimal: ...
    def order_rules(self, symbol: str) -> OrderRules: ...
    async def positions(self, symbols: list[str] | None = None) -> list[PositionSnapshot]: ...
    async def order(self, symbol: str, exchange_order_id: str) -> OrderSnapshot: ...
    async def order_by_client_id(self, symbol: str, client_id: str) -> OrderSnapshot: ...
    async def open_orders(self, symbol: str | None = None) -> list[OrderSnapshot]: ...
    async def place_entry(self, symbol: str, side: Side, quantity: Decimal, client_id: str,
                          price: Decimal | None = None) -> OrderSnapshot: ...
    async def place_stop(self, symbol: str, position_side: Side, quantity: Decimal, trigger_price: Decimal,
                         client_id: str, purpose: OrderPurpose = OrderPurpose.STOP) -> OrderSnapshot: ...
    async def cancel_order(self, order: OrderRef) -> None: ...
    async def close_position(self, symbol: str, position_side: Side, quantity: Decimal,
                             client_id: str) -> OrderSnapshot: ...
    async def fills(self, symbol: str, since: datetime) -> list[Fill]: ...
    def position_updates(self) -> AsyncIterator[PositionSnapshot | Resynced]: ...
    def order_updates(self) -> AsyncIterator[OrderSnapshot | Resynced]: ...
    def mark_prices(self, symbols: list[str]) -> AsyncIterator[MarkPrice | Resynced]: ...
