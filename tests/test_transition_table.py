"""Every (state, event) pair: listed pairs go where the table says, unlisted pairs change nothing."""
from __future__ import annotations

from datetime import timedelta

import pytest

from lifecycle.errors import GuardRefused, UndefinedTransition
from lifecycle.events import PositionEvent
from lifecycle.machines.position import PositionMachine
from lifecycle.machines.states import TERMINAL_STATES, PositionState
from lifecycle.machines.table import TABLE, Edge, check_table, defined_pairs
from tests.scenarios import T0, bad_events, good_event, new_position, path_for_edge, path_to

machine = PositionMachine()


async def _reach(events: list[PositionEvent]):
    p = new_position()
    at = T0
    for name in events:
        at += timedelta(seconds=1)
        await machine.apply(p, good_event(name, p), at)
    # Our own activity (stop placed, close requested) is an hour ago: outside any grace window.
    return p, at + timedelta(hours=1)


def _edge_id(edge: Edge) -> str:
    return f"{edge.source}-{edge.event}-{edge.dest}"


@pytest.mark.parametrize("edge", TABLE, ids=_edge_id)
async def test_each_listed_edge_goes_where_the_table_says(edge: Edge) -> None:
    p, at = await _reach(path_for_edge(edge))
    assert p.state is edge.source
    outcome = await machine.apply(p, good_event(edge.event, p), at)
    assert (outcome.source, outcome.dest, p.state) == (edge.source, edge.dest, edge.dest)
    assert outcome.journal.event == edge.event.value
    assert outcome.journal.seq == p.seq


UNLISTED = [(s, e) for s in PositionState for e in PositionEvent if (s, e) not in defined_pairs()]


@pytest.mark.parametrize(("state", "event"), UNLISTED, ids=[f"{s}-{e}" for s, e in UNLISTED])
async def test_each_unlisted_pair_is_refused_and_changes_nothing(state: PositionState, event: PositionEvent) -> None:
    p, at = await _reach(path_to(state))
    assert p.state is state
    before = p.clone()
    with pytest.raises(UndefinedTransition) as refused:
        await machine.apply(p, good_event(event, p), at)
    assert p == before
    assert (refused.value.state, refused.value.event) == (state.value, event.value)


GUARDED = [(edge, guard) for edge in TABLE for guard in edge.guard_names if not guard.startswith("was_")]


@pytest.mark.parametrize(("edge", "guard"), GUARDED, ids=[f"{_edge_id(e)}-{g}" for e, g in GUARDED])
async def test_a_failing_guard_refuses_the_event_and_changes_nothing(edge: Edge, guard: str) -> None:
    p, at = await _reach(path_for_edge(edge))
    if edge.event is PositionEvent.STOP_MOVED and p.stop_price is None:
        await machine.apply(p, good_event(edge.event, p), at)  # a stop to compare against
    if guard == "is_absence_proven":
        at = p.last_activity_at or at  # right after our own activity: inside the grace window
    events = bad_events(guard, p)
    assert events, f"no failing event written for guard {guard}"
    for event in events:
        before = p.clone()
        with pytest.raises(GuardRefused) as refused:
            await machine.apply(p, event, at)
        assert guard in refused.value.failed_guards
        assert p == before


def test_every_state_is_reachable_and_terminal_states_have_no_exits() -> None:
    check_table(TABLE)  # also runs at import; here it is visible as a test
    sources = {e.source for e in TABLE}
    assert sources.isdisjoint(TERMINAL_STATES)
    assert set(PositionState) - TERMINAL_STATES <= sources


def test_a_table_that_gives_a_terminal_state_an_exit_is_rejected() -> None:
    bad = (*TABLE, Edge(PositionState.CLOSED, PositionEvent.FLAT, PositionState.OPEN))
    with pytest.raises(ValueError, match="terminal states"):
        check_table(bad)


def test_the_design_card_states_and_events_exist() -> None:
    required_states = {"OPENING", "OPEN", "TS_ACTIVE", "CLOSING_BY_BOT", "CLOSED", "CLOSED_EXTERNAL", "PHANTOM"}
    assert required_states <= {s.value for s in PositionState}
    required_events = {"entry_filled", "entry_failed", "ts_activated", "stop_moved", "reduced", "close_requested",
                       "flat", "close_failed", "vanished"}
    assert required_events <= {e.value for e in PositionEvent}
    assert any(s.is_terminal for s in PositionState if s.value not in required_states)  # the never-filled entry


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
