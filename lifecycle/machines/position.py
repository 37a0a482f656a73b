"""The position machine: the table above, run by `transitions`' (synchronous) machine.

One machine serves every position. Positions are never added to it as models (`add_model` is
quadratic in the number of models); an event is fired with `machine.events[name].trigger(position)`,
which needs nothing but the position's `state` attribute. Per-position ordering is the engine's job
(it never fires two events at one position at once), so the machine runs unqueued.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from transitions import Machine, State

from lifecycle.actions import Action, ClosureRecord, EmitClosure
from lifecycle.domain import CloseCause, Position, require_utc
from lifecycle.errors import GuardRefused, UndefinedTransition
from lifecycle.events import (
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
    to_payload,
)
from lifecycle.guards.cleanup import terminal_cleanup
from lifecycle.journal import JournalEntry, Outcome
from lifecycle.machines.states import PositionState
from lifecycle.machines.table import INITIAL_STATE, TABLE, Edge


@dataclass(slots=True)
class _Context:
    """Travels with one trigger through guards, effect and hooks."""

    event: Event
    at: datetime
    actions: list[Action] = field(default_factory=list)
    closure: ClosureRecord | None = None  # set by the terminal-cleanup hook


# --- effects: how each accepted event changes the position's data (not its state) ---------------


def _entry_filled(p: Position, e: EntryFilled, at: datetime) -> None:
    p.quantity = e.quantity
    p.entry_price = e.price
    p.last_activity_at = at
    if p.state is PositionState.CLOSING_BY_BOT and p.state_before_close is PositionState.OPENING:
        p.state_before_close = PositionState.OPEN  # filled now: a rejected close returns to OPEN, not OPENING


def _entry_failed(p: Position, e: EntryFailed, at: datetime) -> None:
    p.close_cause = CloseCause.ENTRY_FAILED


def _ts_activated(p: Position, e: TsActivated, at: datetime) -> None:
    assert p.trailing is not None  # the guard checked it
    p.trailing.active = True
    p.trailing.watermark = e.mark


def _stop_moved(p: Position, e: StopMoved, at: datetime) -> None:
    p.stop_price = e.stop_price
    # Not our "last activity" for the grace window: a stop order does not change what REST says about the
    # position, and counting it let a trailing position's moves hide its close from REST while the stream
    # was silent (each move restarted the grace window).
    if p.trailing is not None:
        p.trailing.last_moved_at = at
        if e.watermark is not None:
            p.trailing.watermark = e.watermark


def _reduced(p: Position, e: Reduced, at: datetime) -> None:
    p.quantity = e.remaining


def _close_requested(p: Position, e: CloseRequested, at: datetime) -> None:
    p.state_before_close = p.state
    p.close_reason = e.reason
    p.last_activity_at = at


def _flat(p: Position, e: Flat, at: datetime) -> None:
    p.close_cause = e.cause  # None lets the terminal hook apply the state's default
    p.exit_price = e.exit_price


def _close_failed(p: Position, e: Event, at: datetime) -> None:
    p.state_before_close = None
    p.close_reason = None


def _vanished(p: Position, e: Vanished, at: datetime) -> None:
    # Confirmed absent and no closing fill found: PHANTOM, or CLOSED when we were closing it (our close may
    # well have done it, but nothing shows it did: not claimed as the bot's).
    p.close_cause = CloseCause.NOT_FOUND


EFFECTS: dict[PositionEvent, Callable[[Position, Any, datetime], None]] = {
    PositionEvent.ENTRY_FILLED: _entry_filled,
    PositionEvent.ENTRY_FAILED: _entry_failed,
    PositionEvent.TS_ACTIVATED: _ts_activated,
    PositionEvent.STOP_MOVED: _stop_moved,
    PositionEvent.REDUCED: _reduced,
    PositionEvent.CLOSE_REQUESTED: _close_requested,
    PositionEvent.FLAT: _flat,
    PositionEvent.CLOSE_FAILED: _close_failed,
    PositionEvent.VANISHED: _vanished,
}
assert set(EFFECTS) == set(PositionEvent)


def _ctx(event_data: Any) -> _Context:
    ctx: _Context = event_data.kwargs["ctx"]
    return ctx


def _condition(guard: Callable[[Position, Event, datetime], bool]) -> Callable[[Any], bool]:
    def check(event_data: Any) -> bool:
        ctx = _ctx(event_data)
        return guard(event_data.model, ctx.event, ctx.at)

    check.__name__ = guard.__name__
    return check


def _apply_effect(event_data: Any) -> None:
    ctx = _ctx(event_data)
    EFFECTS[ctx.event.name](event_data.model, ctx.event, ctx.at)


def _on_enter_terminal(event_data: Any) -> None:
    ctx = _ctx(event_data)
    actions = terminal_cleanup(event_data.model, ctx.at, ctx.event)
    ctx.actions.extend(actions)
    # The hook's own closure becomes the outcome's (the store writes it with the journal row).
    ctx.closure = next((a.closure for a in actions if isinstance(a, EmitClosure)), None)


class PositionMachine:
    """Validates and applies events to positions according to TABLE."""

    def __init__(self, table: tuple[Edge, ...] = TABLE) -> None:
        states = [
            # Every terminal state gets the cleanup hook; which states are terminal comes from the enum,
            # checked against the table at import, so a new terminal state cannot be left without it.
            State(s, on_enter=[_on_enter_terminal] if s.is_terminal else None)
            for s in PositionState
        ]
        self._machine = Machine(
            model=None,
            states=states,
            initial=INITIAL_STATE,
            send_event=True,
            auto_transitions=False,
            queued=False,
            before_state_change=[_apply_effect],
        )
        for edge in table:
            self._machine.add_transition(
                trigger=edge.event.value,
                source=edge.source,
                dest=None if edge.internal else edge.dest,
                conditions=[_condition(g) for g in edge.guards],
            )
        self._edges: dict[tuple[PositionState, PositionEvent], list[Edge]] = {}
        for edge in table:
            self._edges.setdefault((edge.source, edge.event), []).append(edge)

    async def apply(self, position: Position, event: Event, at: datetime) -> Outcome:
        """Fire `event` at `position` (a draft: it is changed in place) or raise TransitionRefused.

        On refusal the position is left exactly as it was.
        """
        at = require_utc(at, "at")
        source = position.state
        candidates = self._edges.get((source, event.name), ())
        if not candidates:
            raise UndefinedTransition(position.id, source.value, event.name.value)
        ctx = _Context(event=event, at=at)
        accepted = self._machine.events[event.name.value].trigger(position, ctx=ctx)
        if not accepted:
            failed = sorted({g.__name__ for e in candidates for g in e.guards if not g(position, event, at)})
            raise GuardRefused(position.id, source.value, event.name.value, failed)
        position.seq += 1
        position.updated_at = at
        journal = JournalEntry(
            position_id=position.id,
            seq=position.seq,
            event=event.name.value,
            source=source,
            dest=position.state,
            at=at,
            cause=position.close_cause.value if position.state.is_terminal and position.close_cause else None,
            payload=to_payload(event),
        )
        return Outcome(source, position.state, event, journal, tuple(ctx.actions), ctx.closure)
