"""One schedule run against real parts: the venue simulator (here), the real `Service` (in this process, or
as a `lifecycle run` process for the schedules that kill it), unmodified ccxt, SQLite or PostgreSQL, the
JSON-lines records.

The world keeps the ground truth while it runs: a listener on the simulator's own event feed (`Ledger`) sees
every fill and every stop as the venue does it, knows who opened each venue position (our entry, or someone
else), who flattened it (our stop, take-profit or close, a liquidation, an ADL, a settlement, a person) and
when, and every interval in which a position of ours was on the venue without a working stop of ours.
After the faults clear the world waits (with a deadline) for the books and the venue to agree, then
`chaos.checks` judges.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import ROUND_DOWN
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import aiohttp
from loguru import logger

from chaos.schedule import BLINDING, QTY, Schedule, Step
from db.repository import Repository
from exchange.ccxt_adapter import ExchangeSettings, Secret
from exchange.sim.server import SimServer
from exchange.sim.venue import Account, SimAlgo, SimError, SimOrder
from lifecycle.app.service import AccountConfig, Service, ServiceConfig
from lifecycle.client_ids import parse_client_id
from lifecycle.domain import CloseReason, OrderPurpose, Side
from lifecycle.live import LiveConfig, OpenCommand
from lifecycle.reconciler import ReconcileConfig
from scheduler.jobs import ScheduleConfig
from tests.storage_faults import DriverErrors

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Tuning:
    """The service's settings in a chaos run: the production mechanisms, with intervals short enough that a
    schedule of a second or two settles in a few more. The bounds of chaos.checks are derived from these."""

    live: LiveConfig = field(default_factory=lambda: LiveConfig(
        trail_min_interval_s=0, retry_backoff_s=0.05, cause_wait_s=0.3, cause_rest_timeout_s=1.0,
        unprotected_close_after_s=2.0))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(
        sync_interval_s=1.0, fast_sync_interval_s=0.25, orphan_interval_s=1.0))
    reconcile: ReconcileConfig = field(default_factory=lambda: ReconcileConfig(
        grace_ms=300, phantom_after_s=1.5, stream_doubt_s=2.0))
    storage_timeout_s: float = 0.3
    shutdown_drain_s: float = 2.0
    user_probe_after_s: float = 0.5
    market_silent_after_s: float = 3.0
    sim_timeout_s: float = 1.0  # how long the simulator's `timeouts` fault hangs a call
    settle_s: float = 15.0  # how long the books may take to agree with the venue once the faults cleared


@dataclass
class Interval:
    """A position of ours on the venue without a working stop of ours, from `start` to `end` (wall clock)."""
    position_id: str
    symbol: str
    start: float
    reason: str  # initial / own_cancel / venue_cancel / expired / triggered / other
    end: float | None = None


@dataclass
class Flatten:
    """A venue position of ours that went flat (or changed hands), as the venue did it."""
    position_id: str
    symbol: str
    at: float
    client_id: str | None  # the flattening order's; None: it vanished without a fill
    flipped: bool = False
    netted: bool = False  # our entry met someone else's opposite position: no fill after our entry explains it


@dataclass
class Ledger:
    """Ground truth from the simulator's event feed (synchronous: it sees every change as it happens)."""
    sim: SimServer
    account: Account
    symbols: tuple[str, ...]
    owner: dict[str, str | None] = field(default_factory=dict)  # symbol -> our position id, "foreign" or None
    opened: dict[str, float] = field(default_factory=dict)  # our position id -> when its entry first filled
    entry_filled: set[str] = field(default_factory=set)
    flattened: dict[str, Flatten] = field(default_factory=dict)  # our position id -> how it ended on the venue
    # Our entry that landed on someone else's same-side position (opened while ours was on its way): one
    # venue position, two holders. Not judged for protection or settling (the symbol stays "foreign"); the
    # position's end must match one of the orders that reduced or flattened the shared position.
    joined: dict[str, str] = field(default_factory=dict)  # our position id -> symbol
    reduced: dict[str, list[str]] = field(default_factory=dict)  # our position id -> reducing client ids
    intervals: list[Interval] = field(default_factory=list)
    venue_cancelled: set[str] = field(default_factory=set)  # client ids the venue (a step) cancelled
    anomalies: list[str] = field(default_factory=list)
    _amount: dict[str, D] = field(default_factory=dict)
    _open_interval: dict[str, Interval] = field(default_factory=dict)  # symbol -> its running interval
    _foreign_by: dict[str, str | None] = field(default_factory=dict)  # symbol -> the order that opened it
    strays: list[Interval] = field(default_factory=list)  # stops of ours for another position than the holder
    _stray_open: dict[str, Interval] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sim.venue.user_listeners.append(self.on_event)

    def detach(self) -> None:
        with contextlib.suppress(ValueError):
            self.sim.venue.user_listeners.remove(self.on_event)  # intervals still open keep end=None: judged

    def on_event(self, account_name: str, event: dict[str, Any]) -> None:
        if account_name != self.account.name:
            return
        now = time.time()
        reason = "other"
        if event.get("e") == "ORDER_TRADE_UPDATE" and event["o"].get("x") == "TRADE":
            self._on_trade(event["o"], now)
            reason = "initial"
        elif event.get("e") == "ALGO_UPDATE":
            body = event["o"]
            status = body.get("X")
            reason = {"CANCELED": "venue_cancel" if body.get("caid") in self.venue_cancelled else "own_cancel",
                      "EXPIRED": "expired", "TRIGGERING": "triggered"}.get(status, "other")
        for symbol in self.symbols:
            self._check_protection(symbol, now, reason)
            self._check_strays(symbol, now)

    def _on_trade(self, order: dict[str, Any], now: float) -> None:
        symbol = order["s"]
        before = self._amount.get(symbol, D(0))
        after = self.sim.venue.position(self.account, symbol).amount
        self._amount[symbol] = after
        client_id = order.get("c")
        parsed = parse_client_id(client_id)
        owner = self.owner.get(symbol)
        if parsed is not None and parsed.purpose is OrderPurpose.ENTRY:
            self.entry_filled.add(parsed.position_id)
        if before == 0 and after != 0:
            if parsed is not None and parsed.purpose is OrderPurpose.ENTRY:
                self.owner[symbol] = parsed.position_id
                self.opened.setdefault(parsed.position_id, now)
            else:
                self.owner[symbol] = "foreign"
                self._foreign_by[symbol] = client_id
            return
        if before != 0 and (after == 0 or (after > 0) != (before > 0)):
            if owner not in (None, "foreign"):
                self.flattened[owner] = Flatten(owner, symbol, now, client_id, flipped=after != 0)
            elif owner == "foreign" and parsed is not None and parsed.purpose is OrderPurpose.ENTRY:
                # Our entry met someone else's opposite position (opened while ours was on its way): netted,
                # ours never stood alone; it ended by that order, as far as anyone can tell.
                self.opened.setdefault(parsed.position_id, now)
                self.flattened[parsed.position_id] = Flatten(parsed.position_id, symbol, now,
                                                             self._foreign_by.get(symbol), netted=True)
            for position_id in self._joined_on(symbol):
                self.flattened[position_id] = Flatten(position_id, symbol, now, client_id, flipped=after != 0)
            if after == 0:
                self.owner[symbol] = None
            elif parsed is not None and parsed.purpose is OrderPurpose.ENTRY:
                self.anomalies.append(f"entry {client_id} flipped the venue position of {owner} on {symbol}")
                self.owner[symbol] = parsed.position_id
            else:
                self.owner[symbol] = "foreign"
            return
        if abs(after) > abs(before):  # added to
            if parsed is None or parsed.purpose is not OrderPurpose.ENTRY or parsed.position_id != owner:
                if owner not in (None, "foreign"):
                    self.anomalies.append(f"order {client_id} added to the venue position of {owner} on {symbol}")
                elif owner == "foreign" and parsed is not None and parsed.purpose is OrderPurpose.ENTRY:
                    self.joined[parsed.position_id] = symbol
                    self.opened.setdefault(parsed.position_id, now)
        elif owner not in (None, "foreign"):
            self.reduced.setdefault(owner, []).append(client_id or "")
        else:
            if owner == "foreign" and parsed is not None and parsed.purpose is OrderPurpose.ENTRY:
                # Our entry (part of it) met someone else's larger opposite position: netted, never stood alone.
                self.opened.setdefault(parsed.position_id, now)
                self.flattened.setdefault(parsed.position_id, Flatten(parsed.position_id, symbol, now,
                                                                      self._foreign_by.get(symbol), netted=True))
            for position_id in self._joined_on(symbol):
                self.reduced.setdefault(position_id, []).append(client_id or "")

    def _joined_on(self, symbol: str) -> list[str]:
        return [p for p, s in self.joined.items() if s == symbol and p not in self.flattened]

    def vanished(self, symbol: str) -> None:
        """The `vanish` actor: no event, no fill; the position is simply gone."""
        owner = self.owner.get(symbol)
        for position_id in [owner] if owner not in (None, "foreign") else self._joined_on(symbol):
            self.flattened[position_id] = Flatten(position_id, symbol, time.time(), None)
        self.owner[symbol] = None
        self._amount[symbol] = D(0)
        self._check_protection(symbol, time.time(), "other")

    def ours(self, symbol: str) -> str | None:
        owner = self.owner.get(symbol)
        return owner if owner not in (None, "foreign") else None

    def our_stops(self, symbol: str, position_id: str) -> list[Any]:
        return [a for a in self.sim.venue.open_algos(self.account, symbol) if a.order_type == "STOP_MARKET"
                and (p := parse_client_id(a.client_id)) is not None and p.position_id == position_id]

    def _check_strays(self, symbol: str, now: float) -> None:
        """A conditional order of ours for another position, working while a position of ours holds the
        symbol: it could close the wrong position (interval, judged like an unprotected one)."""
        owner = self.ours(symbol)
        working = set()
        if owner is not None:
            for algo in self.sim.venue.open_algos(self.account, symbol):
                parsed = parse_client_id(algo.client_id)
                if parsed is not None and parsed.position_id != owner:
                    working.add(algo.client_id)
        for client_id in working - set(self._stray_open):
            interval = Interval(owner or "", symbol, now, f"stray {client_id}")
            self.strays.append(interval)
            self._stray_open[client_id] = interval
        for client_id in set(self._stray_open) - working:
            self._stray_open.pop(client_id).end = now

    def _check_protection(self, symbol: str, now: float, reason: str) -> None:
        position_id = self.ours(symbol)
        amount = self.sim.venue.position(self.account, symbol).amount
        running = self._open_interval.get(symbol)
        protected = True
        if position_id is not None and amount != 0:
            closing = "SELL" if amount > 0 else "BUY"
            protected = any(a.side == closing for a in self.our_stops(symbol, position_id))
        if running is not None and (protected or running.position_id != position_id):
            running.end = now
            del self._open_interval[symbol]
            running = None
        if not protected and running is None and position_id is not None:
            interval = Interval(position_id, symbol, now, reason)
            self.intervals.append(interval)
            self._open_interval[symbol] = interval


@dataclass
class Outcome:
    """What one command did: the position it created, or the exception it raised (type and message)."""
    step: Step
    at: float
    position_id: str | None = None
    error: str | None = None
    error_type: str | None = None


@dataclass
class Run:
    """Everything the checks need about one finished run."""
    schedule: Schedule
    tuning: Tuning
    ledger: Ledger
    t0: float
    clear_at: float  # wall clock: every fault off
    windows: list[tuple[float, float, str]]  # blinding faults (wall clock), with the kill's downtime
    outcomes: list[Outcome]
    applied: dict[str, int]  # kind -> how many steps had an effect
    skipped: dict[str, int]  # kind -> how many steps found nothing to act on
    settled_in: float | None  # seconds from clear to agreement (None: never agreed)
    venue_problems: list[str]  # tests.invariants.violations at the end
    positions: list[Any]  # every stored position of the account
    journals: dict[str, list[Any]]
    closures: dict[str, dict[str, Any] | None]
    trailing_left: list[str]  # terminal positions with a trailing row
    records: list[dict[str, Any]]
    output: str  # every log line and record text the service wrote (for the secrets check)
    secrets: tuple[str, ...]
    restarts: int = 0
    notes: list[str] = field(default_factory=list)
    venue: list[str] = field(default_factory=list)  # the account's orders as the venue ended them (evidence)
    stored_secret: bool = False  # an API key or secret found in the database's files


class WorldError(Exception):
    """The harness could not run the schedule (not a finding about the engine)."""


class _Handle:
    """The service under test: in this process, or a real `lifecycle run` process."""

    account_name: str

    async def start(self) -> None: raise NotImplementedError
    async def open(self, command: OpenCommand) -> str: raise NotImplementedError
    async def close(self, position_id: str) -> bool: raise NotImplementedError
    async def live_ids(self, symbol: str) -> list[str]: raise NotImplementedError
    async def stop(self) -> None: raise NotImplementedError
    async def kill(self) -> None: raise NotImplementedError
    def output(self) -> str: raise NotImplementedError

    def repo(self) -> Repository | None:
        return None


class InProcess(_Handle):
    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.account_name = config.accounts[0].name
        self.service: Service | None = None
        self.lines: list[str] = []
        self._sink: int | None = None
        self.db_errors: DriverErrors | None = None

    async def start(self) -> None:
        self._sink = logger.add(lambda m: self.lines.append(m), level="INFO", format="{level} {message}")
        self.service = await Service(self.config).start()
        # Its hooks go in now, before the fault (installing them while the SQLite writer's thread dispatches
        # the same event is not safe); the fault only switches them.
        self.db_errors = DriverErrors(self.service.repo) if self.service.repo is not None else None

    @property
    def live(self) -> Any:
        assert self.service is not None
        return self.service.accounts[self.account_name].live

    async def open(self, command: OpenCommand) -> str:
        return (await self.live.open(command)).id

    async def close(self, position_id: str) -> bool:
        return await self.live.close(position_id, CloseReason.SIGNAL)

    async def live_ids(self, symbol: str) -> list[str]:
        engine = self.service.accounts[self.account_name].engine if self.service else None
        return [p.id for p in (engine.positions.values() if engine else []) if p.symbol == symbol]

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stop()
        if self._sink is not None:
            logger.remove(self._sink)
            self._sink = None

    async def kill(self) -> None:
        raise WorldError("an in-process service cannot be killed")

    def output(self) -> str:
        return "".join(self.lines)

    def repo(self) -> Repository | None:
        return self.service.repo if self.service is not None else None


class Child(_Handle):
    """`python -m lifecycle.app.cli run --config ...`: a real service process, commanded over its control API."""

    def __init__(self, workdir: Path, toml: str, env: dict[str, str], port: int, token: str, account: str) -> None:
        self.workdir = workdir
        self.config_path = workdir / "lifecycle.toml"
        self.config_path.write_text(toml, encoding="utf-8")
        self.env = env
        self.port = port
        self.token = token
        self.account_name = account
        self.proc: asyncio.subprocess.Process | None = None
        self.logs: list[Path] = []
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Start the process and wait until it is healthy. Its API port was free when it was picked, but any
        process's outgoing connection may take it as its local port before the service listens (CI, seed 430: the
        service exited with "Address already in use"): then it starts again on another free port."""
        for _ in range(PORT_TRIES - 1):
            try:
                await self._start()
                return
            except _PortTaken:
                self.port = _free_port()
                config = self.config_path.read_text(encoding="utf-8")
                self.config_path.write_text(re.sub(r"(?m)^port = \d+$", f"port = {self.port}", config, count=1),
                                            encoding="utf-8")
        await self._start()

    async def _start(self) -> None:
        if self.session is None:
            self.session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.token}"},
                                                 timeout=aiohttp.ClientTimeout(total=10))
        log = self.workdir / f"service-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as sink:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lifecycle.app.cli", "run", "--config", str(self.config_path), cwd=ROOT,
                env=self.env, stdout=sink, stderr=sink)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.returncode is not None:
                said = log.read_text(errors="replace")
                error = _PortTaken if f":{self.port}: Address already in use" in said else WorldError
                raise error(f"the service exited with {self.proc.returncode} while starting: {said[-2000:]}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                async with self.session.get(self._url("/health")) as r:
                    health = await r.json(content_type=None)
                    if r.status == 200 and "starting" not in health.get("reasons", []):
                        return
            if time.monotonic() > deadline:
                raise WorldError("the service did not answer /health within 30 s")
            await asyncio.sleep(0.05)

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def open(self, command: OpenCommand) -> str:
        async with self._reaching():
            return await self._open(command)

    async def close(self, position_id: str) -> bool:
        async with self._reaching():
            return await self._close(position_id)

    async def live_ids(self, symbol: str) -> list[str]:
        async with self._reaching():
            return await self._live_ids(symbol)

    @contextlib.asynccontextmanager
    async def _reaching(self) -> Any:
        """A command while the process is down (killed, restarting) is refused, as a bot would see it."""
        try:
            yield
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as e:
            raise CommandRefused(0, f"service unreachable: {type(e).__name__}") from None

    async def _open(self, command: OpenCommand) -> str:
        assert self.session is not None
        body: dict[str, Any] = {"symbol": command.symbol, "side": command.side.value,
                                "quantity": str(command.quantity)}
        for name in ("entry_price", "stop_loss_pct", "trailing_activation", "trailing_callback_pct", "take_profit"):
            value = getattr(command, name)
            if value is not None:
                body[name] = str(value)
        async with self.session.post(self._url("/positions"), json=body) as r:
            answer = await r.json(content_type=None)
            if r.status != 201:
                raise CommandRefused(r.status, str(answer.get("error", answer))[:300])
            return str(answer["id"])

    async def _close(self, position_id: str) -> bool:
        assert self.session is not None
        async with self.session.post(self._url(f"/positions/{position_id}/close"), json={"reason": "signal"}) as r:
            answer = await r.json(content_type=None)
            if r.status != 200:
                raise CommandRefused(r.status, str(answer.get("error", answer))[:300])
            return bool(answer.get("accepted"))

    async def _live_ids(self, symbol: str) -> list[str]:
        assert self.session is not None
        async with self.session.get(self._url("/positions")) as r:
            answer = await r.json(content_type=None)
            if r.status != 200:  # e.g. 503 while a restarted service starts (seed 470): refused, as for a bot
                raise CommandRefused(r.status, str(answer.get("error", answer) if isinstance(answer, dict)
                                                   else answer)[:300])
        rows = answer.get("positions", answer) if isinstance(answer, dict) else answer
        return [str(p["id"]) for p in rows if p.get("symbol") == symbol]

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def stop(self) -> None:
        try:
            if self.proc is not None and self.proc.returncode is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(self.proc.wait(), 20)
                except TimeoutError:
                    self.proc.kill()
                    await self.proc.wait()
                    raise WorldError("the service did not stop within 20 s of SIGTERM") from None
        finally:
            if self.session is not None:
                await self.session.close()
                self.session = None

    def output(self) -> str:
        return "".join(log.read_text(errors="replace") for log in self.logs if log.exists())


class CommandRefused(KeyError):
    """The service refused a command (its HTTP status), or could not be reached (status 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status

    def __str__(self) -> str:
        return str(self.args[0])


PORT_TRIES = 5  # starts of a service process whose API port was taken meanwhile, each on a new free port


class _PortTaken(WorldError):
    """The service could not listen on its API port: something took it after it was picked."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class World:
    def __init__(self, schedule: Schedule, workdir: Path, *, tuning: Tuning | None = None,
                 pg_url: str | None = None, pg_admin: Any = None, disk: Any = None) -> None:
        """`pg_url`: the worker's PostgreSQL database (schedules on "postgres" need it); `pg_admin`: an
        object with async `cut(database)` / `restore(database)` for the pg_outage fault; `disk`: a SmallDisk
        the workdir lives on (disk_full), or None where none can be mounted."""
        self.schedule = schedule
        self.workdir = workdir
        self.tuning = tuning or Tuning()
        self.pg_url = pg_url
        self.pg_admin = pg_admin
        self.disk = disk
        self.outcomes: list[Outcome] = []
        self.applied: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self.windows: list[tuple[float, float, str]] = []
        self.notes: list[str] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._activation: dict[str, D] = {}
        self.restarts = 0
        self.stalls = 0

    # --- setting up -------------------------------------------------------------------------------

    def _service_config(self, account: Account, db_url: str) -> ServiceConfig:
        t = self.tuning
        settings = ExchangeSettings(api_key=Secret(account.api_key), secret=Secret(account.secret),
                                    urls=self.sim.ccxt_urls(), user_probe_after_s=t.user_probe_after_s,
                                    market_silent_after_s=t.market_silent_after_s, backoff_initial_s=0.05,
                                    backoff_max_s=0.2, rate_limit=False)
        return ServiceConfig(accounts=(AccountConfig(account.name, settings, self.schedule.symbols),),
                             database_url=db_url, records_dir=self.workdir / "records", live=t.live,
                             schedule=t.schedule, reconcile=t.reconcile,
                             recovery_retry_s=0.1, storage_timeout_s=t.storage_timeout_s,
                             shutdown_drain_s=t.shutdown_drain_s)

    def _child(self, account: Account, db_url: str) -> Child:
        t = self.tuning
        port = _free_port()
        token = secrets.token_hex(16)
        urls = "\n".join(f'"{k}" = "{v}"' for k, v in self.sim.ccxt_urls().items())
        toml = f'''database_url = "{db_url}"
log_dir = "{self.workdir / 'logs'}"
shutdown_drain_s = {t.shutdown_drain_s}
storage_timeout_s = {t.storage_timeout_s}
[records]
dir = "{self.workdir / 'records'}"
[api]
port = {port}
[live]
trail_min_interval_s = {t.live.trail_min_interval_s}
retry_backoff_s = {t.live.retry_backoff_s}
cause_wait_s = {t.live.cause_wait_s}
cause_rest_timeout_s = {t.live.cause_rest_timeout_s}
unprotected_close_after_s = {t.live.unprotected_close_after_s}
[schedule]
sync_interval_s = {t.schedule.sync_interval_s}
fast_sync_interval_s = {t.schedule.fast_sync_interval_s}
orphan_interval_s = {t.schedule.orphan_interval_s}
[reconcile]
grace_ms = {t.reconcile.grace_ms}
phantom_after_s = {t.reconcile.phantom_after_s}
stream_doubt_s = {t.reconcile.stream_doubt_s}
[[accounts]]
name = "{account.name}"
symbols = {json.dumps(list(self.schedule.symbols))}
api_key_env = "CHAOS_KEY"
secret_env = "CHAOS_SECRET"
rate_limit = false
reconnect_backoff_max_s = 0.2
user_probe_after_s = {t.user_probe_after_s}
market_silent_after_s = {t.market_silent_after_s}
[accounts.urls]
{urls}
'''
        env = {**os.environ, "CHAOS_KEY": account.api_key, "CHAOS_SECRET": account.secret,
               "LIFECYCLE_API_TOKEN": token, "PYTHONPATH": str(ROOT)}
        for name in [k for k in env if k.startswith("LIFECYCLE_") and k != "LIFECYCLE_API_TOKEN"]:
            env.pop(name)  # the configuration file says everything
        return Child(self.workdir, toml, env, port, token, account.name)

    # --- running ----------------------------------------------------------------------------------

    async def run(self) -> Run:
        s = self.schedule
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sim = await SimServer(mark_interval_s=0.2).start()
        try:
            return await self._run()
        finally:
            if self.disk is not None:
                self.disk.free()
            await self._db_errors(False)
            if s.database == "postgres" and self.pg_admin is not None:
                await self.pg_admin.restore()
            await self.sim.stop()

    async def _run(self) -> Run:
        s = self.schedule
        name = f"chaos{s.seed if s.seed is not None else secrets.token_hex(3)}x{secrets.token_hex(2)}"
        account = self.account = self.sim.venue.add_account(name)
        if s.database == "postgres":
            if self.pg_url is None:
                raise WorldError("no PostgreSQL database for a postgres schedule")
            db_url = self.pg_url
        else:
            db_url = f"sqlite:///{self.workdir / 'lifecycle.sqlite'}"
        self.handle: _Handle = (self._child(account, db_url) if s.kill_at_ms is not None
                                else InProcess(self._service_config(account, db_url)))
        self.ledger = Ledger(self.sim, account, s.symbols)
        await self.handle.start()
        t0 = self.t0 = time.time()
        stalls = asyncio.ensure_future(self._watch_stalls())
        try:
            driver = asyncio.ensure_future(self._drive())
            kill = asyncio.ensure_future(self._kill_later()) if s.kill_at_ms is not None else None
            await driver
            if kill is not None:
                await kill
            await self._until(t0 + s.clear_ms / 1000)
            await self._all_faults_off()
            clear_at = time.time()
            for task in self._tasks:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 15)
            settled_in, problems, repo = await self._settle(clear_at)
            positions, journals, closures, trailing_left = await self._books(repo)
        finally:
            stalls.cancel()
            await self.handle.stop()
        if s.kill_at_ms is not None and repo is not None:
            await repo.close()
        self.ledger.detach()
        records = _read_records(self.workdir / "records")
        output = self.handle.output() + json.dumps(records)
        if self.stalls:
            self.notes.append(f"{self.stalls} stall(s) of this process over 0.25 s (counted as fault windows)")
        stored = b"".join(p.read_bytes() for p in self.workdir.glob("lifecycle.sqlite*"))
        return Run(s, self.tuning, self.ledger, t0, clear_at, self.windows, self.outcomes, self.applied, self.skipped,
                   settled_in, problems, positions, journals, closures, trailing_left, records, output,
                   (account.api_key, account.secret), self.restarts, self.notes, self._venue_dump(),
                   any(x.encode() in stored for x in (account.api_key, account.secret)))

    def _venue_dump(self) -> list[str]:
        account = self.account
        lines = [f"position {symbol}: {p.amount}" for symbol, p in account.positions.items()]
        lines += [f"order {o.client_id} {o.symbol} {o.side} {o.type} qty {o.qty} filled {o.filled} {o.status}"
                  for o in account.orders.values()]
        lines += [f"algo {a.client_id} {a.symbol} {a.side} {a.order_type} trigger {a.trigger} qty {a.qty} {a.status}"
                  for a in account.algos.values()]
        return lines

    async def _watch_stalls(self, tick_s: float = 0.05, stalled_s: float = 0.25) -> None:
        """The machine itself stalling (a 2-core machine saturated by workers and service processes): a tick
        this late means nobody in this process could act meanwhile. Such a stretch counts as a fault window
        ("stall"): the bounds judge the engine's logic, not the machine's load."""
        while True:
            before = time.time()
            await asyncio.sleep(tick_s)
            late = time.time() - before - tick_s
            if late > stalled_s:
                self.windows.append((before, time.time(), "stall"))
                self.stalls += 1

    async def _until(self, at: float) -> None:
        delay = at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _drive(self) -> None:
        for step in self.schedule.steps:
            await self._until(self.t0 + step.at_ms / 1000)
            try:
                await self._apply(step)
            except (SimError, KeyError, ValueError) as e:  # the step found nothing to act on
                self._skip(step.kind, f"{type(e).__name__}: {e}")

    async def _kill_later(self) -> None:
        assert self.schedule.kill_at_ms is not None
        await self._until(self.t0 + self.schedule.kill_at_ms / 1000)
        down = time.time()
        await self.handle.kill()
        self.applied["kill"] = self.applied.get("kill", 0) + 1
        await asyncio.sleep(0.05)
        while True:
            try:
                await self.handle.start()
                break
            except WorldError as e:  # a fault window (a full disk) may keep it from starting: try again
                self.notes.append(f"restart failed: {str(e)[:200]}")
                await self._all_faults_off()
        self.restarts += 1
        self.windows.append((down, time.time(), "kill"))

    def _count(self, kind: str) -> None:
        self.applied[kind] = self.applied.get(kind, 0) + 1

    def _skip(self, kind: str, why: str) -> None:
        self.skipped[kind] = self.skipped.get(kind, 0) + 1

    def _later(self, delay_s: float, work: Callable[[], Any]) -> None:
        async def run() -> None:
            await asyncio.sleep(delay_s)
            result = work()
            if asyncio.iscoroutine(result):
                await result

        self._tasks.append(asyncio.ensure_future(run()))

    def _window(self, step: Step) -> None:
        self.windows.append((self.t0 + step.at_ms / 1000, self.t0 + step.end_ms / 1000, step.kind))

    # --- the steps --------------------------------------------------------------------------------

    async def _apply(self, step: Step) -> None:
        kind, a = step.kind, step.a
        venue, account = self.sim.venue, self.account
        handler = getattr(self, f"_do_{kind}", None)
        if handler is not None:
            await handler(step, a)
            return
        if kind in BLINDING and kind != "kill":
            faults = _FAULTS.get(kind)
            if faults is not None:
                on, off = faults(a, self.tuning)
                self.sim.set_faults(**on)
                self._later(step.dur_ms / 1000, lambda: self.sim.set_faults(**off))
                self._window(step)
                self._count(kind)
                return
        if kind in {"liquidation", "adl", "settlement", "manual_close"}:
            if venue.position(account, a["symbol"]).amount == 0:
                raise KeyError("no position")
            venue.force_close(account, a["symbol"], "manual" if kind == "manual_close" else kind)
            self._count(kind)
            return
        raise WorldError(f"unknown step kind {kind}")

    def _command(self, step: Step, work: Callable[[], Any]) -> None:
        outcome = Outcome(step, time.time())
        self.outcomes.append(outcome)

        async def run() -> None:
            try:
                result = await work()
                if isinstance(result, str):
                    outcome.position_id = result
            except Exception as e:  # noqa: BLE001 - a command's failure is its outcome, recorded for the checks
                outcome.error_type, outcome.error = type(e).__name__, str(e)[:300]

        self._tasks.append(asyncio.ensure_future(run()))

    def _open_command(self, a: dict[str, Any]) -> OpenCommand:
        symbol = a["symbol"]
        side = Side(a["side"])
        mark = self.sim.venue.marks[symbol]
        spec = self.sim.venue.spec(symbol)
        sign = 1 if side is Side.LONG else -1

        def price(pct: str, direction: int) -> D:
            raw = mark * (1 + direction * sign * D(pct) / 100)
            return raw.quantize(spec.tick, rounding=ROUND_DOWN)

        entry = price(a["limit_pct"], -1) if a.get("entry") == "limit" else None
        activation = price(a["activation_pct"], 1) if "activation_pct" in a else None
        if activation is not None:
            self._activation[symbol] = activation
        return OpenCommand(symbol, side, D(QTY[symbol]), entry_price=entry, stop_loss_pct=D(a["stop_pct"]),
                           trailing_activation=activation,
                           trailing_callback_pct=D(a["callback_pct"]) if "callback_pct" in a else None,
                           take_profit=price(a["tp_pct"], 1) if "tp_pct" in a else None)

    async def _do_open(self, step: Step, a: dict[str, Any], copies: int = 1) -> None:
        if self.ledger.owner.get(a["symbol"]) == "foreign":
            raise KeyError("someone else holds a position on the symbol")
        command = self._open_command(a)
        for _ in range(copies):
            self._command(step, lambda: self.handle.open(command))
        self._count(step.kind)

    async def _do_open_twice(self, step: Step, a: dict[str, Any]) -> None:
        await self._do_open(step, a, copies=2)

    async def _do_close(self, step: Step, a: dict[str, Any], copies: int = 1) -> list[str]:
        ids = await self.handle.live_ids(a["symbol"])
        if not ids:
            raise KeyError("no live position")
        for position_id in ids:

            def close(pid: str = position_id) -> Awaitable[bool]:
                return self.handle.close(pid)

            for _ in range(copies):
                self._command(step, close)
        self._count(step.kind)
        return ids

    async def _do_close_twice(self, step: Step, a: dict[str, Any]) -> None:
        await self._do_close(step, a, copies=2)

    async def _do_reopen(self, step: Step, a: dict[str, Any]) -> None:
        """Close the symbol's position and open a new one as soon as the old one has ended."""
        ids = await self._do_close(step, a)

        async def reopen() -> None:
            deadline = time.time() + 5
            # (Until 2026-12-03 this was `any(i in await ... for i in ids)`: an async generator, which any()
            # refuses with a TypeError swallowed where the tasks are awaited: the reopen never reopened.)
            while time.time() < deadline:
                live = await self.handle.live_ids(a["symbol"])
                if not any(i in live for i in ids):
                    break
                await asyncio.sleep(0.02)
            if self.ledger.owner.get(a["symbol"]) != "foreign":
                command = self._open_command(a)
                self._command(step, lambda: self.handle.open(command))

        self._tasks.append(asyncio.ensure_future(reopen()))

    async def _do_move(self, step: Step, a: dict[str, Any]) -> None:
        venue = self.sim.venue
        venue.set_mark(a["symbol"], venue.marks[a["symbol"]] * (1 + D(a["pct"]) / 100))
        self._count(step.kind)

    async def _do_gap_stop(self, step: Step, a: dict[str, Any]) -> None:
        symbol = a["symbol"]
        stops = [s for s in self.sim.venue.open_algos(self.account, symbol) if s.order_type == "STOP_MARKET"
                 and parse_client_id(s.client_id) is not None]
        if not stops:
            raise KeyError("no stop of ours")
        stop = stops[0]
        direction = -1 if stop.side == "SELL" else 1
        self.sim.venue.set_mark(symbol, stop.trigger * (1 + direction * D(a["beyond_pct"]) / 100) + direction *
                                self.sim.venue.spec(symbol).tick)
        self._count(step.kind)

    async def _do_gap_activation(self, step: Step, a: dict[str, Any]) -> None:
        symbol = a["symbol"]
        activation = self._activation.get(symbol)
        position_id = self.ledger.ours(symbol)
        if activation is None or position_id is None:
            raise KeyError("no trailing plan for a position of ours")
        amount = self.sim.venue.position(self.account, symbol).amount
        direction = 1 if amount > 0 else -1
        self.sim.venue.set_mark(symbol, activation * (1 + direction * D(a["beyond_pct"]) / 100) + direction *
                                self.sim.venue.spec(symbol).tick)
        self._count(step.kind)

    async def _do_spike(self, step: Step, a: dict[str, Any]) -> None:
        venue, symbol = self.sim.venue, a["symbol"]
        before = venue.marks[symbol]
        venue.set_mark(symbol, before * (1 + D(a["pct"]) / 100))
        self._later(a["back_ms"] / 1000, lambda: venue.set_mark(symbol, before))
        self._count(step.kind)

    def _manual(self, symbol: str, side: str, quantity: D, *, reduce_only: bool = False, type_: str = "MARKET",
                price: D | None = None) -> Any:
        return self.sim.venue.new_order(self.account, symbol=symbol, side=side, type_=type_, quantity=quantity,
                                        price=price, client_id=f"web_{secrets.token_hex(8)}", reduce_only=reduce_only)

    async def _do_manual_open(self, step: Step, a: dict[str, Any]) -> None:
        symbol = a["symbol"]
        venue = self.sim.venue
        working: list[SimOrder | SimAlgo] = [*venue.open_orders(self.account, symbol),
                                             *venue.open_algos(self.account, symbol)]
        ours_working = [o for o in working if parse_client_id(o.client_id) is not None]
        if venue.position(self.account, symbol).amount != 0 or ours_working or await self.handle.live_ids(symbol):
            raise KeyError("the symbol is not free")
        self._manual(symbol, "BUY" if a["side"] == "long" else "SELL", D(QTY[symbol]))
        self._count(step.kind)

    async def _do_flip(self, step: Step, a: dict[str, Any]) -> None:
        symbol = a["symbol"]
        amount = self.sim.venue.position(self.account, symbol).amount
        if self.ledger.ours(symbol) is None or amount == 0:
            raise KeyError("no position of ours")
        self._manual(symbol, "SELL" if amount > 0 else "BUY", abs(amount) + D(QTY[symbol]))
        self._count(step.kind)

    async def _do_manual_reduce(self, step: Step, a: dict[str, Any]) -> None:
        symbol = a["symbol"]
        amount = self.sim.venue.position(self.account, symbol).amount
        step_size = self.sim.venue.spec(symbol).step
        part = (abs(amount) * D(a["fraction"])).quantize(step_size, rounding=ROUND_DOWN)
        if self.ledger.ours(symbol) is None or amount == 0 or part <= 0:
            raise KeyError("no position of ours to reduce")
        self._manual(symbol, "SELL" if amount > 0 else "BUY", part, reduce_only=True)
        self._count(step.kind)

    async def _do_foreign_order(self, step: Step, a: dict[str, Any]) -> None:
        symbol = a["symbol"]
        spec = self.sim.venue.spec(symbol)
        price = (self.sim.venue.marks[symbol] / 2).quantize(spec.tick, rounding=ROUND_DOWN)
        self._manual(symbol, "BUY", D(QTY[symbol]), type_="LIMIT", price=price)
        self._count(step.kind)

    async def _do_partial_entry(self, step: Step, a: dict[str, Any]) -> None:
        symbol = a["symbol"]
        entries = [o for o in self.sim.venue.open_orders(self.account, symbol) if o.type == "LIMIT"
                   and (p := parse_client_id(o.client_id)) is not None and p.purpose is OrderPurpose.ENTRY]
        if not entries:
            raise KeyError("no resting entry of ours")
        order = entries[0]
        self.sim.venue.fill_partially(self.account, order.order_id, (order.qty - order.filled) / 2)
        self._count(step.kind)

    async def _do_venue_cancel(self, step: Step, a: dict[str, Any]) -> None:
        symbol, what = a["symbol"], a["what"]
        venue = self.sim.venue
        if what == "entry":
            orders = [o for o in venue.open_orders(self.account, symbol)
                      if (p := parse_client_id(o.client_id)) is not None and p.purpose is OrderPurpose.ENTRY]
            if not orders:
                raise KeyError("no working entry of ours")
            self.ledger.venue_cancelled.add(orders[0].client_id)
            venue.cancel_order(self.account, symbol, orders[0].order_id, None)
        else:
            purpose = OrderPurpose.STOP if what == "stop" else OrderPurpose.TAKE_PROFIT
            algos = [o for o in venue.open_algos(self.account, symbol)
                     if (p := parse_client_id(o.client_id)) is not None and p.purpose is purpose]
            if not algos:
                raise KeyError(f"no working {what} of ours")
            self.ledger.venue_cancelled.add(algos[0].client_id)
            venue.cancel_algo(self.account, algos[0].algo_id, None)
        self._count(step.kind)

    async def _do_funding(self, step: Step, a: dict[str, Any]) -> None:
        self.sim.venue.funding(self.account, a["symbol"])
        self._count(step.kind)

    async def _do_vanish(self, step: Step, a: dict[str, Any]) -> None:
        symbol = a["symbol"]
        if self.ledger.ours(symbol) is None or self.sim.venue.position(self.account, symbol).amount == 0:
            raise KeyError("no position of ours")
        self.sim.venue.vanish(self.account, symbol)
        self.ledger.vanished(symbol)
        self._count(step.kind)

    async def _do_drop_streams(self, step: Step, a: dict[str, Any]) -> None:
        await self.sim.drop_streams()
        self._window(step)
        self._count(step.kind)

    async def _do_expire_key(self, step: Step, a: dict[str, Any], notice: bool = False) -> None:
        self.sim.expire_listen_keys(notice=notice)
        self._window(step)
        self._count(step.kind)

    async def _do_expire_key_notice(self, step: Step, a: dict[str, Any]) -> None:
        await self._do_expire_key(step, a, notice=True)

    async def _do_bad_frame(self, step: Step, a: dict[str, Any]) -> None:
        self.sim.inject_user_text(self.account.api_key, a["frame"])
        self._window(step)
        self._count(step.kind)

    async def _do_stream_down(self, step: Step, a: dict[str, Any]) -> None:
        self.sim.set_faults(user_stream_down=True)
        await self.sim.drop_streams()
        self._later(step.dur_ms / 1000, lambda: self.sim.set_faults(user_stream_down=False))
        self._window(step)
        self._count(step.kind)

    async def _do_disk_full(self, step: Step, a: dict[str, Any]) -> None:
        if self.disk is None:
            raise KeyError("no small filesystem here")
        disk = self.disk
        await asyncio.to_thread(disk.fill)
        self._later(step.dur_ms / 1000, lambda: asyncio.to_thread(disk.free))
        self._window(step)
        self._count(step.kind)

    async def _do_db_error(self, step: Step, a: dict[str, Any]) -> None:
        if not isinstance(self.handle, InProcess):
            raise KeyError("driver errors are raised inside the service process only")
        await self._db_errors(True)
        self._later(step.dur_ms / 1000, lambda: self._db_errors(False))
        self._window(step)
        self._count(step.kind)

    async def _db_errors(self, on: bool) -> None:
        """The database driver's own error, raised at the connection level for every statement."""
        handle = getattr(self, "handle", None)
        hook = handle.db_errors if isinstance(handle, InProcess) else None
        if hook is None:
            return
        if on:
            hook.on()
        else:
            hook.off()

    async def _do_pg_outage(self, step: Step, a: dict[str, Any]) -> None:
        if self.schedule.database != "postgres" or self.pg_admin is None:
            raise KeyError("not on PostgreSQL")
        await self.pg_admin.cut()
        self._later(step.dur_ms / 1000, self.pg_admin.restore)
        self._window(step)
        self._count(step.kind)

    async def _all_faults_off(self) -> None:
        self.sim.set_faults(**_OFF)
        if self.disk is not None:
            await asyncio.to_thread(self.disk.free)
        await self._db_errors(False)
        if self.schedule.database == "postgres" and self.pg_admin is not None:
            await self.pg_admin.restore()

    # --- after the faults -------------------------------------------------------------------------

    async def _settle(self, clear_at: float) -> tuple[float | None, list[str], Repository | None]:
        """Wait until the venue's books and ours agree (tests.invariants), at most `settle_s`."""
        from tests.invariants import violations

        repo = self.handle.repo()
        if repo is None:
            repo = await Repository.open(self._db_url(), run_migrations=False)
        foreign = lambda: {s for s, o in self.ledger.owner.items() if o == "foreign"}  # noqa: E731
        deadline = clear_at + self.tuning.settle_s
        problems: list[str] = []
        while True:
            try:
                problems = await violations(self.sim, self.account, repo, ignore_symbols=foreign())
            except Exception as e:  # noqa: BLE001 - the database may still be coming back
                problems = [f"books unreadable: {type(e).__name__}: {e}"]
            if not problems:
                return time.time() - clear_at, [], repo
            if time.time() > deadline:
                return None, problems, repo
            await asyncio.sleep(0.1)

    def _db_url(self) -> str:
        if self.schedule.database == "postgres":
            assert self.pg_url is not None
            return self.pg_url
        return f"sqlite:///{self.workdir / 'lifecycle.sqlite'}"

    async def _books(self, repo: Repository | None) -> tuple[list[Any], dict[str, list[Any]],
                                                              dict[str, dict[str, Any] | None], list[str]]:
        if repo is None:
            return [], {}, {}, []
        positions = await repo.list_positions([self.account.name])
        journals = {p.id: await repo.journal(p.id) for p in positions}
        closures = {p.id: await repo.closure(p.id) for p in positions if p.state.is_terminal}
        trailing_left = [p.id for p in positions if p.state.is_terminal and await repo.trailing_state_exists(p.id)]
        return positions, journals, closures, trailing_left


def _read_records(directory: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if not directory.exists():
        return out
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


_FAULTS: dict[str, Callable[[dict[str, Any], Tuning], tuple[dict[str, Any], dict[str, Any]]]] = {
    "latency": lambda a, t: ({"rest_latency_ms": a["ms"]}, {"rest_latency_ms": 0}),
    "timeouts": lambda a, t: ({"timeouts": a["n"], "timeout_s": t.sim_timeout_s}, {"timeouts": 0}),
    "http_5xx": lambda a, t: ({"http_5xx": a["n"]}, {"http_5xx": 0}),
    "rate_limit": lambda a, t: ({"rate_limit": a["n"]}, {"rate_limit": 0}),
    "ip_ban": lambda a, t: ({"ip_ban": a["n"]}, {"ip_ban": 0}),
    "reject_orders": lambda a, t: ({"reject_orders": a["n"]}, {"reject_orders": 0}),
    "lost_answers": lambda a, t: ({"lost_answers": a["n"], "lost_answers_on": a["on"]},
                                  {"lost_answers": 0, "lost_answers_on": ""}),
    "stale_positions": lambda a, t: ({"stale_positions_s": 30.0}, {"stale_positions_s": 0}),
    "ws_silent": lambda a, t: ({"ws_silent": True}, {"ws_silent": False}),
    "duplicate_events": lambda a, t: ({"duplicate_events": True}, {"duplicate_events": False}),
    "reorder_events": lambda a, t: ({"reorder_events": True}, {"reorder_events": False}),
    "delay_fills": lambda a, t: ({"delay_fill_updates_s": float(a["s"])}, {"delay_fill_updates_s": 0}),
    "reject_stops": lambda a, t: ({"reject_stops": a["n"], "reject_stops_code": -2021}, {"reject_stops": 0}),
    "single_stop": lambda a, t: ({"single_stop": True}, {"single_stop": False}),
}
_OFF = {"rest_latency_ms": 0, "timeouts": 0, "http_5xx": 0, "rate_limit": 0, "ip_ban": 0, "reject_orders": 0,
        "lost_answers": 0, "lost_answers_on": "", "stale_positions_s": 0, "ws_silent": False,
        "user_stream_down": False, "duplicate_events": False, "reorder_events": False, "delay_fill_updates_s": 0,
        "reject_stops": 0, "single_stop": False}
