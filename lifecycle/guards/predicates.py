"""Pure predicates: no I/O, no mutation, no clock. Everything they need arrives as arguments.

The first group speaks plain trading terms; the second adapts them to (position, event) for the
transition table, where a guard is shown by its function name on every edge it protects.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from lifecycle.domain import CloseCause, Position, Side
from lifecycle.events import EntryFilled, Event, Flat, Reduced, StopMoved, TsActivated, Vanished
from lifecycle.machines.states import PositionState

# Causes a `flat` event may carry. BOT only while our close is in flight (invariant 3: the state decides
# bot vs external, never the event); ENTRY_FAILED and NOT_FOUND belong to other events' terminal states.
EXTERNAL_CAUSES = frozenset({CloseCause.STOP_LOSS, CloseCause.TRAILING_STOP, CloseCause.TAKE_PROFIT,
                             CloseCause.LIQUIDATION, CloseCause.ADL,
                             CloseCause.SETTLEMENT, CloseCause.MANUAL, CloseCause.UNKNOWN})
CLOSE_CAUSES = EXTERNAL_CAUSES | {CloseCause.BOT}

ABSENCE_CONFIRMATIONS_REQUIRED = 2  # one REST snapshot is not proof (seed 000); a targeted query must agree


def is_stop_on_safe_side(side: Side, stop_price: Decimal, mark: Decimal) -> bool:
    """A stop that the mark has not reached yet: below the mark for a long, above it for a short.

    A stop on the wrong side would trigger at once (Binance -2021); the engine closes at market instead.
    """
    return stop_price < mark if side is Side.LONG else stop_price > mark


def is_stop_improvement(side: Side, current: Decimal | None, new: Decimal) -> bool:
    """A stop only ever tightens: higher for a long, lower for a short. The first placement always is."""
    if current is None:
        return True
    return new > current if side is Side.LONG else new < current


def is_activation_crossed(side: Side, activation_price: Decimal, mark: Decimal) -> bool:
    return mark >= activation_price if side is Side.LONG else mark <= activation_price


def is_absence_confirmed(confirmations: int, required: int = ABSENCE_CONFIRMATIONS_REQUIRED) -> bool:
    return confirmations >= required


def is_outside_grace_window(last_activity_at: datetime | None, now: datetime, grace_ms: int) -> bool:
    """True when our own last order activity on the symbol is older than the grace window.

    REST lags our own orders; absence right after we acted is not evidence of anything.
    """
    if last_activity_at is None:
        return True
    return now - last_activity_at >= timedelta(milliseconds=grace_ms)


# --- guards of the transition table: (position, event, at) -> bool -------------------------------


def has_filled_quantity(p: Position, e: Event, at: datetime) -> bool:
    return isinstance(e, EntryFilled) and e.quantity > 0


def has_crossed_activation(p: Position, e: Event, at: datetime) -> bool:
    return (
        isinstance(e, TsActivated)
        and p.trailing is not None
        and is_activation_crossed(p.side, p.trailing.activation_price, e.mark)
    )


def is_better_stop(p: Position, e: Event, at: datetime) -> bool:
    return isinstance(e, StopMoved) and is_stop_improvement(p.side, p.stop_price, e.stop_price)


def is_safe_side_of_mark(p: Position, e: Event, at: datetime) -> bool:
    return isinstance(e, StopMoved) and is_stop_on_safe_side(p.side, e.stop_price, e.mark)


def is_external_cause(p: Position, e: Event, at: datetime) -> bool:
    """A flat we did not ask for cannot claim to be the bot's close (seed 001 the other way round)."""
    return isinstance(e, Flat) and (e.cause is None or e.cause in EXTERNAL_CAUSES)


def is_close_cause(p: Position, e: Event, at: datetime) -> bool:
    return isinstance(e, Flat) and (e.cause is None or e.cause in CLOSE_CAUSES)


def has_remaining_quantity(p: Position, e: Event, at: datetime) -> bool:
    """A reduction leaves something and is a reduction; zero remaining is `flat`, not `reduced`."""
    return isinstance(e, Reduced) and Decimal(0) < e.remaining < p.quantity


def is_absence_proven(p: Position, e: Event, at: datetime) -> bool:
    return (
        isinstance(e, Vanished)
        and is_absence_confirmed(e.confirmations)
        and is_outside_grace_window(p.last_activity_at, at, e.grace_ms)
    )


def was_open_before_close(p: Position, e: Event, at: datetime) -> bool:
    return p.state_before_close is PositionState.OPEN


def was_trailing_before_close(p: Position, e: Event, at: datetime) -> bool:
    return p.state_before_close is PositionState.TS_ACTIVE


def was_opening_before_close(p: Position, e: Event, at: datetime) -> bool:
    return p.state_before_close is PositionState.OPENING
