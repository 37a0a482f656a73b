"""Async repository: the only code that reads or writes lifecycle rows.

`commit` writes a transition atomically: the position row (guarded by its journal sequence number,
so a stale writer fails instead of overwriting), the journal row, the trailing state, and for a
terminal transition the closure row, in one database transaction.

Group commit (issue 13): transitions of different positions that are ready at the same moment share one
database transaction (one fsync). `commit` puts the transition in a queue and waits for its own outcome;
a writer task takes everything queued at once and writes it: a lone transition goes alone and at once
(nothing waits for company), while the transitions that arrive during a write form the next batch. In a
batch, the journal-sequence guard is checked first for every member (`SELECT ... FOR UPDATE` on
PostgreSQL; SQLite's single writer is held by this process's write lock); a stale member fails alone with
`ConcurrentModification` and the others are written with one executemany per statement. A batch the
database refuses as a whole (a constraint, a guard that moved between the check and the write) is
written again member by member, so each member gets its own answer; a batch that fails (the database
down) fails each of its members with the error. A member is acknowledged only after its transaction
committed: `synchronous=FULL` on SQLite, a durable commit on PostgreSQL. Order rows (`save_order`) go
through the same queue and share the batch's transaction (one executemany for the updates, one for the
inserts); a batch holds at most one write per position's transition and per order.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlmodel import SQLModel

from db import driver_sql, multirow
from db.engine import create_engine, migrate, sqlite_pragmas
from db.leases import Fence, fences_broken
from db.tables import ClosureRow, JournalRow, OrderRow, PositionRow, TrailingStateRow
from lifecycle.actions import ClosureRecord
from lifecycle.domain import (
    CloseCause,
    CloseReason,
    OrderPurpose,
    OrderRef,
    OrderStatus,
    Position,
    Side,
    TrailingState,
)
from lifecycle.eager import EagerFuture
from lifecycle.errors import ConcurrentModification, DuplicateLivePosition, LeaseLost, StoreRefused
from lifecycle.journal import JournalEntry, Outcome
from lifecycle.machines.states import TERMINAL_STATES, PositionState


def _table(row: type[SQLModel]) -> sa.Table:
    """The table SQLModel maps a `table=True` class to (its `__table__`, which the class does not declare)."""
    table = sa.inspect(row).local_table
    assert isinstance(table, sa.Table)
    return table


positions = _table(PositionRow)
trailing_states = _table(TrailingStateRow)
orders = _table(OrderRow)
journal = _table(JournalRow)
closures = _table(ClosureRow)

_LIVE_STATES = [s.value for s in PositionState if s not in TERMINAL_STATES]
_FINAL_ORDER_STATUSES = [s.value for s in OrderStatus if s.is_final]


# Statements of the hot path, built once; per call only parameters change (no per-call compilation).
_UPDATE_POSITION = (
    positions.update()
    .where(positions.c.id == sa.bindparam("_id"), positions.c.seq == sa.bindparam("_prev_seq"))
    .values({c.name: sa.bindparam(c.name) for c in positions.c if c.name != "id"})
)
_INSERT_JOURNAL = journal.insert()
_UPDATE_TRAILING = (
    trailing_states.update()
    .where(trailing_states.c.position_id == sa.bindparam("_id"))
    .values({c.name: sa.bindparam(c.name) for c in trailing_states.c if c.name != "position_id"})
)
_DELETE_TRAILING = trailing_states.delete().where(trailing_states.c.position_id == sa.bindparam("_id"))
_INSERT_CLOSURE = closures.insert()

# A lazy order row (a status: bookkeeping) waits at most this long for a transition to share its transaction.
ORDER_LINGER_S = 0.005

_W = TypeVar("_W")
_R = TypeVar("_R")


@dataclass(slots=True)
class _Pending:
    """One transition waiting for its batch."""

    position: Position
    outcome: Outcome
    done: asyncio.Future[None]
    fence: Fence | None


@dataclass(slots=True)
class _PendingOrder:
    """One order row (insert or update) waiting for its batch: order rows share the transitions' transactions
    (a cascade writes a status per expired stop and per fill; one transaction each queued the flats behind
    them, and the position's lock is held while its order is written)."""

    order: OrderRef
    now: datetime
    done: asyncio.Future[None]
    fence: Fence | None


@dataclass
class BatchStats:
    batches: int = 0  # transactions written by the batch writer (a lone transition is a batch of one)
    members: int = 0  # transitions written through them
    order_rows: int = 0  # order rows written through them
    largest: int = 0  # the most writes (transitions and order rows) in one
    stale: int = 0  # members refused alone by the journal-sequence guard
    one_by_one: int = 0  # batches refused as a whole and written again member by member
    sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1000))  # the latest batch sizes


class _BatchRefused(Exception):
    """The batch as a whole was refused (a constraint, or a guard that moved under it): write one by one."""


class Repository:
    def __init__(self, engine: AsyncEngine, *, batch_max: int = 500, writers: int | None = None) -> None:
        """`batch_max`: the most transitions in one transaction. `writers`: how many batches may be written
        at once (SQLite: 1, its one writer; PostgreSQL: 4 by default, each on its own pooled connection)."""
        if batch_max < 1:
            raise ValueError(f"batch_max must be >= 1, got {batch_max}")
        self.engine = engine
        sqlite = engine.dialect.name == "sqlite"
        # SQLite has one writer; queueing writers here avoids busy-waiting inside the driver.
        self._write_lock = asyncio.Lock() if sqlite else None
        # SQLite on a file: writes run in a thread of their own (`_SqliteWriter`); an in-memory one (tests) cannot
        # be opened twice and writes through the async engine like PostgreSQL.
        self._writer = (_SqliteWriter(engine.url) if sqlite and engine.url.database not in (None, "", ":memory:")
                        else None)
        self.batch_max = batch_max
        self.writers = writers if writers is not None else (1 if sqlite else 4)
        if self.writers < 1:
            raise ValueError(f"writers must be >= 1, got {self.writers}")
        self.batch_stats = BatchStats()
        self._pending: deque[_Pending | _PendingOrder] = deque()
        self._writing = 0  # batch writer tasks running
        self._inflight: set[str] = set()  # the keys (position ids, "order " + client id) in batches being written
        self._linger: asyncio.TimerHandle | None = None  # lazy order rows wait for company until this fires
        self._writer_tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(cls, url: str, *, run_migrations: bool = True, **engine_kwargs: Any) -> Repository:
        engine = create_engine(url, **engine_kwargs)
        if run_migrations:
            await migrate(engine)
        return cls(engine)

    async def close(self, timeout_s: float = 15.0) -> None:
        """Transitions already handed over are written (or fail) before the pool goes, for up to `timeout_s`
        (a database that does not answer must not hold a stop forever; what was not written is rebuilt by the
        next start's recovery)."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger_over()  # lazy rows still waiting for company go now
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s  # one bound for the whole close (the writer's thread included)
        if self._writer_tasks:
            _, pending = await asyncio.wait(list(self._writer_tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        if self._writer is not None:
            await self._writer.close(max(0.0, deadline - loop.time()))
        await self.engine.dispose()

    @property
    def sync_engines(self) -> list[sa.Engine]:
        """The synchronous engines under this repository (the async engine's, and the SQLite writer's): where a
        test hooks SQLAlchemy's events to see or fail every statement."""
        return [self.engine.sync_engine] + ([self._writer.engine] if self._writer is not None else [])

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        if self._write_lock is None:
            async with self.engine.begin() as conn:
                yield conn
            return
        async with self._write_lock, self.engine.begin() as conn:
            yield conn

    # --- writes -------------------------------------------------------------------------------

    async def insert_position(self, position: Position, creation: JournalEntry, fence: Fence | None = None) -> None:
        """A new row for a new position (never an upsert over an old one), with journal row 0."""
        await self.insert_positions([(position, creation)], fence)

    async def insert_positions(self, items: Sequence[tuple[Position, JournalEntry]],
                               fence: Fence | None = None) -> None:
        """Insert new positions in one transaction (bulk: adoption, imports, benchmarks); with a `fence`, only
        while its lease holds (LeaseLost otherwise, nothing written)."""
        if not items:
            return
        try:
            async with self._write() as conn:
                await conn.run_sync(_check_fence, fence)
                await conn.execute(positions.insert(), [{**_position_values(p), "id": p.id} for p, _ in items])
                with_trailing = [_trailing_values(p) for p, _ in items if p.trailing is not None]
                if with_trailing:
                    await conn.execute(trailing_states.insert(), with_trailing)
                await conn.execute(journal.insert(), [_journal_values(c) for _, c in items])
        except IntegrityError as e:
            if "uq_positions_live_symbol_side" in str(e.orig) or "positions.account" in str(e.orig):
                first = items[0][0]
                raise DuplicateLivePosition(
                    f"a live position already exists for one of these (account, symbol, side), e.g. "
                    f"{first.account}/{first.symbol}/{first.side}"
                    if len(items) > 1
                    else f"a live {first.side} position on {first.account}/{first.symbol} already exists"
                ) from None
            raise

    def commit(self, position: Position, outcome: Outcome, fence: Fence | None = None) -> asyncio.Future[None]:
        """Persist an accepted transition of `position` (already changed in memory) atomically: the future
        resolves once it is durable. Transitions committed at the same moment share a transaction (see the
        module docstring); the answer, and any error, is this transition's own. (A future, not a coroutine:
        awaiting it costs no task, on the path of every transition.) With a `fence`, the transition is written
        only while the account's lease holds, in the same transaction (LeaseLost otherwise)."""
        # Eager: the books' and the engine's callbacks run when the batch settles it, not turns later (eager.py).
        done: asyncio.Future[None] = EagerFuture(loop=asyncio.get_running_loop())
        self._queue(_Pending(position, outcome, done, fence))
        return done

    def _queue(self, item: _Pending | _PendingOrder) -> None:
        self._pending.append(item)
        if self._writing < self.writers:
            self._start_writer()

    def _start_writer(self) -> None:
        if self._linger is not None:  # the writer takes the lazy rows too
            self._linger.cancel()
            self._linger = None
        self._writing += 1
        task = asyncio.ensure_future(self._write_batches())
        self._writer_tasks.add(task)
        task.add_done_callback(self._writer_tasks.discard)

    async def _write_batches(self) -> None:
        """Write what is queued, a batch at a time, until nothing is."""
        try:
            while self._pending:
                batch: list[_Pending | _PendingOrder] = []
                seen: set[str] = set()
                later: list[_Pending | _PendingOrder] = []
                while self._pending and len(batch) < self.batch_max:
                    item = self._pending.popleft()
                    if item.done.cancelled():
                        continue  # its caller gave up before it was taken: never written
                    # One transition per position per batch (the guard reads once), one write per order; and
                    # none while an earlier write of the same key is in another writer's batch (PostgreSQL's
                    # writers run side by side): each key is written in the order it was queued.
                    key = item.position.id if isinstance(item, _Pending) else "order " + item.order.client_id
                    if key in seen or key in self._inflight:
                        later.append(item)
                        continue
                    seen.add(key)
                    batch.append(item)
                self._pending.extendleft(reversed(later))
                if not batch:
                    return  # all behind writes in flight: their writers take them next
                self._inflight |= seen
                try:
                    await self._write_batch(batch)
                finally:
                    self._inflight -= seen
        finally:
            self._writing -= 1

    async def _write_batch(self, batch: list[_Pending | _PendingOrder]) -> None:
        stats = self.batch_stats
        stats.batches += 1
        orders_in = sum(isinstance(item, _PendingOrder) for item in batch)
        stats.members += len(batch) - orders_in
        stats.order_rows += orders_in
        stats.largest = max(stats.largest, len(batch))
        stats.sizes.append(len(batch))
        if len(batch) == 1:
            _settle(batch[0], await _outcome_of(self._write_one(batch[0])))
            return

        def settle(stale: dict[int, StoreRefused | ConcurrentModification | LeaseLost]) -> None:
            _settle_all(batch, lambda item: stale.get(id(item)))

        try:
            stale = await self._run(_commit_many, batch, settle)
        except _BatchRefused:
            stats.one_by_one += 1
            for item in batch:
                _settle(item, await _outcome_of(self._write_one(item)))
            return
        except Exception as e:  # noqa: BLE001 - the batch failed: each member fails with the error
            failure: BaseException = e
            _settle_all(batch, lambda item: failure)
            return
        stats.stale += len(stale)
        settle(stale)  # (SQLite: done already, in the loop's first turn after the thread's answer)

    async def _write_one(self, item: _Pending | _PendingOrder) -> None:
        if isinstance(item, _PendingOrder):
            await self._run(_save_order, item)
            return
        try:
            await self._run(_commit_one, item)
        except IntegrityError as e:  # a constraint, not an outage: retrying cannot help
            raise StoreRefused(
                f"position {item.position.id} #{item.outcome.journal.seq}: {str(e.orig).splitlines()[0]}") from e

    async def _run(self, write: Callable[[sa.Connection, _W], _R], work: _W,
                   settle: Callable[[_R], None] | None = None) -> _R:
        """Run `write(connection, work)` in one write transaction. SQLite: the whole transaction in the
        writer's thread, one hop there and back (SQLAlchemy's async layer over aiosqlite makes a hop per
        statement: ~2 ms for a transition's five statements against ~0.6 ms in one hop, measured); elsewhere
        (PostgreSQL, an in-memory SQLite) on the async engine's connection through `run_sync`. `settle`: the
        writer thread's answer is handed to it in the loop's first turn after the commit (the caller's own
        wake-up is one turn later; on PostgreSQL the caller settles after its await)."""
        if self._writer is not None:
            assert self._write_lock is not None
            async with self._write_lock:
                return await self._writer.run(write, work, settle)
        async with self._write() as conn:
            return await conn.run_sync(write, work)

    def save_order(self, order: OrderRef, now: datetime, fence: Fence | None = None, *,
                   lazy: bool = False) -> asyncio.Future[None]:
        """Insert or update one order of ours (with a `fence`: only while its lease holds); the future resolves
        once it is durable. Queued with the transitions: order rows ready at the same moment share their
        transaction (see the module docstring). `lazy` (a status row, bookkeeping): no writer is started for it
        for up to ORDER_LINGER_S, so that it rides with a transition queued meanwhile (the venue's expiry of a
        stop comes a moment before the flat of its position) instead of holding SQLite's one writer for an
        fsync of its own while that flat waits."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        item = _PendingOrder(order, now, done, fence)
        if not lazy:
            self._queue(item)
            return done
        self._pending.append(item)
        if self._linger is None:
            self._linger = loop.call_later(ORDER_LINGER_S, self._linger_over)
        return done

    def _linger_over(self) -> None:
        self._linger = None
        if self._pending and self._writing < self.writers:
            self._start_writer()

    # --- reads --------------------------------------------------------------------------------

    async def load_live(self, accounts: Sequence[str] | None = None) -> list[Position]:
        """Every non-terminal position (of these accounts) with its trailing state and working orders.

        Both queries read one snapshot (a REPEATABLE READ transaction on PostgreSQL, one read
        transaction on SQLite), so a writer in another process cannot make them disagree.
        """
        live: sa.ColumnElement[bool] = positions.c.state.in_(_LIVE_STATES)
        if accounts is not None:
            live = live & positions.c.account.in_(list(accounts))
        order_query = (
            sa.select(*_ORDER_COLUMNS)
            .join(positions, positions.c.id == orders.c.position_id)
            .where(live, orders.c.status.not_in(_FINAL_ORDER_STATUSES))
        )
        async with self.engine.connect() as conn:
            if self.engine.dialect.name == "postgresql":
                conn = await conn.execution_options(isolation_level="REPEATABLE READ")
            async with conn.begin():
                rows = (await conn.execute(_POSITION_SELECT.where(live))).all()
                order_rows = (await conn.execute(order_query)).all()
        loaded = {row[0]: _position_from_row(row) for row in rows}
        for row in order_rows:
            order = _order_from_row(row)
            loaded[order.position_id].orders[order.client_id] = order
        return list(loaded.values())

    async def get_position(self, position_id: str) -> Position | None:
        query = _POSITION_SELECT.where(positions.c.id == position_id)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
            if row is None:
                return None
            position = _position_from_row(row)
            order_query = sa.select(*_ORDER_COLUMNS).where(orders.c.position_id == position_id)
            for o in (await conn.execute(order_query)).all():
                order = _order_from_row(o)
                if not order.status.is_final:
                    position.orders[order.client_id] = order
        return position

    async def list_positions(self, accounts: Sequence[str] | None = None,
                             states: Sequence[PositionState] | None = None) -> list[Position]:
        """Positions (of these accounts, in these states), oldest first, without their orders."""
        query = _POSITION_SELECT.order_by(positions.c.created_at, positions.c.id)
        if accounts is not None:
            query = query.where(positions.c.account.in_(list(accounts)))
        if states is not None:
            query = query.where(positions.c.state.in_([s.value for s in states]))
        async with self.engine.connect() as conn:
            return [_position_from_row(r) for r in (await conn.execute(query)).all()]

    async def journal(self, position_id: str) -> list[JournalEntry]:
        query = sa.select(journal).where(journal.c.position_id == position_id).order_by(journal.c.seq)
        async with self.engine.connect() as conn:
            return [_journal_from_row(r) for r in (await conn.execute(query)).all()]

    async def closed_since(self, accounts: Sequence[str], since: datetime) -> list[str]:
        """Ids of the positions of these accounts that ended at or after `since` (the closures index)."""
        query = sa.select(closures.c.position_id).where(closures.c.account.in_(list(accounts)),
                                                        closures.c.closed_at >= since)
        async with self.engine.connect() as conn:
            return [r[0] for r in (await conn.execute(query)).all()]

    async def closure(self, position_id: str) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(closures).where(closures.c.position_id == position_id))).first()
        return dict(row._mapping) if row is not None else None

    async def recent_closures(self, accounts: Sequence[str] | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The newest `limit` closure rows (of these accounts; None: all), newest first, as plain dicts
        (decimals as Decimal, times as aware datetimes, NULL as None)."""
        if limit < 1:
            return []
        query = sa.select(closures).order_by(closures.c.closed_at.desc(), closures.c.position_id.desc()).limit(limit)
        if accounts is not None:
            query = query.where(closures.c.account.in_(list(accounts)))
        async with self.engine.connect() as conn:
            return [dict(row._mapping) for row in (await conn.execute(query)).all()]

    async def trailing_state_exists(self, position_id: str) -> bool:
        query = sa.select(sa.func.count()).where(trailing_states.c.position_id == position_id)
        async with self.engine.connect() as conn:
            return bool((await conn.execute(query)).scalar_one())

    async def count_positions(self, states: Sequence[PositionState] | None = None) -> int:
        query = sa.select(sa.func.count()).select_from(positions)
        if states is not None:
            query = query.where(positions.c.state.in_([s.value for s in states]))
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())


# --- mapping between domain objects and rows ---------------------------------------------------


def _position_values(p: Position) -> dict[str, Any]:
    return {
        "account": p.account,
        "symbol": p.symbol,
        "side": p.side.value,
        "state": p.state.value,
        "requested_quantity": p.requested_quantity,
        "quantity": p.quantity,
        "entry_price": p.entry_price,
        "stop_price": p.stop_price,
        "exit_price": p.exit_price,
        "close_cause": p.close_cause.value if p.close_cause else None,
        "close_reason": p.close_reason.value if p.close_reason else None,
        "state_before_close": p.state_before_close.value if p.state_before_close else None,
        "last_activity_at": p.last_activity_at,
        "created_at": p.created_at,
        "updated_at": p.updated_at,
        "closed_at": p.closed_at,
        "seq": p.seq,
    }


def _trailing_values(p: Position) -> dict[str, Any]:
    t = p.trailing
    assert t is not None
    return {
        "position_id": p.id,
        "activation_price": t.activation_price,
        "callback_rate": t.callback_rate,
        "active": t.active,
        "watermark": t.watermark,
        "last_moved_at": t.last_moved_at,
    }


def _journal_values(e: JournalEntry) -> dict[str, Any]:
    return {
        "position_id": e.position_id,
        "seq": e.seq,
        "event": e.event,
        "source": e.source.value if e.source else None,
        "dest": e.dest.value,
        "at": e.at,
        "cause": e.cause,
        "payload": e.payload,
    }


def _closure_values(c: ClosureRecord) -> dict[str, Any]:
    return {
        "position_id": c.position_id,
        "account": c.account,
        "symbol": c.symbol,
        "side": c.side.value,
        "state": c.state.value,
        "cause": c.cause.value,
        "reason": c.reason.value if c.reason else None,
        "quantity": c.quantity,
        "entry_price": c.entry_price,
        "exit_price": c.exit_price,
        "opened_at": c.opened_at,
        "closed_at": c.closed_at,
        "pnl": c.pnl,
        "fee": c.fee,
        "net_pnl": c.net_pnl,
        "detection_latency_ms": c.detection_latency_ms,
    }


# Rehydration reads these for every live position: explicit column order, tuple unpacking and
# dict look-ups for enums keep it linear and cheap (bench/rehydrate.py measures it).
_POSITION_COLUMNS = (
    positions.c.id, positions.c.account, positions.c.symbol, positions.c.side, positions.c.state,
    positions.c.requested_quantity, positions.c.created_at, positions.c.updated_at, positions.c.quantity,
    positions.c.entry_price, positions.c.stop_price, positions.c.exit_price, positions.c.close_cause,
    positions.c.close_reason, positions.c.state_before_close, positions.c.last_activity_at, positions.c.closed_at,
    positions.c.seq, trailing_states.c.activation_price, trailing_states.c.callback_rate, trailing_states.c.active,
    trailing_states.c.watermark, trailing_states.c.last_moved_at,
)
_POSITION_SELECT = sa.select(*_POSITION_COLUMNS).select_from(
    positions.outerjoin(trailing_states, trailing_states.c.position_id == positions.c.id)
)
_ORDER_COLUMNS = (
    orders.c.client_id, orders.c.position_id, orders.c.symbol, orders.c.purpose, orders.c.side, orders.c.quantity,
    orders.c.status, orders.c.trigger_price, orders.c.exchange_order_id, orders.c.algo_id, orders.c.created_at,
)
_SIDES = {m.value: m for m in Side}
_STATES = {m.value: m for m in PositionState}
_CAUSES = {m.value: m for m in CloseCause}
_REASONS = {m.value: m for m in CloseReason}
_PURPOSES = {m.value: m for m in OrderPurpose}
_ORDER_STATUSES = {m.value: m for m in OrderStatus}


def _position_from_row(r: Sequence[Any]) -> Position:
    (pid, account, symbol, side, state, requested, created, updated, qty, entry, stop, exit_, cause, reason,
     before_close, last_activity, closed, seq, activation, callback, active, watermark, last_moved) = r
    return Position(
        id=pid,
        account=account,
        symbol=symbol,
        side=_SIDES[side],
        state=_STATES[state],
        requested_quantity=requested,
        created_at=created,
        updated_at=updated,
        quantity=qty,
        entry_price=entry,
        stop_price=stop,
        exit_price=exit_,
        close_cause=_CAUSES[cause] if cause else None,
        close_reason=_REASONS[reason] if reason else None,
        state_before_close=_STATES[before_close] if before_close else None,
        last_activity_at=last_activity,
        closed_at=closed,
        seq=seq,
        trailing=None
        if activation is None
        else TrailingState(activation, callback, bool(active), watermark, last_moved),
    )


def _order_from_row(r: Sequence[Any]) -> OrderRef:
    client_id, position_id, symbol, purpose, side, qty, status, trigger, exchange_id, algo_id, created = r
    return OrderRef(client_id, position_id, symbol, _PURPOSES[purpose], side, qty, _ORDER_STATUSES[status], trigger,
                    exchange_id, algo_id, created)


def _journal_from_row(r: Any) -> JournalEntry:
    return JournalEntry(
        position_id=r.position_id,
        seq=r.seq,
        event=r.event,
        source=PositionState(r.source) if r.source else None,
        dest=PositionState(r.dest),
        at=r.at,
        cause=r.cause,
        payload=r.payload,
    )


def _order_values(order: OrderRef, now: datetime) -> dict[str, Any]:
    return {
        "position_id": order.position_id,
        "symbol": order.symbol,
        "purpose": order.purpose.value,
        "side": order.side,
        "quantity": order.quantity,
        "status": order.status.value,
        "trigger_price": order.trigger_price,
        "exchange_order_id": order.exchange_order_id,
        "algo_id": order.algo_id,
        "updated_at": now,
    }


_UPDATE_ORDER = (
    orders.update()
    .where(orders.c.client_id == sa.bindparam("_client_id"))
    .values({name: sa.bindparam(name) for name in (
        "position_id", "symbol", "purpose", "side", "quantity", "status", "trigger_price", "exchange_order_id",
        "algo_id", "updated_at")})
)
_INSERT_ORDER = orders.insert()


# --- the writes, as synchronous functions of one connection in one transaction (see `Repository._run`) ---


def _statements(conn: sa.Connection) -> Callable[[driver_sql.Statement, dict[str, Any]], int]:
    """How a lone write runs its statements on `conn` (returns the row count): on the SQLite writer's thread
    straight on the driver's connection (`db/driver_sql.py` says why), elsewhere through SQLAlchemy."""
    if driver_sql.applies(conn):
        return functools.partial(driver_sql.execute, conn)
    return lambda statement, values: conn.execute(statement, values).rowcount


def _commit_one(conn: sa.Connection, item: _Pending) -> None:
    position, outcome = item.position, item.outcome
    entry = outcome.journal
    _check_fence(conn, item.fence)
    run = _statements(conn)
    values = _position_values(position)
    values["_id"], values["_prev_seq"] = position.id, entry.seq - 1
    if run(_UPDATE_POSITION, values) != 1:
        raise ConcurrentModification(
            f"position {position.id}: row is not at seq {entry.seq - 1}; refusing to overwrite")
    run(_INSERT_JOURNAL, _journal_values(entry))
    if position.trailing is None:
        run(_DELETE_TRAILING, {"_id": position.id})
    else:
        values = _trailing_values(position)
        values["_id"] = values.pop("position_id")
        run(_UPDATE_TRAILING, values)
    if outcome.closure is not None:
        run(_INSERT_CLOSURE, _closure_values(outcome.closure))


def _save_order(conn: sa.Connection, item: _PendingOrder) -> None:
    order = item.order
    _check_fence(conn, item.fence)
    run = _statements(conn)
    values = _order_values(order, item.now)
    if run(_UPDATE_ORDER, {**values, "_client_id": order.client_id}) == 0:
        run(_INSERT_ORDER, {**values, "client_id": order.client_id, "created_at": order.created_at})


def _commit_many(conn: sa.Connection, batch: list[_Pending | _PendingOrder]
                 ) -> dict[int, StoreRefused | ConcurrentModification | LeaseLost]:
    """Write the batch in one transaction; returns the members (by `id()`) the fence or the guard refused
    (not written). `_BatchRefused` when the database refuses the batch as a whole."""
    stale: dict[int, StoreRefused | ConcurrentModification | LeaseLost] = {}
    try:
        fences = {item.fence for item in batch if item.fence is not None}
        broken = fences_broken(conn, list(fences)) if fences else set()
        order_items = []
        for item in batch:
            if isinstance(item, _PendingOrder):
                if item.fence is not None and item.fence in broken:
                    stale[id(item)] = _lease_lost(item.fence)
                else:
                    order_items.append(item)
        if order_items:
            _write_orders(conn, order_items)
        transitions = [item for item in batch if isinstance(item, _Pending)]
        if not transitions:
            return stale
        multi = multirow.applies(conn)  # multi-row statements (db/multirow.py says why)
        ids = [item.position.id for item in transitions]
        if multi:  # SQLite: its one writer is held (this process's write lock): nothing to lock
            stored = multirow.pairs(conn, positions, "id", "seq", ids)
        else:  # lock the rows read (SQLite renders no FOR UPDATE: its writer is held)
            check = sa.select(positions.c.id, positions.c.seq).where(positions.c.id.in_(ids)).with_for_update()
            stored = {row[0]: row[1] for row in conn.execute(check)}
        good = []
        for item in transitions:
            position, seq = item.position, item.outcome.journal.seq
            if item.fence is not None and item.fence in broken:
                stale[id(item)] = _lease_lost(item.fence)
            elif stored.get(position.id) != seq - 1:
                stale[id(item)] = ConcurrentModification(
                    f"position {position.id}: row is not at seq {seq - 1}; refusing to overwrite")
            else:
                good.append(item)
        if not good:
            return stale
        rows = []
        for item in good:
            values = _position_values(item.position)
            values["_id"], values["_prev_seq"] = item.position.id, item.outcome.journal.seq - 1
            rows.append(values)
        if multi:
            matched: int | None = multirow.update(conn, positions, "id", rows, key_param="_id",
                                                  guard=("seq", "_prev_seq"))
        else:
            result = conn.execute(_UPDATE_POSITION, rows)
            matched = result.rowcount if conn.dialect.supports_sane_multi_rowcount else None
        if matched is not None and matched != len(rows):
            raise _BatchRefused(f"{matched} of {len(rows)} position rows matched their guard")
        entries = [_journal_values(item.outcome.journal) for item in good]
        gone = [item.position.id for item in good if item.position.trailing is None]
        kept = []
        for item in good:
            if item.position.trailing is not None:
                values = _trailing_values(item.position)
                values["_id"] = values.pop("position_id")
                kept.append(values)
        ended = [_closure_values(item.outcome.closure) for item in good if item.outcome.closure is not None]
        if multi:
            multirow.insert(conn, journal, entries)
            multirow.delete(conn, trailing_states, "position_id", gone)
            multirow.update(conn, trailing_states, "position_id", kept, key_param="_id")
            multirow.insert(conn, closures, ended)
        else:
            conn.execute(_INSERT_JOURNAL, entries)
            if gone:
                conn.execute(_DELETE_TRAILING, [{"_id": i} for i in gone])
            if kept:
                conn.execute(_UPDATE_TRAILING, kept)
            if ended:
                conn.execute(_INSERT_CLOSURE, ended)
    except IntegrityError as e:
        raise _BatchRefused(str(e.orig).splitlines()[0]) from e
    return stale


def _write_orders(conn: sa.Connection, items: list[_PendingOrder]) -> None:
    """Order rows of a batch (one per client id: `_write_batches` keeps the second write of one for the next
    batch): an update for the rows there, an insert for the others, one executemany each; on SQLite one
    multi-row upsert (the row's `created_at` is kept)."""
    if multirow.applies(conn):
        multirow.insert(conn, orders, [{**_order_values(item.order, item.now), "client_id": item.order.client_id,
                                        "created_at": item.order.created_at} for item in items],
                        upsert_on="client_id", keep=("created_at",))
        return
    ids = [item.order.client_id for item in items]
    there = {row[0] for row in conn.execute(sa.select(orders.c.client_id).where(orders.c.client_id.in_(ids)))}
    updates, inserts = [], []
    for item in items:
        values = _order_values(item.order, item.now)
        if item.order.client_id in there:
            updates.append({**values, "_client_id": item.order.client_id})
        else:
            inserts.append({**values, "client_id": item.order.client_id, "created_at": item.order.created_at})
    if updates:
        conn.execute(_UPDATE_ORDER, updates)
    if inserts:
        conn.execute(_INSERT_ORDER, inserts)


def _check_fence(conn: sa.Connection, fence: Fence | None) -> None:
    if fence is not None and fences_broken(conn, [fence]):
        raise _lease_lost(fence)


def _lease_lost(fence: Fence) -> LeaseLost:
    return LeaseLost(f"account {fence.account}: the lease (epoch {fence.epoch}) is no longer this process's; "
                     "nothing was written")


class _SqliteWriter:
    """The SQLite writes of a repository, run in one thread on a synchronous engine of the same file (same
    pragmas: WAL, synchronous=FULL): a whole transaction per hop. SQLite has one writer, so one thread loses
    nothing. `close` disposes of the engine in that thread, after any write still running there."""

    def __init__(self, url: sa.URL) -> None:
        self.engine = sa.create_engine(url.set(drivername="sqlite"))
        sa.event.listen(self.engine, "connect", sqlite_pragmas)
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None

    async def run(self, write: Callable[[sa.Connection, _W], _R], work: _W,
                  settle: Callable[[_R], None] | None = None) -> _R:
        """`write` in the thread; a successful result goes to `settle` in the loop's first turn after it (the
        members of a batch answered there: `run_in_executor` woke the caller two turns later, and in a cascade a
        turn of the loop is 20-50 ms), then to the caller. `settle` runs even if the caller stopped waiting: the
        write is durable either way."""
        if self._thread is None:  # (again after `close`: like SQLAlchemy's engine after dispose, usable again)
            self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[_R] = loop.create_future()

        def deliver(done: concurrent.futures.Future[_R]) -> None:  # on the loop
            error = done.exception()
            try:
                if error is None and settle is not None:
                    try:
                        settle(done.result())
                    except Exception as e:  # noqa: BLE001 - the caller settles again (each member once): report
                        loop.call_exception_handler({"message": "settling a SQLite batch failed", "exception": e})
            finally:  # (a KeyboardInterrupt or SystemExit goes on out, as from any callback: the caller is answered)
                if not answer.cancelled():
                    if error is not None:
                        answer.set_exception(error)
                    else:
                        answer.set_result(done.result())

        def finished(done: concurrent.futures.Future[_R]) -> None:  # in the writer thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to answer
                loop.call_soon_threadsafe(deliver, done)

        self._thread.submit(self._transaction, write, work).add_done_callback(finished)
        return await answer

    def _transaction(self, write: Callable[[sa.Connection, _W], _R], work: _W) -> _R:
        with self.engine.begin() as conn:
            return write(conn, work)

    async def close(self, timeout_s: float) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        disposed = asyncio.get_running_loop().run_in_executor(thread, self.engine.dispose)
        with contextlib.suppress(asyncio.TimeoutError):
            # A write hung in the thread (a disk that does not answer) is not waited for past the bound; the
            # interpreter's exit still joins the thread (as it joined aiosqlite's).
            await asyncio.wait_for(disposed, timeout_s)
        thread.shutdown(wait=False)


class FencedStore:
    """The position store of one account whose writes are fenced by its lease (`Fence`): what a service
    process on a shared PostgreSQL database hands to that account's engine. Reads go straight through."""

    def __init__(self, repo: Repository, fence: Fence) -> None:
        self.repo = repo
        self.fence = fence

    async def insert_position(self, position: Position, creation: JournalEntry) -> None:
        await self.repo.insert_positions([(position, creation)], self.fence)

    def commit(self, position: Position, outcome: Outcome) -> asyncio.Future[None]:
        return self.repo.commit(position, outcome, self.fence)

    def save_order(self, order: OrderRef, now: datetime, *, lazy: bool = False) -> asyncio.Future[None]:
        return self.repo.save_order(order, now, self.fence, lazy=lazy)

    async def load_live(self, accounts: Sequence[str] | None = None) -> list[Position]:
        return await self.repo.load_live(accounts)

    async def get_position(self, position_id: str) -> Position | None:
        return await self.repo.get_position(position_id)


async def _outcome_of(work: Any) -> BaseException | None:
    try:
        await work
    except Exception as e:  # noqa: BLE001 - handed to the member's own caller
        return e
    return None


def _settle_all(batch: list[_Pending | _PendingOrder],
                error_of: Callable[[_Pending | _PendingOrder], BaseException | None]) -> None:
    """Answer every member of a batch, whatever one member's callbacks raise: the members' futures are eager
    (lifecycle/eager.py), so a KeyboardInterrupt or SystemExit from a listener comes out here; it goes on out
    once every member is answered (a member left unanswered held the writer and every later write)."""
    exiting: BaseException | None = None
    for item in batch:
        try:
            _settle(item, error_of(item))
        except (SystemExit, KeyboardInterrupt) as e:
            exiting = exiting or e
    if exiting is not None:
        raise exiting


def _settle(item: _Pending | _PendingOrder, error: BaseException | None) -> None:
    """Answer the member's caller (unless it stopped waiting: the write stands either way)."""
    if item.done.done():
        return
    if error is None:
        item.done.set_result(None)
    else:
        item.done.set_exception(error)
