"""Random event sequences against the engine on a real SQLite file (hypothesis stateful).

Invariants checked after every step: the state is one of the enum's; a terminal position has no
trailing state, no lock, no working order of ours and a closure row; every journal replays to the
stored state; memory equals the database for every live position.
"""
from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import replace
from decimal import Decimal as D
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from db.repository import Repository
from exchange.paper import PaperExchange
from lifecycle.domain import CloseCause, CloseReason, OrderPurpose, OrderRef, Side, TrailingState
from lifecycle.engine import Engine
from lifecycle.errors import TransitionRefused
from lifecycle.events import (
    CloseFailed,
    CloseRequested,
    EntryFailed,
    EntryFilled,
    Flat,
    Reduced,
    StopMoved,
    TsActivated,
    Vanished,
)
from lifecycle.machines.states import PositionState
from lifecycle.records import JsonlRecords
from lifecycle.replay import replay
from tests.conftest import FakeClock

_TEMPLATE: dict[str, Path] = {}

prices = st.decimals(min_value=D(50), max_value=D(150), places=1)
quantities = st.decimals(min_value=D("0.1"), max_value=D(2), places=1)
events = st.one_of(
    st.builds(EntryFilled, quantity=st.one_of(quantities, st.just(D(0))), price=prices),
    st.builds(EntryFailed, reason=st.just("expired")),
    st.builds(TsActivated, mark=prices),
    st.builds(StopMoved, stop_price=prices, mark=prices),
    st.builds(Reduced, remaining=st.one_of(quantities, st.just(D(0)))),
    st.builds(CloseRequested, reason=st.sampled_from(CloseReason)),
    st.builds(Flat, cause=st.one_of(st.none(), st.sampled_from(CloseCause)), exit_price=st.one_of(st.none(), prices)),
    st.builds(CloseFailed, error=st.just("rejected")),
    st.builds(Vanished, confirmations=st.integers(0, 3), grace_ms=st.sampled_from([0, 5_000, 600_000])),
)


def _migrated_template() -> Path:
    """One migrated SQLite file per test session; each example works on a fresh copy of it."""
    if "path" not in _TEMPLATE:
        path = Path(tempfile.mkdtemp(prefix="lc-hyp-")) / "template.sqlite"

        async def make() -> None:
            repo = await Repository.open(f"sqlite:///{path}")
            async with repo.engine.connect() as conn:  # fold the WAL into the main file before copying
                await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            await repo.close()

        asyncio.run(make())
        _TEMPLATE["path"] = path
    return _TEMPLATE["path"]


class LifecycleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="lc-hyp-"))
        shutil.copy(_migrated_template(), self.dir / "db.sqlite")
        self.clock = FakeClock()
        self.exchange = PaperExchange()
        self.repo = self.run(Repository.open(f"sqlite:///{self.dir / 'db.sqlite'}", run_migrations=False))
        self.engine = Engine(self.repo, canceller=self.exchange, records=JsonlRecords(self.dir / "rec"),
                             clock=self.clock)
        self.ids: list[str] = []
        self.lock_tasks: list[asyncio.Task] = []

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    @initialize(side=st.sampled_from(Side), trailing=st.booleans())
    def open_first(self, side: Side, trailing: bool) -> None:
        self.open_position(side, trailing)

    @rule(side=st.sampled_from(Side), trailing=st.booleans())
    def open_position(self, side: Side, trailing: bool) -> None:
        symbol = f"S{len(self.ids)}"
        p = self.run(self.engine.open_position(
            account="acct", symbol=symbol, side=side, quantity=D(1),
            trailing=TrailingState(activation_price=D(110) if side is Side.LONG else D(90), callback_rate=D(1))
            if trailing else None))
        self.ids.append(p.id)

    @precondition(lambda self: bool(self.engine.positions))
    @rule(data=st.data(), event=events, wait_ms=st.integers(0, 700_000))
    def fire(self, data: st.DataObject, event, wait_ms: int) -> None:
        pid = data.draw(st.sampled_from(sorted(self.engine.positions)))
        self.clock.advance(milliseconds=wait_ms)
        try:
            self.run(self.engine.fire(pid, event))
        except TransitionRefused:
            pass

    @precondition(lambda self: bool(self.engine.positions))
    @rule(data=st.data(), purpose=st.sampled_from([OrderPurpose.STOP, OrderPurpose.TAKE_PROFIT]))
    def place_order(self, data: st.DataObject, purpose: OrderPurpose) -> None:
        pid = data.draw(st.sampled_from(sorted(self.engine.positions)))
        order = OrderRef(client_id=f"o{pid}{len(self.exchange.orders)}", position_id=pid,
                         symbol=self.engine.positions[pid].symbol, purpose=purpose,
                         side="sell", quantity=D(1), trigger_price=D(95))
        self.run(self.engine.track_order(pid, self.run(self.exchange.place_order(order))))

    @precondition(lambda self: bool(self.engine.positions))
    @rule(data=st.data())
    def queue_stop_move(self, data: st.DataObject) -> None:
        """Leave a stop mutation waiting behind a slow one, as a live engine would."""
        p = self.engine.positions[data.draw(st.sampled_from(sorted(self.engine.positions)))]

        async def slow(target: D) -> D:
            await asyncio.sleep(0.001)  # a slow exchange call
            return target

        for target in (D(1), D(2)):
            self.lock_tasks.append(
                self.loop.create_task(self.engine.locks.submit(p.account, p.symbol, p.id, target, slow)))
        self.run(asyncio.sleep(0))  # one loop step: the first is in flight, the second waits

    @invariant()
    def terminal_positions_leave_nothing_behind(self) -> None:
        for pid in self.ids:
            stored = self.run(self.repo.get_position(pid))
            assert stored is not None and stored.state in PositionState
            if stored.state.is_terminal:
                assert pid not in self.engine.positions
                assert stored.trailing is None and not self.run(self.repo.trailing_state_exists(pid))
                assert not self.engine.locks.is_held(stored.account, stored.symbol, pid)
                assert self.exchange.open_orders(pid) == [] and stored.orders == {}
                assert self.run(self.repo.closure(pid))["state"] == stored.state.value
            else:
                assert self.engine.positions[pid] == stored

    @invariant()
    def every_journal_replays_to_the_stored_state(self) -> None:
        for pid in self.ids:
            stored = self.run(self.repo.get_position(pid))
            replayed = self.run(replay(self.run(self.repo.journal(pid))))
            # Everything but the tracked orders (order bookkeeping is not a transition) comes back.
            assert replace(replayed, orders={}) == replace(stored, orders={})

    def teardown(self) -> None:
        for task in self.lock_tasks:
            self.run(task)  # every queued mutation ends: applied, superseded or released, none hangs
        assert self.engine.locks.held_keys() == set()
        self.run(self.repo.close())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)


LifecycleMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_random_event_sequences_keep_every_invariant = LifecycleMachine.TestCase
