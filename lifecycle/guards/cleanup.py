"""The one terminal-cleanup hook. The machine factory attaches it to every terminal state.

It runs inside the transition on the draft position, so its database part (trailing state gone,
closure row) commits atomically with the journal row; its exchange part (cancellations) and memory
part (lock, drop) are actions the engine executes after the commit, outside the position's lock. No path
into a terminal state can skip it (seed 000: the path that noticed a close forgot the trailing state).
"""
from __future__ import annotations

from datetime import datetime

from lifecycle.actions import Action, CancelWorkingOrders, ClosureRecord, DropPosition, EmitClosure, ReleaseStopLock
from lifecycle.domain import CloseCause, Position
from lifecycle.events import Event, Flat
from lifecycle.machines.states import PositionState

# What a terminal state means when the event did not say why.
_DEFAULT_CAUSE: dict[PositionState, CloseCause] = {
    PositionState.CLOSED: CloseCause.BOT,
    PositionState.CLOSED_EXTERNAL: CloseCause.UNKNOWN,
    PositionState.PHANTOM: CloseCause.NOT_FOUND,
    PositionState.CANCELLED: CloseCause.ENTRY_FAILED,
}


def terminal_cleanup(position: Position, at: datetime, event: Event | None = None) -> list[Action]:
    """Clear what must not outlive the position and return the actions that finish the job."""
    if not position.state.is_terminal:
        raise AssertionError(f"terminal cleanup called in non-terminal state {position.state}")
    position.trailing = None
    position.closed_at = at
    if position.close_cause is None:
        position.close_cause = _DEFAULT_CAUSE.get(position.state, CloseCause.UNKNOWN)
    # Order matters: waiting stop moves are released first; the record of a closure that is committed goes
    # out at once (it must not wait for cancellations: in a cascade they queue behind the venue's rate
    # limit for seconds, issue 13); then the cancellation waits for the move in flight (symbol lock) and
    # cancels whatever is working by then; memory last (the cancellation reads the working orders).
    return [
        ReleaseStopLock(position.account, position.symbol, position.id),
        EmitClosure(closure_of(position, event)),
        CancelWorkingOrders(position.account, position.symbol, position.id),
        DropPosition(position.id),
    ]


def closure_of(position: Position, event: Event | None = None) -> ClosureRecord:
    """The closure; a `flat` event adds what the exchange said about the closing fill and its time."""
    assert position.closed_at is not None and position.close_cause is not None
    flat = event if isinstance(event, Flat) else None
    return ClosureRecord(
        position_id=position.id,
        account=position.account,
        symbol=position.symbol,
        side=position.side,
        state=position.state,
        cause=position.close_cause,
        reason=position.close_reason,
        quantity=position.quantity,
        entry_price=position.entry_price,
        exit_price=position.exit_price,
        opened_at=position.created_at,
        closed_at=position.closed_at,
        realized_pnl=flat.realized_pnl if flat else None,
        fee=flat.fee if flat else None,
        exchange_ts_ms=flat.exchange_ts_ms if flat else None,
        cause_source=flat.cause_source if flat and flat.cause_source and flat.cause is not None else "state",
    )
