"""Reconciliation on a schedule (APScheduler), against the simulator through ccxt, on a SQLite file."""
from __future__ import annotations

import asyncio
import time
from decimal import Decimal as D
from pathlib import Path

import pytest

from lifecycle.client_ids import make_client_id
from lifecycle.domain import CloseCause, CloseReason, OrderPurpose, Side
from lifecycle.live import OpenCommand
from lifecycle.machines.states import PositionState as S
from lifecycle.reconciler import Reconciler
from scheduler.jobs import ReconciliationScheduler, ScheduleConfig
from tests.livekit import Rig
from tests.storage_faults import DriverErrors
from tests.waiting import ManualClock


async def test_a_close_is_found_while_the_listen_key_is_expired(rig: Rig) -> None:
    p = await rig.open(OpenCommand("BTCUSDT", Side.LONG, D("0.01"), stop_loss_pct=D(1)))
    assert rig.live is not None
    config = ScheduleConfig(sync_interval_s=60, fast_sync_interval_s=0.3, orphan_interval_s=60)
    scheduler = await ReconciliationScheduler(Reconciler.of(rig.live, grace_ms=0), config).start()
    try:
        rig.sim.expire_listen_keys()  # connections stay open, nothing arrives, keepalive answers -1125
        await asyncio.sleep(0.05)
        closed_at = time.monotonic()
        rig.sim.venue.force_close(rig.account, "BTCUSDT", "manual")
        stored = await rig.ended(p.id, timeout=10)
        took = time.monotonic() - closed_at
        assert (stored.state, stored.close_cause) == (S.CLOSED_EXTERNAL, CloseCause.MANUAL)
        # The stream is noticed silent after user_probe_after_s (0.5 s here), then fast syncs find it.
        assert took < 0.5 + 2 * config.fast_sync_interval_s + 1.0
        assert scheduler.stats.runs[("sync", "ok")] >= 1
    finally:
        await scheduler.stop()


async def test_a_wedged_stream_is_resubscribed_when_rest_keeps_disagreeing(rig: Rig) -> None:
    p = await rig.open(OpenCommand("BTCUSDT", Side.LONG, D("0.01"), stop_loss_pct=D(1)))
    assert rig.live is not None and rig.exchange is not None
    config = ScheduleConfig(sync_interval_s=0.3, fast_sync_interval_s=0.3, orphan_interval_s=60)
    reconciler = Reconciler.of(rig.live, grace_ms=0, stream_doubt_s=1.0)
    scheduler = await ReconciliationScheduler(reconciler, config).start()
    generation = rig.exchange.generation
    try:
        rig.sim.set_faults(ws_silent=True)  # connected, listen key alive, nothing delivered: a wedge
        await asyncio.sleep(0.05)
        rig.sim.venue.force_close(rig.account, "BTCUSDT", "manual")
        await asyncio.sleep(0.2)
        rig.sim.set_faults(ws_silent=False)  # a new subscription would work
        stored = await rig.ended(p.id, timeout=10)
        assert (stored.state, stored.close_cause) == (S.CLOSED_EXTERNAL, CloseCause.MANUAL)
        assert rig.exchange.generation > generation
        assert any("may be wedged" in m for _, m in rig.alarms())
    finally:
        await scheduler.stop()


async def test_with_a_healthy_stream_positions_are_checked_every_tick_and_the_audit_keeps_its_interval(
        rig: Rig) -> None:
    assert rig.live is not None
    await rig.open(OpenCommand("BTCUSDT", Side.LONG, D("0.01"), stop_loss_pct=D(1)))
    config = ScheduleConfig(sync_interval_s=60, fast_sync_interval_s=0.1, orphan_interval_s=60)
    scheduler = ReconciliationScheduler(Reconciler.of(rig.live), config)
    await scheduler.start()
    try:
        await rig.until(lambda: scheduler.stats.runs[("sync", "ok")] >= 4, what="four sync ticks")
        assert scheduler.stats.runs[("audit", "ok")] == 1  # the first tick only: nothing is suspect
    finally:
        await scheduler.stop()


async def test_the_orphan_sweep_cancels_ours_only(rig: Rig) -> None:
    p = await rig.open(OpenCommand("ETHUSDT", Side.LONG, D("0.5"), stop_loss_pct=D(1)))
    assert rig.live is not None and rig.exchange is not None
    # An orphan of ours: a stop for a position this engine does not hold (left by a crash).
    orphan = make_client_id("0123456789abcdef0123", OrderPurpose.STOP, 4)
    await rig.exchange.place_stop("ETHUSDT", Side.LONG, D("0.1"), D(2500), orphan)
    await rig.exchange.place_stop("ETHUSDT", Side.LONG, D("0.1"), D(2400), "web_someone_elses")
    scheduler = ReconciliationScheduler(Reconciler.of(rig.live), ScheduleConfig())
    summary = await scheduler.sweep_orphans()
    assert summary.startswith("1 orphan(s) cancelled")
    assert rig.live.stats.orphans_cancelled == 1  # counted per cancel, as it happens
    left = {a.client_id for a in rig.sim.venue.open_algos(rig.account, "ETHUSDT")}
    assert orphan not in left and "web_someone_elses" in left
    assert any(cid.startswith(f"lc-{p.id}-s") for cid in left)  # the live position's stop stays
    [record] = rig.records.read("orphan_cancelled")  # type: ignore[union-attr]
    assert (record["client_order_id"], record["position_id"]) == (orphan, "0123456789abcdef0123")


async def test_the_orphan_sweep_leaves_an_order_alone_while_the_database_cannot_say(rig: Rig) -> None:
    """Chaos seed 300596: the database failing while the sweep asks whether an order's position is live
    crashed the job with a traceback; it must leave the order for the next sweep and say why."""
    await rig.open(OpenCommand("ETHUSDT", Side.LONG, D("0.5"), stop_loss_pct=D(1)))
    assert rig.live is not None and rig.exchange is not None and rig.repo is not None
    orphan = make_client_id("0123456789abcdef0123", OrderPurpose.STOP, 4)
    await rig.exchange.place_stop("ETHUSDT", Side.LONG, D("0.1"), D(2500), orphan)
    scheduler = ReconciliationScheduler(Reconciler.of(rig.live), ScheduleConfig())
    failing = DriverErrors(rig.repo)
    failing.on()
    try:
        summary = await scheduler.sweep_orphans()
    finally:
        failing.off()
    assert summary.startswith("0 orphan(s) cancelled") and "1 left for the next sweep" in summary
    assert orphan in {a.client_id for a in rig.sim.venue.open_algos(rig.account, "ETHUSDT")}
    assert (await scheduler.sweep_orphans()).startswith("1 orphan(s) cancelled")  # the database is back


async def test_the_orphan_sweep_waits_for_the_symbols_stop_lock(rig: Rig) -> None:
    """Every stop mutation holds the symbol's lock; the orphan sweep's cancel too (a move or a terminal
    cleanup in flight finishes first)."""
    await rig.open(OpenCommand("ETHUSDT", Side.LONG, D("0.5"), stop_loss_pct=D(1)))
    assert rig.live is not None and rig.exchange is not None and rig.engine is not None
    orphan = make_client_id("0123456789abcdef0123", OrderPurpose.STOP, 4)
    await rig.exchange.place_stop("ETHUSDT", Side.LONG, D("0.1"), D(2500), orphan)
    scheduler = ReconciliationScheduler(Reconciler.of(rig.live), ScheduleConfig())
    holding, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with rig.engine.locks.exclusive(rig.account.name, "ETHUSDT"):  # type: ignore[union-attr]
            holding.set()
            await release.wait()

    holder = asyncio.ensure_future(hold())
    await holding.wait()
    listed = rig.sim.calls["GET /fapi/v1/openAlgoOrders"]
    sweep = asyncio.ensure_future(scheduler.sweep_orphans())
    await rig.until(lambda: rig.sim.calls["GET /fapi/v1/openAlgoOrders"] > listed, what="the sweep's listing")
    await rig.until(lambda: rig.engine.locks.users(rig.account.name, "ETHUSDT") == 2,  # type: ignore[union-attr]
                    what="the sweep waiting for the lock")
    assert orphan in {a.client_id for a in rig.sim.venue.open_algos(rig.account, "ETHUSDT")}  # still waiting
    assert not sweep.done()
    release.set()
    assert (await sweep).startswith("1 orphan(s) cancelled")
    await holder
    assert orphan not in {a.client_id for a in rig.sim.venue.open_algos(rig.account, "ETHUSDT")}


def test_schedule_config_refuses_impossible_intervals() -> None:
    with pytest.raises(ValueError, match="sync_interval_s"):
        ScheduleConfig(sync_interval_s=0)
    with pytest.raises(ValueError, match="must not exceed"):
        ScheduleConfig(sync_interval_s=1, fast_sync_interval_s=2)
    with pytest.raises(ValueError, match="aged_policy"):
        ScheduleConfig(aged_policy="panic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_age_s"):
        ScheduleConfig(max_age_s=-1)


async def _hand_opened(rig: Rig, symbol: str, quantity: str) -> None:
    rig.sim.venue.new_order(rig.account, symbol=symbol, side="BUY", type_="MARKET", quantity=D(quantity),
                            price=None, client_id="web_by_hand", reduce_only=False)
    await rig.until(lambda: rig.live is not None and rig.live.account_view.stream_position(symbol) is not None,
                    what=f"the stream showing {symbol}")


async def test_an_untracked_position_is_reported_and_not_touched_by_default(rig: Rig) -> None:
    await _hand_opened(rig, "SOLUSDT", "2")
    assert rig.live is not None
    reconciler = Reconciler.of(rig.live)
    for _ in range(2):
        report = await reconciler.sync()
        assert report.untracked == 1 and report.adopted == []
    [record] = rig.records.read("untracked_position")  # type: ignore[union-attr]  # reported once
    assert (record["symbol"], record["side"], record["quantity"]) == ("SOLUSDT", "long", "2")
    assert rig.sim.venue.open_algos(rig.account, "SOLUSDT") == [] and rig.engine.positions == {}  # type: ignore[union-attr]


async def test_an_untracked_position_is_adopted_and_protected_in_adopt_mode(rig: Rig) -> None:
    await _hand_opened(rig, "SOLUSDT", "2")
    assert rig.live is not None
    report = await Reconciler.of(rig.live, untracked="adopt").sync()
    [pid] = report.adopted
    await rig.live.idle()
    adopted = rig.engine.positions[pid]  # type: ignore[union-attr]
    assert (adopted.state, adopted.quantity, adopted.stop_price) == (S.OPEN, D(2), D("148.50"))  # 1 % under 150
    assert [(a.trigger, a.qty) for a in rig.stop_algos("SOLUSDT")] == [(D("148.50"), D(2))]
    rig.set_mark("SOLUSDT", "148")  # and it is a position like any other: its stop fills, the cause is ours
    await assert_end(rig, pid, S.CLOSED_EXTERNAL, CloseCause.STOP_LOSS)


async def test_aged_positions_are_reported_or_closed(rig: Rig) -> None:
    p = await rig.open(OpenCommand("BTCUSDT", Side.LONG, D("0.01"), stop_loss_pct=D(1)))
    assert rig.live is not None
    report_only = ReconciliationScheduler(Reconciler.of(rig.live),
                                          ScheduleConfig(max_age_s=0.05, aged_policy="report"))
    await rig.until(lambda: rig.age_s(p.id) > 0.05, what="the position older than max_age_s")
    assert await report_only.check_aged() == "1 aged, 0 closed"
    assert await report_only.check_aged() == "1 aged, 0 closed"
    assert [r["position_id"] for r in rig.records.read("aged_position")] == [p.id]  # type: ignore[union-attr]
    assert rig.state(p.id) is S.OPEN
    closing = ReconciliationScheduler(Reconciler.of(rig.live),
                                      ScheduleConfig(max_age_s=0.05, aged_policy="close"))
    assert await closing.check_aged() == "1 aged, 1 closed"
    stored = await rig.ended(p.id)
    assert (stored.state, stored.close_reason) == (S.CLOSED, CloseReason.MAX_AGE)


async def assert_end(rig: Rig, position_id: str, state: S, cause: CloseCause) -> None:
    stored = await rig.ended(position_id)
    assert (stored.state, stored.close_cause) == (state, cause)
    await rig.until(lambda: not rig.our_open_orders(), what="no order of ours left open")


# --- regressions found in review ------------------------------------------------------------------------


async def test_stop_lets_a_run_in_flight_finish(rig: Rig) -> None:
    assert rig.live is not None
    reconciler = Reconciler.of(rig.live)
    started, finished = asyncio.Event(), asyncio.Event()
    real = reconciler.sync

    async def slow_sync():
        started.set()
        await asyncio.sleep(0.3)
        report = await real()
        finished.set()
        return report

    reconciler.sync = slow_sync  # type: ignore[method-assign]
    scheduler = await ReconciliationScheduler(reconciler, ScheduleConfig(
        sync_interval_s=60, fast_sync_interval_s=0.05, orphan_interval_s=60)).start()
    await asyncio.wait_for(started.wait(), 2)
    await scheduler.stop(timeout=5.0)
    assert finished.is_set()


async def test_concurrent_passes_adopt_once(rig: Rig) -> None:
    await _hand_opened(rig, "SOLUSDT", "2")
    assert rig.live is not None
    reconciler = Reconciler.of(rig.live, untracked="adopt")
    results = await asyncio.gather(reconciler.sync(), reconciler.sync())  # sync job, aged job, resync hook
    await rig.live.idle()
    assert sum(len(r.adopted) for r in results) == 1 and len(rig.stop_algos("SOLUSDT")) == 1


async def test_a_stale_resync_does_not_make_a_closed_position_adoptable(rig: Rig) -> None:
    p = await rig.open(OpenCommand("BTCUSDT", Side.LONG, D("0.01"), stop_loss_pct=D(1)))
    assert rig.live is not None and rig.exchange is not None
    rig.sim.set_faults(stale_positions_s=5)  # REST lags (seed 000)
    assert await rig.live.close(p.id)
    await rig.ended(p.id)
    await rig.exchange.recreate(rig.exchange.generation, "a reconnect")  # its resync reads the stale REST
    await asyncio.sleep(0.5)
    report = await Reconciler.of(rig.live, untracked="adopt").sync()
    assert report.adopted == [] and rig.our_open_orders() == []


async def test_the_sweep_leaves_stops_of_positions_live_in_the_database(rig: Rig, tmp_path: Path) -> None:
    p = await rig.open(OpenCommand("ETHUSDT", Side.LONG, D("0.5"), stop_loss_pct=D(1)))
    assert rig.live is not None and rig.engine is not None
    rig.engine.positions.pop(p.id)  # as seen by another engine process sharing the account and database
    summary = await ReconciliationScheduler(Reconciler.of(rig.live), ScheduleConfig()).sweep_orphans()
    assert summary.startswith("0 orphan(s)") and len(rig.stop_algos("ETHUSDT")) == 1


async def test_closing_the_adapter_ends_its_streams(rig: Rig) -> None:
    from exchange.ccxt_adapter import CcxtExchange
    from tests.livekit import settings_for
    from tests.test_ccxt_adapter import Collector

    venue = await CcxtExchange(settings_for(rig.sim, rig.account)).start()
    positions = Collector(venue.position_updates())
    await positions.wait_for(lambda i: True)
    await venue.close()
    await asyncio.sleep(0.5)
    assert venue.client is None and positions.task.done()  # no client rebuilt after close()
    await positions.stop()


async def test_a_rest_only_absence_ends_phantom_only_after_it_lasted(rig: Rig) -> None:
    """Stream down, REST lagging an open: one look never ends a live position (nor cancels its stop); a
    position really gone with no fill ends PHANTOM once the absence has lasted phantom_after_s."""
    assert rig.live is not None
    rig.sim.set_faults(stale_positions_s=60)  # REST's snapshot predates the open below
    p = await rig.open(OpenCommand("BTCUSDT", Side.LONG, D("0.01"), stop_loss_pct=D(1)))
    q = await rig.open(OpenCommand("ETHUSDT", Side.LONG, D("0.1"), stop_loss_pct=D(1)))
    rig.sim.set_faults(user_stream_down=True)
    await rig.sim.drop_streams()
    await rig.until(lambda: not rig.live.stream_healthy(), what="stream down")  # type: ignore[union-attr]
    clock = ManualClock()
    reconciler = Reconciler.of(rig.live, grace_ms=0, phantom_after_s=1.0, monotonic=clock)
    report = await reconciler.sync()
    assert report.closed == [] and rig.state(p.id) is S.OPEN and rig.state(q.id) is S.OPEN
    assert len(rig.stop_algos("BTCUSDT")) == 1 and len(rig.stop_algos("ETHUSDT")) == 1
    rig.sim.set_faults(stale_positions_s=0)  # REST fresh again: BTC and ETH are there ...
    rig.sim.venue.vanish(rig.account, "ETHUSDT")  # ... except ETH, gone without a fill
    clock.advance(1.1)
    report = await reconciler.sync()
    assert report.closed == [q.id] and rig.state(p.id) is S.OPEN  # BTC reappeared: its clock restarted
    stored = await rig.ended(q.id)
    assert (stored.state, stored.close_cause) == (S.PHANTOM, CloseCause.NOT_FOUND)
    rig.sim.set_faults(user_stream_down=False)


async def stream_down(rig: Rig, down: bool) -> None:
    assert rig.live is not None
    rig.sim.set_faults(user_stream_down=down)
    if down:
        await rig.sim.drop_streams()
    await rig.until(lambda: rig.live.stream_healthy() is not down, timeout=15,  # type: ignore[union-attr]
                    what="stream down" if down else "stream back")


async def test_time_a_live_stream_vouched_for_never_counts_toward_phantom(rig: Rig) -> None:
    assert rig.live is not None
    rig.sim.set_faults(stale_positions_s=600)  # REST never shows the open below: the position is live
    p = await rig.open(OpenCommand("BTCUSDT", Side.LONG, D("0.01"), stop_loss_pct=D(1)))
    clock = ManualClock()
    reconciler = Reconciler.of(rig.live, grace_ms=0, phantom_after_s=2.0, stream_doubt_s=1000, monotonic=clock)
    await stream_down(rig, True)
    assert (await reconciler.sync()).closed == []  # a blip: kept, its countdown started
    await stream_down(rig, False)
    rig.sim.venue.funding(rig.account, "BTCUSDT")  # the stream speaks for the position again
    await rig.until(lambda: rig.live.stream_shows(rig.engine.positions[p.id]) is True,  # type: ignore[union-attr]
                    what="the stream showing it")
    for _ in range(5):  # 2.5 s with the live stream showing it: not an unexplained absence
        assert (await reconciler.sync()).stream_disagrees == 1
        clock.advance(0.5)
    await stream_down(rig, True)
    report = await reconciler.sync()  # the first look during a second blip
    assert report.closed == [] and rig.state(p.id) is S.OPEN and len(rig.stop_algos("BTCUSDT")) == 1
    await stream_down(rig, False)


async def test_the_aged_check_leaves_a_position_in_its_phantom_countdown_to_it(rig: Rig) -> None:
    assert rig.live is not None
    p = await rig.open(OpenCommand("BTCUSDT", Side.LONG, D("0.01"), stop_loss_pct=D(1)))
    await stream_down(rig, True)
    rig.sim.venue.vanish(rig.account, "BTCUSDT")  # gone without a fill
    clock = ManualClock()
    reconciler = Reconciler.of(rig.live, grace_ms=0, phantom_after_s=0.5, monotonic=clock)
    scheduler = ReconciliationScheduler(reconciler, ScheduleConfig(max_age_s=0.01, aged_policy="close"))
    await rig.until(lambda: rig.age_s(p.id) > 0.01, what="the position older than max_age_s")
    assert await scheduler.check_aged() == "0 aged, 0 closed"  # not closed as CLOSED while counting down
    clock.advance(0.6)
    await reconciler.sync()
    stored = await rig.ended(p.id)
    assert (stored.state, stored.close_cause) == (S.PHANTOM, CloseCause.NOT_FOUND)
    await stream_down(rig, False)


async def test_seed_000_with_the_stream_down_stale_rest_delays_and_fresh_rest_detects(rig: Rig) -> None:
    """Seed 000 with the private stream down: a REST snapshot stale for a while after an external close
    never declares anything (it still shows the position); once REST tells the truth the close is found
    with its cause within one fast-sync interval plus the confirming queries."""
    assert rig.live is not None
    p = await rig.open(OpenCommand("BTCUSDT", Side.LONG, D("0.01"), stop_loss_pct=D(1)))
    q = await rig.open(OpenCommand("ETHUSDT", Side.LONG, D("0.1"), stop_loss_pct=D(1)))
    config = ScheduleConfig(sync_interval_s=60, fast_sync_interval_s=0.3, orphan_interval_s=60)
    scheduler = await ReconciliationScheduler(Reconciler.of(rig.live, grace_ms=0), config).start()
    try:
        await stream_down(rig, True)
        rig.sim.set_faults(stale_positions_s=2.0)  # REST keeps answering the snapshot from before the close
        rig.sim.venue.force_close(rig.account, "BTCUSDT", "manual")
        syncs = scheduler.stats.runs[("sync", "ok")]
        await asyncio.sleep(1.8)
        assert scheduler.stats.runs[("sync", "ok")] >= syncs + 3  # several passes saw the stale snapshot
        assert rig.state(p.id) is S.OPEN  # ... and declared nothing
        stored = await rig.ended(p.id, timeout=0.2 + config.fast_sync_interval_s + 1.0)
        assert (stored.state, stored.close_cause) == (S.CLOSED_EXTERNAL, CloseCause.MANUAL)
        closed_at = time.monotonic()  # REST fresh, the stream still down
        rig.sim.venue.force_close(rig.account, "ETHUSDT", "adl")
        stored = await rig.ended(q.id, timeout=config.fast_sync_interval_s + 1.0)
        assert (stored.state, stored.close_cause) == (S.CLOSED_EXTERNAL, CloseCause.ADL)
        assert time.monotonic() - closed_at < config.fast_sync_interval_s + 1.0
    finally:
        await scheduler.stop()
        await stream_down(rig, False)


async def test_venue_wide_listings_go_symbol_by_symbol_and_every_tenth_sweep_lists_every_symbol(
        sim: object, tmp_path: Path) -> None:
    """Binance weighs an order listing without a symbol 40, with one 1: an account with a few symbols lists
    them one by one in the audit and the orphan sweep (issue 14: REST per account). An orphan of ours on a
    symbol it neither configures nor holds shows only in a full listing: the first sweep and every tenth."""
    from exchange.sim.server import SimServer
    from lifecycle.live.orphans import FULL_SWEEP_EVERY

    assert isinstance(sim, SimServer)
    rig = await Rig(sim, sim.venue.add_account("lister"), f"sqlite:///{tmp_path / 'l.sqlite'}", tmp_path / "records",
                    symbols=["BTCUSDT", "ETHUSDT"]).start()
    try:
        assert rig.live is not None and rig.exchange is not None
        await rig.open(OpenCommand("ETHUSDT", Side.LONG, D("0.5"), stop_loss_pct=D(1)))
        scheduler = ReconciliationScheduler(Reconciler.of(rig.live), ScheduleConfig())
        left_behind = make_client_id("0123456789abcdef0123", OrderPurpose.STOP, 4)
        await rig.exchange.place_stop("SOLUSDT", Side.LONG, D("1"), D(100), left_behind)
        assert (await scheduler.sweep_orphans()).startswith("1 orphan(s) cancelled")  # the first sweep: full
        again = make_client_id("0123456789abcdef0123", OrderPurpose.STOP, 5)
        await rig.exchange.place_stop("SOLUSDT", Side.LONG, D("1"), D(100), again)
        lists = ("GET /fapi/v1/openOrders", "GET /fapi/v1/openAlgoOrders")
        before = {k: (sim.calls[k], sim.symbol_calls[k]) for k in lists}
        for _ in range(FULL_SWEEP_EVERY - 1):
            assert (await scheduler.sweep_orphans()).startswith("0 orphan(s) cancelled")
        assert (await rig.live.audit_protection())["checked"] == 1
        for key in lists:  # BTCUSDT and ETHUSDT, each by name: no listing of every symbol
            calls, named = sim.calls[key] - before[key][0], sim.symbol_calls[key] - before[key][1]
            assert calls == named == 2 * FULL_SWEEP_EVERY, (key, calls, named)
        assert (await scheduler.sweep_orphans()).startswith("1 orphan(s) cancelled")  # the tenth after: full
    finally:
        await rig.stop()
