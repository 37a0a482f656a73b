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
    realized_pnl: Decimal | None = None  # the exchange's figure for the closing fill, else from entry/exit
    fee: Decimal | None = None  # the closing fill's commission (Binance `n`; USDT unless BNB pays fees)
    exchange_ts_ms: int | None = None  # when the exchange reported the close, if an event said so
    cause_source: str = "state"  # where the cause came from (see events.Flat); "state": the state decided it

    @property
    def pnl(self) -> Decimal | None:
        if self.realized_pnl is not None:
            return self.realized_pnl
        if self.entry_price is None or self.exit_price is None:
            return None
        direction = 1 if self.side is Side.LONG else -1
        return (self.exit_price - self.entry_price) * self.quantity * direction

    @property
    def net_pnl(self) -> Decimal | None:
        """The PnL less the closing fill's fee when the venue reported it, else the gross PnL (the entry's fee
        is not tracked: a round trip costs about twice `fee`)."""
        pnl = self.pnl
        if pnl is None or self.fee is None:
            return pnl
        return pnl - self.fee

    @property
    def detection_latency_ms(self) -> float | None:
        """From the exchange's event time to the terminal transition (includes any clock skew)."""
        if self.exchange_ts_ms is None:
            return None
        return round(self.closed_at.timestamp() * 1000 - self.exchange_ts_ms, 3)

    def as_record(self) -> dict[str, Any]:
        pnl = self.pnl
        return {
            "event": "closure",
            "position_id": self.position_id,
            "account": self.account,
            "symbol": self.symbol,
            "side": self.side.value,
            "state": self.state.value,
            "cause": self.cause.value,
            "cause_source": self.cause_source,
            "reason": self.reason.value if self.reason else None,
            "quantity": str(self.quantity),
            "entry_price": str(self.entry_price) if self.entry_price is not None else None,
            "exit_price": str(self.exit_price) if self.exit_price is not None else None,
            "opened_at": self.opened_at.isoformat(),
            "closed_at": self.closed_at.isoformat(),
            "duration_s": round((self.closed_at - self.opened_at).total_seconds(), 3),
            "pnl": str(pnl) if pnl is not None else None,
            "fee": str(self.fee) if self.fee is not None else None,
            "net_pnl": str(net) if (net := self.net_pnl) is not None else None,
            "detection_latency_ms": self.detection_latency_ms,
            "at": self.closed_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class EmitClosure:
    closure: ClosureRecord


@dataclass(frozen=True, slots=True)
class DropPosition:
    """Forget the position in memory; its rows stay in the database."""

    position_id: str


Action = ReleaseStopLock | CancelWorkingOrders | EmitClosure | DropPosition
