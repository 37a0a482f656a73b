"""A live engine wired to real parts: the venue simulator through unmodified ccxt, a SQLite file or a
PostgreSQL database, JSON-lines records. Used by the live-engine tests and the benchmarks."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal as D
from pathlib import Path
from typing import Any

from loguru import logger

from db.repository import Repository
from exchange.ccxt_adapter import CcxtExchange, ExchangeSettings
from exchange.secret import Secret
from exchange.sim.server import SimServer
from exchange.sim.venue import Account, SimAlgo, SimOrder, SymbolSpec, VenueConfig
from lifecycle.client_ids import parse_client_id
from lifecycle.domain import Position
from lifecycle.engine import Engine
from lifecycle.live import LiveConfig, LiveEngine, OpenCommand
from lifecycle.machines.states import PositionState
from lifecycle.records import JsonlRecords

SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT", "ADAUSDT"]
FAST = LiveConfig(trail_min_interval_s=0, retry_backoff_s=0.02, cause_wait_s=0.5)


def many_symbols(n: int) -> VenueConfig:
    """A venue with `n` made-up symbols (S0000USDT, ...), for runs with many positions (one per symbol and
    side in one-way mode)."""
    return VenueConfig(symbols=tuple(SymbolSpec(f"S{i:04d}USDT", f"S{i:04d}", D("0.01"), D("0.1"), D("0.1"),
                                                D(100) + i) for i in range(n)))


def settings_for(sim: SimServer, account: Account) -> ExchangeSettings:
    return ExchangeSettings(api_key=Secret(account.api_key), secret=Secret(account.secret), urls=sim.ccxt_urls(),
                            user_probe_after_s=0.5, market_silent_after_s=5.0, backoff_initial_s=0.05,
                            backoff_max_s=0.2, rate_limit=False)


@dataclass
class Rig:
    sim: SimServer
    account: Account
    db_url: str
    records_dir: Path
    config: LiveConfig = FAST
    symbols: list[str] = field(default_factory=lambda: list(SYMBOLS))
    settings: ExchangeSettings | None = None  # default: settings_for() (quick probes and reconnects)
    exchange: CcxtExchange | None = None
    repo: Repository | None = None
    engine: Engine | None = None
    live: LiveEngine | None = None
    records: JsonlRecords | None = None
    log: list[tuple[str, str]] = field(default_factory=list)  # (level, message) of WARNING and above
    _sink: int | None = None

    async def start(self) -> Rig:
        self._sink = logger.add(lambda m: self.log.append((m.record["level"].name, m.record["message"])),
                                level="WARNING")
        self.exchange = await CcxtExchange(self.settings or settings_for(self.sim, self.account)).start()
        self.repo = await Repository.open(self.db_url)
        self.records = JsonlRecords(self.records_dir)
        self.engine = Engine(self.repo, canceller=self.exchange, records=self.records)
        await self.engine.rehydrate([self.account.name])
        self.live = await LiveEngine(self.engine, self.exchange, account=self.account.name, symbols=self.symbols,
                                     config=self.config).start()
        await self.live.wait_ready()
        return self

    async def stop(self) -> None:
        if self.live is not None:
            await self.live.stop()
        if self.engine is not None:
            await self.engine.books.close(2.0)
        if self.exchange is not None:
            await self.exchange.close()
        if self.records is not None:
            self.records.close(2.0)
        if self.repo is not None:
            await self.repo.close()
        if self._sink is not None:
            logger.remove(self._sink)
            self._sink = None

    async def restart(self) -> None:
        """A new process: new client, new engine, state from the database only, restart recovery."""
        await self.stop()
        self.exchange = self.repo = self.engine = self.live = None
        await self.start()
        assert self.live is not None
        await self.live.recover(retry_s=0.05)

    # --- helpers ---------------------------------------------------------------------------------

    async def open(self, command: OpenCommand, expect: PositionState = PositionState.OPEN) -> Position:
        assert self.live is not None and self.engine is not None
        position = await self.live.open(command)

        def reached() -> bool:
            assert self.engine is not None
            return self.state(position.id) is expect and (
                expect is not PositionState.OPEN or self.engine.positions[position.id].stop_price is not None)

        await self.until(reached)
        await self.live.idle()
        return self.engine.positions[position.id]

    def age_s(self, position_id: str) -> float:
        """Seconds since the live position was created, by the engine's clock."""
        assert self.engine is not None
        return (self.engine.clock() - self.engine.positions[position_id].created_at).total_seconds()

    def state(self, position_id: str) -> PositionState | None:
        assert self.engine is not None
        p = self.engine.positions.get(position_id)
        return p.state if p is not None else None

    async def stored(self, position_id: str) -> Position:
        assert self.repo is not None
        p = await self.repo.get_position(position_id)
        assert p is not None
        return p

    async def until(self, predicate: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> float:
        """Wait for `predicate` (until it returns something true); returns the seconds it took."""
        started = time.monotonic()
        while not predicate():
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{what} not reached within {timeout}s")
            await asyncio.sleep(0.005)
        return time.monotonic() - started

    async def ended(self, position_id: str, timeout: float = 5.0) -> Position:
        assert self.engine is not None and self.live is not None

        def gone() -> bool:
            assert self.engine is not None
            return position_id not in self.engine.positions

        await self.until(gone, timeout, f"end of {position_id}")
        await self.live.idle()
        return await self.stored(position_id)

    def our_open_orders(self) -> list[Any]:
        venue = self.sim.venue
        working: list[SimOrder | SimAlgo] = [*venue.open_orders(self.account, None),
                                             *venue.open_algos(self.account, None)]
        return [o for o in working if parse_client_id(o.client_id) is not None]

    def stop_algos(self, symbol: str) -> list[Any]:
        return [a for a in self.sim.venue.open_algos(self.account, symbol) if a.order_type == "STOP_MARKET"]

    def set_mark(self, symbol: str, price: str | int | D) -> None:
        self.sim.venue.set_mark(symbol, D(str(price)))

    def alarms(self) -> list[tuple[str, str]]:
        return [entry for entry in self.log if entry[0] in {"WARNING", "ERROR", "CRITICAL"}]
