"""Events are validated on the way in and survive the journal unchanged."""
from __future__ import annotations

from decimal import Decimal as D

import pytest

from lifecycle.domain import CloseCause, CloseReason, TrailingState
from lifecycle.errors import InvalidEvent
from lifecycle.events import (
    EVENT_TYPES,
    CloseFailed,
    CloseRequested,
    EntryFailed,
    EntryFilled,
    Flat,
    PositionEvent,
    Reduced,
    StopMoved,
    TsActivated,
    Vanished,
    from_payload,
    to_payload,
)

SAMPLES = [
    EntryFilled(quantity=D("0.012"), price=D("60123.5"), exchange_order_id="88"),
    EntryFailed(reason="expired"),
    TsActivated(mark=D("61000.1")),
    StopMoved(stop_price=D("60500"), mark=D("61000"), watermark=D("61100"), client_order_id="lc1"),
    Reduced(remaining=D("0.006"), price=D("61000"), realized_pnl=D("5.1"), fee=D("0.02")),
    CloseRequested(reason=CloseReason.MAX_AGE),
    Flat(cause=CloseCause.LIQUIDATION, exit_price=D("55000"), exchange_order_id="99"),
    CloseFailed(error="-2022 ReduceOnly Order is rejected"),
    Vanished(confirmations=2, grace_ms=5000),
]


def test_there_is_one_sample_per_event() -> None:
    assert {type(s) for s in SAMPLES} == set(EVENT_TYPES.values())


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: e.name.value)
def test_an_event_round_trips_through_its_journal_payload(event) -> None:
    import json

    payload = json.loads(json.dumps(to_payload(event)))  # exactly what the JSON column holds
    assert from_payload(event.name.value, payload) == event


@pytest.mark.parametrize(
    "make",
    [
        lambda: EntryFilled(quantity=D(-1), price=D(100)),
        lambda: EntryFilled(quantity=D(1), price=D(0)),
        lambda: StopMoved(stop_price=D("NaN"), mark=D(1)),
        lambda: Reduced(remaining=D("-0.1")),
        lambda: Vanished(confirmations=-1, grace_ms=0),
        lambda: from_payload("teleported", {}),
        lambda: from_payload(PositionEvent.TS_ACTIVATED, {"mark": "lots"}),
        lambda: from_payload(PositionEvent.TS_ACTIVATED, {"mark": "1", "extra": 1}),
        lambda: from_payload(PositionEvent.CLOSE_REQUESTED, {"reason": "boredom"}),
        lambda: from_payload(PositionEvent.TS_ACTIVATED, {}),
    ],
)
def test_malformed_events_are_refused_with_a_clear_error(make) -> None:
    with pytest.raises(InvalidEvent):
        make()


@pytest.mark.parametrize("rate", [D(0), D(100), D(-1)])
def test_a_callback_rate_outside_0_100_is_refused(rate: D) -> None:
    with pytest.raises(ValueError, match="callback_rate"):
        TrailingState(activation_price=D(1), callback_rate=rate)


def test_enum_fields_accept_their_values_and_refuse_anything_else() -> None:
    assert CloseRequested(reason="signal").reason is CloseReason.SIGNAL  # type: ignore[arg-type]
    assert Flat(cause="manual").cause is CloseCause.MANUAL  # type: ignore[arg-type]
    with pytest.raises(InvalidEvent, match="reason must be one of"):
        CloseRequested(reason="boredom")  # type: ignore[arg-type]
