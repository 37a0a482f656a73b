"""Books that never block protection: a write-behind queue in front of the `PositionStore`.

Invariant 8 (protect first, books second): a storage failure must not delay or prevent a stop, a trailing
move or a close. So a write (a transition's commit, an order row) is tried at once; if the store fails, or
does not answer within `timeout_s`, the write is queued and the caller goes on as if it had been committed:
memory runs ahead of the database. "Does not answer" means no write at all completed for `timeout_s`: a
store that is merely busy (a burst queued on SQLite's single writer) is waited for, and so is one whose
answers wait behind a busy event loop (the timer that would judge it fires late then). While anything is
queued, later writes queue behind it (per-position order, and the journal-sequence guard, stay intact); a
background flusher retries the queue, in order, until the store takes it. A write that timed out is not
repeated while it may still land: the flusher first waits for that attempt's own outcome. A retried commit
that finds its journal row already there (an answer lost after the database committed) counts as written:
nothing is written twice.

What is not written when the process dies is rebuilt by restart recovery from the venue: client ids are
deterministic, so the orders placed meanwhile are found again by id.

Opening a position is not queued: a new exposure the books cannot record is refused (`StorageUnavailable`).
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from lifecycle.eager import EagerFuture, when_answered
from lifecycle.errors import ConcurrentModification, StoreRefused
from lifecycle.retry import Backoff

STARVED_SHARE = 0.25  # a timeout timer later than this share of the timeout found the event loop busy
CONFIRM_SHARE = 0.1  # a store found stuck is looked at once more this share of the timeout later
STARVED_CAP = 4  # timeouts after which a write is judged even on late timers (a loop busy for that long)


@dataclass(slots=True)
class _Write:
    what: str  # "commit <position> #<seq>" / "order <client id>": for logs
    call: Callable[[], Awaitable[Any]]  # writes it (again)
    done: Callable[[], Awaitable[bool]] | None  # after a ConcurrentModification: was it written already?
    inflight: asyncio.Future[Any] | None = None  # an attempt that timed out and may still land


@dataclass
class BooksStats:
    queued: int = 0  # writes that went to the queue instead of the store
    flushed: int = 0  # queued writes written later
    failures: int = 0  # failed or timed-out attempts
    lost: int = 0  # queued writes refused for good (logged with what they were)
    failures_by_kind: dict[str, int] = field(default_factory=dict)


class Books:
    """Write now, or queue and write later in order; never raise a storage failure at the caller."""

    def __init__(self, *, timeout_s: float = 0.5, retry_initial_s: float = 0.05, retry_max_s: float = 2.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.backoff = Backoff(step_s=retry_initial_s, max_s=retry_max_s, doubling=True)
        self.monotonic = monotonic
        self.stats = BooksStats()
        self.failing: str | None = None  # why the store last failed, while writes are queued
        self.failing_since: float | None = None
        self._queue: deque[_Write] = deque()
        self._progress = monotonic()  # when a write last completed: a store that makes none is stuck
        self._flusher: asyncio.Task[None] | None = None
        self._drained = asyncio.Event()
        self._drained.set()

    @property
    def behind(self) -> int:
        """How many writes wait for the store."""
        return len(self._queue)

    async def write(self, what: str, call: Callable[[], Awaitable[Any]],
                    done: Callable[[], Awaitable[bool]] | None = None) -> None:
        """Write through `call()`; on failure or timeout queue it. ConcurrentModification and StoreRefused
        propagate (a stale writer, a failed constraint: definite answers, never queued); every other failure
        is the store's and is queued. Cancelling the caller does not cancel the write."""
        await asyncio.shield(self.submit(what, call, done))

    def submit(self, what: str, call: Callable[[], Awaitable[Any]],
               done: Callable[[], Awaitable[bool]] | None = None) -> asyncio.Future[None]:
        """`write`, as a future that resolves when the write is in the store or queued (or fails with
        ConcurrentModification / StoreRefused). Driven by callbacks, not a task: the hot path of every
        transition goes through here (issue 13)."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[None] = EagerFuture(loop=loop)
        if self._queue:
            self._enqueue(_Write(what, call, done))
            answer.set_result(None)
            return answer
        attempt = asyncio.ensure_future(call())  # a store that returns a future runs no extra task here
        started = loop.time()
        timer: asyncio.TimerHandle | None = None

        queued = False
        confirmed = False  # the stuck store was seen once; the next on-time look decides

        def queue_it(inflight: asyncio.Future[Any] | None) -> None:
            nonlocal queued
            queued = True
            self._enqueue(_Write(what, call, done, inflight=inflight))
            if not answer.done():
                answer.set_result(None)

        def on_timeout() -> None:
            nonlocal timer, confirmed
            if queued or attempt.done():
                return
            assert timer is not None
            if self._queue:  # another writer found the store stuck meanwhile: keep the order, queue behind it
                queue_it(attempt)
                return
            if (loop.time() - timer.when() > self.timeout_s * STARVED_SHARE
                    and loop.time() - started < self.timeout_s * STARVED_CAP):
                # This timer ran late: the event loop itself was busy (a cascade of stream updates), and the
                # store's answers may be waiting behind it in the loop's queue. That says nothing about the
                # store: judge it only on a timer that fires on time (a false "storage failing" queued every
                # write of a 500-position burst and told /health so: bench.burst, issue 13). Not forever: after
                # STARVED_CAP timeouts a write is judged whatever the loop does (a database that died during a
                # cascade must not hold protection up for as long as the cascade lasts).
                timer = loop.call_later(self.timeout_s, on_timeout)
                return
            # Busy is not stuck: while other writes complete (a burst queued on SQLite's one writer), wait on.
            if self.monotonic() - self._progress >= self.timeout_s and not confirmed:
                # One more short look first: a pause of the whole process (a full garbage collection took
                # 135-400 ms in bench.closure_latency) can end just before this timer, and the write then
                # needs a few milliseconds more of the loop. A store that is stuck stays stuck.
                confirmed = True
                timer = loop.call_later(self.timeout_s * CONFIRM_SHARE, on_timeout)
                return
            if self.monotonic() - self._progress >= self.timeout_s:
                self._failed(what, f"no write completed for {self.timeout_s:g} s")
                queue_it(attempt)
            else:
                timer = loop.call_later(self.timeout_s, on_timeout)

        def on_done(finished: asyncio.Future[Any]) -> None:
            if timer is not None:
                timer.cancel()
            if queued:
                return  # queued after a timeout: the flusher takes this attempt's outcome
            # (Even if nobody waits for the answer any more, a failed write is queued, never dropped.)
            error = finished.exception() if not finished.cancelled() else asyncio.CancelledError()
            if error is None:
                self._progress = self.monotonic()
                if not answer.done():
                    answer.set_result(None)
            elif isinstance(error, (ConcurrentModification, StoreRefused)):
                if not answer.done():
                    answer.set_exception(error)
            else:
                self._failed(what, _describe(error))
                queue_it(None)

        timer = loop.call_later(self.timeout_s, on_timeout)
        when_answered(attempt, on_done)  # eagerly if the store's future is eager: no turn of the loop between
        return answer

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every queued write is in the store (True), or `timeout_s` passed (False)."""
        if not self._queue:
            return True
        try:
            await asyncio.wait_for(self._drained.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self, timeout_s: float) -> int:
        """Flush for up to `timeout_s`, then stop; returns how many writes were left unwritten (logged)."""
        await self.drain(timeout_s)
        left = len(self._queue)
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        if left:
            logger.error("books: {} write(s) could not be made before stopping ({}); restart recovery rebuilds "
                         "them from the exchange (first: {})", left, self.failing, self._queue[0].what)
        return left

    # --- internals ------------------------------------------------------------------------------

    def _enqueue(self, write: _Write) -> None:
        self._queue.append(write)
        self.stats.queued += 1
        self._drained.clear()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())

    def _failed(self, what: str, why: str) -> None:
        self.stats.failures += 1
        kind = what.split(" ", 1)[0]
        self.stats.failures_by_kind[kind] = self.stats.failures_by_kind.get(kind, 0) + 1
        if self.failing is None:
            self.failing_since = self.monotonic()
            logger.error("books: the database failed ({}) writing {}; protection goes on, the books catch up "
                         "when it is back", why, what)
        self.failing = why

    async def _flush(self) -> None:
        failures = 0  # of the write at the head of the queue
        while self._queue:
            write = self._queue[0]
            try:
                if write.inflight is not None:
                    attempt, write.inflight = write.inflight, None
                    await attempt  # the timed-out attempt's own outcome first: it may have landed
                else:
                    await write.call()
            except StoreRefused as e:
                self.stats.lost += 1
                logger.error("books: {} refused by the database for good: {}; not written", write.what, e)
            except ConcurrentModification:
                if write.done is None or not await self._written(write):
                    self.stats.lost += 1
                    logger.error("books: {} refused by the database (a newer row is there); not written", write.what)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the store is still failing: try again, slower
                self._failed(write.what, _describe(e))
                failures += 1
                await asyncio.sleep(self.backoff.delay(failures))
                continue
            self._queue.popleft()
            self._progress = self.monotonic()
            self.stats.flushed += 1
            failures = 0
        if self.failing is not None:
            took = self.monotonic() - (self.failing_since or self.monotonic())
            logger.warning("books: the database is back after {:.1f} s; every queued write is in it", took)
        self.failing = self.failing_since = None
        self._drained.set()

    async def _written(self, write: _Write) -> bool:
        assert write.done is not None
        try:
            return await write.done()
        except Exception as e:  # noqa: BLE001 - cannot tell: treat as not written (logged as lost)
            logger.error("books: could not check whether {} was written: {}", write.what, _describe(e))
            return False


def _describe(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
