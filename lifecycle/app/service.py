"""The background service: for each configured account, the live engine, its reconciliation and its
schedule, started in the order that makes a restart safe and stopped in the order that loses nothing.

This is a composition root (like `lifecycle.app.cli`): it wires the pure domain to the database, the ccxt
adapter and the scheduler, so unlike the domain modules it imports them.

Start, per account: open the database (migrations applied), rehydrate that account's live positions,
start the live engine's streams and wait until the private streams are subscribed (retrying, with an
error line, while the exchange cannot be reached), attach reconciliation, run restart recovery (a REST
snapshot reconciled with the database before any order), then start the scheduled jobs and run one
orphan sweep at once. A failure
while starting stops what was already started: nothing is half-started.

Stop (SIGINT / SIGTERM with `run`): the scheduled jobs stop first (runs in flight finish),
then each live engine drains (new commands refused, marks no longer move stops; commands and closes in
flight finish from their fills, up to `shutdown_drain_s`), background work finishes, stops stay on the
exchange, the exchange clients and the database are closed and the logs flushed. A second signal while
stopping is logged and ignored: a stop is never cut in half by an impatient Ctrl-C (SIGKILL is the way
to crash it on purpose; restart recovery handles that too).
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from loguru import logger

from db.engine import DatabaseConfigError, SqliteLock, open_error
from db.leases import LeaseStore
from db.repository import FencedStore, Repository
from exchange import errors as xerr
from exchange.ccxt_adapter import CcxtExchange, ExchangeSettings
from exchange.secret import Secret
from lifecycle.app.api import ClosureStats, ControlApi
from lifecycle.app.garbage import GC_TIMES, QuietCollector
from lifecycle.app.leases import ClusterConfig, Held, LeaseKeeper
from lifecycle.books import Books
from lifecycle.engine import Engine
from lifecycle.events import from_payload
from lifecycle.guards.cleanup import closure_of
from lifecycle.live import LiveConfig, LiveEngine
from lifecycle.reconciler import ReconcileConfig, Reconciler
from lifecycle.records import JsonlRecords
from lifecycle.replay import replay
from lifecycle.retry import Backoff, until_done
from scheduler.jobs import ReconciliationScheduler, ScheduleConfig

T = TypeVar("T")

# The young generation collects after this many new objects (CPython's default: 700). A burst of transitions
# allocates a few hundred objects each; with the default, collections that walk every live position ran
# several times per burst and took a quarter of the engine's time (issue 13, bench/transitions.py).
GC_YOUNG_THRESHOLD = 50_000
# How long an account's start waits for the check of closure records lost in a crash (it reads the records
# files): records are books, a records disk that hangs must not keep the account from protecting and
# detecting. Past this the start goes on and the check finishes in the background when the disk answers.
RECORDS_CHECK_BOUND_S = 5.0


def tune_gc() -> None:
    """Once started: what exists now (configuration, markets, loaded positions, ccxt's clients) moves out of
    the collector's sight (`gc.freeze`), and young collections run less often. Cycles are still collected;
    memory stays bounded (a young collection every 50,000 allocations at the latest; the service's
    `QuietCollector` runs them earlier, while the loop is idle). Every collection is timed (`GC_TIMES`)."""
    GC_TIMES.install()
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


@dataclass(frozen=True)
class AccountConfig:
    name: str
    exchange: ExchangeSettings
    symbols: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("account name must not be empty")
        if not self.symbols:
            raise ValueError(f"account {self.name!r}: symbols must list at least one symbol")


@dataclass(frozen=True)
class ServiceConfig:
    accounts: tuple[AccountConfig, ...]
    database_url: str
    records_dir: Path
    live: LiveConfig = field(default_factory=LiveConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    reconcile: ReconcileConfig = field(default_factory=ReconcileConfig)
    recovery_retry_s: float = 2.0  # while the exchange cannot be reached at start
    ready_timeout_s: float = 10.0  # per attempt to see the private streams subscribed
    shutdown_drain_s: float = 10.0  # how long a stop waits for commands and closes in flight
    # A database write not answered this fast is queued and made later: protection never waits longer.
    storage_timeout_s: float = 0.5
    records_retention_days: int | None = None  # None: records are kept forever
    trailing_activation_pct: Decimal = Decimal("0.5")  # open commands asking for a trailing stop without
    trailing_callback_pct: Decimal = Decimal("0.5")  # parameters: activation from the mark, distance
    api: ApiBinding | None = None  # the control API; None: not served
    # Several processes on one PostgreSQL database (lifecycle.app.leases); None on PostgreSQL: one with this
    # host's name and pid. Not for SQLite (one process per file).
    cluster: ClusterConfig | None = None

    def __post_init__(self) -> None:
        if not self.accounts:
            raise ValueError("accounts: at least one account is needed")
        names = [a.name for a in self.accounts]
        if len(set(names)) != len(names):
            raise ValueError(f"accounts: names must be unique, got {names}")
        if not self.storage_timeout_s > 0:
            raise ValueError(f"storage_timeout_s must be > 0, got {self.storage_timeout_s}")
        for name in ("recovery_retry_s", "ready_timeout_s", "shutdown_drain_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class ApiBinding:
    token: Secret
    host: str = "127.0.0.1"
    port: int = 8780


@dataclass
class AccountRuntime:
    config: AccountConfig
    exchange: CcxtExchange
    engine: Engine
    live: LiveEngine | None = None
    reconciler: Reconciler | None = None
    scheduler: ReconciliationScheduler | None = None


class StartError(Exception):
    """The service cannot start (one line naming the setting); whatever had started was stopped."""


class Service:
    def __init__(self, config: ServiceConfig, *, sqlite_lock: SqliteLock | None = None) -> None:
        """`sqlite_lock`: taken by the caller already (`lifecycle run` takes it before anything touches the
        database or the log); else `start` takes it."""
        self.config = config
        self.repo: Repository | None = None
        self.records: JsonlRecords | None = None
        self.accounts: dict[str, AccountRuntime] = {}
        self.closures = ClosureStats()
        self.api: ControlApi | None = None
        self.started = False
        self._stopping = False
        self._stopped = asyncio.Event()
        self._extra: asyncio.Task[Any] | None = None  # run(after_start=...)'s task
        self._records_checks: set[asyncio.Task[int]] = set()  # closure records' checks past their bound
        self._sqlite_lock = sqlite_lock  # one service per SQLite file
        self.keeper: LeaseKeeper | None = None  # PostgreSQL: the leases of the accounts this process acts on
        self.collector = QuietCollector()  # young collections while the loop is idle (lifecycle/app/garbage.py)

    @property
    def instance(self) -> str | None:
        """This process's name among the processes of one PostgreSQL database (None: SQLite, alone)."""
        return self.keeper.config.instance if self.keeper is not None else None

    def lease_stats(self) -> dict[str, int] | None:
        """For /metrics: the lease keeper's counts (None without one)."""
        keeper = self.keeper
        if keeper is None:
            return None
        stats = keeper.stats
        return {"held": sum(1 for h in keeper.held.values() if not h.lost), "acquired": stats.acquired,
                "lost": stats.lost, "handed_over": stats.handed_over, "renew_failures": stats.renew_failures}

    def lease_problems(self) -> list[str]:
        """For /health: the leases have not been renewed for longer than two renewal intervals."""
        keeper = self.keeper
        if keeper is None or not keeper.held:
            return []
        last = keeper.stats.last_renew_ok
        age = keeper.monotonic() - last if last is not None else None
        if age is not None and age <= 2 * keeper.config.renew_s:
            return []
        shown = f"{age:.1f} s" if age is not None else "since the start"
        return [f"leases not renewed for {shown}: this process stops acting on its accounts when they run out"]

    async def start(self) -> Service:
        try:
            if self._sqlite_lock is None:
                self._sqlite_lock = take_sqlite_lock(self.config.database_url)
            cluster = self.config.cluster
            if _postgresql(self.config.database_url):
                cluster = cluster or ClusterConfig(instance=default_instance())
                # a session stuck inside a transaction (this process frozen or cut off mid-write) holds its lease
                # rows, and so every takeover, until the server ends it: half a lease at most
                self.repo = await _open_database(self.config.database_url, idle_in_transaction_s=cluster.lease_s / 2)
            elif cluster is not None:
                raise StartError("cluster: several processes share accounts only on PostgreSQL; SQLite is one "
                                 "process per database file (remove [cluster] or use a postgresql:// database_url)")
            else:
                self.repo = await _open_database(self.config.database_url)
            self.records = JsonlRecords(self.config.records_dir, retention_days=self.config.records_retention_days,
                                        instance=cluster.instance if cluster is not None else None)
            self.records.listeners.append(self.closures)
            if self.config.api is not None:  # bound before anything acts: a taken port stops the start here
                binding = self.config.api
                try:
                    self.api = await ControlApi(self, binding.token, binding.host, binding.port).start()
                except OSError as e:
                    key = "api.host" if isinstance(e, socket.gaierror) else "api.port"
                    reason = os.strerror(e.errno) if e.errno and e.errno > 0 else (e.strerror or str(e))
                    raise StartError(f"{key}: cannot listen on {binding.host}:{binding.port}: {reason}") from None
            if cluster is not None:
                self.keeper = LeaseKeeper(LeaseStore(self.repo.engine), cluster,
                                          [a.name for a in self.config.accounts],
                                          start=self._start_leased, stop=self._drop_account)
                await self.keeper.start()
            else:
                for account in self.config.accounts:
                    await self._start_account(account)
        except BaseException:
            logger.error("start failed; stopping what was started")
            await self.stop()
            raise
        self.started = True
        tune_gc()
        if not self._stopping:  # (a stop during the start has stopped the collector already: not started again)
            self.collector.start()
        logger.info("service running: {} account(s), {} live position(s)", len(self.accounts),
                    sum(len(a.engine.positions) for a in self.accounts.values()))
        return self

    async def _start_leased(self, name: str, held: Held) -> None:
        """Start an account whose lease this process just took (its writes fenced, its orders gated); a start
        that fails or is cancelled (the lease lost meanwhile) stops what it started."""
        account = next(a for a in self.config.accounts if a.name == name)
        try:
            await self._start_account(account, held)
        except BaseException:
            await self._drop_account(name, False)
            raise

    async def _drop_account(self, name: str, graceful: bool) -> None:
        """Stop acting on one account. Graceful (a hand-over): drained like a service stop, the books flushed.
        Else (the lease is lost): at once; what the books could not write is rebuilt by the new owner's
        recovery from the venue. Stops stay on the venue either way."""
        runtime = self.accounts.pop(name, None)
        if runtime is None:
            return
        drain = self.config.shutdown_drain_s if graceful else 0.0
        try:
            if runtime.scheduler is not None:
                await runtime.scheduler.stop()
            if runtime.reconciler is not None:
                runtime.reconciler.detach()
            if runtime.live is not None:
                await runtime.live.stop(timeout=5.0 if graceful else 1.0, drain_s=drain)
            await runtime.engine.books.close(drain if graceful else 0.1)
        finally:
            await runtime.exchange.close()
        logger.info("{}: stopped here ({}); {} live position(s) left protected on the venue", name,
                    "handed over" if graceful else "lease lost", len(runtime.engine.positions))

    async def _start_account(self, account: AccountConfig, held: Held | None = None) -> None:
        assert self.repo is not None and self.records is not None
        exchange = await self._start_exchange(account)
        if held is not None:
            exchange.may_act = held.acting
        try:
            await self._check_account(account, exchange)
        except BaseException:
            await exchange.close()
            raise
        store = self.repo if held is None else FencedStore(self.repo, held.fence)
        engine = Engine(store, canceller=exchange, records=self.records,
                        books=Books(timeout_s=self.config.storage_timeout_s))
        runtime = self.accounts[account.name] = AccountRuntime(account, exchange, engine)
        loaded = await engine.rehydrate([account.name])
        logger.info("{}: {} live position(s) loaded from the database", account.name, loaded)
        await self._check_closure_records(account.name)
        runtime.live = await LiveEngine(engine, exchange, account=account.name, symbols=list(account.symbols),
                                        config=self.config.live).start()
        live, ready_s = runtime.live, self.config.ready_timeout_s
        await until_done(lambda: live.wait_ready(timeout=ready_s), retry_on=(TimeoutError,), backoff=Backoff(0),
                         on_retry=lambda attempt, _e, _d: logger.error(
                             "{}: private streams not subscribed after {} s (attempt {}); the exchange may be "
                             "unreachable; still trying, nothing is sent meanwhile", account.name, ready_s, attempt))
        runtime.reconciler = Reconciler.of(runtime.live, self.config.reconcile).attach()
        await runtime.live.recover(retry_s=self.config.recovery_retry_s)
        runtime.scheduler = await ReconciliationScheduler(runtime.reconciler,
                                                          self.config.schedule).start()
        # Orders of ours left by a crash between a terminal commit and its cancellations (or placed and
        # never recorded) go now, not one orphan interval later.
        await runtime.scheduler.run_now("orphans")

    async def _check_closure_records(self, account: str) -> None:
        """`_recover_closure_records`, waited for up to RECORDS_CHECK_BOUND_S; then the start goes on without it
        (a records disk that hangs; review, seventh session: the account never started and a stop fill on the
        venue went unseen). A close the live engine detects before the check has read the records may then
        write a closure record a second time; a duplicate record is the price of not waiting for books."""
        check = asyncio.ensure_future(self._recover_closure_records(account))
        try:
            await asyncio.wait_for(asyncio.shield(check), RECORDS_CHECK_BOUND_S)
        except TimeoutError:
            logger.error("{}: the check of closure records lost in a crash did not finish within {} s (the "
                         "records directory does not answer?); the account starts without it, the check goes on",
                         account, RECORDS_CHECK_BOUND_S)
            self._records_checks.add(check)
            check.add_done_callback(self._records_checks.discard)

    async def _recover_closure_records(self, account: str, window: timedelta = timedelta(days=1)) -> int:
        """A crash (SIGKILL, power) between a terminal commit and the writing of its closure record loses the
        record, not the closure: the database has it. Closures of the last `window` without a record are
        written now, rebuilt from the journal, marked `"recovered": true`."""
        assert self.repo is not None and self.records is not None
        now = datetime.now(UTC)
        since = now - window
        retention = self.config.records_retention_days
        if retention is not None:  # files older than that are deleted: their closures are not "lost"
            kept_from = datetime.combine(now.date() - timedelta(days=retention - 1), datetime.min.time(),
                                         tzinfo=UTC)
            since = max(since, kept_from)
        records = self.records
        try:  # books, not protection: whatever fails here is said and the start goes on
            written = {r.get("position_id")
                       for r in await in_daemon_thread(records.read_since, "closure", since.date())}
            records.remember_closures(written)  # a close whose record landed and whose commit did not: once
            ended = await self.repo.closed_since([account], since)
            if not ended:
                return 0
            missing = [pid for pid in ended if pid not in written]
            for position_id in missing:
                journal = await self.repo.journal(position_id)
                position = await replay(journal)
                last = journal[-1]
                record = closure_of(position, from_payload(last.event, last.payload)).as_record()
                record["recovered"] = True
                records.emit(record)
        except Exception as e:  # noqa: BLE001
            logger.error("{}: closure records lost in a crash could not be checked: {}: {}", account,
                         type(e).__name__, e)
            return 0
        if missing:
            logger.warning("{}: {} closure record(s) lost in a crash were written again from the journal: {}",
                           account, len(missing), missing)
        return len(missing)

    async def _start_exchange(self, account: AccountConfig) -> CcxtExchange:
        """The exchange client, its markets loaded. A venue that answers 5xx, 429 or nothing at all is waited
        for (a service restarted during an outage must come up when the venue does, not exit)."""
        return await self._until_reachable(account, "cannot load the exchange's markets",
                                           lambda: CcxtExchange(account.exchange).start())

    async def _check_account(self, account: AccountConfig, exchange: CcxtExchange) -> None:
        """What cannot work stops the start with one line (exit 2): a key the venue refuses, no permission
        to trade, a hedge-mode account, a symbol the venue does not list. An unreachable venue is waited for."""
        await self._until_reachable(account, "cannot check the account on the exchange",
                                    lambda: exchange.check_account(list(account.symbols)))

    async def _until_reachable(self, account: AccountConfig, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """`call()` retried every `recovery_retry_s` while the venue is unreachable (5xx, 429, timeouts); a
        refusal that retrying cannot change (a bad key, a missing permission) stops the start (StartError)."""
        index, every = self.config.accounts.index(account), Backoff.fixed(self.config.recovery_retry_s)
        try:
            return await until_done(call, retry_on=(xerr.Retryable,), backoff=every,
                                    on_retry=lambda attempt, e, delay: logger.error(
                                        "{}: {} ({}); retry {} in {} s", account.name, what, e, attempt, delay))
        except xerr.Fatal as e:
            raise StartError(f"accounts.{index} ({account.name}): {e}") from None

    async def stop(self) -> None:
        """Graceful stop (see the module docstring); safe to call twice and after a failed start."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self.collector.stop()
        for check in list(self._records_checks):
            check.cancel()  # books: a check still waiting for the records disk is not waited for
        logger.info("stopping: scheduled jobs first, then in-flight work; stops stay on the exchange")
        try:
            if self.api is not None:  # no new commands from outside; the API never holds up the rest of the stop
                try:
                    await asyncio.wait_for(self.api.stop(), 5.0)
                except Exception as e:  # noqa: BLE001 - books and the page: the drain below matters more
                    logger.error("stopping the control API failed: {}: {}", type(e).__name__, e)
            keeper = self.keeper
            if keeper is not None:  # no account taken or handed over from here on; the leases are still renewed
                await keeper.close()
                await keeper.keep_alive_until(self._stop_accounts())
                await keeper.release_all()  # drained and flushed: the other instances take them at once
            else:
                await self._stop_accounts()
            if self.records is not None:
                await asyncio.to_thread(self.records.close, self.config.shutdown_drain_s)
        finally:
            for runtime in list(self.accounts.values()):
                try:
                    await runtime.exchange.close()
                except Exception as e:  # noqa: BLE001 - one client must not keep the others or the database open
                    logger.warning("{}: closing the exchange client failed: {}", runtime.config.name,
                                   type(e).__name__)
            try:
                if self.repo is not None:
                    await self.repo.close()
            finally:
                if self._sqlite_lock is not None:
                    self._sqlite_lock.release()
                    self._sqlite_lock = None
                left = {name: len(r.engine.positions) for name, r in self.accounts.items()}
                logger.info("stopped; live positions left protected on the exchange: {}", left)
                await logger.complete()
                self._stopped.set()

    async def _stop_accounts(self) -> None:
        runtimes = list(self.accounts.values())
        for runtime in runtimes:
            if runtime.scheduler is not None:
                await runtime.scheduler.stop()
        await asyncio.gather(*(self._stop_live(r) for r in runtimes))
        await self._end_extra()  # the bot's own work must not outlive the clients and the database
        # The books catch up before the database closes (what cannot be written is said, and rebuilt
        # from the venue at the next start).
        await asyncio.gather(*(r.engine.books.close(self.config.shutdown_drain_s) for r in runtimes))

    async def _end_extra(self) -> None:
        extra, self._extra = self._extra, None
        if extra is None:
            return
        if not extra.done():
            extra.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):  # a failure was logged when it happened
            await extra

    async def _stop_live(self, runtime: AccountRuntime) -> None:
        if runtime.reconciler is not None:
            runtime.reconciler.detach()
        if runtime.live is not None:
            await runtime.live.stop(drain_s=self.config.shutdown_drain_s)

    async def run(self, after_start: Callable[[Service], Awaitable[Any]] | None = None) -> None:
        """Start, run until SIGINT or SIGTERM, then stop gracefully.

        The signal handlers are installed before anything starts: a signal during the start (which may be
        waiting for an unreachable exchange) abandons the start and stops what it had started.
        `after_start` (the bot's own work, a scripted step) runs as a task once started; a command it has
        in flight at the signal is drained like any other.
        """
        loop = asyncio.get_running_loop()
        requested = asyncio.Event()

        def on_signal(sig: signal.Signals) -> None:
            if requested.is_set():
                logger.warning("{} received while stopping; the stop goes on (SIGKILL to abort)", sig.name)
                return
            logger.info("{} received: stopping", sig.name)
            requested.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            starting = asyncio.ensure_future(self.start())
            waiting = asyncio.ensure_future(requested.wait())
            await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                logger.warning("stop requested during the start; abandoning it")
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting  # start() stops what it had started
                return
            if starting.exception() is not None:
                waiting.cancel()
                starting.result()  # a failed start raises here (it has stopped what it started)
            if after_start is not None:
                self._extra = asyncio.ensure_future(after_start(self))
                self._extra.add_done_callback(_log_failure)
            await waiting
            await self.stop()  # drains, then ends the after_start work before closing anything
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        e = task.exception()
        logger.error("the work run after start failed: {}: {}", type(e).__name__, e)


def default_instance() -> str:
    """This process's name when the configuration gives none: host and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


def take_sqlite_lock(url: str) -> SqliteLock | None:
    """The lock that keeps a second service off a SQLite database (None for PostgreSQL); StartError if held."""
    try:
        return SqliteLock.take(url)
    except DatabaseConfigError as e:
        raise StartError(f"database_url: {e}") from None


async def check_database(url: str) -> None:
    """Open the database (migrations applied) and close it again: StartError naming `database_url` if not."""
    repo = await _open_database(url)
    await repo.close()


def _postgresql(url: str) -> bool:
    return url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


async def _open_database(url: str, **engine_kwargs: Any) -> Repository:
    try:
        return await Repository.open(url, **engine_kwargs)
    except DatabaseConfigError as e:
        raise StartError(f"database_url: {e}") from None
    except Exception as e:  # noqa: BLE001 - unreachable, refused login, unwritable file: say which, not the password
        raise StartError(f"database_url: {open_error(url, e)}") from None


async def in_daemon_thread(call: Callable[..., T], *args: Any) -> T:
    """`call(*args)` in a daemon thread of its own. For file reads that only keep books: one that never returns
    (a disk or network mount that hangs) leaves that thread behind, where `asyncio.to_thread`'s executor
    thread would hold up the interpreter's exit (`asyncio.run` joins it: a SIGTERMed service never ended)."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if answer.done():
            return  # the caller gave up
        if error is not None:
            answer.set_exception(error)
        else:
            answer.set_result(result)

    def run() -> None:
        try:
            result, error = call(*args), None
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            result, error = None, e
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to answer
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=f"books-{getattr(call, '__name__', 'read')}", daemon=True).start()
    return await answer
