"""The transition table as a specification: a hand-written expected table (from DESIGN.md's position
machine, refined as the table refines it), compared with `TABLE` and with what the machine does.

Nothing below is derived from `TABLE`: a changed line in lifecycle/machines/table.py fails here until the
expectation is changed too, on purpose.
"""
from __future__ import annotations

from datetime import timedelta
from typing import NamedTuple

import pytest

from lifecycle.errors import GuardRefused, UndefinedTransition
from lifecycle.events import PositionEvent
from lifecycle.guards import predicates
from lifecycle.machines.position import PositionMachine
from lifecycle.machines.states import TERMINAL_STATES, PositionState
from lifecycle.machines.table import INITIAL_STATE, TABLE, Edge, check_table
from tests.scenarios import (
    T0,
    bad_events,
    good_event,
    new_position,
    path_for_edge,
    path_to,
)


class Row(NamedTuple):
    source: str
    event: str
    guards: tuple[str, ...]
    dest: str
    note: str
    cause: str | None = None  # into a terminal state: the journal's cause when the event names none


# The expected table. Rows with the same (source, event) are alternatives, tried in the order written.
# DESIGN.md's rows are marked (design); the others are the table's refinements, with the reason.
EXPECTED: tuple[Row, ...] = (
    # (design) ... "if that fails, close at market" is the live engine's job, not a transition.
    Row("OPENING", "entry_filled", ("has_filled_quantity",), "OPEN", "initial stop is placed right after"),
    Row("OPENING", "entry_failed", (), "CANCELLED", "nothing filled", "entry_failed"),  # (design)
    Row("OPENING", "close_requested", (), "CLOSING_BY_BOT", "cancel the entry, close what filled"),  # (design)
    # (design) a pending entry can be rejected or expire without an update reaching us
    Row("OPENING", "vanished", ("is_absence_proven",), "PHANTOM", "confirmed twice, outside grace window",
        "not_found"),
    Row("OPEN", "ts_activated", ("has_crossed_activation",), "TS_ACTIVE", "mark crossed the activation price"),
    Row("OPEN", "stop_moved", ("is_better_stop", "is_safe_side_of_mark"), "OPEN",
        "exchange confirmed, under the symbol lock"),  # (design) internal
    Row("OPEN", "reduced", ("has_remaining_quantity",), "OPEN", "partial take-profit: stop resized"),  # (design)
    Row("OPEN", "close_requested", (), "CLOSING_BY_BOT",
        "signal, take-profit, max age, operator, stop crossed"),  # (design)
    # (design) flat outside our close is external (seed 001); a cause naming our close is refused
    Row("OPEN", "flat", ("is_external_cause",), "CLOSED_EXTERNAL", "cause taken from the order that flattened it",
        "unknown"),
    Row("OPEN", "vanished", ("is_absence_proven",), "PHANTOM", "confirmed twice, no closing fill found",
        "not_found"),  # (design)
    Row("TS_ACTIVE", "stop_moved", ("is_better_stop", "is_safe_side_of_mark"), "TS_ACTIVE",
        "the stop follows the watermark"),  # (design) internal
    Row("TS_ACTIVE", "reduced", ("has_remaining_quantity",), "TS_ACTIVE",
        "partial take-profit: stop resized"),  # (design)
    Row("TS_ACTIVE", "close_requested", (), "CLOSING_BY_BOT",
        "signal, take-profit, max age, operator, stop crossed"),  # (design)
    Row("TS_ACTIVE", "flat", ("is_external_cause",), "CLOSED_EXTERNAL",
        "cause taken from the order that flattened it", "unknown"),  # (design)
    Row("TS_ACTIVE", "vanished", ("is_absence_proven",), "PHANTOM", "confirmed twice, no closing fill found",
        "not_found"),  # (design)
    # (design) flat while our close is in flight is our close: never "external" (seed 001)
    Row("CLOSING_BY_BOT", "flat", ("is_close_cause",), "CLOSED", "the exchange reports quantity 0", "bot"),
    # refinement: the entry filled after the close was requested from OPENING; now there is something to close
    Row("CLOSING_BY_BOT", "entry_filled", ("has_filled_quantity",), "CLOSING_BY_BOT", "late fill of the entry"),
    # refinement: the close was requested from OPENING and the entry was cancelled with nothing filled
    Row("CLOSING_BY_BOT", "entry_failed", ("was_opening_before_close",), "CANCELLED",
        "closed before the entry filled", "entry_failed"),
    # refinement: our close order may fill in parts
    Row("CLOSING_BY_BOT", "reduced", ("has_remaining_quantity",), "CLOSING_BY_BOT", "close order partly filled"),
    # refinement: confirmed absence while our close is in flight is our close landing, not a phantom; but
    # nothing shows it was ours, so the cause is not_found, not bot
    Row("CLOSING_BY_BOT", "vanished", ("is_absence_proven",), "CLOSED",
        "confirmed absent, no closing fill: cause not_found", "not_found"),
    # (design) a rejected close returns to where it was requested from; OPENING is the table's addition
    Row("CLOSING_BY_BOT", "close_failed", ("was_open_before_close",), "OPEN",
        "position still there; retried per policy"),
    Row("CLOSING_BY_BOT", "close_failed", ("was_trailing_before_close",), "TS_ACTIVE",
        "position still there; retried per policy"),
    Row("CLOSING_BY_BOT", "close_failed", ("was_opening_before_close",), "OPENING", "entry still pending"),
)

EXPECTED_STATES = {  # state -> terminal
    "OPENING": False, "OPEN": False, "TS_ACTIVE": False, "CLOSING_BY_BOT": False,
    "CLOSED": True, "CLOSED_EXTERNAL": True, "PHANTOM": True, "CANCELLED": True,
}
EXPECTED_EVENTS = {"entry_filled", "entry_failed", "ts_activated", "stop_moved", "reduced", "close_requested",
                   "flat", "close_failed", "vanished"}
EXPECTED_INITIAL = "OPENING"

machine = PositionMachine()


def _row_id(row: Row) -> str:
    return f"{row.source}-{row.event}-{row.dest}"


def _by_pair(rows: list[tuple[str, str, tuple[str, ...], str, str]]) -> dict[tuple[str, str], list[tuple]]:
    """(source, event) -> its alternatives (guards, dest, note) in order: the order of unrelated lines is free."""
    out: dict[tuple[str, str], list[tuple]] = {}
    for source, event, guards, dest, note in rows:
        out.setdefault((source, event), []).append((guards, dest, note))
    return out


def _as_edge(row: Row) -> Edge:
    return Edge(PositionState(row.source), PositionEvent(row.event), PositionState(row.dest),
                tuple(getattr(predicates, g) for g in row.guards), row.note)


async def _reach(events: list[PositionEvent]):
    p = new_position()
    at = T0
    for name in events:
        at += timedelta(seconds=1)
        await machine.apply(p, good_event(name, p), at)
    # Our own activity (stop placed, close requested) is an hour ago: outside any grace window.
    return p, at + timedelta(hours=1)


# --- the table is the expected table ----------------------------------------------------------------


def test_the_table_is_the_expected_table() -> None:
    actual = _by_pair([(e.source.value, e.event.value, e.guard_names, e.dest.value, e.note) for e in TABLE])
    expected = _by_pair([row[:5] for row in EXPECTED])
    missing = {pair: alts for pair, alts in expected.items() if actual.get(pair) != alts}
    unexpected = {pair: alts for pair, alts in actual.items() if expected.get(pair) != alts}
    assert actual == expected, f"TABLE differs from the expected table:\n expected {missing}\n table has {unexpected}"


def test_states_events_initial_and_terminal_states_are_the_expected_ones() -> None:
    assert {s.value: s.is_terminal for s in PositionState} == EXPECTED_STATES
    assert {s.value for s in TERMINAL_STATES} == {s for s, terminal in EXPECTED_STATES.items() if terminal}
    assert {e.value for e in PositionEvent} == EXPECTED_EVENTS
    assert INITIAL_STATE.value == EXPECTED_INITIAL


# --- the machine does what the expected table says ---------------------------------------------------


@pytest.mark.parametrize("row", EXPECTED, ids=_row_id)
async def test_each_expected_edge_goes_where_the_expected_table_says(row: Row) -> None:
    p, at = await _reach(path_for_edge(row.source, row.guards))
    assert p.state.value == row.source
    outcome = await machine.apply(p, good_event(PositionEvent(row.event), p), at)
    assert (outcome.source.value, outcome.dest.value, p.state.value) == (row.source, row.dest, row.dest)
    assert outcome.journal.event == row.event
    assert outcome.journal.seq == p.seq
    assert outcome.journal.cause == row.cause
    assert bool(outcome.actions) == EXPECTED_STATES[row.dest]  # the cleanup hook asks for its actions


UNLISTED = [(s, e) for s in EXPECTED_STATES for e in sorted(EXPECTED_EVENTS)
            if not any((r.source, r.event) == (s, e) for r in EXPECTED)]


@pytest.mark.parametrize(("state", "event"), UNLISTED, ids=[f"{s}-{e}" for s, e in UNLISTED])
async def test_each_unlisted_pair_is_refused_and_changes_nothing(state: str, event: str) -> None:
    p, at = await _reach(path_to(PositionState(state)))
    assert p.state.value == state
    before = p.clone()
    with pytest.raises(UndefinedTransition) as refused:
        await machine.apply(p, good_event(PositionEvent(event), p), at)
    assert p == before
    assert (refused.value.state, refused.value.event) == (state, event)


# The was_* guards pick among alternatives by where the close came from: each is exercised by its own row.
GUARDED = [(row, guard) for row in EXPECTED for guard in row.guards if not guard.startswith("was_")]


@pytest.mark.parametrize(("row", "guard"), GUARDED, ids=[f"{_row_id(r)}-{g}" for r, g in GUARDED])
async def test_a_failing_guard_refuses_the_event_and_changes_nothing(row: Row, guard: str) -> None:
    p, at = await _reach(path_for_edge(row.source, row.guards))
    if row.event == "stop_moved" and p.stop_price is None:
        await machine.apply(p, good_event(PositionEvent.STOP_MOVED, p), at)  # a stop to compare against
    if guard == "is_absence_proven":
        at = p.last_activity_at or at  # right after our own activity: inside the grace window
    events = bad_events(guard, p)
    assert events, f"no failing event written for guard {guard}"
    for event in events:
        assert event.name.value == row.event
        before = p.clone()
        with pytest.raises(GuardRefused) as refused:
            await machine.apply(p, event, at)
        assert guard in refused.value.failed_guards
        assert p == before


async def test_a_flat_while_the_bot_closes_is_our_close_and_otherwise_external() -> None:
    closing, at = await _reach(path_to(PositionState.CLOSING_BY_BOT))
    await machine.apply(closing, good_event(PositionEvent.FLAT, closing), at)
    assert (closing.state, closing.close_cause.value) == (PositionState.CLOSED, "bot")
    open_, at = await _reach(path_to(PositionState.OPEN))
    await machine.apply(open_, good_event(PositionEvent.FLAT, open_), at)
    assert (open_.state, open_.close_cause.value) == (PositionState.CLOSED_EXTERNAL, "unknown")


async def test_naive_timestamps_are_refused() -> None:
    p = new_position()
    with pytest.raises(ValueError, match="timezone-aware"):
        await machine.apply(p, good_event(PositionEvent.ENTRY_FILLED, p), T0.replace(tzinfo=None))


# --- the table's own check refuses broken tables ----------------------------------------------------


SPEC_EDGES = tuple(_as_edge(r) for r in EXPECTED)


def test_the_check_accepts_the_expected_table() -> None:
    check_table(SPEC_EDGES)  # so that each refusal below is the one broken line's doing


def test_a_table_that_gives_a_terminal_state_an_exit_is_rejected() -> None:
    bad = (*SPEC_EDGES, Edge(PositionState.CLOSED, PositionEvent.FLAT, PositionState.OPEN))
    with pytest.raises(ValueError, match="terminal states"):
        check_table(bad)


def test_a_table_that_leaves_a_live_state_without_exits_is_rejected() -> None:
    bad = tuple(e for e in SPEC_EDGES if e.source is not PositionState.TS_ACTIVE)
    with pytest.raises(ValueError, match="terminal states"):
        check_table(bad)


def test_a_table_with_an_unreachable_state_is_rejected() -> None:
    bad = tuple(e for e in SPEC_EDGES if e.dest is not PositionState.PHANTOM)
    with pytest.raises(ValueError, match=r"unreachable states: .*PHANTOM"):
        check_table(bad)


def test_alternatives_without_a_guard_are_rejected() -> None:
    unguarded = Edge(PositionState.CLOSING_BY_BOT, PositionEvent.CLOSE_FAILED, PositionState.OPEN)
    with pytest.raises(ValueError, match="alternatives need a guard"):
        check_table((*SPEC_EDGES, unguarded))
