"""The engine core: live positions in memory, events in order per position, journal before effects.

For every event, under the position's own lock: the machine decides on a draft copy, the store commits
the draft with its journal row in one transaction, and only then does the draft become the live
position. The actions a terminal transition asks for (release the stop lock, cancel leftover orders
under the symbol's lock, emit the closure record, drop the position) run after the position's lock is
released, so an order tracked meanwhile is still seen and cancelled. A refused event or a failed
commit leaves the live position exactly as it was.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import replace
from datetime import datetime
from decimal import Decimal

from loguru import logger

from lifecycle.actions import Action, CancelWorkingOrders, DropPosition, EmitClosure, ReleaseStopLock
from lifecycle.books import Books
from lifecycle.domain import OrderRef, OrderStatus, Position, Side, TrailingState, new_position_id, utcnow
from lifecycle.eager import when_answered
from lifecycle.errors import (
    ConcurrentModification,
    DuplicateLivePosition,
    InvalidEvent,
    OrderAlreadyGone,
    StorageUnavailable,
    TransitionRefused,
    UndefinedTransition,
    UnknownPosition,
)
from lifecycle.events import EntryFailed, Event
from lifecycle.guards.stop_lock import StopLockRegistry
from lifecycle.journal import Outcome, creation_entry
from lifecycle.machines.position import PositionMachine
from lifecycle.machines.states import PositionState
from lifecycle.machines.table import INITIAL_STATE
from lifecycle.metrics import Metrics
from lifecycle.ports import OrderCanceller, PositionStore, RecordSink
from lifecycle.record_kinds import TransitionRecord


class Engine:
    def __init__(
        self,
        store: PositionStore,
        *,
        canceller: OrderCanceller,
        records: RecordSink,
        locks: StopLockRegistry | None = None,
        machine: PositionMachine | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] = utcnow,
        books: Books | None = None,
    ) -> None:
        self.store = store
        # Writes after the venue acted go through the books: a failing database never holds up protection.
        self.books = books or Books()
        self.canceller = canceller
        self.records = records
        self.locks = locks or StopLockRegistry()
        self.machine = machine or PositionMachine()
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.positions: dict[str, Position] = {}  # live positions only, by id
        self._live_keys: dict[tuple[str, str, Side], str] = {}  # (account, symbol, side) -> position id
        self._order: dict[str, asyncio.Lock] = {}  # per-position event ordering, created on demand
        self._status_writes: dict[str, asyncio.Future[None]] = {}  # client id -> its latest status write
        # Called after every committed transition with the new position (sync, must be quick).
        self.listeners: list[Callable[[Position, Outcome], None]] = []

    # --- lifecycle entry points ---------------------------------------------------------------

    async def open_position(
        self,
        *,
        account: str,
        symbol: str,
        side: Side,
        quantity: Decimal,
        trailing: TrailingState | None = None,
    ) -> Position:
        """Create a new position in OPENING (a new row, also when the symbol was traded before)."""
        if not account or not symbol:
            raise InvalidEvent("account and symbol are required")
        if not quantity.is_finite() or quantity <= 0:
            raise InvalidEvent(f"quantity must be > 0, got {quantity}")
        key = (account, symbol, side)
        if key in self._live_keys:
            raise DuplicateLivePosition(f"a live {side} position on {account}/{symbol} already exists: "
                                        f"{self._live_keys[key]}")
        now = self.clock()
        position = Position(
            id=new_position_id(),
            account=account,
            symbol=symbol,
            side=side,
            state=INITIAL_STATE,
            requested_quantity=quantity,
            created_at=now,
            updated_at=now,
            trailing=trailing,
        )
        creation = creation_entry(position, now)
        if self.books.behind:
            raise StorageUnavailable(f"the database is failing ({self.books.failing}); no new position is opened "
                                     "until it is back")
        insert = asyncio.ensure_future(self.store.insert_position(position, creation))
        finished, _ = await asyncio.wait({insert}, timeout=self.books.timeout_s)
        if not finished:
            # A stuck database: refuse now rather than send the entry whenever it answers; if the row lands
            # later it is ended CANCELLED (it would otherwise hold the symbol's live slot in the database).
            asyncio.ensure_future(self._cancel_late_row(insert, position))  # noqa: RUF006 - fire and forget; what it awaits keeps it alive
            raise StorageUnavailable(f"the database did not record the new position within "
                                     f"{self.books.timeout_s:g} s; nothing was sent")
        error = insert.exception()
        if isinstance(error, DuplicateLivePosition):
            raise error
        if error is not None:  # a new exposure the books cannot record is not taken
            raise StorageUnavailable(f"the database cannot record a new position: {type(error).__name__}") from error
        self._add_live(position)
        logger.info("{} {} {} {} created in {}", account, symbol, side, position.id, position.state)
        return position

    async def _cancel_late_row(self, insert: asyncio.Future[None], position: Position) -> None:
        try:
            await insert
        except Exception:  # noqa: BLE001 - never written: nothing to end
            return
        self._add_live(position)
        try:
            await self.fire(position.id, EntryFailed(reason="not sent: the database recorded it too late"))
        except Exception as e:  # noqa: BLE001 - restart recovery settles an OPENING row without an entry
            logger.error("position {} recorded too late could not be ended: {}", position.id, e)

    async def fire(self, position_id: str, event: Event) -> Outcome:
        """Apply one event to one live position; raises TransitionRefused (logged, counted) if refused.

        Once the machine has accepted the event, cancelling the caller no longer stops the work: the
        commit, the swap into memory and the terminal actions complete, then the cancellation is raised.
        """
        outcome = await self.fire_if(position_id, event, only_in=None)
        assert outcome is not None
        return outcome

    async def fire_if(self, position_id: str, event: Event | Callable[[], Event | None],
                      only_in: Collection[PositionState] | None) -> Outcome | None:
        """`fire`, but only while the position is live and in one of `only_in` (checked under its lock).

        For observations that may arrive twice or late (a stream update and a REST answer for the same
        fill, a flat after another path already closed the position): returns None, quietly, when the
        position has moved on, instead of a refusal that would read as an alarm in the logs.

        `event` may be a function that makes the event: it is called under the position's lock, once the
        position passed the check, so that what it reads and takes (the part of an order's figures a reduction
        books) follows the order in which the position's events are applied. It returns None when, seen under
        the lock, its observation is no longer news (a newer update of the position was applied first): nothing
        happens then, quietly, as for a position that moved on.
        """
        live = self.positions.get(position_id)
        if live is None:
            if only_in is not None:
                return None
            made = event if isinstance(event, Event) else event()
            what = made.name.value if made is not None else "-"
            self.metrics.refused[("-", what, "unknown_position")] += 1
            logger.warning("event {} for position {} refused: not a live position", what, position_id)
            raise UnknownPosition(f"no live position {position_id}")
        async with self._lock_of(position_id):
            live = self.positions.get(position_id)
            if only_in is not None and (live is None or live.state not in only_in):
                return None
            if not isinstance(event, Event):
                made = event()
                if made is None:
                    return None
                event = made
            if live is None:  # became terminal while this event waited
                self.metrics.refused[("-", event.name.value, "unknown_position")] += 1
                raise UnknownPosition(f"position {position_id} is no longer live")
            draft = live.clone()
            try:
                outcome = await self.machine.apply(draft, event, self.clock())
            except TransitionRefused as refusal:
                why = "undefined" if isinstance(refusal, UndefinedTransition) else "guard"
                self.metrics.refused[(refusal.state, refusal.event, why)] += 1
                logger.warning("{} {}: {}", live.account, live.symbol, refusal)
                raise
            cancelled = await self._commit(draft, outcome)
        if outcome.actions:
            cancelled |= await _finish(self._run(outcome.actions))
        if cancelled:
            raise asyncio.CancelledError
        return outcome

    async def _commit(self, draft: Position, outcome: Outcome) -> bool:
        """Write the transition (through the books), then make the draft the live position. Runs to the end
        even if the caller is cancelled meanwhile; returns whether it was (the caller raises it after).

        The draft becomes live (and the listeners hear of it) in a callback of the books' answer, not when this
        coroutine resumes: the members of one group commit are all swapped in within the loop's turn that
        follows their transaction, instead of one task wake-up after another (a 500-position cascade's
        acknowledgements took 0.1-0.3 ms each, in a row: bench.burst, issue 13). The transition record and the log
        line follow when this coroutine resumes; the record's `committed_at` is the swap's time. The swap is
        claimed (its time taken) before it runs, so that a listener raising past `_swap` (a BaseException, which
        the loop's handler then reports) cannot make the coroutine swap and notify a second time."""
        # The committed draft is not changed after this (later events work on clones; only its working-order
        # dict, which a commit does not write, is), so a queued retry can write it as it is.
        seq = outcome.journal.seq

        async def written() -> bool:
            stored = await self.store.get_position(draft.id)
            return stored is not None and stored.seq >= seq

        answer = self.books.submit(f"commit {draft.id} #{seq}", lambda: self.store.commit(draft, outcome), written)
        swapped: list[datetime] = []

        def swap() -> None:
            # Claimed before anything runs: whatever a listener raises (a BaseException escapes `_swap`), the
            # coroutine must not swap and notify a second time.
            swapped.append(self.clock())
            self._swap(draft, outcome)

        def on_answer(done: asyncio.Future[None]) -> None:
            if not swapped and not done.cancelled() and done.exception() is None:
                swap()

        when_answered(answer, on_answer)  # eager (the books' answer is): the swap comes with the answer itself
        try:
            cancelled = await _outlast(answer)
        except ConcurrentModification:
            # another writer moved it on: take the stored truth, then refuse
            await _finish(self._reload(draft.id))
            raise
        if not swapped:  # answered before it was awaited (the books queued it): its callback has not run yet
            swap()
        self._committed(draft, outcome, swapped[0])
        return cancelled

    def _swap(self, draft: Position, outcome: Outcome) -> None:
        """The committed draft becomes the live position and every listener hears of it (an exception from one is
        logged; a BaseException, such as SystemExit, goes on out once the others heard)."""
        self.positions[draft.id] = draft
        self.metrics.transitions[(outcome.source.value, outcome.journal.event, outcome.dest.value)] += 1
        escaped: BaseException | None = None
        for listener in self.listeners:
            try:
                listener(draft, outcome)
            except Exception as e:  # noqa: BLE001 - a listener must not undo a committed transition
                logger.error("transition listener failed: {}: {}", type(e).__name__, e)
            except BaseException as e:  # noqa: BLE001 - SystemExit and the like: re-raised once the others heard
                escaped = escaped or e
        if escaped is not None:
            raise escaped

    def _committed(self, draft: Position, outcome: Outcome, committed_at: datetime) -> None:
        """The transition's record and its log line (after `_swap`)."""
        self.records.emit(TransitionRecord(
            account=draft.account, symbol=draft.symbol, position_id=draft.id, at=outcome.journal.at,
            committed_at=committed_at, seq=outcome.journal.seq, source=outcome.source.value,
            trigger=outcome.journal.event, dest=outcome.dest.value, cause=outcome.journal.cause,
            payload=outcome.journal.payload))
        # One line per transition; a closing one says the closure's cause and reason on the same line (its
        # EmitClosure action logs nothing: two lines per close were a tenth of a cascade's work, issue 13).
        closure = next((a.closure for a in outcome.actions if isinstance(a, EmitClosure)), None)
        logger.info(
            "{} {} {} {} --{}--> {}{}{}",
            draft.account,
            draft.symbol,
            draft.id,
            outcome.source,
            outcome.journal.event,
            outcome.dest,
            f" (cause {outcome.journal.cause})" if outcome.journal.cause else "",
            f"; closed: cause={closure.cause} reason={closure.reason}" if closure is not None else "",
        )

    async def _reload(self, position_id: str) -> None:
        stored = await self.store.get_position(position_id)
        if stored is None or stored.is_terminal:
            self._forget(position_id)
        else:
            self.positions[position_id] = stored
        logger.warning("position {} reloaded from the database after a concurrent change", position_id)

    async def track_order(self, position_id: str, order: OrderRef) -> None:
        """Remember an order of ours for this position (persisted first, then in memory), in event order."""
        if order.position_id != position_id:
            raise InvalidEvent(f"order {order.client_id} belongs to {order.position_id}, not {position_id}")
        if position_id not in self.positions:
            raise UnknownPosition(f"no live position {position_id}")
        async with self._lock_of(position_id):
            position = self.positions.get(position_id)
            if position is None:
                raise UnknownPosition(f"position {position_id} is no longer live")
            await self._save_order(order)
            if order.status.is_final:  # kept in the database; memory holds working orders only
                position.orders.pop(order.client_id, None)
            else:
                position.orders[order.client_id] = order

    async def order_status(self, position_id: str, order: OrderRef, *, lazy: bool = False) -> None:
        """A new status of an order already tracked (`track_order` registered it, durably): memory changes and
        the row's write is queued under the position's lock, in event order, and the write is awaited after the
        lock is released. A status row is bookkeeping: a transition of the position (a flat right behind the
        venue's expiry of its stop) must not wait for its fsync (bench.closure_latency: ~0.6 ms on every
        close). `lazy` (a status the stream reported, that no protection path waits for): the row rides with
        the next transition's transaction if one comes within a few milliseconds (on SQLite's one writer, the
        flat queued behind it would wait for a second fsync); a retry by the books is never lazy. If the write
        fails, the books retry it in order; restart recovery asks the venue anyway. Memory is ahead of the row
        meanwhile: a refusal (a lost lease) reaches the caller after memory changed, and a reload after a
        ConcurrentModification may bring a finished order back as working (its cancel then finds it gone)."""
        if order.position_id != position_id:
            raise InvalidEvent(f"order {order.client_id} belongs to {order.position_id}, not {position_id}")
        client_id = order.client_id
        async with self._lock_of(position_id):
            position = self.positions.get(position_id)
            if position is None:
                raise UnknownPosition(f"no live position {position_id}")
            if client_id not in position.orders:
                return  # finished while this waited for the lock (its final status came first): kept finished
            frozen, now = replace(order), self.clock()
            previous = self._status_writes.get(client_id)
            if previous is None or previous.done():
                written = self._submit_status(frozen, now, lazy)
            else:
                # The order's previous status is not yet written nor queued by the books: this one goes to the
                # books after it, so that a failed attempt the books retry can never land after a newer status.
                written = asyncio.get_running_loop().create_future()
                previous.add_done_callback(lambda _: _chain(lambda: self._submit_status(frozen, now, False), written))
            self._status_writes[client_id] = written
            written.add_done_callback(
                lambda done: self._status_writes.pop(client_id) if self._status_writes.get(client_id) is done else None)
            if order.status.is_final:
                position.orders.pop(client_id, None)
            else:
                position.orders[client_id] = order
        await asyncio.shield(written)

    def _submit_status(self, frozen: OrderRef, now: datetime, lazy: bool) -> asyncio.Future[None]:
        """Hand an order's status row to the books: resolves when it is written or queued by them."""
        attempts = [lazy]

        def save() -> Awaitable[None]:
            first = attempts.pop() if attempts else False
            return self.store.save_order(frozen, now, lazy=first)

        written = self.books.submit(f"order {frozen.client_id}", save)
        # Lazy only for the attempt made right here: a write the books queued (the store failing) or retry later
        # goes at once, since their flusher writes one at a time and nothing would come to share it.
        attempts.clear()
        return written

    async def rehydrate(self, accounts: list[str] | None = None) -> int:
        """Load every live position (of these accounts: the ones this process owns) into memory.

        Positions are not registered with the `transitions` machine (quadratic `add_model`); a dict
        and an index by (account, symbol, side) are all the engine keeps, built in linear time.
        """
        loaded = await self.store.load_live(accounts)
        for position in loaded:
            self._add_live(position)
        logger.info("rehydrated {} live positions", len(loaded))
        return len(loaded)

    def live_position(self, account: str, symbol: str, side: Side) -> Position | None:
        position_id = self._live_keys.get((account, symbol, side))
        return self.positions.get(position_id) if position_id else None

    def count_by_state(self) -> dict[PositionState, int]:
        counts: dict[PositionState, int] = {}
        for p in self.positions.values():
            counts[p.state] = counts.get(p.state, 0) + 1
        return counts

    # --- internals ----------------------------------------------------------------------------

    async def _save_order(self, order: OrderRef) -> None:
        frozen, now = replace(order), self.clock()  # the caller's OrderRef may change before a queued retry
        await self.books.write(f"order {order.client_id}", lambda: self.store.save_order(frozen, now))

    def _add_live(self, position: Position) -> None:
        self.positions[position.id] = position
        self._live_keys[(position.account, position.symbol, position.side)] = position.id

    def _lock_of(self, position_id: str) -> asyncio.Lock:
        lock = self._order.get(position_id)
        if lock is None:
            lock = self._order[position_id] = asyncio.Lock()
        return lock

    def _forget(self, position_id: str) -> None:
        position = self.positions.pop(position_id, None)
        self._order.pop(position_id, None)
        if position is not None:
            key = (position.account, position.symbol, position.side)
            if self._live_keys.get(key) == position.id:
                del self._live_keys[key]

    async def _run(self, actions: Iterable[Action]) -> None:
        for action in actions:
            try:
                await self._run_one(action)
            except Exception as e:  # noqa: BLE001 - the transition is committed; an action failure must not undo it
                self.metrics.action_failures[type(action).__name__] += 1
                logger.error("action {} failed: {}: {}", type(action).__name__, type(e).__name__, e)

    async def _run_one(self, action: Action) -> None:
        if isinstance(action, ReleaseStopLock):
            self.locks.release(action.account, action.symbol, action.position_id)
        elif isinstance(action, CancelWorkingOrders):
            async with self.locks.exclusive(action.account, action.symbol):
                position = self.positions.get(action.position_id)
                for order in position.working_orders() if position is not None else []:
                    try:
                        await self.canceller.cancel_order(order)
                    except OrderAlreadyGone:  # filled, expired or cancelled meanwhile: nothing left to do
                        order.status = OrderStatus.CANCELED  # no longer working; the stream says how it ended
                        await self._save_order(order)
                        logger.info("leftover {} order {} of {} was already gone", order.purpose, order.client_id,
                                    order.position_id)
                        continue
                    except Exception as e:  # noqa: BLE001 - one failed cancel must not keep the others open
                        self.metrics.action_failures["cancel_order"] += 1
                        logger.error("could not cancel leftover {} order {} of {}: {}: {}", order.purpose,
                                     order.client_id, order.position_id, type(e).__name__, e)
                        continue
                    order.status = OrderStatus.CANCELED
                    await self._save_order(order)
                    logger.info("cancelled leftover {} order {} of {}", order.purpose, order.client_id,
                                order.position_id)
        elif isinstance(action, EmitClosure):
            self.records.emit(action.closure.as_record())  # its log line is the transition's (`_committed`)
        elif isinstance(action, DropPosition):
            self._forget(action.position_id)
        else:  # pragma: no cover - the Action union is closed
            raise TypeError(f"unknown action {action!r}")


async def _outlast(work: asyncio.Future[None]) -> bool:
    """Wait for `work` (a future that runs on its own) even if the caller is cancelled meanwhile; say
    whether it was. `_finish` for work that is already a future: no task is made for it."""
    cancelled = False
    while True:
        try:
            await asyncio.shield(work)
            return cancelled
        except asyncio.CancelledError:
            if work.done() and work.cancelled():
                raise
            cancelled = True
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()


def _chain(start: Callable[[], asyncio.Future[None]], into: asyncio.Future[None]) -> None:
    """Start a write now and hand its answer (or the error starting it) to `into`."""
    try:
        started = start()
    except Exception as e:  # noqa: BLE001 - the waiting caller gets it
        if not into.done():
            into.set_exception(e)
        return

    def copy(done: asyncio.Future[None]) -> None:
        if into.done():
            return
        if done.cancelled():
            into.cancel()
        elif done.exception() is not None:
            into.set_exception(done.exception())  # type: ignore[arg-type]
        else:
            into.set_result(None)

    started.add_done_callback(copy)


async def _finish(work: Awaitable[None]) -> bool:
    """Run `work` to the end even if the caller is cancelled meanwhile; say whether it was.

    Used once the machine has decided: a half-done commit or cleanup is worse than a late
    cancellation, which the caller raises after everything is done. Errors of `work` propagate.
    """
    return await _outlast(asyncio.ensure_future(work))
