"""Table mappings. Enum values are stored as their strings; domain rules live in `lifecycle`."""
from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from db.types import ExactDecimal, UTCDateTime
from lifecycle.machines.states import TERMINAL_STATES

_LIVE = "state NOT IN ({})".format(", ".join(f"'{s.value}'" for s in sorted(TERMINAL_STATES)))


class PositionRow(SQLModel, table=True):
    """One row per position ever opened: a reopened symbol is a new row, never an update of the old."""

    __tablename__ = "positions"
    __table_args__ = (
        # At most one live position per account, symbol and side (hedge mode holds one of each).
        sa.Index(
            "uq_positions_live_symbol_side",
            "account",
            "symbol",
            "side",
            unique=True,
            sqlite_where=sa.text(_LIVE),
            postgresql_where=sa.text(_LIVE),
        ),
        sa.Index("ix_positions_state", "state"),
    )

    id: str = Field(primary_key=True, max_length=32)
    account: str = Field(max_length=64)
    symbol: str = Field(max_length=64)
    side: str = Field(max_length=8)
    state: str = Field(max_length=32)
    requested_quantity: Decimal = Field(sa_type=ExactDecimal)
    quantity: Decimal = Field(sa_type=ExactDecimal)
    entry_price: Decimal | None = Field(default=None, sa_type=ExactDecimal)
    stop_price: Decimal | None = Field(default=None, sa_type=ExactDecimal)
    exit_price: Decimal | None = Field(default=None, sa_type=ExactDecimal)
    close_cause: str | None = Field(default=None, max_length=32)
    close_reason: str | None = Field(default=None, max_length=32)
    state_before_close: str | None = Field(default=None, max_length=32)
    last_activity_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)
    closed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    seq: int = Field(default=0)  # sequence number of the last journal row (optimistic concurrency)


class TrailingStateRow(SQLModel, table=True):
    """Trailing-stop state of a live position; deleted in the transaction that makes it terminal."""

    __tablename__ = "trailing_states"

    position_id: str = Field(primary_key=True, foreign_key="positions.id", max_length=32)
    activation_price: Decimal = Field(sa_type=ExactDecimal)
    callback_rate: Decimal = Field(sa_type=ExactDecimal)
    active: bool = Field(default=False)
    watermark: Decimal | None = Field(default=None, sa_type=ExactDecimal)
    last_moved_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class OrderRow(SQLModel, table=True):
    """Orders of ours, with every id the exchange gave them (Binance algo orders have an algo id)."""

    __tablename__ = "orders"
    __table_args__ = (sa.Index("ix_orders_position", "position_id"), sa.Index("ix_orders_status", "status"))

    client_id: str = Field(primary_key=True, max_length=36)
    position_id: str = Field(foreign_key="positions.id", max_length=32)
    symbol: str = Field(max_length=64)
    purpose: str = Field(max_length=16)
    side: str = Field(max_length=8)
    quantity: Decimal = Field(sa_type=ExactDecimal)
    status: str = Field(max_length=16)
    trigger_price: Decimal | None = Field(default=None, sa_type=ExactDecimal)
    exchange_order_id: str | None = Field(default=None, max_length=64)
    algo_id: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class JournalRow(SQLModel, table=True):
    """Append-only: every accepted transition of every position, in order. Never updated."""

    __tablename__ = "journal"

    position_id: str = Field(primary_key=True, foreign_key="positions.id", max_length=32)
    seq: int = Field(primary_key=True)
    event: str = Field(max_length=32)
    source: str | None = Field(default=None, max_length=32)
    dest: str = Field(max_length=32)
    at: datetime = Field(sa_type=UTCDateTime)
    cause: str | None = Field(default=None, max_length=32)
    payload: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)


class ClosureRow(SQLModel, table=True):
    """How a position ended; written in the same transaction as its terminal journal row."""

    __tablename__ = "closures"
    __table_args__ = (sa.Index("ix_closures_closed_at", "closed_at"),)

    position_id: str = Field(primary_key=True, foreign_key="positions.id", max_length=32)
    account: str = Field(max_length=64)
    symbol: str = Field(max_length=64)
    side: str = Field(max_length=8)
    state: str = Field(max_length=32)
    cause: str = Field(max_length=32)
    reason: str | None = Field(default=None, max_length=32)
    quantity: Decimal = Field(sa_type=ExactDecimal)
    entry_price: Decimal | None = Field(default=None, sa_type=ExactDecimal)
    exit_price: Decimal | None = Field(default=None, sa_type=ExactDecimal)
    opened_at: datetime = Field(sa_type=UTCDateTime)
    closed_at: datetime = Field(sa_type=UTCDateTime)
    # The trader's numbers (ClosureRecord): NULL where unknown, and on rows written before revision 0002.
    pnl: Decimal | None = Field(default=None, sa_type=ExactDecimal)  # gross: the venue's realized PnL
    fee: Decimal | None = Field(default=None, sa_type=ExactDecimal)  # the closing fill's commission
    net_pnl: Decimal | None = Field(default=None, sa_type=ExactDecimal)  # pnl - fee (pnl when fee unknown)
    detection_latency_ms: float | None = Field(default=None)  # venue event time to the terminal transition


class AccountLeaseRow(SQLModel, table=True):
    """Who acts on an account (PostgreSQL with several processes; see `db.leases`). `epoch` grows with every
    acquisition and fences every write: a process that lost the lease cannot write for the account."""

    __tablename__ = "account_leases"

    account: str = Field(primary_key=True, max_length=64)
    owner: str | None = Field(default=None, max_length=128)  # the instance name; None: free
    token: str | None = Field(default=None, max_length=36)  # the owning process run (unique per start)
    epoch: int = Field(default=0)
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)  # by the database's clock
    acquired_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    renewed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    release_requested: bool = Field(default=False)  # `lifecycle accounts release NAME`: the owner hands it back


class InstanceRow(SQLModel, table=True):
    """A running service process (one row per start), seen while it renews; the share of accounts each
    takes is counted from the instances seen within one lease."""

    __tablename__ = "instances"

    token: str = Field(primary_key=True, max_length=36)
    name: str = Field(max_length=128)
    host: str = Field(max_length=255)
    pid: int
    max_accounts: int = Field(default=0)  # its capacity (0: no limit): nobody hands it more than it can take
    started_at: datetime = Field(sa_type=UTCDateTime)
    seen_at: datetime = Field(sa_type=UTCDateTime)


metadata = SQLModel.metadata
