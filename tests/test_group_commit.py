"""Group commit (issue 13): transitions of different positions that are ready together share one transaction,
and every guarantee of a lone commit holds for each member. On a SQLite file and on PostgreSQL."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from db.repository import Repository, closures
from exchange.paper import PaperExchange
from lifecycle.domain import CloseReason, OrderPurpose, OrderRef, OrderStatus, Position, Side, TrailingState
from lifecycle.engine import Engine
from lifecycle.errors import ConcurrentModification, StoreRefused
from lifecycle.events import CloseRequested, EntryFilled, Event, Flat, StopMoved, TsActivated
from lifecycle.journal import Outcome
from lifecycle.record_kinds import TransitionRecord
from lifecycle.records import JsonlRecords
from lifecycle.replay import replay
from tests.storage_faults import DriverErrors

ROOT = Path(__file__).resolve().parent.parent

SCRIPT: list[Event] = [EntryFilled(quantity=D(1), price=D(100))]
SCRIPT += [StopMoved(stop_price=D(90 + i), mark=D(100 + i)) for i in range(4)]
SCRIPT += [TsActivated(mark=D(111)), CloseRequested(reason=CloseReason.SIGNAL), Flat(exit_price=D(111))]


async def _open(engine: Engine, n: int) -> list[str]:
    ids = []
    for i in range(n):
        p = await engine.open_position(account="acct", symbol=f"S{i}", side=Side.LONG, quantity=D(1),
                                       trailing=TrailingState(activation_price=D(110), callback_rate=D(1)))
        ids.append(p.id)
    return ids


async def _outcome(engine: Engine, position_id: str, event: Event) -> tuple[object, Outcome]:
    """What `Engine.fire` would commit for `event`, without committing it."""
    draft = engine.positions[position_id].clone()
    return draft, await engine.machine.apply(draft, event, engine.clock())


def _stop(position_id: str, now: datetime) -> OrderRef:
    """A working stop order of the position (symbol S0), as the engine tracks one."""
    return OrderRef(f"lc-{position_id}-s1", position_id, "S0", OrderPurpose.STOP, "sell", D(1), OrderStatus.NEW,
                    trigger_price=D(90), created_at=now)


async def _row_status(repo: Repository, client_id: str) -> str:
    async with repo.engine.connect() as conn:
        status: str = (await conn.execute(sa.text("SELECT status FROM orders WHERE client_id = :c"),
                                          {"c": client_id})).scalar_one()
    return status


async def test_concurrent_transitions_share_transactions_and_each_journal_replays(engine: Engine,
                                                                                 repo: Repository) -> None:
    ids = await _open(engine, 40)
    before = repo.batch_stats.members

    async def drive(position_id: str) -> None:
        for event in SCRIPT:
            await engine.fire(position_id, event)

    await asyncio.gather(*(drive(pid) for pid in ids))
    stats = repo.batch_stats
    assert stats.members - before == 40 * len(SCRIPT)
    assert stats.largest > 1, "transitions ready together were committed one transaction each"
    for pid in ids:  # per-position order kept under load: every journal complete, in order, replayable
        entries = await repo.journal(pid)
        assert [e.seq for e in entries] == list(range(len(SCRIPT) + 1))
        replayed = await replay(entries)
        stored = await repo.get_position(pid)
        assert stored is not None and replayed.state is stored.state and stored.state.is_terminal
        assert await repo.closure(pid) is not None


async def test_the_members_of_a_batch_are_live_before_any_of_them_is_recorded(engine: Engine,
                                                                            repo: Repository) -> None:
    """A batch's members are swapped into memory (and the listeners told) together, when their transaction
    commits, not one task wake-up after another (bench.burst, issue 13): when the first record of a batch is
    written, every member of that batch is already live in its new state, and every listener heard of it."""
    ids = await _open(engine, 30)
    sizes_before = len(repo.batch_stats.sizes)
    live_when_recorded: list[int] = []
    heard: list[str] = []
    engine.listeners.append(lambda position, outcome: heard.append(position.id))
    emit = engine.records.emit

    def counting(record: object) -> None:
        live_when_recorded.append(sum(engine.positions[pid].state.value == "OPEN" for pid in ids))
        emit(record)  # type: ignore[arg-type]

    engine.records.emit = counting  # type: ignore[method-assign]
    await asyncio.gather(*(engine.fire(pid, EntryFilled(quantity=D(1), price=D(100))) for pid in ids))
    sizes = list(repo.batch_stats.sizes)[sizes_before:]
    assert sum(sizes) == 30 and max(sizes) > 1
    expected, done = [], 0
    for size in sizes:  # every record of a batch sees all of that batch (and the batches before it) live
        done += size
        expected += [done] * size
    assert live_when_recorded == expected
    assert sorted(heard) == sorted(ids)


async def test_a_batch_is_live_in_the_loops_first_turn_after_its_transaction(
        sqlite_url: str, exchange: PaperExchange, records: JsonlRecords, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer thread's answer settles the batch's members, and their books' and engine's callbacks swap each
    one in, in one turn of the event loop (lifecycle/eager.py): a turn of a loop working through a cascade lasts
    20-50 ms. Before, the answer went the executor's way (a turn to set its future, a turn to wake the writer's
    task), then through the member's future and the books' answer, a turn each: four turns."""
    repo = await Repository.open(sqlite_url)  # SQLite's writer thread (PostgreSQL writes on the loop's driver)
    try:
        await _live_one_turn_after_the_transaction(Engine(repo, canceller=exchange, records=records), repo,
                                                   monkeypatch)
    finally:
        await repo.close()


async def _live_one_turn_after_the_transaction(engine: Engine, repo: Repository,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert repo._writer is not None
    ids = await _open(engine, 20)
    loop = asyncio.get_running_loop()
    turns = [0]

    def tick() -> None:  # always ready: runs once in every turn of the loop
        turns[0] += 1
        handle[0] = loop.call_soon(tick)

    handle = [loop.call_soon(tick)]
    ended_at: list[int] = []  # the turn in progress when each transaction ended in the writer thread
    transaction = repo._writer._transaction

    def timed(write: object, work: object) -> object:
        try:
            return transaction(write, work)  # type: ignore[arg-type]
        finally:
            ended_at.append(turns[0])

    monkeypatch.setattr(repo._writer, "_transaction", timed)
    swapped_at: dict[str, int] = {}

    def heard(position: Position, outcome: Outcome) -> None:
        swapped_at.setdefault(position.id, turns[0])

    engine.listeners.append(heard)
    try:
        await asyncio.gather(*(engine.fire(pid, EntryFilled(quantity=D(1), price=D(100))) for pid in ids))
    finally:
        handle[0].cancel()
    assert sorted(swapped_at) == sorted(ids) and ended_at
    gaps = [turn - max(t for t in ended_at if t <= turn) for turn in swapped_at.values()]
    # 1, or 2 when the loop began a turn between the thread's end and its answer (the old way: 4 or 5)
    assert max(gaps) <= 2, gaps


async def test_a_stale_member_fails_alone_and_the_rest_of_its_batch_commits(engine: Engine,
                                                                           repo: Repository) -> None:
    a, b, c = await _open(engine, 3)
    old_b, stale_outcome = await _outcome(engine, b, EntryFilled(quantity=D(1), price=D(100)))
    await engine.fire(b, EntryFilled(quantity=D(1), price=D(100)))  # another writer moved b on first
    drafts = [await _outcome(engine, pid, EntryFilled(quantity=D(1), price=D(100))) for pid in (a, c)]
    batches = repo.batch_stats.batches
    results = await asyncio.gather(repo.commit(drafts[0][0], drafts[0][1]),  # type: ignore[arg-type]
                                   repo.commit(old_b, stale_outcome),  # type: ignore[arg-type]
                                   repo.commit(drafts[1][0], drafts[1][1]),  # type: ignore[arg-type]
                                   return_exceptions=True)
    assert repo.batch_stats.batches == batches + 1 and repo.batch_stats.sizes[-1] == 3  # one batch of three
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], ConcurrentModification)
    assert [e.seq for e in await repo.journal(a)] == [0, 1] and [e.seq for e in await repo.journal(c)] == [0, 1]
    assert [e.event for e in await repo.journal(b)] == ["created", "entry_filled"]  # written once, not twice


async def test_a_member_the_database_refuses_fails_alone_with_its_own_error(engine: Engine, repo: Repository) -> None:
    ids = await _open(engine, 3)
    for pid in ids:
        for event in SCRIPT[:-1]:
            await engine.fire(pid, event)
    victim = ids[1]
    async with repo.engine.begin() as conn:  # a closure row already there: the terminal commit breaks a key
        await conn.execute(closures.insert().values(
            position_id=victim, account="acct", symbol="S1", side="long", state="CLOSED", cause="bot",
            reason="signal", quantity=D(1), entry_price=D(100), exit_price=D(111), opened_at=engine.clock(),
            closed_at=engine.clock()))
    one_by_one = repo.batch_stats.one_by_one
    results = await asyncio.gather(*(engine.fire(pid, Flat(exit_price=D(111))) for pid in ids),
                                   return_exceptions=True)
    assert isinstance(results[1], StoreRefused), results
    assert not isinstance(results[0], BaseException) and not isinstance(results[2], BaseException), results
    assert repo.batch_stats.one_by_one == one_by_one + 1
    for pid in (ids[0], ids[2]):
        stored = await repo.get_position(pid)
        assert stored is not None and stored.state.is_terminal


async def test_a_failed_batch_fails_each_of_its_members_and_the_next_batch_commits(engine: Engine,
                                                                                  repo: Repository) -> None:
    ids = await _open(engine, 4)
    drafts = [await _outcome(engine, pid, EntryFilled(quantity=D(1), price=D(100))) for pid in ids]
    faults = DriverErrors(repo)
    faults.on()
    try:
        results = await asyncio.gather(*(repo.commit(d, o) for d, o in drafts),  # type: ignore[arg-type]
                                       return_exceptions=True)
    finally:
        faults.off()
    assert all(isinstance(r, sa.exc.OperationalError) for r in results), results
    assert [e.seq for e in await repo.journal(ids[0])] == [0]  # nothing of the failed batch was written
    await asyncio.gather(*(repo.commit(d, o) for d, o in drafts))  # type: ignore[arg-type]
    for pid in ids:
        assert [e.seq for e in await repo.journal(pid)] == [0, 1]


async def test_order_rows_ready_with_transitions_share_their_transactions(engine: Engine, repo: Repository) -> None:
    """A cascade writes an order status per expired stop and per fill next to the flats: one transaction each
    queued the flats behind them. Order rows go in the batches; a second write of one order waits for the
    next batch, so the newest status is the one kept."""
    ids = await _open(engine, 30)
    now = datetime.now(UTC)
    stops = [OrderRef(f"lc-{pid}-s1", pid, f"S{i}", OrderPurpose.STOP, "sell", D(1), OrderStatus.NEW,
                      trigger_price=D(90), created_at=now) for i, pid in enumerate(ids)]
    await asyncio.gather(*(repo.save_order(o, now) for o in stops))  # inserts
    commits: list[object] = []

    def counted(conn: object) -> None:
        commits.append(conn)

    for sync_engine in repo.sync_engines:
        sa.event.listen(sync_engine, "commit", counted)
    expired = [OrderRef(o.client_id, o.position_id, o.symbol, o.purpose, o.side, o.quantity, OrderStatus.EXPIRED,
                        trigger_price=o.trigger_price, created_at=now) for o in stops]
    drafts = [await _outcome(engine, pid, EntryFilled(quantity=D(1), price=D(100))) for pid in ids]
    # Two writes of one order queued at once are written in the order queued, on PostgreSQL too (its writers
    # run batches side by side: the second write waits until the first one's batch is done).
    writes = [*(repo.save_order(o, now) for o in expired),  # updates of the rows there (queued when called)...
              *(repo.commit(d, o) for d, o in drafts)]  # type: ignore[arg-type]
    again = [repo.save_order(stops[0], now)]  # ...and the same order again, last
    await asyncio.gather(*writes, *again)
    for sync_engine in repo.sync_engines:
        sa.event.remove(sync_engine, "commit", counted)
    assert len(commits) < 10, f"61 writes took {len(commits)} transactions: order rows went one transaction each"
    async with repo.engine.connect() as conn:
        rows: dict[str, str] = dict((await conn.execute(sa.text("SELECT client_id, status FROM orders"))).all())
    if again:
        assert rows.pop(stops[0].client_id) == OrderStatus.NEW.value  # written after its EXPIRED, a batch later
    assert set(rows.values()) == {OrderStatus.EXPIRED.value} and len(rows) == 30 - len(again)
    for pid in ids:
        stored = await repo.get_position(pid)
        assert stored is not None and stored.seq == 1


async def test_a_lazy_order_row_rides_with_the_next_transition_or_goes_alone_soon(engine: Engine,
                                                                                   repo: Repository) -> None:
    """An order's status (bookkeeping) queued lazily waits a few milliseconds for a transition to share its
    transaction: the flat right behind a stop's expiry then waits for one fsync, not two."""
    from db.repository import ORDER_LINGER_S

    [pid] = await _open(engine, 1)
    now = datetime.now(UTC)
    stop = _stop(pid, now)
    await repo.save_order(stop, now)
    draft, outcome = await _outcome(engine, pid, EntryFilled(quantity=D(1), price=D(100)))
    commits: list[object] = []

    def counted(conn: object) -> None:
        commits.append(conn)

    for sync_engine in repo.sync_engines:
        sa.event.listen(sync_engine, "commit", counted)
    try:
        lazy = repo.save_order(replace(stop, status=OrderStatus.EXPIRED), now, lazy=True)
        await asyncio.sleep(0)  # the row waits: no writer started for it
        assert not lazy.done() and not commits
        await asyncio.gather(lazy, repo.commit(draft, outcome))  # type: ignore[arg-type]
        assert len(commits) == 1 and repo.batch_stats.sizes[-1] == 2, "the lazy row took a transaction of its own"
        alone = repo.save_order(replace(stop, status=OrderStatus.CANCELED), now, lazy=True)
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(alone, 5.0)  # with no transition coming, it goes once the linger is over
        assert asyncio.get_running_loop().time() - started >= ORDER_LINGER_S * 0.9 and len(commits) == 2
    finally:
        for sync_engine in repo.sync_engines:
            sa.event.remove(sync_engine, "commit", counted)
    status = await _row_status(repo, stop.client_id)
    assert status == OrderStatus.CANCELED.value
    stored = await repo.get_position(pid)
    assert stored is not None and stored.seq == 1


async def test_a_second_write_of_one_order_waits_for_the_first_ones_batch_on_parallel_writers(
        engine: Engine, repo: Repository) -> None:
    """PostgreSQL's writers write batches side by side; two writes of one order queued together must not be in
    flight at once (the second could commit first and the older status would stay). The engine no longer
    holds the position's lock while an order's status is written, so the repository keeps the order."""
    if repo.writers == 1:
        pytest.skip("one writer (SQLite): nothing runs side by side")
    [pid] = await _open(engine, 1)
    now = datetime.now(UTC)
    stop = _stop(pid, now)
    await repo.save_order(stop, now)
    seen: list[tuple[str, int]] = []

    def executed(conn: sa.Connection, _cursor: object, statement: str, *_: object) -> None:
        if statement.startswith("UPDATE orders"):
            seen.append(("update", id(conn)))

    def committed(conn: sa.Connection) -> None:
        seen.append(("commit", id(conn)))

    sync_engine = repo.engine.sync_engine
    sa.event.listen(sync_engine, "before_cursor_execute", executed)
    sa.event.listen(sync_engine, "commit", committed)
    try:
        async with repo.engine.connect() as blocker, blocker.begin():  # holds the row: the first write waits
            await blocker.execute(sa.text("SELECT 1 FROM orders WHERE client_id = :c FOR UPDATE"),
                                  {"c": stop.client_id})
            writes = asyncio.gather(repo.save_order(replace(stop, status=OrderStatus.EXPIRED), now),
                                    repo.save_order(replace(stop, status=OrderStatus.CANCELED), now))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5.0
            while sum(kind == "update" for kind, _ in seen) < 1 and loop.time() < deadline:
                await asyncio.sleep(0.01)
            # The first write is blocked in the database; give a second writer time to send its own (the
            # defect: it would), then let them go.
            late = loop.time() + 0.3
            while sum(kind == "update" for kind, _ in seen) < 2 and loop.time() < late:
                await asyncio.sleep(0.01)
        await writes
    finally:
        sa.event.remove(sync_engine, "before_cursor_execute", executed)
        sa.event.remove(sync_engine, "commit", committed)
    updates = [i for i, (kind, _) in enumerate(seen) if kind == "update"]
    assert len(updates) == 2, seen
    first_commit = seen.index(("commit", seen[updates[0]][1]), updates[0])
    assert first_commit < updates[1], f"the second write of the order started before the first committed: {seen}"
    status = await _row_status(repo, stop.client_id)
    assert status == OrderStatus.CANCELED.value


async def test_a_lone_transition_is_written_at_once_in_a_batch_of_one(engine: Engine, repo: Repository) -> None:
    [pid] = await _open(engine, 1)
    batches = repo.batch_stats.batches
    await engine.fire(pid, EntryFilled(quantity=D(1), price=D(100)))
    assert repo.batch_stats.batches == batches + 1 and repo.batch_stats.sizes[-1] == 1


def test_a_repository_refuses_impossible_batch_settings() -> None:
    engine = create_async_engine("sqlite+aiosqlite://")
    with pytest.raises(ValueError, match="batch_max"):
        Repository(engine, batch_max=0)
    with pytest.raises(ValueError, match="writers"):
        Repository(engine, writers=0)


async def test_a_sigkill_in_the_middle_of_batches_keeps_every_acknowledged_transition(db_url: str) -> None:
    """A real process commits batches of 30 positions' transitions and is SIGKILLed mid-stream: every
    transition it acknowledged is on disk, and every journal replays to the stored row."""
    url = db_url
    await (await Repository.open(url)).close()  # the schema, before the child starts
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.batch_crash_child", url, "30", cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=asyncio.subprocess.PIPE)
    acked: dict[str, int] = {}
    try:
        assert child.stdout is not None
        async with asyncio.timeout(60):
            assert (await child.stdout.readline()).strip() == b"READY"
            while sum(acked.values()) < 900:  # ~30 batches in
                line = (await child.stdout.readline()).decode().split()
                assert line and line[0] == "ACK", line
                acked[line[1]] = max(acked.get(line[1], 0), int(line[2]))
    finally:
        child.kill()  # SIGKILL: no cleanup, whatever batch is in flight is cut off
        await child.wait()
    repo = await Repository.open(url)
    try:
        for position_id, seq in acked.items():
            entries = await repo.journal(position_id)
            stored = await repo.get_position(position_id)
            assert stored is not None and stored.seq >= seq, (position_id, seq, stored)
            assert [e.seq for e in entries] == list(range(stored.seq + 1))
            replayed = await replay(entries)
            assert (replayed.state, replayed.stop_price, replayed.seq) == (stored.state, stored.stop_price, stored.seq)
    finally:
        await repo.close()


async def test_our_own_order_statuses_go_at_once_and_the_streams_ride_with_the_next_transition(
        engine: Engine, repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """A status the engine waits for on a protection path (the old stop's cancel in a stop move, under the
    symbol's stop lock) is written at once; only a status the stream reported waits for company. With the
    linger made 30 s, an eager write that lingered would miss the 5 s deadline."""
    import db.repository

    monkeypatch.setattr(db.repository, "ORDER_LINGER_S", 30.0)
    [pid] = await _open(engine, 1)
    now = datetime.now(UTC)
    stop = _stop(pid, now)
    await engine.track_order(pid, stop)
    await asyncio.wait_for(engine.order_status(pid, replace(stop, status=OrderStatus.CANCELED)), 5.0)
    assert stop.client_id not in engine.positions[pid].orders
    take_profit = OrderRef(f"lc-{pid}-t1", pid, "S0", OrderPurpose.TAKE_PROFIT, "sell", D(1), OrderStatus.NEW,
                           trigger_price=D(120), created_at=now)
    await engine.track_order(pid, take_profit)
    lazy = asyncio.ensure_future(engine.order_status(pid, replace(take_profit, status=OrderStatus.EXPIRED),
                                                     lazy=True))
    for _ in range(50):
        await asyncio.sleep(0)
    assert not lazy.done(), "a lazy status went alone at once"
    assert take_profit.client_id not in engine.positions[pid].orders  # memory is ahead of the row meanwhile
    await engine.fire(pid, EntryFilled(quantity=D(1), price=D(100)))  # the transition takes the row along
    await asyncio.wait_for(lazy, 5.0)
    async with repo.engine.connect() as conn:
        rows: dict[str, str] = dict((await conn.execute(sa.text("SELECT client_id, status FROM orders"))).all())
    assert rows == {stop.client_id: OrderStatus.CANCELED.value, take_profit.client_id: OrderStatus.EXPIRED.value}


async def test_closing_with_a_hung_sqlite_write_keeps_to_its_one_bound(tmp_path: Path) -> None:
    """A write hung in the SQLite writer's thread (a disk that does not answer): `close(timeout_s)` returns
    within that bound, not twice it (the writer tasks and the thread's dispose waited one bound each)."""
    import threading
    import time

    repo = await Repository.open(f"sqlite:///{tmp_path / 'hung.sqlite'}")
    engine = Engine(repo, canceller=PaperExchange(), records=JsonlRecords(tmp_path / "records"))
    [pid] = await _open(engine, 1)
    release = threading.Event()

    def hang(*_: object) -> None:
        release.wait(30)

    [writer_engine] = [e for e in repo.sync_engines if e is not repo.engine.sync_engine]
    sa.event.listen(writer_engine, "before_cursor_execute", hang)
    try:
        draft, outcome = await _outcome(engine, pid, EntryFilled(quantity=D(1), price=D(100)))
        stuck = repo.commit(draft, outcome)  # type: ignore[arg-type]
        began = time.monotonic()
        await repo.close(timeout_s=1.0)
        took = time.monotonic() - began
        assert took < 1.6, f"close(timeout_s=1.0) took {took:.2f} s"
        assert not stuck.done() or stuck.cancelled() or stuck.exception() is not None
    finally:
        release.set()


async def test_a_stream_status_the_books_queued_behind_a_failing_store_is_replayed_at_once(
        engine: Engine, repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the store fails, the books queue writes and replay them one at a time: a lazy status replayed
    lazily would wait out its linger with nothing to share it (made 30 s here: the drain would time out)."""
    import db.repository

    monkeypatch.setattr(db.repository, "ORDER_LINGER_S", 30.0)
    [pid] = await _open(engine, 1)
    now = datetime.now(UTC)
    stop = _stop(pid, now)
    await engine.track_order(pid, stop)
    faults = DriverErrors(repo)
    faults.on()
    try:
        await engine.fire(pid, EntryFilled(quantity=D(1), price=D(100)))  # fails: the books queue it
        assert engine.books.behind >= 1
        await asyncio.wait_for(engine.order_status(pid, replace(stop, status=OrderStatus.EXPIRED), lazy=True), 5.0)
    finally:
        faults.off()
    assert await engine.books.drain(5.0), f"{engine.books.behind} write(s) still queued after 5 s"
    status = await _row_status(repo, stop.client_id)
    assert status == OrderStatus.EXPIRED.value


async def test_an_older_status_retried_by_the_books_never_lands_after_a_newer_one(
        engine: Engine, repo: Repository) -> None:
    """An order's status write fails once and the books retry it; a newer status of the same order, queued
    meanwhile, must still be the one the row keeps (the retry went to the end of the books' queue, behind the
    newer write already in the store: the row said `open` for a cancelled stop, and a restart loaded it as
    working)."""
    [pid] = await _open(engine, 1)
    now = datetime.now(UTC)
    stop = _stop(pid, now)
    await engine.track_order(pid, stop)
    failures = [1]  # the next update of an order row fails, once

    def fail_once(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.startswith("UPDATE orders") and failures:
            failures.pop()
            raise sa.exc.DBAPIError(statement, None, RuntimeError("injected: the disk hiccupped"))

    for sync_engine in repo.sync_engines:  # installed before any write is in flight
        sa.event.listen(sync_engine, "before_cursor_execute", fail_once)
    older = asyncio.ensure_future(engine.order_status(pid, replace(stop, status=OrderStatus.OPEN)))
    newer = asyncio.ensure_future(engine.order_status(pid, replace(stop, status=OrderStatus.CANCELED), lazy=True))
    await asyncio.wait_for(asyncio.gather(older, newer), 5.0)
    assert await engine.books.drain(5.0)
    assert not failures, "the injected failure did not happen: the test tests nothing"
    status = await _row_status(repo, stop.client_id)
    assert status == OrderStatus.CANCELED.value, "an older status was written after the newer one"
    assert stop.client_id not in engine.positions[pid].orders
    assert not [o for p in await repo.load_live() if p.id == pid for o in p.orders.values()]


async def test_a_status_for_an_order_that_finished_meanwhile_neither_revives_nor_rewrites_it(
        engine: Engine, repo: Repository) -> None:
    """Two statuses of one order pass the caller's "still tracked?" look before the position's lock (the stream's
    FILLED and our CANCELED after the cancel found it gone): the one that comes second under the lock must not
    put the finished order back into memory or write over its row."""
    [pid] = await _open(engine, 1)
    now = datetime.now(UTC)
    stop = _stop(pid, now)
    await engine.track_order(pid, stop)
    await engine.order_status(pid, replace(stop, status=OrderStatus.FILLED))
    await engine.order_status(pid, replace(stop, status=OrderStatus.OPEN))  # looked before FILLED took the lock
    assert stop.client_id not in engine.positions[pid].orders
    status = await _row_status(repo, stop.client_id)
    assert status == OrderStatus.FILLED.value


async def test_a_listener_that_raises_past_the_swap_callback_hears_of_a_transition_once(
        engine: Engine, repo: Repository) -> None:
    """The swap runs in a callback of the books' answer; a listener raising what `except Exception` does not
    catch (a BaseException) leaves that callback half done. The coroutine must not swap and notify again when
    it resumes: one listener call, one transition counted, one record. A listener after it still hears of the
    transition (it did not: the exception left the loop over the listeners; sixth session)."""

    class Escapes(BaseException):
        pass

    [pid] = await _open(engine, 1)
    heard: list[int] = []

    def listener(position: object, outcome: Outcome) -> None:
        heard.append(outcome.journal.seq)
        raise Escapes

    engine.listeners.append(listener)
    later: list[int] = []
    engine.listeners.append(lambda position, outcome: later.append(outcome.journal.seq))
    recorded: list[int] = []
    emit = engine.records.emit

    def recording(record: TransitionRecord) -> None:
        recorded.append(record.seq)
        emit(record)

    engine.records.emit = recording  # type: ignore[method-assign,assignment]
    loop = asyncio.get_running_loop()
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda loop, context: None)  # the callback's error goes to the loop's handler
    try:
        await engine.fire(pid, EntryFilled(quantity=D(1), price=D(100)))
    finally:
        loop.set_exception_handler(handler)
    assert heard == [1] and recorded == [1] and later == [1]
    assert sum(engine.metrics.transitions.values()) == 1
    assert engine.positions[pid] == await repo.get_position(pid)


def test_a_systemexit_from_a_listener_leaves_no_member_of_its_batch_unanswered(db_url: str) -> None:
    """Review of 794a1b2: the swap runs inside the batch's answer now (eager callbacks), so a listener's
    SystemExit (or KeyboardInterrupt) came out through the repository in the middle of the batch: the members
    after it were never answered and the writer waited forever, holding every later write. Now every member is
    answered first, then the exception goes on out of the loop as from any callback; the loop, run again, goes
    on. In a process of its own (tests/systemexit_child.py): a SystemExit out of an asyncio task (PostgreSQL's
    writer settles in its task) leaves CPython 3.11's recursion counter off, which breaks the interpreter that
    runs pytest later (an AST error at the session's end)."""
    done = subprocess.run([sys.executable, "-m", "tests.systemexit_child", db_url], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stdout + done.stderr
