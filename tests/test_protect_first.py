"""Protect first, books second (invariant 8): a storage failure never stops protection, and the books catch
up once storage is back, in order, without duplicates. Real failures: a small filesystem that fills up
(SQLite, records) and PostgreSQL stopped and started; the venue simulator through unmodified ccxt."""
from __future__ import annotations

import asyncio
from datetime import timedelta
from decimal import Decimal as D
from pathlib import Path

import pytest

from exchange.sim.server import SimServer
from lifecycle.client_ids import make_client_id
from lifecycle.domain import OrderPurpose, Side
from lifecycle.errors import StorageUnavailable
from lifecycle.live import OpenCommand
from lifecycle.machines.states import PositionState as S
from lifecycle.replay import replay
from tests.invariants import violations
from tests.livekit import Rig
from tests.storage_faults import SmallDisk, postgres, postgres_cluster, small_disk  # noqa: F401 - fixture

LIMIT_ENTRY = OpenCommand("BTCUSDT", Side.LONG, D("0.010"), entry_price=D("59000.0"), stop_loss_pct=D(1))


async def rig_on(sim: SimServer, db_url: str, records_dir: Path) -> Rig:
    return await Rig(sim, sim.venue.add_account("alice"), db_url, records_dir).start()


async def rest_then_fill(rig: Rig) -> str:
    """A limit entry resting on the venue; returns the position id (the caller breaks storage, then fills)."""
    assert rig.live is not None
    position = await rig.live.open(LIMIT_ENTRY)
    await rig.until(lambda: rig.sim.venue.open_orders(rig.account, "BTCUSDT"), what="the entry resting")
    assert rig.state(position.id) is S.OPENING
    return position.id


TRAILING = OpenCommand("BTCUSDT", Side.LONG, D("0.010"), stop_loss_pct=D(1), trailing_activation=D(60100),
                       trailing_callback_pct=D("0.5"))


async def trail_to(rig: Rig, position_id: str, price: int) -> None:
    """Move the mark up to `price` and wait until the trailing stop has followed it (0.5 % behind)."""
    assert rig.engine is not None and rig.live is not None
    rig.set_mark("BTCUSDT", price)
    await rig.until(lambda: (rig.engine.positions[position_id].stop_price or 0) >= D(price) * D("0.994"),  # type: ignore[union-attr]
                    timeout=5, what=f"the stop following {price}")
    await rig.live.idle()


async def books_caught_up(rig: Rig, position_id: str) -> None:
    """After storage is back: nothing waits, the database says what memory says, the venue's books agree."""
    assert rig.engine is not None and rig.repo is not None and rig.live is not None
    await rig.until(lambda: rig.engine.books.behind == 0, timeout=20, what="the books caught up")  # type: ignore[union-attr]
    live = rig.engine.positions[position_id]
    stored = await rig.stored(position_id)
    assert (stored.state, stored.quantity, stored.stop_price, stored.seq) == (
        live.state, live.quantity, live.stop_price, live.seq)
    journal = await rig.repo.journal(position_id)
    assert [e.seq for e in journal] == list(range(len(journal)))  # in order, nothing twice, nothing missing
    assert (await replay(journal)).state is stored.state
    working = [o for o in stored.orders.values() if o.purpose is OrderPurpose.STOP]
    assert [o.client_id for o in working] == [a.client_id for a in rig.stop_algos("BTCUSDT")]
    assert await violations(rig.sim, rig.account, rig.repo) == []
    assert not rig.live.health_reasons()


async def test_an_entry_filled_while_the_sqlite_disk_is_full_is_protected_and_booked_later(
        sim: SimServer, small_disk: SmallDisk, tmp_path: Path) -> None:
    rig = await rig_on(sim, f"sqlite:///{small_disk.path / 'live.sqlite'}", tmp_path / "records")
    try:
        assert rig.engine is not None and rig.live is not None
        pid = await rest_then_fill(rig)
        small_disk.fill()
        rig.set_mark("BTCUSDT", "58990")  # the limit entry fills
        await rig.until(lambda: bool(rig.stop_algos("BTCUSDT")), timeout=5, what="a stop on the venue")
        assert rig.state(pid) is S.OPEN and rig.engine.books.behind > 0
        assert [a.trigger for a in rig.stop_algos("BTCUSDT")] == [D("58410.0")]
        assert any(r.startswith("storage failing") for r in rig.live.health_reasons())
        assert (await rig.stored(pid)).state is S.OPENING  # the database is behind, memory is not
        small_disk.free()
        await books_caught_up(rig, pid)
    finally:
        small_disk.free()
        await rig.stop()


async def test_a_stop_with_the_books_still_behind_is_recovered_from_the_venue_at_restart(
        sim: SimServer, small_disk: SmallDisk, tmp_path: Path) -> None:
    """Stopped while the database still cannot be written: the row says OPENING with a resting entry, the
    venue holds a filled position with its stop. The restart takes the fill in and finds the same stop by
    its client id: one stop, OPEN, not closed as a resting entry at shutdown."""
    rig = await rig_on(sim, f"sqlite:///{small_disk.path / 'live.sqlite'}", tmp_path / "records")
    try:
        assert rig.engine is not None and rig.live is not None
        pid = await rest_then_fill(rig)
        small_disk.fill()
        rig.set_mark("BTCUSDT", "58990")
        await rig.until(lambda: rig.engine.positions[pid].stop_price is not None, timeout=5,  # type: ignore[union-attr]
                        what="the stop placed and recorded in memory")
        [stop] = rig.stop_algos("BTCUSDT")
        await rig.stop()  # the books cannot catch up: what is unwritten is logged
        small_disk.free()  # (read only once space is back: SQLite may need to recreate its WAL index to read)
        assert (await rig.repo.get_position(pid)).state is S.OPENING  # type: ignore[union-attr]
        await rig.restart()
        await rig.until(lambda: rig.state(pid) is S.OPEN and rig.engine.positions[pid].stop_price is not None,  # type: ignore[union-attr]
                        timeout=10, what="the position taken in after the restart")
        await rig.live.idle()
        assert [a.client_id for a in rig.stop_algos("BTCUSDT")] == [stop.client_id]  # found by its id, not doubled
        assert sim.venue.position(rig.account, "BTCUSDT").amount == D("0.010")  # not closed at market
        await books_caught_up(rig, pid)
    finally:
        small_disk.free()
        await rig.stop()


async def test_stops_moved_while_the_database_is_full_never_leak(
        sim: SimServer, small_disk: SmallDisk, tmp_path: Path) -> None:
    rig = await rig_on(sim, f"sqlite:///{small_disk.path / 'live.sqlite'}", tmp_path / "records")
    try:
        assert rig.engine is not None and rig.live is not None
        p = await rig.open(TRAILING)
        small_disk.fill()
        for price in (60200, 60400, 60600, 60800):  # four trailing moves while nothing can be written
            await trail_to(rig, p.id, price)
            assert len(rig.stop_algos("BTCUSDT")) == 1  # the old stop is gone every time
        assert rig.engine.books.behind > 0
        small_disk.free()
        await books_caught_up(rig, p.id)
        assert rig.engine.positions[p.id].state is S.TS_ACTIVE
    finally:
        small_disk.free()
        await rig.stop()


async def test_an_entry_filled_while_the_records_directory_is_full_is_protected(
        sim: SimServer, small_disk: SmallDisk, tmp_path: Path) -> None:
    rig = await rig_on(sim, f"sqlite:///{tmp_path / 'live.sqlite'}", small_disk.path / "records")
    try:
        assert rig.records is not None and rig.live is not None
        pid = await rest_then_fill(rig)
        small_disk.fill()
        rig.set_mark("BTCUSDT", "58990")
        await rig.until(lambda: bool(rig.stop_algos("BTCUSDT")), timeout=5, what="a stop on the venue")
        assert rig.state(pid) is S.OPEN
        await rig.until(lambda: rig.engine.positions[pid].stop_price is not None,  # type: ignore[union-attr]
                        what="the stop recorded")
        await rig.until(lambda: rig.records.failing is not None, what="records failing")  # type: ignore[union-attr]
        assert any(r.startswith("records not written") for r in rig.live.health_reasons())
        small_disk.free()

        def seqs() -> list[int]:  # (a transition's record follows its swap when its commit's coroutine resumes)
            assert rig.records is not None and rig.records.flush(timeout=10)
            return [r["seq"] for r in rig.records.read("transition") if r["position_id"] == pid]

        await rig.until(lambda: seqs() == [1, 2], what="entry filled, stop placed: in order, once each")
        lines = (small_disk.path / "records").glob("*.jsonl")
        assert all(line.endswith("}") for path in lines for line in path.read_text().splitlines())  # no torn line
        await books_caught_up(rig, pid)
    finally:
        small_disk.free()
        await rig.stop()


async def test_no_new_position_is_opened_while_the_database_cannot_record_it(
        sim: SimServer, small_disk: SmallDisk, tmp_path: Path) -> None:
    rig = await rig_on(sim, f"sqlite:///{small_disk.path / 'live.sqlite'}", tmp_path / "records")
    try:
        assert rig.live is not None
        small_disk.fill()
        with pytest.raises(StorageUnavailable):
            await rig.live.open(OpenCommand("ETHUSDT", Side.LONG, D("0.1"), stop_loss_pct=D(1)))
        assert not rig.our_open_orders() and not sim.venue.position(rig.account, "ETHUSDT").amount
    finally:
        small_disk.free()
        await rig.stop()


@pytest.mark.postgres
async def test_an_entry_filled_while_postgresql_restarts_is_protected_and_booked_later(
        sim: SimServer, pg_url: str, tmp_path: Path) -> None:
    postgres_cluster()  # skips where the cluster cannot be controlled
    rig = await rig_on(sim, pg_url, tmp_path / "records")
    try:
        assert rig.engine is not None and rig.live is not None
        pid = await rest_then_fill(rig)
        await asyncio.to_thread(postgres, "stop")
        try:
            rig.set_mark("BTCUSDT", "58990")
            await rig.until(lambda: bool(rig.stop_algos("BTCUSDT")), timeout=5, what="a stop on the venue")
            assert rig.state(pid) is S.OPEN and rig.engine.books.behind > 0
            assert any(r.startswith("storage failing") for r in rig.live.health_reasons())
        finally:
            await asyncio.to_thread(postgres, "start")
        await books_caught_up(rig, pid)
        stored = await rig.stored(pid)
        journal = await rig.repo.journal(pid)  # type: ignore[union-attr]
        assert [e.event for e in journal] == ["created", "entry_filled", "stop_moved"] and stored.state is S.OPEN
    finally:
        await asyncio.to_thread(postgres, "start")
        await rig.stop()


async def test_an_entry_fill_the_stream_never_delivered_is_taken_in_by_the_protection_audit(
        sim: SimServer, tmp_path: Path) -> None:
    rig = await rig_on(sim, f"sqlite:///{tmp_path / 'live.sqlite'}", tmp_path / "records")
    try:
        assert rig.live is not None and rig.engine is not None
        pid = await rest_then_fill(rig)
        sim.set_faults(ws_silent=True)  # the fill update never arrives
        rig.set_mark("BTCUSDT", "58990")
        await rig.until(lambda: sim.venue.position(rig.account, "BTCUSDT").amount > 0, what="the fill on the venue")
        assert rig.state(pid) is S.OPENING and not rig.stop_algos("BTCUSDT")
        rig.engine.positions[pid].created_at -= timedelta(seconds=5)  # past the audit's wait for the stream
        counts = await rig.live.audit_protection()
        assert counts["repaired"] == 1
        await rig.until(lambda: bool(rig.stop_algos("BTCUSDT")), timeout=5, what="a stop on the venue")
        assert rig.state(pid) is S.OPEN
        [repair] = rig.records.read("protection_repair")  # type: ignore[union-attr]
        assert repair["repair"] == "entry_taken_in" and repair["position_id"] == pid
        sim.set_faults(ws_silent=False)
        await rig.live.idle()
        assert await violations(sim, rig.account, rig.repo) == []  # type: ignore[arg-type]
    finally:
        await rig.stop()


async def test_the_protection_audit_puts_back_a_stop_the_stream_never_said_was_gone(
        sim: SimServer, tmp_path: Path) -> None:
    rig = await rig_on(sim, f"sqlite:///{tmp_path / 'live.sqlite'}", tmp_path / "records")
    try:
        assert rig.live is not None and rig.engine is not None
        p = await rig.open(OpenCommand("BTCUSDT", Side.LONG, D("0.010"), stop_loss_pct=D(1)))
        sim.set_faults(ws_silent=True)
        [stop] = rig.stop_algos("BTCUSDT")
        sim.venue.cancel_algo(rig.account, stop.algo_id, None)  # removed, and the stream is blind
        assert rig.live.unprotected() == []  # memory does not know
        counts = await rig.live.audit_protection()
        assert counts == {"checked": 1, "repaired": 1}
        [again] = rig.stop_algos("BTCUSDT")
        assert again.trigger == p.stop_price and again.client_id != stop.client_id
        [repair] = rig.records.read("protection_repair")  # type: ignore[union-attr]
        assert repair["repair"] == "placed"
        assert await rig.live.audit_protection() == {"checked": 1, "repaired": 0}  # nothing left to repair
        sim.set_faults(ws_silent=False)
    finally:
        await rig.stop()


async def test_the_protection_audit_cancels_an_extra_stop_of_ours(sim: SimServer, tmp_path: Path) -> None:
    rig = await rig_on(sim, f"sqlite:///{tmp_path / 'live.sqlite'}", tmp_path / "records")
    try:
        assert rig.live is not None and rig.engine is not None and rig.exchange is not None
        p = await rig.open(OpenCommand("BTCUSDT", Side.LONG, D("0.010"), stop_loss_pct=D(1)))
        leaked = make_client_id(p.id, OrderPurpose.STOP, 40)  # a stop of ours nothing recorded
        await rig.exchange.place_stop("BTCUSDT", Side.LONG, D("0.010"), D(59000), leaked)
        counts = await rig.live.audit_protection()
        assert counts["repaired"] == 1
        [kept] = rig.stop_algos("BTCUSDT")
        assert kept.trigger == p.stop_price
        stored = await rig.stored(p.id)
        assert [o.client_id for o in stored.orders.values() if o.purpose is OrderPurpose.STOP] == [kept.client_id]
        assert leaked not in stored.orders  # cancelled: no longer a working order of the position
    finally:
        await rig.stop()


async def test_a_restart_with_the_books_behind_keeps_the_tightest_stop_the_venue_holds(
        sim: SimServer, small_disk: SmallDisk, tmp_path: Path) -> None:
    """Trailing moves while the database is full, then a stop that cannot write them: at restart the venue's
    tighter stop is taken as the truth, not moved back to the older price the database recorded."""
    rig = await rig_on(sim, f"sqlite:///{small_disk.path / 'live.sqlite'}", tmp_path / "records")
    try:
        assert rig.engine is not None and rig.live is not None
        p = await rig.open(TRAILING)
        small_disk.fill()
        for price in (60400, 60800):
            await trail_to(rig, p.id, price)
        [tight] = rig.stop_algos("BTCUSDT")
        await rig.stop()  # the books cannot catch up
        small_disk.free()  # first: a WAL-mode read on a full disk can fail with "disk I/O error"
        assert (await rig.repo.get_position(p.id)).stop_price < tight.trigger  # type: ignore[union-attr]
        rig.set_mark("BTCUSDT", 60700)  # a little lower: no new move would reach the old height
        await rig.restart()
        await rig.live.idle()
        [kept] = rig.stop_algos("BTCUSDT")
        assert kept.trigger == tight.trigger  # never moved back
        assert rig.engine.positions[p.id].stop_price == tight.trigger
        await rig.until(lambda: rig.engine.books.behind == 0, what="books caught up")  # type: ignore[union-attr]
        assert (await rig.stored(p.id)).stop_price == tight.trigger
    finally:
        small_disk.free()
        await rig.stop()


async def test_a_stop_no_repair_can_put_back_ends_in_an_unprotected_close(sim: SimServer, tmp_path: Path) -> None:
    from dataclasses import replace as _replace

    from lifecycle.domain import CloseReason
    from tests.livekit import FAST
    rig = await Rig(sim, sim.venue.add_account("alice"), f"sqlite:///{tmp_path / 'live.sqlite'}",
                    tmp_path / "records", config=_replace(FAST, unprotected_close_after_s=0.5)).start()
    try:
        assert rig.live is not None and rig.engine is not None
        p = await rig.open(OpenCommand("BTCUSDT", Side.LONG, D("0.010"), stop_loss_pct=D(1)))
        sim.set_faults(reject_stops=10_000, reject_stops_code=-1111)  # every new stop refused
        [stop] = rig.stop_algos("BTCUSDT")
        sim.venue.cancel_algo(rig.account, stop.algo_id, None)  # removed by someone else
        deadline = asyncio.get_running_loop().time() + 10
        while p.id in rig.engine.positions:
            assert asyncio.get_running_loop().time() < deadline, "the naked position was never closed"
            await rig.live.check_protection(grace_s=0.1)
            await asyncio.sleep(0.1)
        stored = await rig.ended(p.id)
        assert stored.state is S.CLOSED and stored.close_reason is CloseReason.UNPROTECTED
        assert sim.venue.position(rig.account, "BTCUSDT").amount == 0
        repairs = rig.records.read("protection_repair")  # type: ignore[union-attr]
        assert repairs and all(r["repair"] == "failed" for r in repairs)
    finally:
        sim.set_faults(reject_stops=0)
        await rig.stop()


async def test_the_venue_stop_is_kept_at_restart_even_before_the_first_mark(
        sim: SimServer, small_disk: SmallDisk, tmp_path: Path) -> None:
    """As above, with no mark price known while recovery decides (a slow mark stream): the working stop on
    the venue has not triggered, so it is on the safe side; it is kept, not loosened."""
    rig = await rig_on(sim, f"sqlite:///{small_disk.path / 'live.sqlite'}", tmp_path / "records")
    try:
        assert rig.engine is not None and rig.live is not None
        p = await rig.open(TRAILING)
        small_disk.fill()
        await trail_to(rig, p.id, 60800)
        [tight] = rig.stop_algos("BTCUSDT")
        await rig.stop()
        small_disk.free()
        await rig.start()  # a new process, but no mark reaches it before recovery
        assert rig.live is not None and rig.engine is not None
        rig.live.marks.clear()
        task = asyncio.ensure_future(rig.live.recover(retry_s=0.05))
        await asyncio.sleep(0)  # one loop step: recovery has begun
        rig.live.marks.clear()
        await task
        await rig.live.idle()
        assert [a.trigger for a in rig.stop_algos("BTCUSDT")] == [tight.trigger]
        assert rig.engine.positions[p.id].stop_price == tight.trigger
    finally:
        small_disk.free()
        await rig.stop()
