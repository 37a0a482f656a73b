"""The states a position can be in, and which of them end its life."""
from __future__ import annotations

from enum import StrEnum


class PositionState(StrEnum):
    """Lifecycle state of one position. Values are stored in the database as these strings."""

    OPENING = "OPENING"  # entry order in flight
    OPEN = "OPEN"  # filled, protected by a stop on the exchange
    TS_ACTIVE = "TS_ACTIVE"  # trailing stop activated: the stop follows the watermark
    CLOSING_BY_BOT = "CLOSING_BY_BOT"  # our reduce-only close order in flight
    CLOSED = "CLOSED"  # flattened while we were closing it
    CLOSED_EXTERNAL = "CLOSED_EXTERNAL"  # flattened by anything else: stop fill, liquidation, ADL, a person
    PHANTOM = "PHANTOM"  # confirmed absent on the exchange and no closing fill found
    CANCELLED = "CANCELLED"  # the entry never filled

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


# Declared here and checked against the transition table at import time (a state with no outgoing
# edge must be listed, and a listed one must have none), so the two can never disagree.
TERMINAL_STATES: frozenset[PositionState] = frozenset(
    {PositionState.CLOSED, PositionState.CLOSED_EXTERNAL, PositionState.PHANTOM, PositionState.CANCELLED}
)

# The states in which a position holds quantity on the venue: it must have a live stop there (PROTECTED),
# and a flat or an absence on the venue ends it (FLATTENABLE: also while our own close is in flight).
PROTECTED: frozenset[PositionState] = frozenset({PositionState.OPEN, PositionState.TS_ACTIVE})
FLATTENABLE: frozenset[PositionState] = PROTECTED | {PositionState.CLOSING_BY_BOT}
