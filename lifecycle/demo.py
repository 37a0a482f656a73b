"""A scripted walk through the lifecycle on SQLite and the paper exchange: every ending once,
a refused event, a restart that rehydrates a live position, and a replay of every journal."""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal as D
from pathlib import Path

from db.repository import Repository
from exchange.paper import PaperExchange
from lifecycle.domain import CloseCause, CloseReason, OrderPurpose, OrderRef, Side, TrailingState
from lifecycle.engine import Engine
from lifecycle.errors import TransitionRefused
from lifecycle.events import (
    CloseFailed,
    CloseRequested,
    EntryFailed,
    EntryFilled,
    Flat,
    Reduced,
    StopMoved,
    TsActivated,
    Vanished,
)
from lifecycle.records import JsonlRecords
from lifecycle.replay import replay

ACCOUNT = "demo"


@dataclass
class DemoResult:
    database: Path
    records: Path
    rows: list[tuple[str, str, str, str, int]]  # symbol, position id, state, cause, journal rows
    refused: int
    rehydrated: int
    replay_ok: bool


async def _protect(engine: Engine, exchange: PaperExchange, position_id: str, stop: D, mark: D) -> None:
    """Place a stop on the paper exchange and record it: what issue 4's engine will do for real."""
    position = engine.positions[position_id]
    order = await exchange.place_order(
        OrderRef(
            client_id=f"lc{position_id}s{len(position.orders)}",
            position_id=position_id,
            symbol=position.symbol,
            purpose=OrderPurpose.STOP,
            side="sell" if position.side is Side.LONG else "buy",
            quantity=position.quantity,
            trigger_price=stop,
        )
    )
    await engine.track_order(position_id, order)
    await engine.fire(position_id, StopMoved(stop_price=stop, mark=mark, client_order_id=order.client_id))


async def run_demo(workdir: Path) -> DemoResult:
    workdir.mkdir(parents=True, exist_ok=True)
    db_path = workdir / "lifecycle.sqlite"
    records = JsonlRecords(workdir / "records")
    exchange = PaperExchange()
    url = f"sqlite:///{db_path}"
    repo = await Repository.open(url)
    engine = Engine(repo, canceller=exchange, records=records)
    refused = 0
    ids: list[str] = []

    async def opened(symbol: str, side: Side, qty: str, price: str, trailing: TrailingState | None = None) -> str:
        p = await engine.open_position(account=ACCOUNT, symbol=symbol, side=side, quantity=D(qty), trailing=trailing)
        await engine.fire(p.id, EntryFilled(quantity=D(qty), price=D(price)))
        ids.append(p.id)
        return p.id

    # 1. A trailing stop activates and follows; the bot closes: CLOSED, cause bot.
    btc = await opened("BTCUSDT", Side.LONG, "0.010", "60000", TrailingState(activation_price=D(61000), callback_rate=D("0.5")))
    await _protect(engine, exchange, btc, D(59000), D(60000))
    await engine.fire(btc, TsActivated(mark=D(61200)))
    await _protect(engine, exchange, btc, D("60894"), D(61200))
    try:  # a stop never moves backwards: refused, logged, counted, nothing changes
        await engine.fire(btc, StopMoved(stop_price=D(60500), mark=D(61000)))
    except TransitionRefused:
        refused += 1
    await engine.fire(btc, CloseRequested(reason=CloseReason.SIGNAL))
    await engine.fire(btc, Flat(exit_price=D(61150)))

    # 2. Our stop fills on the exchange: CLOSED_EXTERNAL, cause stop_loss.
    eth = await opened("ETHUSDT", Side.SHORT, "0.5", "3000")
    await _protect(engine, exchange, eth, D(3090), D(3000))
    await engine.fire(eth, Flat(cause=CloseCause.STOP_LOSS, exit_price=D(3090)))

    # 3. The entry never fills: CANCELLED.
    sol = await engine.open_position(account=ACCOUNT, symbol="SOLUSDT", side=Side.LONG, quantity=D(3))
    ids.append(sol.id)
    await engine.fire(sol.id, EntryFailed(reason="limit entry expired"))

    # 4. Gone from the exchange, confirmed twice, no closing fill: PHANTOM.
    xrp = await opened("XRPUSDT", Side.LONG, "100", "0.60")
    await engine.fire(xrp, Vanished(confirmations=2, grace_ms=0))

    # 5. Partial take-profit, a rejected bot close, then a liquidation: CLOSED_EXTERNAL, cause liquidation.
    doge = await opened("DOGEUSDT", Side.LONG, "1000", "0.20")
    await _protect(engine, exchange, doge, D("0.18"), D("0.20"))
    await engine.fire(doge, Reduced(remaining=D(600), price=D("0.22")))
    await engine.fire(doge, CloseRequested(reason=CloseReason.OPERATOR))
    await engine.fire(doge, CloseFailed(error="rejected: margin is insufficient"))
    await engine.fire(doge, Flat(cause=CloseCause.LIQUIDATION, exit_price=D("0.17")))

    # 6. A position that is still open when the process stops...
    ada = await opened("ADAUSDT", Side.SHORT, "500", "0.45", TrailingState(activation_price=D("0.40"), callback_rate=D(1)))
    await _protect(engine, exchange, ada, D("0.47"), D("0.45"))
    await repo.close()

    # ... is rehydrated by the next process from the database, trailing state and stop order included.
    repo = await Repository.open(url)
    engine = Engine(repo, canceller=exchange, records=records)
    rehydrated = await engine.rehydrate()
    await engine.fire(ada, TsActivated(mark=D("0.399")))
    await engine.fire(ada, CloseRequested(reason=CloseReason.MAX_AGE))
    await engine.fire(ada, Flat(exit_price=D("0.401")))

    rows = []
    replay_ok = True
    for pid in ids:
        stored = await repo.get_position(pid)
        assert stored is not None
        journal = await repo.journal(pid)
        replayed = await replay(journal)
        replay_ok &= (replayed.state, replayed.quantity, replayed.close_cause) == (
            stored.state,
            stored.quantity,
            stored.close_cause,
        )
        cause = stored.close_cause.value if stored.close_cause else "-"
        rows.append((stored.symbol, pid, stored.state.value, cause, len(journal)))
    await repo.close()
    if exchange.open_orders():
        raise RuntimeError(f"orders left open on the exchange: {exchange.open_orders()}")
    return DemoResult(db_path, records.directory, rows, refused, rehydrated, replay_ok)
