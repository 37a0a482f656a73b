"""THE transition table of a position: one edge per line, the only place transitions are defined.

Edges with the same (source, event) are tried in order; the first whose guards all hold is taken.
An edge whose destination equals its source is internal: the state stays, the event's effect applies.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from lifecycle.domain import Position
from lifecycle.events import Event, PositionEvent
from lifecycle.guards.predicates import (
    has_crossed_activation,
    has_filled_quantity,
    has_remaining_quantity,
    is_absence_proven,
    is_better_stop,
    is_close_cause,
    is_external_cause,
    is_safe_side_of_mark,
    was_open_before_close,
    was_opening_before_close,
    was_trailing_before_close,
)
from lifecycle.machines.states import TERMINAL_STATES, PositionState

Guard = Callable[[Position, Event, datetime], bool]


@dataclass(frozen=True, slots=True)
class Edge:
    source: PositionState
    event: PositionEvent
    dest: PositionState
    guards: tuple[Guard, ...] = ()
    note: str = ""

    @property
    def internal(self) -> bool:
        return self.source is self.dest

    @property
    def guard_names(self) -> tuple[str, ...]:
        return tuple(g.__name__ for g in self.guards)


S, E = PositionState, PositionEvent

INITIAL_STATE = S.OPENING

TABLE: tuple[Edge, ...] = (
    Edge(S.OPENING, E.ENTRY_FILLED, S.OPEN, (has_filled_quantity,), "initial stop is placed right after"),
    Edge(S.OPENING, E.ENTRY_FAILED, S.CANCELLED, (), "nothing filled"),
    Edge(S.OPENING, E.CLOSE_REQUESTED, S.CLOSING_BY_BOT, (), "cancel the entry, close what filled"),
    # Absence of a pending entry is possible (rejected or expired without an update reaching us).
    Edge(S.OPENING, E.VANISHED, S.PHANTOM, (is_absence_proven,), "confirmed twice, outside grace window"),
    Edge(S.OPEN, E.TS_ACTIVATED, S.TS_ACTIVE, (has_crossed_activation,), "mark crossed the activation price"),
    Edge(S.OPEN, E.STOP_MOVED, S.OPEN, (is_better_stop, is_safe_side_of_mark),
         "exchange confirmed, under the symbol lock"),
    Edge(S.OPEN, E.REDUCED, S.OPEN, (has_remaining_quantity,), "partial take-profit: stop resized"),
    Edge(S.OPEN, E.CLOSE_REQUESTED, S.CLOSING_BY_BOT, (), "signal, take-profit, max age, operator, stop crossed"),
    Edge(S.OPEN, E.FLAT, S.CLOSED_EXTERNAL, (is_external_cause,), "cause taken from the order that flattened it"),
    Edge(S.OPEN, E.VANISHED, S.PHANTOM, (is_absence_proven,), "confirmed twice, no closing fill found"),
    Edge(S.TS_ACTIVE, E.STOP_MOVED, S.TS_ACTIVE, (is_better_stop, is_safe_side_of_mark),
         "the stop follows the watermark"),
    Edge(S.TS_ACTIVE, E.REDUCED, S.TS_ACTIVE, (has_remaining_quantity,), "partial take-profit: stop resized"),
    Edge(S.TS_ACTIVE, E.CLOSE_REQUESTED, S.CLOSING_BY_BOT, (), "signal, take-profit, max age, operator, stop crossed"),
    Edge(S.TS_ACTIVE, E.FLAT, S.CLOSED_EXTERNAL, (is_external_cause,), "cause taken from the order that flattened it"),
    Edge(S.TS_ACTIVE, E.VANISHED, S.PHANTOM, (is_absence_proven,), "confirmed twice, no closing fill found"),
    # Flat while our close is in flight is our close (or our stop): never "external" (seed 001).
    Edge(S.CLOSING_BY_BOT, E.FLAT, S.CLOSED, (is_close_cause,), "the exchange reports quantity 0"),
    # The entry filled after the close was requested from OPENING: now there is something to close.
    Edge(S.CLOSING_BY_BOT, E.ENTRY_FILLED, S.CLOSING_BY_BOT, (has_filled_quantity,), "late fill of the entry"),
    # Closed before anything filled: the entry was cancelled with nothing filled.
    Edge(S.CLOSING_BY_BOT, E.ENTRY_FAILED, S.CANCELLED, (was_opening_before_close,), "closed before the entry filled"),
    # Our close order may fill in parts.
    Edge(S.CLOSING_BY_BOT, E.REDUCED, S.CLOSING_BY_BOT, (has_remaining_quantity,), "close order partly filled"),
    # Confirmed absence while our close is in flight is our close landing, not a phantom.
    Edge(S.CLOSING_BY_BOT, E.VANISHED, S.CLOSED, (is_absence_proven,),
         "confirmed absent, no closing fill: cause not_found"),
    # A rejected close returns to where the close was requested from.
    Edge(S.CLOSING_BY_BOT, E.CLOSE_FAILED, S.OPEN, (was_open_before_close,),
         "position still there; retried per policy"),
    Edge(S.CLOSING_BY_BOT, E.CLOSE_FAILED, S.TS_ACTIVE, (was_trailing_before_close,),
         "position still there; retried per policy"),
    Edge(S.CLOSING_BY_BOT, E.CLOSE_FAILED, S.OPENING, (was_opening_before_close,), "entry still pending"),
)


def defined_pairs() -> frozenset[tuple[PositionState, PositionEvent]]:
    return frozenset(_BY_PAIR)


def _index(table: tuple[Edge, ...]) -> dict[tuple[PositionState, PositionEvent], tuple[Edge, ...]]:
    out: dict[tuple[PositionState, PositionEvent], list[Edge]] = {}
    for edge in table:
        out.setdefault((edge.source, edge.event), []).append(edge)
    return {k: tuple(v) for k, v in out.items()}


def check_table(table: tuple[Edge, ...]) -> None:
    """Refuse a table that contradicts the declared terminal states or is unreachable in parts."""
    with_exits = {e.source for e in table}
    derived_terminal = set(PositionState) - with_exits
    if derived_terminal != set(TERMINAL_STATES):
        raise ValueError(
            "terminal states declared in states.py and states without outgoing edges differ: "
            f"declared {sorted(TERMINAL_STATES)}, derived {sorted(derived_terminal)}"
        )
    reachable = {INITIAL_STATE} | {e.dest for e in table}
    if reachable != set(PositionState):
        raise ValueError(f"unreachable states: {sorted(set(PositionState) - reachable)}")
    for pair, edges in _index(table).items():
        if len(edges) > 1 and any(not e.guards for e in edges):
            raise ValueError(f"{pair}: alternatives need a guard on every edge, or the order decides silently")


check_table(TABLE)
_BY_PAIR = _index(TABLE)
