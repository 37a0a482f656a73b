"""Rebuild a position from its journal by running the same machine over the same events."""
from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from lifecycle.domain import Position, Side, TrailingState
from lifecycle.errors import LifecycleError
from lifecycle.events import from_payload
from lifecycle.machines.position import CREATED, JournalEntry, PositionMachine
from lifecycle.machines.states import PositionState


class ReplayMismatch(LifecycleError):
    """The journal does not replay to what it says: corruption, or a table change that broke history."""


def creation_payload(position: Position) -> dict[str, Any]:
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


async def replay(entries: Sequence[JournalEntry], machine: PositionMachine | None = None) -> Position:
    """The position as its journal says it is. Actions the transitions ask for are discarded."""
    if not entries or entries[0].event != CREATED or entries[0].seq != 0:
        raise ReplayMismatch("a journal starts with its creation row (seq 0)")
    machine = machine or PositionMachine()
    first = entries[0]
    data = first.payload
    trailing = data.get("trailing")
    position = Position(
        id=first.position_id,
        account=data["account"],
        symbol=data["symbol"],
        side=Side(data["side"]),
        state=PositionState(first.dest),
        requested_quantity=Decimal(data["requested_quantity"]),
        created_at=first.at,
        updated_at=first.at,
        trailing=None
        if trailing is None
        else TrailingState(
            activation_price=Decimal(trailing["activation_price"]), callback_rate=Decimal(trailing["callback_rate"])
        ),
    )
    for entry in entries[1:]:
        if entry.seq != position.seq + 1:
            raise ReplayMismatch(f"position {position.id}: journal jumps from seq {position.seq} to {entry.seq}")
        if entry.source is not position.state:
            raise ReplayMismatch(f"position {position.id} seq {entry.seq}: source {entry.source}, replayed {position.state}")
        await machine.apply(position, from_payload(entry.event, entry.payload), entry.at)
        if position.state is not entry.dest:
            raise ReplayMismatch(f"position {position.id} seq {entry.seq}: dest {entry.dest}, replayed {position.state}")
    return position
