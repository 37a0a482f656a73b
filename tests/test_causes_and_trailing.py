"""Close-cause classification and the trailing-stop rule (pure domain, used by the live engine)."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import TypedDict

import pytest

from lifecycle.causes import classify_close
from lifecycle.client_ids import make_client_id
from lifecycle.domain import CloseCause, OrderPurpose, Side, TrailingState
from lifecycle.trailing import trail

PID = "00000000000000000001"
OTHER = "00000000000000000002"


@pytest.mark.parametrize(
    ("client_id", "trailing", "cause"),
    [
        (make_client_id(PID, OrderPurpose.STOP, 3), False, CloseCause.STOP_LOSS),
        (make_client_id(PID, OrderPurpose.STOP, 3), True, CloseCause.TRAILING_STOP),
        (make_client_id(PID, OrderPurpose.TAKE_PROFIT), False, CloseCause.TAKE_PROFIT),
        (make_client_id(PID, OrderPurpose.CLOSE), False, CloseCause.BOT),
        ("autoclose-1700000000000", False, CloseCause.LIQUIDATION),
        ("adl_autoclose", False, CloseCause.ADL),
        ("settlement_autoclose-1700000000000", False, CloseCause.SETTLEMENT),
        ("web_8f3a", False, CloseCause.MANUAL),
        (make_client_id(OTHER, OrderPurpose.STOP), False, CloseCause.MANUAL),
        (None, False, CloseCause.UNKNOWN),
        ("", True, CloseCause.UNKNOWN),
    ],
)
def test_the_flattening_order_names_the_cause(client_id: str | None, trailing: bool, cause: CloseCause) -> None:
    assert classify_close(client_id, position_id=PID, trailing_was_active=trailing) is cause


T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Rules(TypedDict):
    tick: D
    min_step: D
    min_interval: timedelta


RULES: Rules = {"tick": D("0.1"), "min_step": D("0.5"), "min_interval": timedelta(seconds=2)}


def active(watermark: str, last_moved: datetime | None = None) -> TrailingState:
    return TrailingState(activation_price=D(110), callback_rate=D(1), active=True, watermark=D(watermark),
                         last_moved_at=last_moved)


def test_a_long_stop_follows_the_high_watermark_and_rounds_down_to_the_tick() -> None:
    d = trail(Side.LONG, active("110"), D(105), D("112.37"), T0, **RULES)
    assert d.watermark == D("112.37") and d.target == D("111.2")  # 112.37 * 0.99 = 111.2463 -> 111.2


def test_a_short_stop_follows_the_low_watermark_and_rounds_up_to_the_tick() -> None:
    d = trail(Side.SHORT, active("90"), D(95), D("88.01"), T0, **RULES)
    assert d.watermark == D("88.01") and d.target == D("88.9")  # 88.01 * 1.01 = 88.8901 -> 88.9


def test_a_pullback_keeps_the_watermark_and_never_moves_the_stop_back() -> None:
    d = trail(Side.LONG, active("120"), D("118.8"), D(115), T0, **RULES)
    assert (d.watermark, d.target) == (D(120), None)


def test_small_improvements_and_fast_repeats_wait() -> None:
    assert trail(Side.LONG, active("120"), D("118.8"), D("120.3"), T0, **RULES).target is None  # +0.2 < step
    recent = active("120", last_moved=T0 - timedelta(seconds=1))
    assert trail(Side.LONG, recent, D("118.8"), D(125), T0, **RULES).target is None  # moved 1 s ago
    later = active("120", last_moved=T0 - timedelta(seconds=3))
    assert trail(Side.LONG, later, D("118.8"), D(125), T0, **RULES).target == D("123.7")


def test_an_inactive_trailing_stop_does_not_trail() -> None:
    with pytest.raises(ValueError, match="activated"):
        trail(Side.LONG, TrailingState(activation_price=D(110), callback_rate=D(1)), None, D(100), T0, **RULES)
