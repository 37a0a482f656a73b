"""The kinds of structured records, one dataclass each, with one header.

Every record carries the header (`account`, `symbol`, `position_id`, `at`; symbol and position id are None
for a record about an account) and its kind's fields. `as_record()` gives the JSON-ready mapping the
records file holds: `event` is the kind; decimals and datetimes as strings (a decimal is written exactly,
never through a float), enums by value; numbers that are measurements (milliseconds, seconds, counts) stay
numbers. The closure record is `lifecycle.actions.ClosureRecord` (it is also the closure row's source).
Pure: no I/O here; `lifecycle.records.JsonlRecords` writes them.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from enum import Enum
from typing import Any, ClassVar


@dataclass(frozen=True, kw_only=True, slots=True)
class Record:
    """The header of every record."""

    kind: ClassVar[str] = "record"
    account: str
    symbol: str | None
    position_id: str | None
    at: datetime

    def as_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": self.kind}
        for f in fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    return value


@dataclass(frozen=True, kw_only=True, slots=True)
class TransitionRecord(Record):
    """A committed transition of a position's machine (its journal row). `at`: when the machine decided it;
    `committed_at`: when its rows were durable (the commit acknowledged) and it took effect."""

    kind: ClassVar[str] = "transition"
    committed_at: datetime
    seq: int
    source: str
    trigger: str
    dest: str
    cause: str | None
    payload: dict[str, Any] | None


@dataclass(frozen=True, kw_only=True, slots=True)
class StopMove(Record):
    """A stop placed or moved (initial, trailing, or synced with the venue)."""

    kind: ClassVar[str] = "stop_move"
    mode: str  # initial / trail / sync
    how: str  # place / place_then_cancel / cancel_then_place
    side: str
    old_price: Decimal | None
    new_price: Decimal
    quantity: Decimal
    mark: Decimal
    watermark: Decimal | None
    client_order_id: str
    unprotected_ms: float  # the measured window of a cancel-then-place (0 otherwise)
    exchange_calls: int
    latency_ms: float


@dataclass(frozen=True, kw_only=True, slots=True)
class Reduction(Record):
    """A partial close (another client, a partial take-profit) left the position smaller."""

    kind: ClassVar[str] = "reduced"
    side: str
    closed_quantity: Decimal
    remaining: Decimal
    price: Decimal | None
    realized_pnl: Decimal | None
    fee: Decimal | None
    cause: str
    duration_s: float


@dataclass(frozen=True, kw_only=True, slots=True)
class ClosureAmended(Record):
    """A fill that came after a close recorded with cause `unknown` explains it."""

    kind: ClassVar[str] = "closure_amended"
    cause_before: str
    cause: str
    cause_source: str
    exchange_order_id: str | None
    client_order_id: str | None
    exit_price: Decimal | None
    realized_pnl: Decimal | None
    fee: Decimal | None


@dataclass(frozen=True, kw_only=True, slots=True)
class ProtectionRepair(Record):
    """The protection check or audit repaired (or failed to repair) a position's stop."""

    kind: ClassVar[str] = "protection_repair"
    repair: str
    detail: str
    state: str
    stop_price: Decimal | None
    quantity: Decimal


@dataclass(frozen=True, kw_only=True, slots=True)
class Adopted(Record):
    """An untracked position on the venue taken into tracking (policy `adopt`)."""

    kind: ClassVar[str] = "adopted"
    side: str
    quantity: Decimal
    entry_price: Decimal


@dataclass(frozen=True, kw_only=True, slots=True)
class UntrackedPosition(Record):
    """A position on the venue nobody here tracks, reported once (policy `alert`)."""

    kind: ClassVar[str] = "untracked_position"
    side: str
    quantity: Decimal
    entry_price: Decimal
    policy: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Recovery(Record):
    """What restart recovery found, per account."""

    kind: ClassVar[str] = "recovery"
    positions: int
    opening: int
    missing: int
    closing: int
    protected: int


@dataclass(frozen=True, kw_only=True, slots=True)
class AgedPosition(Record):
    """A position older than `max_age_s`, reported once (aged policy `report`)."""

    kind: ClassVar[str] = "aged_position"
    age_s: float
    max_age_s: float
    state: str


@dataclass(frozen=True, kw_only=True, slots=True)
class OrphanCancelled(Record):
    """An order of ours whose position is not live here, cancelled by the orphan sweep."""

    kind: ClassVar[str] = "orphan_cancelled"
    client_order_id: str | None
    purpose: str
    type: str
    trigger_price: Decimal | None
