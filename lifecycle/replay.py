"""Rebuild a position from its journal by running the same machine over the same events."""
from __future__ import annotations

from collections.abc import Sequence

from lifecycle.domain import Position
from lifecycle.errors import LifecycleError
from lifecycle.events import from_payload
from lifecycle.journal import CREATED, JournalEntry, position_from_creation
from lifecycle.machines.position import PositionMachine


class ReplayMismatch(LifecycleError):
    """The journal does not replay to what it says: corruption, or a table change that broke history."""


async def replay(entries: Sequence[JournalEntry], machine: PositionMachine | None = None) -> Position:
    """The position as its journal says it is. Actions the transitions ask for are discarded."""
    if not entries or entries[0].event != CREATED or entries[0].seq != 0:
        raise ReplayMismatch("a journal starts with its creation row (seq 0)")
    machine = machine or PositionMachine()
    position = position_from_creation(entries[0])
    for entry in entries[1:]:
        if entry.seq != position.seq + 1:
            raise ReplayMismatch(f"position {position.id}: journal jumps from seq {position.seq} to {entry.seq}")
        if entry.source is not position.state:
            raise ReplayMismatch(f"position {position.id} seq {entry.seq}: source {entry.source}, "
                                 f"replayed {position.state}")
        await machine.apply(position, from_payload(entry.event, entry.payload), entry.at)
        if position.state is not entry.dest:
            raise ReplayMismatch(f"position {position.id} seq {entry.seq}: dest {entry.dest}, "
                                 f"replayed {position.state}")
    return position
