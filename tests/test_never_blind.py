"""Never blind: a silent private stream cannot hide a close longer than the fast sync interval plus the
confirming queries (counted from the close, or from REST answering again); a late fill update never turns an
exact cause into `unknown`; and what the venue would refuse or net away is refused before anything is sent.
Against the venue simulator through unmodified ccxt, on a SQLite file."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal as D
from pathlib import Path

import pytest

from exchange.sim.server import SimServer
from lifecycle.domain import CloseCause, Side
from lifecycle.errors import InvalidEvent, PositionConflict
from lifecycle.live import OpenCommand
from lifecycle.machines.states import PositionState as S
from lifecycle.reconciler import Reconciler
from scheduler.jobs import ReconciliationScheduler, ScheduleConfig
from tests.livekit import FAST, Rig, settings_for

FAST_SYNC = ScheduleConfig(sync_interval_s=60, fast_sync_interval_s=0.3, orphan_interval_s=60)
BOUND_SLACK_S = 2.0  # the confirming queries and the commit, generously (the benchmark prints the real figures)


@pytest.fixture
async def rig(sim: SimServer, tmp_path: Path) -> AsyncIterator[Rig]:
    account = sim.venue.add_account("alice")
    # The idle probe is far away: only REST can find a silent stream within the bound here.
    settings = replace(settings_for(sim, account), user_probe_after_s=600.0)
    r = await Rig(sim, account, f"sqlite:///{tmp_path / 'live.sqlite'}", tmp_path / "records",
                  settings=settings).start()
    yield r
    await r.stop()


def btc_long() -> OpenCommand:
    return OpenCommand("BTCUSDT", Side.LONG, D("0.010"), stop_loss_pct=D(1))


async def scheduled(rig: Rig) -> ReconciliationScheduler:
    assert rig.live is not None
    return await ReconciliationScheduler(Reconciler.of(rig.live, grace_ms=0), FAST_SYNC).start()


async def test_an_expired_listen_key_without_notice_hides_a_close_no_longer_than_the_bound(rig: Rig) -> None:
    p = await rig.open(btc_long())
    scheduler = await scheduled(rig)
    try:
        assert rig.live is not None and rig.exchange is not None
        generation = rig.exchange.generation
        rig.sim.expire_listen_keys()  # the socket stays open, nothing arrives, no notice
        closed_at = time.monotonic()
        rig.sim.venue.force_close(rig.account, "BTCUSDT", "manual")
        stored = await rig.ended(p.id, timeout=FAST_SYNC.fast_sync_interval_s + BOUND_SLACK_S)
        assert (stored.state, stored.close_cause) == (S.CLOSED_EXTERNAL, CloseCause.MANUAL)
        assert time.monotonic() - closed_at < FAST_SYNC.fast_sync_interval_s + BOUND_SLACK_S
        # The stream was doubted at once and got a new key: the next close comes through it again.
        await rig.until(lambda: rig.exchange.generation > generation, what="a new subscription")  # type: ignore[union-attr]
        await rig.until(lambda: rig.live.stream_doubted() is None and rig.live.stream_healthy(),  # type: ignore[union-attr]
                        what="the stream trusted again")
        q = await rig.open(OpenCommand("ETHUSDT", Side.LONG, D("0.1"), stop_loss_pct=D(1)))
        rig.sim.venue.force_close(rig.account, "ETHUSDT", "liquidation")
        stored = await rig.ended(q.id)
        assert stored.close_cause is CloseCause.LIQUIDATION
    finally:
        await scheduler.stop()


async def test_a_listen_key_expired_event_gets_a_new_key_at_once_and_the_next_close_comes_through(
        rig: Rig) -> None:
    p = await rig.open(btc_long())
    assert rig.exchange is not None and rig.live is not None
    generation = rig.exchange.generation
    rig.sim.expire_listen_keys(notice=True)  # Binance pushes listenKeyExpired, then the socket is silent
    await rig.until(lambda: rig.exchange.generation > generation and rig.live.stream_healthy(),  # type: ignore[union-attr]
                    what="a new key and subscription")
    rig.sim.venue.force_close(rig.account, "BTCUSDT", "manual")  # no scheduler running: only the stream sees it
    stored = await rig.ended(p.id)
    assert (stored.state, stored.close_cause) == (S.CLOSED_EXTERNAL, CloseCause.MANUAL)


async def test_a_wedged_socket_with_a_live_key_hides_a_close_no_longer_than_the_bound(rig: Rig) -> None:
    p = await rig.open(btc_long())
    scheduler = await scheduled(rig)
    try:
        assert rig.live is not None and rig.exchange is not None
        generation = rig.exchange.generation
        rig.sim.set_faults(ws_silent=True)  # connected, key alive (keepalive answers), nothing delivered
        closed_at = time.monotonic()
        rig.sim.venue.force_close(rig.account, "BTCUSDT", "adl")
        stored = await rig.ended(p.id, timeout=FAST_SYNC.fast_sync_interval_s + BOUND_SLACK_S)
        assert (stored.state, stored.close_cause) == (S.CLOSED_EXTERNAL, CloseCause.ADL)
        assert time.monotonic() - closed_at < FAST_SYNC.fast_sync_interval_s + BOUND_SLACK_S
        assert rig.exchange.generation > generation  # resubscribed: the wedge is cured, not only worked around
        rig.sim.set_faults(ws_silent=False)
    finally:
        await scheduler.stop()


async def test_a_silent_stream_while_rest_also_fails_is_caught_up_once_rest_answers(rig: Rig) -> None:
    p = await rig.open(btc_long())
    scheduler = await scheduled(rig)
    try:
        rig.sim.set_faults(ws_silent=True, http_5xx=10_000)  # blind both ways
        rig.sim.venue.force_close(rig.account, "BTCUSDT", "manual")
        await asyncio.sleep(1.0)  # an outage of a second: several sync passes fail meanwhile
        assert rig.state(p.id) is S.OPEN
        rig.sim.set_faults(http_5xx=0)
        back_at = time.monotonic()
        stored = await rig.ended(p.id, timeout=FAST_SYNC.fast_sync_interval_s + BOUND_SLACK_S)
        assert (stored.state, stored.close_cause) == (S.CLOSED_EXTERNAL, CloseCause.MANUAL)
        assert time.monotonic() - back_at < FAST_SYNC.fast_sync_interval_s + BOUND_SLACK_S
        assert scheduler.stats.runs[("sync", "exchange_error")] >= 1
        rig.sim.set_faults(ws_silent=False)
    finally:
        await scheduler.stop()


# --- exact causes ---------------------------------------------------------------------------------


@pytest.fixture
async def late_rig(sim: SimServer, tmp_path: Path) -> AsyncIterator[Rig]:
    """cause_wait_s 0: every flat is handled before the fill update that explains it arrives (Binance sends
    the position update first), as when that update comes late."""
    r = await Rig(sim, sim.venue.add_account("bob"), f"sqlite:///{tmp_path / 'late.sqlite'}", tmp_path / "records",
                  config=replace(FAST, cause_wait_s=0.0)).start()
    yield r
    await r.stop()


async def test_a_stop_fill_whose_fill_update_is_late_takes_its_cause_from_our_algo_update(late_rig: Rig) -> None:
    rig = late_rig
    p = await rig.open(btc_long())
    rig.set_mark("BTCUSDT", 59300)  # through our stop
    stored = await rig.ended(p.id)
    assert (stored.state, stored.close_cause) == (S.CLOSED_EXTERNAL, CloseCause.STOP_LOSS)
    [closure] = [c for c in rig.records.read("closure") if c["position_id"] == p.id]  # type: ignore[union-attr]
    assert closure["cause"] == "stop_loss" and closure["cause_source"] in ("algo_update", "fill_update")


async def test_a_manual_close_whose_fill_update_is_late_takes_its_cause_from_rest(late_rig: Rig) -> None:
    rig = late_rig
    p = await rig.open(btc_long())
    rig.sim.set_faults(reorder_events=True)  # the fill update is held back behind the position update
    rig.sim.venue.force_close(rig.account, "BTCUSDT", "manual")
    stored = await rig.ended(p.id)
    rig.sim.set_faults(reorder_events=False)
    assert (stored.state, stored.close_cause) == (S.CLOSED_EXTERNAL, CloseCause.MANUAL)
    [closure] = [c for c in rig.records.read("closure") if c["position_id"] == p.id]  # type: ignore[union-attr]
    assert closure["cause_source"] in ("rest", "fill_update")


async def test_a_fill_update_later_than_cause_wait_s_still_gives_the_exact_cause(rig: Rig) -> None:
    """The default wait (0.5 s) and a fill update 1.5 s late: the cause comes from REST, exact."""
    p = await rig.open(btc_long())
    rig.sim.set_faults(delay_fill_updates_s=1.5)
    rig.sim.venue.force_close(rig.account, "BTCUSDT", "adl")
    stored = await rig.ended(p.id)
    assert (stored.state, stored.close_cause) == (S.CLOSED_EXTERNAL, CloseCause.ADL)
    [closure] = [c for c in rig.records.read("closure") if c["position_id"] == p.id]  # type: ignore[union-attr]
    assert closure["cause_source"] == "rest"
    rig.sim.set_faults(delay_fill_updates_s=0)


async def test_an_unknown_cause_is_amended_by_the_fill_update_that_comes_after(late_rig: Rig) -> None:
    rig = late_rig
    assert rig.live is not None
    p = await rig.open(btc_long())
    rig.sim.set_faults(http_5xx=10_000, delay_fill_updates_s=1.0)  # REST cannot tell, the fill update is late
    rig.sim.venue.force_close(rig.account, "BTCUSDT", "liquidation")
    stored = await rig.ended(p.id, timeout=10)
    rig.sim.set_faults(http_5xx=0)
    assert (stored.state, stored.close_cause) == (S.CLOSED_EXTERNAL, CloseCause.UNKNOWN)
    await rig.until(lambda: rig.live.stats.closures_amended == 1, what="the amendment")  # type: ignore[union-attr]
    [amended] = rig.records.read("closure_amended")  # type: ignore[union-attr]
    assert (amended["position_id"], amended["cause"], amended["cause_before"]) == (p.id, "liquidation", "unknown")
    assert amended["client_order_id"].startswith("autoclose-")
    rig.sim.set_faults(delay_fill_updates_s=0)


# --- what the venue would refuse or net away ------------------------------------------------------


async def test_an_opposite_side_open_on_a_one_way_account_is_refused(rig: Rig) -> None:
    assert rig.live is not None and rig.repo is not None
    p = await rig.open(btc_long())
    before = await rig.repo.count_positions()
    with pytest.raises(PositionConflict, match=p.id):
        await rig.live.open(OpenCommand("BTCUSDT", Side.SHORT, D("0.010"), stop_loss_pct=D(1)))
    assert await rig.repo.count_positions() == before
    assert rig.sim.venue.position(rig.account, "BTCUSDT").amount == D("0.010")  # untouched
    assert rig.state(p.id) is S.OPEN


@pytest.mark.parametrize("command, message", [
    (OpenCommand("BTCUSDT", Side.LONG, D("1e308")), "quantity"),
    (OpenCommand("BTCUSDT", Side.LONG, D("0.010"), entry_price=D("1e308")), "entry_price"),
    (OpenCommand("BTCUSDT", Side.LONG, D("0.0001")), "quantity"),
    (OpenCommand("BTCUSDT", Side.LONG, D("0.0105")), "step"),
    (OpenCommand("BTCUSDT", Side.LONG, D("0.010"), take_profit=D(50000)), "wrong side"),
    (OpenCommand("BTCUSDT", Side.SHORT, D("0.010"), take_profit=D(70000)), "wrong side"),
    (OpenCommand("BTCUSDT", Side.LONG, D("0.010"), take_profit=D("1e12")), "take_profit"),
])
async def test_bad_input_is_refused_before_any_row_or_order(rig: Rig, command: OpenCommand, message: str) -> None:
    assert rig.live is not None and rig.repo is not None
    with pytest.raises(InvalidEvent, match=message):
        await rig.live.open(command)
    assert await rig.repo.count_positions() == 0 and not rig.our_open_orders()
    p = await rig.open(btc_long())  # the symbol is not blocked
    assert rig.state(p.id) is S.OPEN


async def test_trailing_moves_do_not_hide_a_close_from_rest_while_the_stream_is_silent(sim: SimServer,
                                                                                      tmp_path: Path) -> None:
    """A wedged stream, a price that keeps rising (a trailing move every second) and an ADL: stop moves are not
    "our activity" for the grace window, so REST finds the close within the bound all the same."""
    account = sim.venue.add_account("carol")
    settings = replace(settings_for(sim, account), user_probe_after_s=600.0)
    rig = await Rig(sim, account, f"sqlite:///{tmp_path / 'trail.sqlite'}", tmp_path / "records",
                    settings=settings, config=replace(FAST, trail_min_interval_s=1.0)).start()
    assert rig.live is not None
    scheduler = await ReconciliationScheduler(Reconciler.of(rig.live, grace_ms=5000), FAST_SYNC).start()
    try:
        p = await rig.open(OpenCommand("BTCUSDT", Side.LONG, D("0.010"), stop_loss_pct=D(1),
                                       trailing_activation=D(60100), trailing_callback_pct=D("0.5")))
        await asyncio.sleep(5.5)  # past the grace window of the open
        sim.set_faults(ws_silent=True)
        sim.venue.force_close(rig.account, "BTCUSDT", "adl")
        closed_at = time.monotonic()
        price = 60200
        while p.id in rig.engine.positions:  # type: ignore[union-attr]
            assert time.monotonic() - closed_at < FAST_SYNC.fast_sync_interval_s + BOUND_SLACK_S + 1.0, \
                "the close stayed hidden behind the trailing moves"
            price += 50
            rig.set_mark("BTCUSDT", price)
            await asyncio.sleep(0.25)  # paces the market: a rising mark, a trailing move each second
        stored = await rig.ended(p.id)
        assert (stored.state, stored.close_cause) == (S.CLOSED_EXTERNAL, CloseCause.ADL)
    finally:
        sim.set_faults(ws_silent=False)
        await scheduler.stop()
        await rig.stop()


async def test_a_fill_of_another_position_of_ours_never_amends_an_unknown_close(late_rig: Rig) -> None:
    """A closes `unknown` (REST fails, its fill update late); a reversal opens B at once: B's entry fill (on
    A's closing side) arrives first and must not be taken for A's cause; A's own late fill amends it."""
    rig = late_rig
    assert rig.live is not None
    a = await rig.open(btc_long())
    rig.sim.set_faults(http_5xx=1, delay_fill_updates_s=1.0)
    rig.sim.venue.force_close(rig.account, "BTCUSDT", "liquidation")
    stored = await rig.ended(a.id)
    assert stored.close_cause is CloseCause.UNKNOWN
    rig.sim.set_faults(delay_fill_updates_s=0)
    b = await rig.open(OpenCommand("BTCUSDT", Side.SHORT, D("0.010"), stop_loss_pct=D(1)))
    await rig.until(lambda: rig.live.stats.closures_amended == 1, what="the amendment")  # type: ignore[union-attr]
    [amended] = rig.records.read("closure_amended")  # type: ignore[union-attr]
    assert (amended["position_id"], amended["cause"]) == (a.id, "liquidation")
    assert rig.state(b.id) is S.OPEN
