"""What the engine needs from the outside world, as protocols (the domain imports no db, no ccxt)."""
from __future__ import annotations

from collections.abc import Awaitable, Mapping
from datetime import datetime
from typing import Any, Protocol

from lifecycle.domain import OrderRef, Position
from lifecycle.journal import JournalEntry, Outcome
from lifecycle.record_kinds import Record


class PositionStore(Protocol):
    """Durable state: implemented by `db.repository.Repository`."""

    async def insert_position(self, position: Position, creation: JournalEntry) -> None: ...
    def commit(self, position: Position, outcome: Outcome) -> Awaitable[None]: ...
    def save_order(self, order: OrderRef, now: datetime, *, lazy: bool = False) -> Awaitable[None]:
        """`lazy`: a status row that may wait a few milliseconds to share the next transition's transaction."""
        ...
    async def load_live(self, accounts: list[str] | None = None) -> list[Position]: ...
    async def get_position(self, position_id: str) -> Position | None: ...


class OrderCanceller(Protocol):
    """The one exchange operation terminal cleanup needs; the full exchange port builds on it."""

    async def cancel_order(self, order: OrderRef) -> None: ...


class RecordSink(Protocol):
    """Structured records (closures, ...); one JSON object per record."""

    def emit(self, record: Record | Mapping[str, Any]) -> None: ...
