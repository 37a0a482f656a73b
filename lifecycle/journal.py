"""The journal's records: what the machine decided, as data (no I/O, no `transitions`).

Every position's journal starts with its creation row (seq 0, event CREATED, the position as it was opened);
each accepted event adds one `JournalEntry`, carried in the `Outcome` the machine returns together with the
actions it asks for and, for a terminal transition, the closure. The database layer, the engine and replay
share these records without importing the machine that runs the table.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from lifecycle.actions import Action, ClosureRecord
from lifecycle.domain import Position, Side, TrailingState
from lifecycle.events import Event
from lifecycle.machines.states import PositionState

CREATED = "created"  # the journal's row 0: the position as it was opened


@dataclass(frozen=True, slots=True)
class JournalEntry:
    position_id: str
    seq: int
    event: str  # a PositionEvent value, or CREATED for row 0
    source: PositionState | None  # None for the creation row
    dest: PositionState
    at: datetime
    cause: str | None
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Outcome:
    """An accepted transition: what it was, its journal row, the actions it asks for, and its closure.

    `closure` is set when the transition ended the position (the terminal-cleanup hook made it); it is written
    with the journal row in the same transaction. The same record also travels in `actions` (EmitClosure), which
    the engine runs after the commit to emit it.
    """

    source: PositionState
    dest: PositionState
    event: Event
    journal: JournalEntry
    actions: tuple[Action, ...]
    closure: ClosureRecord | None


# --- the creation row ----------------------------------------------------------------------------


def creation_payload(position: Position) -> dict[str, Any]:
    """The payload of a position's journal row 0: what it was opened with."""
    t = position.trailing
    return {
        "account": position.account,
        "symbol": position.symbol,
        "side": position.side.value,
        "requested_quantity": str(position.requested_quantity),
        "trailing": None
        if t is None
        else {"activation_price": str(t.activation_price), "callback_rate": str(t.callback_rate)},
    }


def creation_entry(position: Position, at: datetime) -> JournalEntry:
    """Journal row 0 of a newly created position."""
    return JournalEntry(position.id, 0, CREATED, None, position.state, at, None, creation_payload(position))


def position_from_creation(entry: JournalEntry) -> Position:
    """The position as its creation row says it was opened (the inverse of `creation_entry`)."""
    data = entry.payload
    trailing = data.get("trailing")
    return Position(
        id=entry.position_id,
        account=data["account"],
        symbol=data["symbol"],
        side=Side(data["side"]),
        state=PositionState(entry.dest),
        requested_quantity=Decimal(data["requested_quantity"]),
        created_at=entry.at,
        updated_at=entry.at,
        trailing=None
        if trailing is None
        else TrailingState(
            activation_price=Decimal(trailing["activation_price"]), callback_rate=Decimal(trailing["callback_rate"])
        ),
    )
