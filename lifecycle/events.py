"""Events a position's machine accepts, as typed, validated, journal-serialisable records."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import Enum, StrEnum
from typing import Any, ClassVar, TypeVar

from lifecycle.domain import CloseCause, CloseReason
from lifecycle.errors import InvalidEvent

E_ = TypeVar("E_", bound=Enum)


class PositionEvent(StrEnum):
    ENTRY_FILLED = "entry_filled"
    ENTRY_FAILED = "entry_failed"
    TS_ACTIVATED = "ts_activated"
    STOP_MOVED = "stop_moved"
    REDUCED = "reduced"
    CLOSE_REQUESTED = "close_requested"
    FLAT = "flat"
    CLOSE_FAILED = "close_failed"
    VANISHED = "vanished"


def _positive(name: str, value: Decimal | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if not value.is_finite() or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidEvent(f"{name} must be a finite number {bound}, got {value}")


def _member(enum: type[E_], field_name: str, value: object) -> E_:
    """Accept a member or its value ("signal"); refuse anything else here, not later at commit."""
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(m.value for m in enum)
        raise InvalidEvent(f"{field_name} must be one of {allowed}; got {value!r}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of all events; `name` ties a class to its trigger in the transition table."""

    name: ClassVar[PositionEvent]


@dataclass(frozen=True, slots=True, kw_only=True)
class EntryFilled(Event):
    """The entry order filled (fully, or partially with the rest cancelled)."""

    name: ClassVar[PositionEvent] = PositionEvent.ENTRY_FILLED
    quantity: Decimal
    price: Decimal
    exchange_order_id: str | None = None

    def __post_init__(self) -> None:
        _positive("quantity", self.quantity, allow_zero=True)  # zero is refused by the guard, visibly
        _positive("price", self.price)


@dataclass(frozen=True, slots=True, kw_only=True)
class EntryFailed(Event):
    """The entry order ended with nothing filled."""

    name: ClassVar[PositionEvent] = PositionEvent.ENTRY_FAILED
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TsActivated(Event):
    """The mark crossed the trailing activation price."""

    name: ClassVar[PositionEvent] = PositionEvent.TS_ACTIVATED
    mark: Decimal

    def __post_init__(self) -> None:
        _positive("mark", self.mark)


@dataclass(frozen=True, slots=True, kw_only=True)
class StopMoved(Event):
    """The exchange confirmed our stop at a new trigger price (also the first placement)."""

    name: ClassVar[PositionEvent] = PositionEvent.STOP_MOVED
    stop_price: Decimal
    mark: Decimal  # the mark when the stop was sent: the stop must be on its safe side
    watermark: Decimal | None = None  # trailing watermark that produced this stop
    client_order_id: str | None = None

    def __post_init__(self) -> None:
        _positive("stop_price", self.stop_price)
        _positive("mark", self.mark)
        _positive("watermark", self.watermark)


@dataclass(frozen=True, slots=True, kw_only=True)
class Reduced(Event):
    """A partial fill or partial take-profit left `remaining` on the exchange."""

    name: ClassVar[PositionEvent] = PositionEvent.REDUCED
    remaining: Decimal
    price: Decimal | None = None
    realized_pnl: Decimal | None = None
    fee: Decimal | None = None

    def __post_init__(self) -> None:
        _positive("remaining", self.remaining, allow_zero=True)  # zero is `flat`: the guard says so
        _positive("price", self.price)


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseRequested(Event):
    """The bot decided to close this position."""

    name: ClassVar[PositionEvent] = PositionEvent.CLOSE_REQUESTED
    reason: CloseReason

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", _member(CloseReason, "reason", self.reason))


CAUSE_SOURCES = ("fill_update", "algo_update", "rest", "none")


@dataclass(frozen=True, slots=True, kw_only=True)
class Flat(Event):
    """The exchange reports quantity 0 for this position."""

    name: ClassVar[PositionEvent] = PositionEvent.FLAT
    cause: CloseCause | None = None  # None: decided by the state (bot close) or not known yet
    exit_price: Decimal | None = None
    exchange_order_id: str | None = None
    realized_pnl: Decimal | None = None  # of the flattening fill, as the exchange reports it
    fee: Decimal | None = None
    exchange_ts_ms: int | None = None  # when the exchange reported the flat (detection latency starts here)
    # Where the cause was learnt: fill_update (the flattening fill on the stream), algo_update (our own
    # conditional order's TRIGGERED/FINISHED), rest (userTrades and the order by id), none (not known).
    cause_source: str | None = None

    def __post_init__(self) -> None:
        _positive("exit_price", self.exit_price)
        if self.cause_source is not None and self.cause_source not in CAUSE_SOURCES:
            raise InvalidEvent(f"cause_source must be one of {', '.join(CAUSE_SOURCES)}; got {self.cause_source!r}")
        if self.cause is not None:
            object.__setattr__(self, "cause", _member(CloseCause, "cause", self.cause))


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseFailed(Event):
    """Our close order was rejected and the position is still on the exchange."""

    name: ClassVar[PositionEvent] = PositionEvent.CLOSE_FAILED
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Vanished(Event):
    """The position is absent on the exchange; `confirmations` REST queries agreed."""

    name: ClassVar[PositionEvent] = PositionEvent.VANISHED
    confirmations: int
    grace_ms: int  # the grace window after our own activity that was in force when observed

    def __post_init__(self) -> None:
        if self.confirmations < 0 or self.grace_ms < 0:
            raise InvalidEvent(f"confirmations and grace_ms must be >= 0, got {self.confirmations}, {self.grace_ms}")


EVENT_TYPES: dict[PositionEvent, type[Event]] = {
    cls.name: cls
    for cls in (EntryFilled, EntryFailed, TsActivated, StopMoved, Reduced, CloseRequested, Flat, CloseFailed, Vanished)
}
assert set(EVENT_TYPES) == set(PositionEvent), "every event name needs exactly one event class"


def to_payload(event: Event) -> dict[str, Any]:
    """JSON-safe dict of an event's fields (decimals as strings, enums as values)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if isinstance(value, Decimal):
            value = str(value)
        elif isinstance(value, Enum):
            value = value.value
        out[f.name] = value
    return out


def from_payload(name: str | PositionEvent, payload: dict[str, Any]) -> Event:
    """Rebuild an event from its journal payload; raises InvalidEvent on anything malformed."""
    try:
        cls = EVENT_TYPES[PositionEvent(name)]
    except ValueError as e:
        raise InvalidEvent(f"unknown event {name!r}") from e
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in payload:
            continue
        kwargs[f.name] = _coerce(f.name, hints[f.name], payload[f.name])
    unknown = set(payload) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise InvalidEvent(f"{name}: unknown fields {sorted(unknown)}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise InvalidEvent(f"{name}: {e}") from e


def _coerce(field_name: str, hint: Any, value: Any) -> Any:
    if value is None:
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    target = args[0]
    try:
        if target is Decimal:
            return Decimal(str(value))
        if isinstance(target, type) and issubclass(target, Enum):
            return target(value)
        if target is int:
            return int(value)
    except (InvalidOperation, ValueError) as e:
        raise InvalidEvent(f"{field_name}: cannot read {value!r} as {getattr(target, '__name__', target)}") from e
    return value
