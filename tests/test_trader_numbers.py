"""The numbers a trader reads: a closure's PnL net of the closing fee, kept in the closures table (and listed
newest first for a page), shown by `status --ended` and `history`, and a liquidation in the simulator at the
position's liquidation price, with the loss that goes with it."""
from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from pathlib import Path

import aiohttp
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from db.engine import create_engine, migrate
from db.repository import Repository
from exchange.paper import PaperExchange
from exchange.sim.venue import TAKER_FEE
from lifecycle.actions import ClosureRecord
from lifecycle.app.cli import app
from lifecycle.domain import CloseCause, Side
from lifecycle.engine import Engine
from lifecycle.events import EntryFilled, Flat, StopMoved
from lifecycle.live import OpenCommand
from lifecycle.machines.states import PositionState
from lifecycle.records import JsonlRecords
from tests.conftest import FakeClock
from tests.livekit import Rig
from tests.simclient import signed

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def closure(side: Side = Side.LONG, *, realized: D | None = None, fee: D | None = None,
            exit_price: D | None = D(110)) -> ClosureRecord:
    return ClosureRecord("p1", "a", "BTCUSDT", side, PositionState.CLOSED_EXTERNAL, CloseCause.STOP_LOSS, None,
                         D(2), D(100), exit_price, T0, T0 + timedelta(seconds=5), realized_pnl=realized, fee=fee,
                         exchange_ts_ms=int(T0.timestamp() * 1000) + 4990)


NET = [  # (closure, pnl, fee, net_pnl) as the record writes them
    (closure(realized=D("19.5"), fee=D("0.088")), "19.5", "0.088", "19.412"),  # the venue's figures
    (closure(fee=D("0.088")), "20", "0.088", "19.912"),  # pnl from entry and exit
    (closure(Side.SHORT, fee=D("0.088")), "-20", "0.088", "-20.088"),
    (closure(realized=D(-3)), "-3", None, "-3"),  # no fee known: net is gross
    (closure(exit_price=None), None, None, None),  # nothing known
]


@pytest.mark.parametrize(("record", "pnl", "fee", "net"), NET)
def test_a_closure_record_carries_gross_pnl_fee_and_pnl_net_of_the_fee(record: ClosureRecord, pnl: str | None,
                                                                       fee: str | None, net: str | None) -> None:
    written = record.as_record()
    assert (written["pnl"], written["fee"], written["net_pnl"]) == (pnl, fee, net)
    assert written["exit_price"] == (str(record.exit_price) if record.exit_price is not None else None)


# --- the closures table ---------------------------------------------------------------------------------------


async def _closed(engine: Engine, clock: FakeClock, account: str, symbol: str, *, exit_price: D, realized: D,
                  fee: D | None) -> str:
    p = await engine.open_position(account=account, symbol=symbol, side=Side.LONG, quantity=D("0.5"))
    await engine.fire(p.id, EntryFilled(quantity=D("0.5"), price=D(100)))
    await engine.fire(p.id, StopMoved(stop_price=D(95), mark=D(100)))
    clock.advance(seconds=3)
    venue_ms = int(clock().timestamp() * 1000) - 7  # the venue said so 7 ms before the transition
    await engine.fire(p.id, Flat(cause=CloseCause.STOP_LOSS, exit_price=exit_price, realized_pnl=realized, fee=fee,
                                 exchange_ts_ms=venue_ms))
    return p.id


async def test_the_closures_table_keeps_pnl_fee_net_and_latency_and_lists_the_newest_first(
        engine: Engine, repo: Repository, clock: FakeClock) -> None:
    first = await _closed(engine, clock, "alpha", "BTCUSDT", exit_price=D(95), realized=D("-2.5"), fee=D("0.019"))
    second = await _closed(engine, clock, "beta", "ETHUSDT", exit_price=D(110), realized=D(5), fee=None)
    third = await _closed(engine, clock, "alpha", "SOLUSDT", exit_price=D(101), realized=D("0.5"), fee=D("0.0202"))
    rows = await repo.recent_closures(None, 10)
    assert [r["position_id"] for r in rows] == [third, second, first]
    row = rows[2]
    assert (row["pnl"], row["fee"], row["net_pnl"], row["exit_price"]) == (D("-2.5"), D("0.019"), D("-2.519"), D(95))
    assert row["detection_latency_ms"] == pytest.approx(7.0)
    assert (rows[1]["fee"], rows[1]["net_pnl"]) == (None, D(5))  # no fee known: net is gross
    assert row["closed_at"].tzinfo is not None and row["cause"] == "stop_loss" and row["account"] == "alpha"
    assert [r["position_id"] for r in await repo.recent_closures(["alpha"], 10)] == [third, first]
    assert [r["position_id"] for r in await repo.recent_closures(None, 1)] == [third]
    assert await repo.recent_closures(["nobody"], 10) == []


async def test_a_database_at_revision_0001_upgrades_and_keeps_its_closures_without_figures(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    engine = create_engine(url)
    try:
        await migrate(engine, "0001")
        async with engine.begin() as conn:
            await conn.execute(sa.text(
                "INSERT INTO positions (id, account, symbol, side, state, requested_quantity, quantity, created_at, "
                "updated_at, seq) VALUES ('old1', 'a', 'BTCUSDT', 'long', 'CLOSED', '1', '1', "
                "'2026-01-01 00:00:00.000000', '2026-01-01 00:00:00.000000', 3)"))
            await conn.execute(sa.text(
                "INSERT INTO closures (position_id, account, symbol, side, state, cause, quantity, entry_price, "
                "exit_price, opened_at, closed_at) VALUES ('old1', 'a', 'BTCUSDT', 'long', 'CLOSED', 'bot', '1', "
                "'100', '101', '2026-01-01 00:00:00.000000', '2026-01-01 00:01:00.000000')"))
    finally:
        await engine.dispose()
    status = ["status", "--db", url, "--ended", "1"]
    old = await asyncio.to_thread(CliRunner().invoke, app, status)  # the commands never migrate: they say how
    assert old.exit_code == 2 and "an older schema: run `lifecycle migrate --db URL`" in old.output, old.output
    repo = await Repository.open(url)  # migrates to head
    try:
        [row] = await repo.recent_closures(None, 5)
        assert row["position_id"] == "old1" and row["exit_price"] == D(101)
        assert (row["pnl"], row["fee"], row["net_pnl"], row["detection_latency_ms"]) == (None, None, None, None)
    finally:
        await repo.close()
    shown = await asyncio.to_thread(CliRunner().invoke, app, status)
    assert shown.exit_code == 0, shown.output
    row_text = next(line for line in shown.output.splitlines() if "old1" in line)
    assert re.findall(r"[\w.+-]+", row_text)[-3:] == ["101", "-", "bot"]  # no PnL known: "-", not 0


# --- status and history ---------------------------------------------------------------------------------------


async def test_status_ended_shows_cause_exit_and_net_pnl_and_history_shows_the_prices(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shown.sqlite'}"
    repo = await Repository.open(url)
    clock = FakeClock()
    try:
        engine = Engine(repo, canceller=PaperExchange(), records=JsonlRecords(tmp_path / "records"), clock=clock)
        pid = await _closed(engine, clock, "alpha", "BTCUSDT", exit_price=D("94.9"), realized=D("-2.55"),
                            fee=D("0.01898"))
    finally:
        await repo.close()
    # The commands run their own event loop: off this one.
    status = await asyncio.to_thread(CliRunner().invoke, app, ["status", "--db", url, "--ended", "1"])
    assert status.exit_code == 0, status.output
    header = next(line for line in status.output.splitlines() if "position" in line and "cause" in line)
    assert re.findall(r"\w[\w ]*\w", header)[-3:] == ["exit", "net PnL", "cause"]
    row = next(line for line in status.output.splitlines() if pid in line)
    assert re.findall(r"[\w.+-]+", row)[-3:] == ["94.9", "-2.569", "stop_loss"]
    history = await asyncio.to_thread(CliRunner().invoke, app, ["history", pid, "--db", url])
    assert history.exit_code == 0, history.output
    lines = history.output.strip().splitlines()
    assert lines[0].endswith("--created--> OPENING  | size 0.5")
    assert lines[1].endswith("--entry_filled--> OPEN  | filled 0.5, price 100")
    assert lines[2].endswith("--stop_moved--> OPEN  | stop 95, mark 100")
    assert lines[3].endswith("--flat--> CLOSED_EXTERNAL stop_loss  | exit 94.9, pnl -2.55, fee 0.01898")


# --- a liquidation at the liquidation price -------------------------------------------------------------------


@pytest.mark.parametrize(("side", "liquidation", "mark_first", "pnl", "fee"), [
    # 60000 × (1 - 1/20 + 0.004); the market falls there first. (57240 - 60000) × 0.01; 57240 × 0.01 × 0.04 %
    (Side.LONG, D("57240.0"), True, D("-27.6"), D("0.22896")),
    # 60000 × (1 + 1/20 - 0.004), wherever the mark is. (60000 - 62760) × 0.01; 62760 × 0.01 × 0.04 %
    (Side.SHORT, D("62760.0"), False, D("-27.6"), D("0.25104")),
])
async def test_a_liquidation_fills_at_the_liquidation_price_and_the_closure_shows_the_loss(
        rig: Rig, side: Side, liquidation: D, mark_first: bool, pnl: D, fee: D) -> None:
    assert rig.repo is not None and rig.records is not None
    quantity = D("0.010")
    p = await rig.open(OpenCommand("BTCUSDT", side, quantity, stop_loss_pct=D(10)))  # beyond the liquidation
    entry = p.entry_price
    assert entry == D(60000)
    async with aiohttp.ClientSession() as session:
        for version in ("v2", "v3"):  # Binance's position risk answers carry it as liquidationPrice
            status, rows = await signed(session, rig.sim, rig.account, "GET", f"/fapi/{version}/positionRisk",
                                        symbol="BTCUSDT")
            assert status == 200 and D(rows[0]["liquidationPrice"]) == liquidation
    if mark_first:
        rig.set_mark("BTCUSDT", liquidation)
    rig.sim.venue.force_close(rig.account, "BTCUSDT", "liquidation")
    stored = await rig.ended(p.id)
    assert (stored.state, stored.close_cause, stored.exit_price) == \
        (PositionState.CLOSED_EXTERNAL, CloseCause.LIQUIDATION, liquidation)
    direction = 1 if side is Side.LONG else -1
    assert pnl == (liquidation - entry) * quantity * direction and fee == liquidation * quantity * TAKER_FEE
    records = rig.records
    await rig.until(lambda: any(c["position_id"] == p.id for c in records.read("closure")), what="the closure record")
    [record] = [c for c in records.read("closure") if c["position_id"] == p.id]
    assert D(record["exit_price"]) == liquidation and D(record["pnl"]) == pnl < 0
    assert D(record["fee"]) == fee and D(record["net_pnl"]) == pnl - fee  # the venue's commission, plumbed
    row = await rig.repo.closure(p.id)
    assert row is not None and (row["pnl"], row["fee"], row["net_pnl"]) == (pnl, fee, pnl - fee)
    assert row["detection_latency_ms"] is not None
