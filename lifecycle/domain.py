"""Plain domain objects of a position: no database, no exchange client."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from enum import StrEnum

from lifecycle.machines.states import PositionState


class Side(StrEnum):
    """A position's direction. The one place that says which order side opens it and which closes it,
    and how a stop price is rounded to the tick for it."""

    LONG = "long"
    SHORT = "short"

    @property
    def opposite(self) -> Side:
        return Side.SHORT if self is Side.LONG else Side.LONG

    @property
    def entry_order_side(self) -> str:
        """The order side that opens (or adds to) a position of this side: "buy" or "sell"."""
        return "buy" if self is Side.LONG else "sell"

    @property
    def exit_order_side(self) -> str:
        """The order side that closes (reduces) a position of this side: stops, take-profits, closes."""
        return "sell" if self is Side.LONG else "buy"

    @classmethod
    def from_word(cls, word: str) -> Side | None:
        """long/short, or buy/sell as a trader says it (any case, spaces around); None for anything else."""
        return _SIDE_WORDS.get(word.strip().lower())

    def round_stop(self, raw: Decimal, tick: Decimal) -> Decimal:
        """A stop price on the tick, rounded away from the mark (a long's down, a short's up), so rounding
        never pulls a stop closer than asked."""
        rounding = ROUND_FLOOR if self is Side.LONG else ROUND_CEILING
        return (raw / tick).to_integral_value(rounding=rounding) * tick


_SIDE_WORDS = {"long": Side.LONG, "buy": Side.LONG, "short": Side.SHORT, "sell": Side.SHORT}


class CloseCause(StrEnum):
    """Why a position ended, classified from the fill that flattened it (see DESIGN.md)."""

    BOT = "bot"  # our own close order
    STOP_LOSS = "stop_loss"  # our stop order filled
    TRAILING_STOP = "trailing_stop"  # our stop filled after the trailing stop moved it
    TAKE_PROFIT = "take_profit"  # our take-profit order filled
    LIQUIDATION = "liquidation"  # client id starting "autoclose-"
    ADL = "adl"  # client id "adl_autoclose"
    SETTLEMENT = "settlement"  # client id starting "settlement_autoclose-"
    MANUAL = "manual"  # any other order: a person or another program
    UNKNOWN = "unknown"  # flat, and the flattening order is not known (yet)
    NOT_FOUND = "not_found"  # phantom: confirmed absent, no closing fill
    ENTRY_FAILED = "entry_failed"  # the entry never filled


class CloseReason(StrEnum):
    """Why the bot decided to close (only for closes the bot initiated)."""

    SIGNAL = "signal"
    TAKE_PROFIT = "take_profit"
    MAX_AGE = "max_age"
    OPERATOR = "operator"
    STOP_CROSSED = "stop_crossed"  # the wanted stop was already crossed by the mark: close at market
    UNPROTECTED = "unprotected"  # the initial stop could not be placed
    SHUTDOWN = "shutdown"  # an entry still resting when the service stopped gracefully is cancelled
    # Our close order for the position was found filled, its request's record lost (the books dropped it at a
    # stop while the database failed): the request is written again when the close is found (reconciliation).
    FOUND_FILLED = "found_filled"


class OrderPurpose(StrEnum):
    ENTRY = "entry"
    STOP = "stop"
    TAKE_PROFIT = "take_profit"
    CLOSE = "close"


class OrderStatus(StrEnum):
    NEW = "new"  # sent, not yet acknowledged
    OPEN = "open"  # working on the exchange
    FILLED = "filled"
    CANCELED = "canceled"
    REJECTED = "rejected"
    EXPIRED = "expired"

    @property
    def is_final(self) -> bool:
        return self in {OrderStatus.FILLED, OrderStatus.CANCELED, OrderStatus.REJECTED, OrderStatus.EXPIRED}


def utcnow() -> datetime:
    return datetime.now(UTC)


def require_utc(value: datetime, name: str) -> datetime:
    """Refuse naive datetimes: every time in this project is timezone-aware UTC."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (UTC), got naive {value.isoformat()}")
    return value.astimezone(UTC)


def new_position_id() -> str:
    """A 20-hex-character id: 12 of millisecond time (sortable), 8 random.

    Short on purpose: client order ids (36 characters on Binance) embed it together with a purpose.
    """
    return f"{int(time.time() * 1000):012x}{os.urandom(4).hex()}"


@dataclass(slots=True)
class TrailingState:
    """Trailing-stop configuration and progress; exists from creation until a terminal state."""

    activation_price: Decimal
    callback_rate: Decimal  # percent, in (0, 100)
    active: bool = False
    watermark: Decimal | None = None  # best mark since activation (high for long, low for short)
    last_moved_at: datetime | None = None

    def __post_init__(self) -> None:
        if not (self.activation_price > 0):
            raise ValueError(f"trailing activation_price must be > 0, got {self.activation_price}")
        if not (Decimal(0) < self.callback_rate < Decimal(100)):
            raise ValueError(f"trailing callback_rate must be in (0, 100) percent, got {self.callback_rate}")


@dataclass(slots=True)
class OrderRef:
    """One order of ours, as the lifecycle needs to know it."""

    client_id: str
    position_id: str
    symbol: str
    purpose: OrderPurpose
    side: str  # "buy" / "sell"
    quantity: Decimal
    status: OrderStatus = OrderStatus.NEW
    trigger_price: Decimal | None = None
    exchange_order_id: str | None = None
    algo_id: str | None = None  # Binance USDⓈ-M conditional orders live in the Algo Service
    created_at: datetime = field(default_factory=utcnow)


@dataclass(slots=True)
class Position:
    """One position's live state. The machine moves `state`; effects of events update the rest."""

    id: str
    account: str
    symbol: str
    side: Side
    state: PositionState
    requested_quantity: Decimal
    created_at: datetime
    updated_at: datetime
    quantity: Decimal = Decimal(0)
    entry_price: Decimal | None = None
    stop_price: Decimal | None = None
    exit_price: Decimal | None = None
    close_cause: CloseCause | None = None
    close_reason: CloseReason | None = None
    state_before_close: PositionState | None = None  # where close_failed returns to
    last_activity_at: datetime | None = None  # our own last order activity (grace window)
    closed_at: datetime | None = None
    seq: int = 0  # sequence number of the last journal row
    trailing: TrailingState | None = None
    orders: dict[str, OrderRef] = field(default_factory=dict)  # working orders of ours, by client id

    def __post_init__(self) -> None:
        if self.last_activity_at is None:
            self.last_activity_at = self.created_at  # creating a position sends its entry order

    def clone(self) -> Position:
        """A copy that can be changed without touching this one (the machine works on drafts)."""
        return replace(
            self,
            trailing=replace(self.trailing) if self.trailing is not None else None,
            orders={k: replace(v) for k, v in self.orders.items()},
        )

    @property
    def is_terminal(self) -> bool:
        return self.state.is_terminal

    def working_orders(self) -> list[OrderRef]:
        return [o for o in self.orders.values() if not o.status.is_final]
