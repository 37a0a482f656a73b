"""Reach any state of the table by firing real events, and build events that pass or fail guards."""
from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal as D

from lifecycle.domain import (
    CloseCause,
    CloseReason,
    Position,
    Side,
    TrailingState,
    new_position_id,
)
from lifecycle.events import (
    CloseFailed,
    CloseRequested,
    EntryFailed,
    EntryFilled,
    Event,
    Flat,
    PositionEvent,
    Reduced,
    StopMoved,
    TsActivated,
    Vanished,
)
from lifecycle.machines.states import PositionState

S, E = PositionState, PositionEvent
T0 = datetime(2026, 1, 1, tzinfo=UTC)

ENTRY = D(100)
ACTIVATION = D(110)


def new_position(**overrides: object) -> Position:
    fields: dict[str, object] = {
        "id": new_position_id(),
        "account": "acct",
        "symbol": "BTCUSDT",
        "side": Side.LONG,
        "state": S.OPENING,
        "requested_quantity": D(1),
        "created_at": T0,
        "updated_at": T0,
        "trailing": TrailingState(activation_price=ACTIVATION, callback_rate=D(1)),
    }
    fields.update(overrides)
    return Position(**fields)  # type: ignore[arg-type]


def good_event(name: PositionEvent, p: Position) -> Event:
    """An event of this name whose guards hold for a long position `p` (entry 100, activation 110)."""
    if name is E.ENTRY_FILLED:
        return EntryFilled(quantity=D(1), price=ENTRY)
    if name is E.ENTRY_FAILED:
        return EntryFailed(reason="expired")
    if name is E.TS_ACTIVATED:
        return TsActivated(mark=ACTIVATION + 1)
    if name is E.STOP_MOVED:
        stop = (p.stop_price or D(90)) + 1
        return StopMoved(stop_price=stop, mark=stop + 5)
    if name is E.REDUCED:
        return Reduced(remaining=(p.quantity or D(1)) / 2)
    if name is E.CLOSE_REQUESTED:
        return CloseRequested(reason=CloseReason.SIGNAL)
    if name is E.FLAT:
        return Flat()
    if name is E.CLOSE_FAILED:
        return CloseFailed(error="rejected")
    if name is E.VANISHED:
        return Vanished(confirmations=2, grace_ms=0)
    raise AssertionError(name)


# Event sequences from OPENING to each state, written out (not looked up in the table, which the tests
# check). CLOSING_BY_BOT has one path per state the close can be requested from, because close_failed must
# return there.
_TO = {
    S.OPENING: [],
    S.OPEN: [E.ENTRY_FILLED, E.STOP_MOVED],
    S.TS_ACTIVE: [E.ENTRY_FILLED, E.STOP_MOVED, E.TS_ACTIVATED],
    S.CLOSED: [E.ENTRY_FILLED, E.STOP_MOVED, E.CLOSE_REQUESTED, E.FLAT],
    S.CLOSED_EXTERNAL: [E.ENTRY_FILLED, E.STOP_MOVED, E.FLAT],
    S.PHANTOM: [E.ENTRY_FILLED, E.STOP_MOVED, E.VANISHED],
    S.CANCELLED: [E.ENTRY_FAILED],
}
_CLOSE_FROM_GUARD = {"was_open_before_close": S.OPEN, "was_trailing_before_close": S.TS_ACTIVE,
                     "was_opening_before_close": S.OPENING}


def path_to(state: PositionState, via: PositionState = S.OPEN) -> list[PositionEvent]:
    if state is S.CLOSING_BY_BOT:
        return [*_TO[via], E.CLOSE_REQUESTED]
    return list(_TO[state])


def path_for_edge(source: PositionState | str, guard_names: Iterable[str]) -> list[PositionEvent]:
    """The path to an edge's source; into CLOSING_BY_BOT from the state its was_* guard names (else OPEN)."""
    via = next((_CLOSE_FROM_GUARD[g] for g in guard_names if g in _CLOSE_FROM_GUARD), S.OPEN)
    return path_to(PositionState(source), via)


def bad_events(guard: str, p: Position) -> list[Event]:
    """Events that fail exactly this guard for position `p` (which passed `path_for_edge`)."""
    stop = p.stop_price or D(95)
    failing: dict[str, list[Event]] = {
        "has_filled_quantity": [EntryFilled(quantity=D(0), price=ENTRY)],
        "has_crossed_activation": [TsActivated(mark=ACTIVATION - 1)],
        "is_better_stop": [StopMoved(stop_price=stop - 1, mark=stop + 5), StopMoved(stop_price=stop, mark=stop + 5)],
        "is_safe_side_of_mark": [StopMoved(stop_price=stop + 10, mark=stop + 5)],
        "has_remaining_quantity": [Reduced(remaining=D(0)), Reduced(remaining=p.quantity)],
        "is_absence_proven": [Vanished(confirmations=1, grace_ms=0), Vanished(confirmations=2, grace_ms=3_600_000)],
        "is_external_cause": [Flat(cause=CloseCause.BOT), Flat(cause=CloseCause.ENTRY_FAILED)],
        "is_close_cause": [Flat(cause=CloseCause.NOT_FOUND), Flat(cause=CloseCause.ENTRY_FAILED)],
    }
    return failing.get(guard, [])
