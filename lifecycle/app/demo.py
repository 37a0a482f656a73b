"""The demo: the venue simulator in-process, SQLite in a work directory, and the real service against it
(streams, reconciliation, scheduler, records), driven through a scripted scenario in which every ending
happens once: a bot close, a stop-loss fill, a trailing-stop fill, a liquidation (the market falls to the
position's liquidation price first), an ADL (of a short in profit), a manual close by another client, a
phantom, and a close that a stale REST snapshot still hides but the stream catches. The summary shows each
ending's exit price and PnL net of the closing fee.

The simulator's throw-away key and secret reach the service the way a real deployment's do: through
environment variables named in the configuration (LIFECYCLE_DEMO_API_KEY / LIFECYCLE_DEMO_SECRET; set
them to choose the values, e.g. to search every output for them afterwards).

The live page is served while the demo runs (`page_port`, 8780 unless taken, then a free one): `announce`
is told its address and the token to log in with. The token is LIFECYCLE_API_TOKEN when set (then it is not
shown: the user knows it), else one made up for this run and shown on the terminal only (never logged): it
opens nothing but this demo's page on loopback, against a simulated venue.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal as D
from pathlib import Path
from typing import Any

from exchange.port import StreamHealth
from exchange.sim.server import SimServer
from exchange.sim.venue import SymbolSpec, Venue, VenueConfig
from lifecycle.app.service import Service
from lifecycle.app.settings import Settings, service_config
from lifecycle.domain import CloseCause, CloseReason, Side
from lifecycle.live import LiveEngine, OpenCommand
from lifecycle.machines.states import PositionState as S
from lifecycle.replay import replay

KEY_ENV, SECRET_ENV = "LIFECYCLE_DEMO_API_KEY", "LIFECYCLE_DEMO_SECRET"
TOKEN_ENV = "LIFECYCLE_API_TOKEN"
PAGE_PORT = 8780
ACCOUNT = "demo"
VENUE = VenueConfig(symbols=(*VenueConfig().symbols,
                             SymbolSpec("BNBUSDT", "BNB", D("0.01"), D("0.01"), D("0.01"), D(600)),
                             SymbolSpec("LTCUSDT", "LTC", D("0.01"), D("0.001"), D("0.001"), D(80))))


@dataclass
class Scenario:
    name: str
    symbol: str
    side: Side
    quantity: D
    expect: tuple[S, CloseCause]
    stop_loss_pct: D = D(1)
    trailing: bool = False
    position_id: str | None = None


SCENARIOS = [
    Scenario("bot close", "BTCUSDT", Side.LONG, D("0.01"), (S.CLOSED, CloseCause.BOT)),
    Scenario("stop-loss fill", "ETHUSDT", Side.SHORT, D("0.1"), (S.CLOSED_EXTERNAL, CloseCause.STOP_LOSS)),
    Scenario("trailing-stop fill", "SOLUSDT", Side.LONG, D(1), (S.CLOSED_EXTERNAL, CloseCause.TRAILING_STOP),
             stop_loss_pct=D(2), trailing=True),
    Scenario("liquidation", "XRPUSDT", Side.LONG, D(100), (S.CLOSED_EXTERNAL, CloseCause.LIQUIDATION), D(5)),
    Scenario("ADL", "DOGEUSDT", Side.SHORT, D(100), (S.CLOSED_EXTERNAL, CloseCause.ADL), D(5)),
    Scenario("manual close by another client", "ADAUSDT", Side.LONG, D(100),
             (S.CLOSED_EXTERNAL, CloseCause.MANUAL), D(5)),
    Scenario("phantom", "BNBUSDT", Side.LONG, D("0.1"), (S.PHANTOM, CloseCause.NOT_FOUND), D(5)),
    Scenario("stale REST, the stream catches the close", "LTCUSDT", Side.SHORT, D(1),
             (S.CLOSED_EXTERNAL, CloseCause.MANUAL), D(5)),
]


@dataclass
class Ending:
    state: str
    cause: str | None
    detection_ms: float | None
    exit_price: D | None = None
    net_pnl: D | None = None  # the closing fill's realized PnL less its fee (the closure record's net_pnl)


@dataclass
class DemoResult:
    workdir: Path
    scenarios: list[Scenario]
    endings: dict[str, Ending] = field(default_factory=dict)  # by position id
    first_open_s: float | None = None
    duration_s: float = 0.0
    replay_ok: bool = False
    page_url: str | None = None  # the live page's address while the demo ran

    def ok(self, s: Scenario) -> bool:
        ending = self.endings.get(s.position_id or "")
        return ending is not None and (ending.state, ending.cause) == (s.expect[0].value, s.expect[1].value)

    @property
    def all_ok(self) -> bool:
        return all(self.ok(s) for s in self.scenarios) and self.replay_ok


async def run_demo(workdir: Path, *, pace: float = 1.0, forever: bool = False,
                   show: Callable[[Callable[[], Any]], Any] | None = None, page_port: int | None = PAGE_PORT,
                   announce: Callable[[str, str | None], None] | None = None,
                   stop: asyncio.Event | None = None) -> DemoResult:
    """Play the scenario; `show(render)` (a live display) is given a function returning the current rows.
    `page_port` None: no page. `stop` ends a `forever` run (as SIGINT/SIGTERM do)."""
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    sim = await SimServer(Venue(VENUE), mark_interval_s=0.5).start()
    key = os.environ.get(KEY_ENV) or secrets.token_hex(16)
    secret = os.environ.get(SECRET_ENV) or secrets.token_hex(32)
    venue_account = sim.venue.add_account(ACCOUNT, api_key=key, secret=secret)
    os.environ[KEY_ENV], os.environ[SECRET_ENV] = key, secret
    shown_token = None
    if page_port is not None and not os.environ.get(TOKEN_ENV):
        shown_token = os.environ[TOKEN_ENV] = secrets.token_urlsafe(18)
    page = {"enabled": False} if page_port is None else {"enabled": True, "port": _port_or_free(page_port)}
    settings = Settings.without_environment(
        database_url=f"sqlite:///{workdir / 'lifecycle.sqlite'}", log_dir=workdir / "logs",
        accounts=[{"name": ACCOUNT, "symbols": [s.symbol for s in VENUE.symbols], "urls": sim.ccxt_urls(),
                   "api_key_env": KEY_ENV, "secret_env": SECRET_ENV, "rate_limit": False,
                   "reconnect_backoff_max_s": 1.0}],
        live={"trail_min_interval_s": 0.3, "cause_wait_s": 0.5},
        schedule={"sync_interval_s": 5, "fast_sync_interval_s": 0.5, "orphan_interval_s": 10},
        reconcile={"grace_ms": 500, "phantom_after_s": 1.0}, api=page,
        records={"dir": workdir / "records"}, shutdown_drain_s=5)
    service = Service(service_config(settings))
    result = DemoResult(workdir, [Scenario(**s.__dict__) for s in SCENARIOS])
    endings = result.endings

    def on_record(record: dict[str, Any]) -> None:
        if record.get("event") == "closure":
            exit_price, net_pnl = record.get("exit_price"), record.get("net_pnl")
            endings[str(record["position_id"])] = Ending(str(record.get("state")), record.get("cause"),
                                                         record.get("detection_latency_ms"),
                                                         D(exit_price) if exit_price is not None else None,
                                                         D(net_pnl) if net_pnl is not None else None)

    handle_signals = stop is None  # a caller's own event ends the run; else SIGINT/SIGTERM do
    stop = stop or asyncio.Event()
    try:
        await service.start()
        if service.api is not None and announce is not None:
            result.page_url = service.api.url
            announce(service.api.url, shown_token)
        assert service.records is not None
        service.records.listeners.append(on_record)
        live = service.accounts[ACCOUNT].live
        assert live is not None
        display = show(lambda: rows(result, live)) if show is not None else contextlib.nullcontext()
        with display:
            await _play(result, live, sim, venue_account, pace, started)
            if forever:
                loop = asyncio.get_running_loop()
                if handle_signals:
                    for sig in (signal.SIGINT, signal.SIGTERM):
                        loop.add_signal_handler(sig, stop.set)
                await _forever(result, live, sim, stop)
    finally:
        await service.stop()
        await sim.stop()
        if shown_token is not None:
            os.environ.pop(TOKEN_ENV, None)  # made up for this run: not left behind for the process
    result.replay_ok = await _replay_all(workdir)
    result.duration_s = time.monotonic() - started
    return result


async def _play(result: DemoResult, live: LiveEngine, sim: SimServer, account: Any, pace: float,
                started: float) -> None:
    venue = sim.venue
    by_name = {s.name: s for s in result.scenarios}

    async def until(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise TimeoutError(f"demo: {what} did not happen within {timeout} s")
            await asyncio.sleep(0.02)

    def state(s: Scenario) -> S | None:
        p = live.engine.positions.get(s.position_id or "")
        if p is not None:
            return p.state
        ending = result.endings.get(s.position_id or "")
        return S(ending.state) if ending else None

    def ended(s: Scenario) -> Callable[[], bool]:
        return lambda: (s.position_id or "") in result.endings

    async def pause(factor: float = 1.0) -> None:
        await asyncio.sleep(pace * factor)

    def mark(symbol: str) -> D:
        return venue.marks[symbol]

    def move(symbol: str, pct: str) -> None:
        venue.set_mark(symbol, mark(symbol) * (1 + D(pct) / 100))

    async def glide(symbol: str, target: D, steps: int = 4) -> None:
        """The mark walks to `target` in a few steps: a market moving, not a jump."""
        start = mark(symbol)
        for i in range(1, steps + 1):
            venue.set_mark(symbol, start + (target - start) * i / steps)
            await pause(0.25)

    # Open everything; the initial stops follow the fills.
    for s in result.scenarios:
        m = mark(s.symbol)
        up = 1 if s.side is Side.LONG else -1
        command = OpenCommand(s.symbol, s.side, s.quantity, stop_loss_pct=s.stop_loss_pct,
                              trailing_activation=m * (1 + D("0.005") * up) if s.trailing else None,
                              trailing_callback_pct=D("0.5") if s.trailing else None)
        s.position_id = (await live.open(command)).id
    first = result.scenarios[0]
    await until("the first position opening", lambda: state(first) is S.OPEN)
    result.first_open_s = time.monotonic() - started
    await until("every initial stop", lambda: all(
        (p := live.engine.positions.get(s.position_id or "")) is not None and p.stop_price is not None
        for s in result.scenarios))
    await pause(2)

    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []

    async def bot_close() -> None:
        await live.close(by_name["bot close"].position_id or "", CloseReason.SIGNAL)

    async def stop_loss() -> None:
        move("ETHUSDT", "1.2")  # a short's stop is 1 % above the entry

    async def trailing() -> None:
        sol = by_name["trailing-stop fill"]
        for _ in range(4):  # up past the activation (+0.5 %), the stop follows 0.5 % behind
            move("SOLUSDT", "0.4")
            await pause(0.5)

        def followed() -> bool:
            p = live.engine.positions.get(sol.position_id or "")
            return p is not None and p.stop_price is not None and p.stop_price >= mark("SOLUSDT") * D("0.993")

        await until("the trailing stop following the price", followed)
        await pause(0.5)
        move("SOLUSDT", "-1")  # back down through the trailing stop

    async def forced(kind: str, symbol: str) -> None:
        venue.force_close(account, symbol, kind)

    async def liquidation() -> None:
        # The market falls to the long's liquidation price (4.6 % below its entry at the simulator's 20x,
        # above its 5 % stop), where the venue's liquidation engine takes it over: a loss of most of the margin.
        price = venue.liquidation_price(account, "XRPUSDT")
        assert price is not None
        await glide("XRPUSDT", price)
        venue.force_close(account, "XRPUSDT", "liquidation")

    async def adl() -> None:
        # ADL takes a position in profit (it closes the other side of someone's liquidation): the market falls
        # 3 % first, in favour of this short, which is closed at the mark.
        await glide("DOGEUSDT", mark("DOGEUSDT") * D("0.97"))
        venue.force_close(account, "DOGEUSDT", "adl")

    async def phantom() -> None:
        # The private stream goes down (reconnections refused) and the position disappears from the venue
        # with no fill at all: only the REST sync can notice, and nothing explains the absence.
        sim.set_faults(user_stream_down=True)
        await sim.drop_streams()
        await pause(0.5)
        venue.vanish(account, "BNBUSDT")
        await until("the phantom", ended(by_name["phantom"]))
        sim.set_faults(user_stream_down=False)
        await until("the private streams back", lambda: all(
            live.exchange.health.get(name) is StreamHealth.HEALTHY for name in ("positions", "orders")),
            timeout=60)

    async def stale_rest() -> None:
        sim.set_faults(stale_positions_s=30)  # REST keeps showing the position for 30 s
        await pause(0.5)
        venue.force_close(account, "LTCUSDT", "manual")
        await until("the stale-REST close", ended(by_name["stale REST, the stream catches the close"]))
        sim.set_faults(stale_positions_s=0)

    steps = [
        ("bot close", bot_close), ("stop-loss fill", stop_loss), ("trailing-stop fill", trailing),
        ("liquidation", liquidation), ("ADL", adl),
        ("manual close by another client", lambda: forced("manual", "ADAUSDT")),
        ("phantom", phantom), ("stale REST, the stream catches the close", stale_rest),
    ]
    for name, step in steps:
        await step()
        await until(name, ended(by_name[name]))
        await pause(1.5)


async def _forever(result: DemoResult, live: LiveEngine, sim: SimServer, stop: asyncio.Event) -> None:
    """Random-walk market and trailing positions, reopened as they end, until stopped."""
    sim.start_random_walk(volatility=0.002, seed=int(time.time()))
    symbols = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
    while not stop.is_set():
        for symbol in symbols:
            if live.engine.live_position(ACCOUNT, symbol, Side.LONG) is None:
                m = sim.venue.marks[symbol]
                spec = next(s for s in VENUE.symbols if s.symbol == symbol)
                quantity = max(spec.min_qty, (D(600) / m).quantize(spec.step))
                p = await live.open(OpenCommand(symbol, Side.LONG, quantity, stop_loss_pct=D(1),
                                                trailing_activation=m * D("1.003"), trailing_callback_pct=D("0.4")))
                result.scenarios.append(Scenario(f"random walk #{len(result.scenarios) - 7}", symbol, Side.LONG,
                                                 quantity, (S.CLOSED_EXTERNAL, CloseCause.TRAILING_STOP),
                                                 trailing=True, position_id=p.id))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


def _port_or_free(port: int) -> int:
    """`port` when nothing listens on it on loopback, else 0 (the system picks a free one)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


async def _replay_all(workdir: Path) -> bool:
    from db.repository import Repository

    repo = await Repository.open(f"sqlite:///{workdir / 'lifecycle.sqlite'}", run_migrations=False)
    try:
        for p in await repo.list_positions():
            if (await replay(await repo.journal(p.id))).state is not p.state:
                return False
        return True
    finally:
        await repo.close()


def rows(result: DemoResult, live: LiveEngine) -> list[list[str]]:
    """The live table: one row per scenario."""
    out = []
    for s in result.scenarios:
        p = live.engine.positions.get(s.position_id or "")
        ending = result.endings.get(s.position_id or "")
        if p is not None:
            trailing = "-" if p.trailing is None else ("active" if p.trailing.active else "waiting")
            out.append([s.name, s.symbol, s.side.value, p.state.value, str(p.quantity), str(p.entry_price or "-"),
                        str(live.marks.get(s.symbol, "-")), str(p.stop_price or "-"), trailing, "", ""])
        elif ending is not None:
            latency = f"{ending.detection_ms:.0f} ms" if ending.detection_ms is not None else "-"
            out.append([s.name, s.symbol, s.side.value, ending.state, "", "", str(live.marks.get(s.symbol, "-")),
                        "", "", ending.cause or "", latency])
        else:
            out.append([s.name, s.symbol, s.side.value, "-", "", "", "", "", "", "", ""])
    return out


COLUMNS = ["scenario", "symbol", "side", "state", "size", "entry", "mark", "stop", "trailing", "cause", "detected"]
