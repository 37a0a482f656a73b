"""The one terminal-cleanup hook. The machine factory attaches it to every terminal state.

It runs inside the transition on the draft position, so its database part (trailing state gone,
closure row) commits atomically with the journal row; its exchange part (cancellations) and memory
part (lock, drop) are actions executed after the commit. No path into a terminal state can skip it
(seed 000: the path that noticed a close forgot the trailing state).
"""
from __future__ import annotations

from datetime import datetime

from lifecycle.actions import Action, CancelOrder, ClosureRecord, DropPosition, EmitClosure, ReleaseStopLock
from lifecycle.domain import CloseCause, Position
from lifecycle.machines.states import PositionState

# What a terminal state means when the event did not say why.
_DEFAULT_CAUSE: dict[PositionState, CloseCause] = {
    PositionState.CLOSED: CloseCause.BOT,
    PositionState.CLOSED_EXTERNAL: CloseCause.UNKNOWN,
    PositionState.PHANTOM: CloseCause.NOT_FOUND,
    PositionState.CANCELLED: CloseCause.ENTRY_FAILED,
}


def terminal_cleanup(position: Position, at: datetime) -> list[Action]:
    """Clear what must not outlive the position and return the actions that finish the job."""
    if not position.state.is_terminal:
        raise AssertionError(f"terminal cleanup called in non-terminal state {position.state}")
    position.trailing = None
    position.closed_at = at
    if position.close_cause is None:
        position.close_cause = _DEFAULT_CAUSE.get(position.state, CloseCause.UNKNOWN)
    actions: list[Action] = [CancelOrder(order) for order in position.working_orders()]
    actions.append(ReleaseStopLock(position.account, position.symbol, position.id))
    actions.append(EmitClosure(closure_of(position)))
    actions.append(DropPosition(position.id))
    return actions


def closure_of(position: Position) -> ClosureRecord:
    assert position.closed_at is not None and position.close_cause is not None
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
    )
