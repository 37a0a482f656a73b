"""One stop mutation per symbol at a time; waiting requests coalesce to the newest (seed 003)."""
from __future__ import annotations

import asyncio

import pytest

from lifecycle.guards.stop_lock import MutationStatus, StopLockRegistry


class RecordingVenue:
    """Applies stop moves slowly and records the most that ever ran at once per symbol."""

    def __init__(self) -> None:
        self.applied: list[tuple[str, int]] = []
        self.running: dict[str, int] = {}
        self.max_running: dict[str, int] = {}

    def mover(self, symbol: str, delay: float = 0.01):
        async def apply(target: int) -> int:
            self.running[symbol] = self.running.get(symbol, 0) + 1
            self.max_running[symbol] = max(self.max_running.get(symbol, 0), self.running[symbol])
            await asyncio.sleep(delay)  # a slow exchange call
            self.running[symbol] -= 1
            self.applied.append((symbol, target))
            return target

        return apply


async def test_concurrent_requests_for_one_symbol_never_overlap_and_coalesce_to_the_newest() -> None:
    locks, venue = StopLockRegistry(), RecordingVenue()
    first = asyncio.create_task(locks.submit("a", "BTC", "p1", 1, venue.mover("BTC")))
    await asyncio.sleep(0)  # first is now in flight
    later = [asyncio.create_task(locks.submit("a", "BTC", "p1", t, venue.mover("BTC"))) for t in (2, 3, 4, 5)]
    results = await asyncio.gather(first, *later)
    assert [r.status for r in results] == [MutationStatus.APPLIED, *[MutationStatus.SUPERSEDED] * 3,
                                           MutationStatus.APPLIED]
    assert venue.applied == [("BTC", 1), ("BTC", 5)]
    assert venue.max_running["BTC"] == 1
    assert locks.held_keys() == set()


async def test_different_symbols_move_concurrently() -> None:
    locks, venue = StopLockRegistry(), RecordingVenue()
    started = asyncio.get_running_loop().time()
    await asyncio.gather(*(locks.submit("a", s, f"p-{s}", 1, venue.mover(s, 0.05)) for s in ("BTC", "ETH", "SOL")))
    assert asyncio.get_running_loop().time() - started < 0.12  # three 50 ms moves side by side, not 150 ms
    assert sorted(venue.applied) == [("BTC", 1), ("ETH", 1), ("SOL", 1)]


async def test_two_positions_on_one_symbol_share_the_lock_but_never_drop_each_others_requests() -> None:
    locks, venue = StopLockRegistry(), RecordingVenue()
    blocker = asyncio.create_task(locks.submit("a", "BTC", "long", 1, venue.mover("BTC")))
    await asyncio.sleep(0)  # one loop step: the blocker is in flight
    short = asyncio.create_task(locks.submit("a", "BTC", "short", 10, venue.mover("BTC")))
    long_newer = asyncio.create_task(locks.submit("a", "BTC", "long", 2, venue.mover("BTC")))
    results = await asyncio.gather(blocker, short, long_newer)
    assert all(r.status is MutationStatus.APPLIED for r in results)
    assert venue.max_running["BTC"] == 1
    assert venue.applied == [("BTC", 1), ("BTC", 10), ("BTC", 2)]


async def test_a_failed_exchange_call_propagates_and_is_never_reported_applied() -> None:
    locks = StopLockRegistry()

    async def rejected(target: int) -> int:
        raise RuntimeError("exchange said no")

    with pytest.raises(RuntimeError, match="exchange said no"):
        await locks.submit("a", "BTC", "p1", 1, rejected)
    assert not locks.is_held("a", "BTC")
    venue = RecordingVenue()  # the lock is usable again after a failure
    assert (await locks.submit("a", "BTC", "p1", 2, venue.mover("BTC"))).applied


async def test_release_drops_waiting_requests_and_refuses_new_ones_for_that_position() -> None:
    locks, venue = StopLockRegistry(), RecordingVenue()
    in_flight = asyncio.create_task(locks.submit("a", "BTC", "p1", 1, venue.mover("BTC", 0.02)))
    await asyncio.sleep(0)  # one loop step: in flight
    waiting = asyncio.create_task(locks.submit("a", "BTC", "p1", 2, venue.mover("BTC")))
    other = asyncio.create_task(locks.submit("a", "BTC", "p2", 7, venue.mover("BTC")))
    await asyncio.sleep(0)  # one loop step: both are waiting
    assert locks.is_held("a", "BTC", "p1")
    locks.release("a", "BTC", "p1")
    assert not locks.is_held("a", "BTC", "p1")
    after = await locks.submit("a", "BTC", "p1", 3, venue.mover("BTC"))
    assert [(await in_flight).status, (await waiting).status, after.status, (await other).status] == [
        MutationStatus.APPLIED, MutationStatus.RELEASED, MutationStatus.RELEASED, MutationStatus.APPLIED]
    assert venue.applied == [("BTC", 1), ("BTC", 7)]


async def test_a_released_position_is_refused_even_when_its_symbol_is_idle() -> None:
    locks, venue = StopLockRegistry(), RecordingVenue()
    locks.release("a", "BTC", "p1")  # no slot exists for BTC at this moment
    assert (await locks.submit("a", "BTC", "p1", 1, venue.mover("BTC"))).status is MutationStatus.RELEASED
    assert venue.applied == []


async def test_if_the_newest_waiter_is_cancelled_the_next_newest_still_runs() -> None:
    locks, venue = StopLockRegistry(), RecordingVenue()
    first = asyncio.create_task(locks.submit("a", "BTC", "p1", 1, venue.mover("BTC", 0.02)))
    await asyncio.sleep(0)  # one loop step: first is in flight
    older = asyncio.create_task(locks.submit("a", "BTC", "p1", 2, venue.mover("BTC")))
    newest = asyncio.create_task(locks.submit("a", "BTC", "p1", 3, venue.mover("BTC")))
    await asyncio.sleep(0)  # one loop step: both are waiting
    newest.cancel()
    assert [(await first).status, (await older).status] == [MutationStatus.APPLIED, MutationStatus.APPLIED]
    assert venue.applied == [("BTC", 1), ("BTC", 2)]
    assert locks.held_keys() == set()


async def test_exclusive_work_waits_for_the_move_in_flight() -> None:
    locks, venue = StopLockRegistry(), RecordingVenue()
    move = asyncio.create_task(locks.submit("a", "BTC", "p1", 1, venue.mover("BTC", 0.03)))
    await asyncio.sleep(0)  # one loop step: the move is in flight
    async with locks.exclusive("a", "BTC"):
        assert venue.applied == [("BTC", 1)]  # the move finished before the exclusive section began
    assert (await move).applied and locks.held_keys() == set()
