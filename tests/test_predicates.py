"""The pure predicates behind the guards."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal as D

import pytest

from lifecycle.domain import Side
from lifecycle.guards.predicates import (
    is_absence_confirmed,
    is_activation_crossed,
    is_outside_grace_window,
    is_stop_improvement,
    is_stop_on_safe_side,
)


@pytest.mark.parametrize(
    ("side", "stop", "mark", "safe"),
    [
        (Side.LONG, D(95), D(100), True),
        (Side.LONG, D(100), D(100), False),  # at the mark: would trigger at once (-2021)
        (Side.LONG, D(101), D(100), False),
        (Side.SHORT, D(105), D(100), True),
        (Side.SHORT, D(100), D(100), False),
        (Side.SHORT, D(99), D(100), False),
    ],
)
def test_a_stop_is_safe_only_on_the_far_side_of_the_mark(side: Side, stop: D, mark: D, safe: bool) -> None:
    assert is_stop_on_safe_side(side, stop, mark) is safe


@pytest.mark.parametrize(
    ("side", "current", "new", "better"),
    [
        (Side.LONG, None, D(90), True),
        (Side.LONG, D(90), D(91), True),
        (Side.LONG, D(90), D(90), False),
        (Side.LONG, D(90), D(89), False),
        (Side.SHORT, D(110), D(109), True),
        (Side.SHORT, D(110), D(111), False),
    ],
)
def test_a_stop_only_tightens(side: Side, current: D | None, new: D, better: bool) -> None:
    assert is_stop_improvement(side, current, new) is better


def test_activation_is_crossed_in_the_direction_of_profit() -> None:
    assert is_activation_crossed(Side.LONG, D(110), D(110))
    assert not is_activation_crossed(Side.LONG, D(110), D(109))
    assert is_activation_crossed(Side.SHORT, D(90), D(89))
    assert not is_activation_crossed(Side.SHORT, D(90), D(91))


def test_absence_needs_two_confirmations() -> None:
    assert [is_absence_confirmed(n) for n in (0, 1, 2, 3)] == [False, False, True, True]


def test_the_grace_window_after_our_own_activity() -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    assert is_outside_grace_window(None, t, 5000)
    assert not is_outside_grace_window(t, t + timedelta(milliseconds=4999), 5000)
    assert is_outside_grace_window(t, t + timedelta(milliseconds=5000), 5000)


def test_a_side_names_its_order_sides_and_rounds_its_stop_away_from_the_mark() -> None:
    assert (Side.LONG.entry_order_side, Side.LONG.exit_order_side, Side.LONG.opposite) == ("buy", "sell", Side.SHORT)
    assert (Side.SHORT.entry_order_side, Side.SHORT.exit_order_side, Side.SHORT.opposite) == ("sell", "buy", Side.LONG)
    assert Side.LONG.round_stop(D("99.987"), D("0.01")) == D("99.98")  # a long's stop: down, further from the mark
    assert Side.SHORT.round_stop(D("100.012"), D("0.01")) == D("100.02")  # a short's stop: up
    assert Side.LONG.round_stop(D("99.5"), D("0.5")) == D("99.5")  # already on the tick: unchanged
