"""The books (write-behind in front of the store): a failing or stuck store never holds a caller up, queued
writes land in order and once each, a busy store is waited for, a definite refusal is raised. Against a
recording fake store whose failures the test controls."""
from __future__ import annotations

import asyncio
import time

import pytest

from lifecycle.books import Books
from lifecycle.errors import ConcurrentModification, StoreRefused


class FakeStore:
    """Applies writes to a list, one at a time (like SQLite's single writer); can fail, hang, lose answers."""

    def __init__(self, *, write_s: float = 0.0) -> None:
        self.applied: list[int] = []
        self.calls: list[int] = []
        self.write_s = write_s
        self.failing = False
        self.lose_answer_once = False
        self.refuse = False
        self.hang = asyncio.Event()
        self.hang.set()
        self._lock = asyncio.Lock()

    async def write(self, n: int) -> None:
        async with self._lock:
            self.calls.append(n)
            await self.hang.wait()
            if self.write_s:
                await asyncio.sleep(self.write_s)  # a slow database write
            if self.refuse:
                raise StoreRefused("constraint")
            if self.failing:
                raise ConnectionRefusedError("the database is down")
            if n in self.applied:
                raise ConcurrentModification(f"{n} is there already")
            self.applied.append(n)
            if self.lose_answer_once:
                self.lose_answer_once = False
                raise ConnectionResetError("the answer was lost after the commit")

    async def written(self, n: int) -> bool:
        return n in self.applied


async def _write(books: Books, store: FakeStore, n: int) -> None:
    await books.write(f"commit #{n}", lambda: store.write(n), lambda: store.written(n))


async def test_a_failing_store_queues_in_order_and_catches_up_when_back() -> None:
    store, books = FakeStore(), Books(timeout_s=0.2, retry_initial_s=0.01, retry_max_s=0.05)
    store.failing = True
    started = time.monotonic()
    for n in range(1, 6):
        await _write(books, store, n)  # none raises, none waits for the store
    assert time.monotonic() - started < 0.5
    assert books.behind == 5 and books.failing is not None and "ConnectionRefusedError" in books.failing
    store.failing = False
    assert await books.drain(5)
    assert store.applied == [1, 2, 3, 4, 5] and books.behind == 0 and books.failing is None


async def test_a_stuck_store_queues_after_the_timeout_and_the_stuck_attempt_is_not_repeated() -> None:
    store, books = FakeStore(), Books(timeout_s=0.2, retry_initial_s=0.01)
    store.hang.clear()
    started = time.monotonic()
    await _write(books, store, 1)
    assert 0.15 < time.monotonic() - started < 1.0 and books.behind == 1
    await _write(books, store, 2)  # queued behind at once
    assert books.behind == 2
    store.hang.set()
    assert await books.drain(5)
    assert store.applied == [1, 2] and store.calls == [1, 2]  # the stuck attempt landed; it was not sent again


async def test_a_busy_store_is_waited_for_not_queued() -> None:
    store, books = FakeStore(write_s=0.05), Books(timeout_s=0.2)
    await asyncio.gather(*(_write(books, store, n) for n in range(1, 11)))  # 0.5 s of work, 0.05 s each
    assert books.stats.queued == 0 and books.stats.failures == 0 and sorted(store.applied) == list(range(1, 11))


async def test_a_store_whose_answer_waits_behind_a_busy_event_loop_is_not_called_failing() -> None:
    """A cascade keeps the event loop busy past the timeout (bench.burst with 500 positions): the store answered
    in 10 ms, its answer waits in the loop's queue behind the timer. Not a failing store: nothing queued."""
    store, books = FakeStore(write_s=0.01), Books(timeout_s=0.3, retry_initial_s=0.01)
    loop = asyncio.get_running_loop()
    loop.call_soon(time.sleep, 0.6)  # the loop busy for twice the timeout, right after the write starts
    await _write(books, store, 1)
    assert store.applied == [1]
    assert books.behind == 0 and books.failing is None and books.stats.failures == 0


async def test_a_pause_of_the_whole_process_that_ends_just_before_the_timeout_is_not_a_failing_store() -> None:
    """A full garbage collection paused the process for 135-400 ms (bench.closure_latency): it ended just before
    the timeout's timer, which then fired on time while the write still needed 20 ms of the loop. One more
    short look finds it written: nothing queued, opens not refused."""
    store, books = FakeStore(write_s=0.02), Books(timeout_s=0.3, retry_initial_s=0.01)
    asyncio.get_running_loop().call_soon(time.sleep, 0.29)  # the pause, before the write's first step
    await _write(books, store, 1)
    assert store.applied == [1]
    assert books.behind == 0 and books.failing is None and books.stats.failures == 0


async def test_a_dead_store_is_judged_even_while_the_event_loop_stays_busy() -> None:
    """Late timers do not judge the store, but not forever: a database that died during a long cascade (the loop
    busy the whole time) must not hold the write, and the protection waiting behind it, up until it ends."""
    store, books = FakeStore(), Books(timeout_s=0.3, retry_initial_s=0.01)
    store.hang.clear()  # the database never answers
    busy = True

    async def cascade() -> None:  # every turn of the loop takes 0.1 s: every timer fires late
        while busy:
            time.sleep(0.1)
            await asyncio.sleep(0)

    churn = asyncio.ensure_future(cascade())
    try:
        await asyncio.wait_for(_write(books, store, 1), 5)  # queued, not waited for until the loop calms down
        assert books.behind == 1 and books.failing is not None
    finally:
        busy = False
        await churn
        store.hang.set()
    assert await books.drain(5) and store.applied == [1]


async def test_a_write_whose_answer_was_lost_is_not_written_twice() -> None:
    store, books = FakeStore(), Books(timeout_s=0.2, retry_initial_s=0.01)
    store.lose_answer_once = True
    await _write(books, store, 1)
    assert books.stats.queued == 1  # went to the queue (its flusher may have caught up already)
    assert await books.drain(5)
    assert store.applied == [1] and books.stats.lost == 0  # the retry found it there: counted as written


async def test_a_definite_refusal_is_raised_not_queued() -> None:
    store, books = FakeStore(), Books(timeout_s=0.2)
    store.refuse = True
    with pytest.raises(StoreRefused):
        await _write(books, store, 1)
    assert books.behind == 0


async def test_close_says_what_could_not_be_written() -> None:
    store, books = FakeStore(), Books(timeout_s=0.1, retry_initial_s=0.01)
    store.failing = True
    await _write(books, store, 1)
    await _write(books, store, 2)
    assert await books.close(0.2) == 2
