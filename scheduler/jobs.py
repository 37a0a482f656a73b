"""Reconciliation on a schedule: APScheduler's asyncio scheduler runs the checks as coroutine jobs.

A job never changes a position's state itself: the sync job runs a `Reconciler` pass (which fires
events only on evidence), the orphan sweep cancels orders of ours that belong to no live position.

* `sync`: ticks every `fast_sync_interval_s` (2 s). Every tick runs a reconciliation pass (one REST
  positions list, weight 5 on Binance: 150 of the 2,400 per minute at 2 s): a stream can go silent without
  a sign (an expired listen key, a wedged socket), and only REST then shows the close, so REST is asked
  on every tick whatever the stream's health. Every tick also checks the positions memory knows to be
  unprotected (CRITICAL line, repair).
* `audit`: the venue-wide protection audit (open orders and open algo orders, weight 40 each on Binance)
  every `sync_interval_s` (30 s), or every 10 s while something is suspect; its own job, so its
  listings (slow under ccxt's rate limiter) never delay a sync tick.
* `orphans`: every `orphan_interval_s` (60 s): open orders (regular and conditional) whose client id is in
  our namespace (`lc-...`) and whose position is not live here are cancelled and recorded
  (`orphan_cancelled`). Orders that are not ours are never touched.

Every job runs with `max_instances=1` and coalescing (a late tick is not run twice); its duration and
outcome are logged and counted in `JobStats`.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from loguru import logger

from exchange import errors as xerr
from lifecycle.config_fields import check_limits, setting
from lifecycle.domain import CloseReason
from lifecycle.errors import LeaseLost
from lifecycle.machines.states import PROTECTED
from lifecycle.reconciler import Reconciler, SyncReport
from lifecycle.record_kinds import AgedPosition


@dataclass(frozen=True)
class ScheduleConfig:
    """The jobs' intervals and the aged policy; also the `[schedule]` section of the service's settings."""

    # the venue-wide protection audit (the REST positions are read on every fast tick)
    sync_interval_s: float = setting(30.0, gt=0, le=3600)
    fast_sync_interval_s: float = setting(2.0, gt=0, le=3600)
    orphan_interval_s: float = setting(60.0, gt=0, le=86400)
    aged_interval_s: float = setting(60.0, gt=0, le=86400)
    max_age_s: float | None = setting(None, gt=0, le=366 * 86400)  # None: no aged check
    aged_policy: Literal["report", "close"] = "report"  # report (record and warn) or close (bot close, max_age)

    def __post_init__(self) -> None:
        check_limits(self, "schedule")
        if self.aged_policy not in ("report", "close"):
            raise ValueError(f"aged_policy must be 'report' or 'close', got {self.aged_policy!r}")
        if self.fast_sync_interval_s > self.sync_interval_s:
            raise ValueError("fast_sync_interval_s must not exceed sync_interval_s")


@dataclass
class JobStats:
    runs: Counter[tuple[str, str]] = field(default_factory=Counter)  # (job, outcome) -> count
    last_duration_ms: dict[str, float] = field(default_factory=dict)
    last_outcome: dict[str, str] = field(default_factory=dict)  # job -> ok / skipped / exchange_error / error
    last_at: dict[str, float] = field(default_factory=dict)  # job -> when its last run ended (time.time())
    total_duration_ms: dict[str, float] = field(default_factory=dict)


SUSPECT_AUDIT_S = 10.0  # the shortest interval between venue-wide audits while something is suspect


class ReconciliationScheduler:
    def __init__(self, reconciler: Reconciler, config: ScheduleConfig | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        """The jobs of one account; they see it through the reconciler's read-only view and commands."""
        self.reconciler = reconciler
        self.view, self.commands = reconciler.view, reconciler.commands
        self.account = self.view.account
        self.monotonic = monotonic
        self.config = config or ScheduleConfig()
        self.stats = JobStats()
        self._scheduler: AsyncIOScheduler | None = None
        self._last_audit = float("-inf")
        self._failures_at_audit = 0
        self._running: set[asyncio.Task[Any]] = set()
        self._aged_reported: set[str] = set()

    async def start(self) -> ReconciliationScheduler:
        scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop())
        common = {"max_instances": 1, "coalesce": True, "misfire_grace_time": None}
        scheduler.add_job(self._job, "interval", args=["sync", self._sync_tick], id="sync",
                          seconds=self.config.fast_sync_interval_s, **common)
        scheduler.add_job(self._job, "interval", args=["audit", self._audit_tick], id="audit",
                          seconds=self.config.fast_sync_interval_s, **common)
        scheduler.add_job(self._job, "interval", args=["orphans", self.sweep_orphans], id="orphans",
                          seconds=self.config.orphan_interval_s, **common)
        if self.config.max_age_s is not None:
            scheduler.add_job(self._job, "interval", args=["aged", self.check_aged], id="aged",
                              seconds=self.config.aged_interval_s, **common)
        scheduler.start()
        self._scheduler = scheduler
        logger.info("{}: reconciliation scheduled (positions checked every {} s; protection audit every {} s, "
                    "every {} s while something is suspect; orphan sweep every {} s)", self.account,
                    self.config.fast_sync_interval_s, self.config.sync_interval_s, self.config.fast_sync_interval_s,
                    self.config.orphan_interval_s)
        return self

    async def stop(self, timeout: float = 5.0) -> None:
        """No new runs; the runs in flight finish (up to `timeout`), then the scheduler shuts down.

        APScheduler's asyncio executor cancels running jobs at shutdown, so the jobs are paused first and
        the runs in flight awaited before it is shut down: an adoption or a close is not cut in half.
        """
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is None:
            return
        scheduler.pause()
        if self._running:
            _, pending = await asyncio.wait(set(self._running), timeout=timeout)
            if pending:
                logger.warning("{}: {} reconciliation job(s) still running at stop; cancelled", self.account,
                               len(pending))
        scheduler.shutdown(wait=False)

    async def run_now(self, name: str) -> None:
        """Run one job at once, counted and logged like a scheduled run (e.g. the orphan sweep at start)."""
        work = {"sync": self.reconciler.sync, "orphans": self.sweep_orphans, "aged": self.check_aged,
                "audit": self.commands.audit_protection}[name]
        await self._job(name, work)

    async def _job(self, name: str, work: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._running.add(task)
        started = time.perf_counter()
        outcome = "ok"
        detail: Any = None
        try:
            detail = await work()
            if detail is None:
                outcome = "skipped"
        except xerr.ExchangeError as e:
            outcome = "exchange_error"
            logger.warning("{} job {} failed on the exchange: {}", self.account, name, e)
        except LeaseLost as e:  # the account moves to another process: said once by the lease keeper, no trace
            outcome = "error"
            logger.error("{} job {} failed: {}", self.account, name, e)
        except Exception as e:  # noqa: BLE001 - a job must never stop the scheduler
            outcome = "error"
            logger.exception("{} job {} failed: {}: {}", self.account, name, type(e).__name__, e)
        finally:
            self._running.discard(task)
            ms = round((time.perf_counter() - started) * 1000, 3)
            self.stats.runs[(name, outcome)] += 1
            self.stats.last_duration_ms[name] = ms
            self.stats.last_outcome[name] = outcome
            self.stats.last_at[name] = time.time()
            self.stats.total_duration_ms[name] = self.stats.total_duration_ms.get(name, 0.0) + ms
        if outcome != "skipped":
            # A quiet sync pass runs every couple of seconds: only what found something is worth a line.
            quiet = outcome == "ok" and ((name == "sync" and not _notable(detail)) or
                                         (name == "audit" and not (detail or {}).get("repaired")))
            logger.log("DEBUG" if quiet else "INFO", "{} job {} {} in {} ms{}", self.account, name, outcome, ms,
                       f": {detail}" if detail is not None else "")

    def audit_due(self) -> bool:
        """The venue-wide protection audit (two open-order listings, weight 40 each on Binance) runs every
        `sync_interval_s`, and every SUSPECT_AUDIT_S while something is suspect: memory knows an unprotected
        position, or a stop failed since the last audit (a stream that is merely down, or books behind, do
        not count: they would spend the request budget on listings, and delay the stop moves behind them)."""
        view = self.view
        suspect = bool(view.unprotected()) or view.stop_move_failures != self._failures_at_audit
        since = self.monotonic() - self._last_audit
        # Suspect: soon, but not on every tick: two weight-40 listings per tick would back ccxt's rate limiter
        # up behind them, and the stop moves with it. (The books being behind is not suspect: memory is right.)
        return since >= self.config.sync_interval_s or (
            suspect and since >= max(self.config.fast_sync_interval_s, SUSPECT_AUDIT_S))

    async def _sync_tick(self) -> Any:
        """Every tick: one reconciliation pass (the REST positions list: the watchdog that finds what a
        silent stream hides) and the in-memory protection check."""
        try:
            return await self.reconciler.sync()
        finally:
            await self.commands.check_protection()

    async def _audit_tick(self) -> Any:
        """The venue-wide protection audit, when due (its own job: its listings never delay a sync tick)."""
        if not self.audit_due():
            return None
        self._last_audit = self.monotonic()
        self._failures_at_audit = self.view.stop_move_failures
        counts = await self.commands.audit_protection()
        if counts["repaired"]:
            logger.warning("{}: protection audit: {}", self.account, counts)
        return counts

    async def check_aged(self) -> str | None:
        """Positions older than `max_age_s`: verified on the exchange first (a sync pass: a phantom ends
        as such), then closed by the bot with reason `max_age`, or reported once, per `aged_policy`."""
        max_age = self.config.max_age_s
        if max_age is None:
            return None
        await self.reconciler.sync()
        view, now = self.view, self.view.now()
        # A position REST no longer shows (its phantom countdown running) is not closed: a close would end it
        # CLOSED, not PHANTOM; the countdown settles it.
        aged = [p for p in view.positions(PROTECTED)
                if (now - p.created_at).total_seconds() > max_age and not self.reconciler.absence_pending(p.id)]
        closed = 0
        for position in aged:
            age_s = round((now - position.created_at).total_seconds(), 1)
            if self.config.aged_policy == "close":
                logger.info("{} {} {}: {} s old (max {} s): closing", view.account, position.symbol, position.id,
                            age_s, max_age)
                if await self.commands.close(position.id, CloseReason.MAX_AGE):
                    closed += 1
            elif position.id not in self._aged_reported:
                self._aged_reported.add(position.id)
                self.commands.emit(AgedPosition(
                    account=view.account, symbol=position.symbol, position_id=position.id, at=now, age_s=age_s,
                    max_age_s=max_age, state=position.state.value))
                logger.warning("{} {} {}: {} s old (max {} s); policy 'report': left open", view.account,
                               position.symbol, position.id, age_s, max_age)
        return f"{len(aged)} aged, {closed} closed"

    async def sweep_orphans(self) -> str:
        """Cancel working orders of ours whose position is not live here; never touch anyone else's."""
        sweep = await self.commands.sweep_orphans()
        return (f"{sweep.cancelled} orphan(s) cancelled, {sweep.foreign} order(s) not ours left alone"
                + (f", {sweep.undecided} left for the next sweep (database failing)" if sweep.undecided else ""))


def _notable(report: Any) -> bool:
    """A sync report that found anything beyond "every position is where it should be"."""
    if not isinstance(report, SyncReport):
        return True
    return bool(report.closed or report.untracked or report.adopted or report.unconfirmed or report.stream_disagrees
                or report.in_grace)
