"""Side effects the machine asks for. They run only after the transition is committed."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from lifecycle.domain import CloseCause, CloseReason, Side
from lifecycle.machines.states import PositionState


@dataclass(frozen=True, slots=True)
class CancelWorkingOrders:
    """Cancel every working order of ours for the position (a leftover stop must never outlive it).

    The list is read when the action runs, under the symbol's stop lock, not when the transition was
    decided: a stop move that was in flight finishes first, and the stop it placed is cancelled too.
    """

    account: str
    symbol: str
    position_id: str


@dataclass(frozen=True, slots=True)
class ReleaseStopLock:
    account: str
    symbol: str
    position_id: str


@dataclass(frozen=True, slots=True)
class ClosureRecord:
    """How a position ended. Written to the database with the transition, then emitted as a record."""

    position_id: str
    account: str
    symbol: str
    side: Side
    state: PositionState
    cause: CloseCause
    reason: CloseReason | None
    quantity: Decimal  # the size that was closed
    entry_price: Decimal | None
    exit_price: Decimal | None
    opened_at: datetime
    closed_at: datetime

    def as_record(self) -> dict[str, Any]:
        return {
            "event": "closure",
            "position_id": self.position_id,
            "account": self.account,
            "symbol": self.symbol,
            "side": self.side.value,
            "state": self.state.value,
            "cause": self.cause.value,
            "reason": self.reason.value if self.reason else None,
            "quantity": str(self.quantity),
            "entry_price": str(self.entry_price) if self.entry_price is not None else None,
            "exit_price": str(self.exit_price) if self.exit_price is not None else None,
            "opened_at": self.opened_at.isoformat(),
            "closed_at": self.closed_at.isoformat(),
            "duration_s": round((self.closed_at - self.opened_at).total_seconds(), 3),
        }


@dataclass(frozen=True, slots=True)
class EmitClosure:
    closure: ClosureRecord


@dataclass(frozen=True, slots=True)
class DropPosition:
    """Forget the position in memory; its rows stay in the database."""

    position_id: str


Action = ReleaseStopLock | CancelWorkingOrders | EmitClosure | DropPosition
