"""Several service processes on one PostgreSQL database: each account is acted on by one process at a time.

`LeaseKeeper` runs in every process of a cluster (`[cluster]` in the configuration). It holds the leases of
the accounts this process acts on (`db.leases`), renews them, takes free ones up to its share, hands them
back on SIGTERM or when asked, and stops acting on an account the moment it cannot be sure it still owns it.

What each guarantee rests on (README, "Scale out"):

- **Acting only while owning.** After each renewal the process may act on the account until
  `t_sent + lease_s - margin_s` by its own monotonic clock, where `t_sent` is when the renewal was *sent* (the
  database set the expiry later than that, so this ends at least `margin_s` before the database's expiry,
  as long as the two clocks run at the same rate within `margin_s` per lease). Every request that changes
  the venue asks `Held.acting()` at the moment it is sent (after ccxt's rate limiter): past that instant it
  is refused (`NotOwner`), also in a process that was frozen (SIGSTOP) and wakes with work queued. When a
  renewal fails past that instant, or the database says the lease is gone, the account is stopped at once:
  streams closed, stops left on the venue, a CRITICAL line.
- **Taking over only after the owner stopped.** A held lease is taken only `margin_s` after its expiry by the
  database's clock: at least `2 × margin_s` after the old owner stopped acting by its own. One exception: an
  owner on this same host (host name and pid namespace) whose process is gone (`kill(pid, 0)` says so) is
  known to act no more, and its leases are taken at once (a crashed service restarted by systemd does not
  wait out its own old lease); a reused pid reads as alive, so the exception never takes a live owner's. The taker
  increments the epoch and runs the usual start of an account (rehydrate, streams, restart recovery from
  the venue's REST snapshot, orphan sweep) before any order.
- **Fenced writes.** Every write for the account (transition, new position, order row) checks the lease's
  token and epoch in its own transaction (`FOR SHARE`): a stale owner's write fails with `LeaseLost`, never
  lands after a takeover.
- **Hand-over.** SIGTERM drains every account like a single process does, then releases the leases: another
  process takes them at its next pass (`renew_s`), without waiting for the expiry. `lifecycle accounts
  release NAME` asks the owner to do the same for one account (which it then leaves alone for four passes).

Assignment: every process reads the same account list; each takes free accounts up to its share
(`ceil(accounts / instances heard from within three passes)`, at most `max_accounts`), and beyond its share any
account left free for one more pass (nobody may leave an account unprotected); a process over its share hands
accounts over while another holds less than its due, so a process that joins gets its share.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from loguru import logger

from db.leases import Fence, LeaseStore


@dataclass(frozen=True)
class ClusterConfig:
    """`[cluster]`: run as one of several processes sharing the accounts of one PostgreSQL database."""

    instance: str  # this process's name in the lease table, logs, records and metrics
    lease_s: float = 10.0  # how long a lease lasts without renewal (the database's clock)
    renew_s: float = 2.0  # how often leases are renewed and free accounts looked for
    margin_s: float = 2.0  # clock margin: stop acting this long before the expiry, take over this long after
    max_accounts: int = 0  # at most this many accounts in this process; 0: no limit but the share
    start_concurrency: int = 8  # accounts started at once by one process

    def __post_init__(self) -> None:
        if not self.instance or len(self.instance) > 128:
            raise ValueError("cluster.instance must be 1 to 128 characters")
        if not self.margin_s > 0:
            raise ValueError(f"cluster.margin_s must be > 0, got {self.margin_s}")
        if not self.renew_s > 0:
            raise ValueError(f"cluster.renew_s must be > 0, got {self.renew_s}")
        if not self.lease_s - self.margin_s >= 2 * self.renew_s:
            raise ValueError(f"cluster.lease_s ({self.lease_s:g}) must be at least margin_s + 2 × renew_s "
                             f"({self.margin_s + 2 * self.renew_s:g}): a lease must survive one failed renewal")
        if self.max_accounts < 0:
            raise ValueError(f"cluster.max_accounts must be >= 0, got {self.max_accounts}")
        if self.start_concurrency < 1:
            raise ValueError(f"cluster.start_concurrency must be >= 1, got {self.start_concurrency}")


@dataclass
class Held:
    """One account's lease as this process sees it."""

    account: str
    epoch: int
    fence: Fence
    valid_until: float  # monotonic: act before this instant only
    monotonic: Callable[[], float] = time.monotonic
    lost: bool = False

    def acting(self) -> bool:
        """May this process change the venue for the account right now?"""
        return not self.lost and self.monotonic() < self.valid_until


# start(account, held) starts the account (its engine fenced by `held.fence`, its client gated by `held.acting`);
# stop(account, graceful) stops it: graceful drains and flushes (hand-over), else at once (the lease is lost).
StartAccount = Callable[[str, Held], Awaitable[None]]
StopAccount = Callable[[str, bool], Awaitable[None]]


@dataclass
class KeeperStats:
    acquired: int = 0
    lost: int = 0
    handed_over: int = 0
    renew_failures: int = 0
    last_renew_ok: float | None = None  # monotonic
    takeovers: list[tuple[str, int]] = field(default_factory=list)  # (account, epoch) taken, latest 100


class LeaseKeeper:
    def __init__(self, store: LeaseStore, config: ClusterConfig, accounts: list[str], *, start: StartAccount,
                 stop: StopAccount, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.config = config
        self.accounts = list(accounts)
        self.token = uuid.uuid4().hex
        self.held: dict[str, Held] = {}
        self.stats = KeeperStats()
        self._start, self._stop = start, stop
        self.monotonic = monotonic
        self._started_at = datetime.now(UTC)
        self._starting: dict[str, asyncio.Task[None]] = {}
        self._stopping: dict[str, asyncio.Task[None]] = {}
        self._leave_alone: dict[str, float] = {}  # account -> monotonic: handed back on request, not retaken before
        self._acquired_at: dict[str, float] = {}  # account -> monotonic: when this process took it
        self._free_seen: set[str] = set()  # accounts free at the previous claim pass
        self._renewing: asyncio.Task[None] | None = None
        self._claiming: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(config.start_concurrency)
        self._closing = False
        self._wake = asyncio.Event()

    # --- start and stop --------------------------------------------------------------------------

    async def start(self) -> LeaseKeeper:
        """Lease rows for every configured account, this instance registered, then a first pass taking this
        process's share (its starts awaited, so `lifecycle run` says "running" with its accounts started)."""
        await self.store.ensure(self.accounts)
        await self._heartbeat()
        logger.info("cluster: instance {} joining ({} account(s) configured; lease {:g} s, margin {:g} s)",
                    self.config.instance, len(self.accounts), self.config.lease_s, self.config.margin_s)
        self._renewing = asyncio.ensure_future(self._renew_loop())
        delay = await self._claim_pass()  # the first pass, then the loop: never two passes at once
        self._claiming = asyncio.ensure_future(self._claim_loop(delay))
        if self._starting:
            await asyncio.gather(*self._starting.values(), return_exceptions=True)
        return self

    async def _heartbeat(self) -> None:
        await asyncio.wait_for(self.store.heartbeat(token=self.token, name=self.config.instance,
                                                    started_at=self._started_at,
                                                    max_accounts=self.config.max_accounts), self.config.renew_s)

    async def close(self) -> None:
        """Stop claiming, let starts and hand-overs in flight end (the leases still renewed meanwhile), then stop
        renewing (the accounts themselves are stopped by the caller, then `release_all`)."""
        self._closing = True
        for task in [t for t in (self._claiming,) if t is not None]:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        starting = list(self._starting.values())
        for task in starting:
            task.cancel()
        await asyncio.gather(*starting, *self._stopping.values(), return_exceptions=True)
        if self._renewing is not None:
            self._renewing.cancel()
            await asyncio.gather(self._renewing, return_exceptions=True)

    async def keep_alive_until(self, work: Awaitable[Any]) -> None:
        """Renew the leases while `work` (the graceful stop of every account) runs: a drain longer than the
        lease must not lose the accounts half-way."""
        renewing = asyncio.ensure_future(self._renew_loop())
        try:
            await work
        finally:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)

    async def release_all(self) -> None:
        """Hand every lease back (after the accounts were drained and their books flushed) and leave."""
        held = [a for a, h in self.held.items() if not h.lost]
        try:
            released = await asyncio.wait_for(self.store.release(held, token=self.token), self.config.renew_s * 2)
            if released:
                logger.info("cluster: {} handed back {} account(s): {}", self.config.instance, len(released),
                            ", ".join(sorted(released)))
            await asyncio.wait_for(self.store.leave(token=self.token), self.config.renew_s)
        except Exception as e:  # noqa: BLE001 - they expire instead; the others take them after lease + margin
            logger.error("cluster: the leases could not be handed back ({}: {}); they expire in {:g} s",
                         type(e).__name__, e, self.config.lease_s)
        self.held.clear()

    # --- renewal --------------------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        while True:
            sent = self.monotonic()
            await self._renew_once(sent)
            await asyncio.sleep(max(0.0, self.config.renew_s - (self.monotonic() - sent)))

    async def _renew_once(self, sent: float) -> None:
        held = [a for a, h in self.held.items() if not h.lost]
        if not held:
            return
        config = self.config
        try:
            renewed = await asyncio.wait_for(self.store.renew(held, token=self.token, lease_s=config.lease_s),
                                             config.renew_s)
        except Exception as e:  # noqa: BLE001 - the database unreachable, slow or refusing: acting ends at the margin
            self.stats.renew_failures += 1
            left = min((self.held[a].valid_until for a in held if a in self.held), default=sent) - self.monotonic()
            why = (f"no answer within {config.renew_s:g} s" if isinstance(e, TimeoutError)
                   else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            logger.error("cluster: renewing {} lease(s) failed ({}); acting on them ends in {:.1f} s unless a "
                         "renewal succeeds", len(held), why, max(0.0, left))
            for account in held:
                h = self.held.get(account)
                if h is not None and not h.acting():
                    self._lose(account, "its lease could not be renewed in time")
            return
        self.stats.last_renew_ok = self.monotonic()
        until = sent + config.lease_s - config.margin_s
        answered = {r.account: r for r in renewed}
        for account in held:
            h = self.held.get(account)
            if h is None or (account in self._stopping and account not in answered):
                continue  # (released by a hand-over while this renewal was in flight: not a loss)
            r = answered.get(account)
            if r is None or r.epoch != h.epoch:
                self._lose(account, "the database says its lease is no longer this process's")
                continue
            h.valid_until = until
            if r.release_requested and account not in self._stopping and not self._closing:
                logger.warning("cluster: {}: release requested; handing it over", account)
                self._hand_over(account, leave_alone_s=self.leave_alone_s)

    def _lose(self, account: str, why: str) -> None:
        """Stop acting on the account at once (the lease is gone or may be): the gate closes, streams stop,
        stops stay on the venue; another process takes it after the expiry and the margin."""
        h = self.held.get(account)
        if h is None or h.lost:
            return
        h.lost = True
        self.stats.lost += 1
        logger.critical("cluster: {} stops acting on {} now: {}; its stops stay on the venue and another instance "
                        "takes it over", self.config.instance, account, why)
        if self._closing:
            return  # the service is stopping every account already; the gate is closed from now on
        starting = self._starting.get(account)
        if starting is not None:
            starting.cancel()  # its stop below waits for the start to unwind first
        self._spawn_stop(account, graceful=False, release=False)

    def _hand_over(self, account: str, *, leave_alone_s: float) -> None:
        """Drain the account, then release its lease (free at once for the other instances)."""
        self._leave_alone[account] = self.monotonic() + leave_alone_s
        self._spawn_stop(account, graceful=True, release=True)

    def _spawn_stop(self, account: str, *, graceful: bool, release: bool) -> None:
        if account in self._stopping:
            return

        async def stop() -> None:
            try:
                starting = self._starting.get(account)
                if starting is not None:  # a hand-over of an account still starting: its start ends first
                    await asyncio.gather(starting, return_exceptions=True)
                await self._stop(account, graceful)
                if release:
                    h = self.held.get(account)
                    if h is not None and not h.lost:
                        await self.store.release([account], token=self.token)
                        self.stats.handed_over += 1
                        logger.info("cluster: {} handed {} over", self.config.instance, account)
            except Exception as e:  # noqa: BLE001 - the lease then expires and is taken after the margin
                logger.error("cluster: stopping {} failed: {}: {}", account, type(e).__name__, e)
            finally:
                self.held.pop(account, None)
                self._stopping.pop(account, None)
                self._wake.set()

        self._stopping[account] = asyncio.ensure_future(stop())

    # --- claiming -------------------------------------------------------------------------------

    async def _claim_loop(self, delay: float) -> None:
        while True:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            delay = self.config.renew_s
            try:
                await self._heartbeat()
                delay = await self._claim_pass()
            except Exception as e:  # noqa: BLE001 - next pass
                why = "no answer in time" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
                logger.warning("cluster: looking for free accounts failed: {}", why)

    @property
    def leave_alone_s(self) -> float:
        """An account this process handed over (asked to, or over its share) is not taken back for this long:
        long enough for another process to see it free at two passes, short enough that an account nobody
        else takes is not left unowned for long."""
        return 4 * self.config.renew_s

    def share(self, instances: int) -> int:
        """How many accounts this process aims for with `instances` processes alive."""
        fair = math.ceil(len(self.accounts) / max(1, instances))
        return min(fair, self.config.max_accounts) if self.config.max_accounts else fair

    async def _claim_pass(self) -> float:
        """Take free accounts, hand over what exceeds the share; the seconds until the next pass.

        Free accounts are taken up to the share at once, and beyond it (up to `max_accounts`) when they were
        free at the previous pass too: an account nobody takes is an account nobody protects, while the
        processes under their share get first pick. A process over its share hands accounts over only while
        another live process holds less than `accounts // instances` (the ones it has held longest first)."""
        if self._closing:
            return self.config.renew_s
        config, now = self.config, self.monotonic()
        # Instances heard from within three passes (a dead or frozen one stops counting well before its leases
        # expire), and none known to be dead on this host.
        dead = await self.store.dead_here(token=self.token)
        holdings = {t: n for t, n in (await self.store.holdings(within_s=3 * config.renew_s)).items()
                    if t not in dead}
        holdings.setdefault(self.token, (0, config.max_accounts))
        instances = len(holdings)
        target = self.share(instances)
        mine = [a for a, h in self.held.items() if not h.lost and a not in self._stopping]
        due = len(self.accounts) // instances
        # what the others lack of their due, each as far as its own capacity goes (an instance that can take
        # no more is never handed any: the account would bounce between the others)
        deficit = sum(max(0, (min(due, cap) if cap else due) - n)
                      for t, (n, cap) in holdings.items() if t != self.token)
        if len(mine) > target and deficit > 0:
            extra = sorted(mine, key=lambda a: self._acquired_at.get(a, 0.0))[:min(len(mine) - target, deficit)]
            logger.info("cluster: {} instance(s) alive, share {}: handing over {} account(s): {}", instances, target,
                        len(extra), ", ".join(extra))
            for account in extra:
                self._hand_over(account, leave_alone_s=self.leave_alone_s)
            return config.renew_s
        limit = config.max_accounts or len(self.accounts)
        owned = len(mine) + sum(1 for a in self._starting if a not in mine)
        if owned >= limit:
            return config.renew_s
        # (alone, nothing is left alone: an account handed back with nobody else to take it is taken again)
        candidates = [a for a in self.accounts if a not in self.held and a not in self._starting
                      and (instances == 1 or self._leave_alone.get(a, 0.0) <= now)]
        waits = await self.store.next_free_at(candidates, margin_s=config.margin_s, dead=dead)
        free_before, self._free_seen = self._free_seen, {a for a, w in waits.items() if w <= 0}
        delay = config.renew_s
        for account in candidates:
            if owned >= limit:
                break
            wait = waits.get(account)
            if wait is None:
                continue
            if wait > 0:
                delay = min(delay, wait + 0.05)  # wake just after it becomes free
                continue
            if owned >= target and account not in free_before:
                delay = min(delay, config.renew_s)
                continue  # beyond the share: only if still free at the next pass
            sent = self.monotonic()
            try:
                taken = await asyncio.wait_for(
                    self.store.acquire(account, owner=config.instance, token=self.token, lease_s=config.lease_s,
                                       margin_s=config.margin_s, dead=dead), config.renew_s)
            except TimeoutError:  # (if it did commit, the lease expires unused: nothing acts on it)
                logger.warning("cluster: taking {} got no answer within {:g} s; next pass", account, config.renew_s)
                continue
            if taken is None:
                continue  # another instance was faster
            owned += 1
            self.stats.acquired += 1
            self.stats.last_renew_ok = sent
            self.stats.takeovers = [*self.stats.takeovers[-99:], (account, taken.epoch)]
            self._acquired_at[account] = sent
            held = Held(account, taken.epoch, Fence(account, self.token, taken.epoch),
                        sent + config.lease_s - config.margin_s, self.monotonic)
            self.held[account] = held
            logger.info("cluster: {} took {} (epoch {}); starting it (restart recovery before any order)",
                        config.instance, account, taken.epoch)
            self._starting[account] = asyncio.ensure_future(self._start_held(account, held))
        return delay

    async def _start_held(self, account: str, held: Held) -> None:
        try:
            async with self._slots:
                if held.lost:
                    return
                await self._start(account, held)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - this account cannot start here: hand it back for another try
            logger.error("cluster: {} could not start {}: {}: {}; handing it back", self.config.instance, account,
                         type(e).__name__, e)
            self._spawn_stop(account, graceful=False, release=True)
            self._leave_alone[account] = self.monotonic() + self.leave_alone_s
        finally:
            self._starting.pop(account, None)
