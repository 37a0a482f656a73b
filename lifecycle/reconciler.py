"""One reconciliation pass: REST positions compared with the live positions, as machine events.

A pass never changes a state itself; it observes and fires events, and only where the observation is
proof (DESIGN: seed 000 and 001):

* A live position that REST still shows is left alone, whatever the stream said; a stale REST answer
  (seed 000) therefore never un-closes or closes anything.
* A live position REST does not show is absent only when a second, targeted query agrees and our own
  last order activity on it is older than the grace window (REST lags our orders). Then the closing fill
  is looked up in recent trades: found, `flat` with its cause (in CLOSING_BY_BOT -> CLOSED, and the cause
  is the order's: our close is `bot`, never external: seed 001; a stop or a liquidation that came first
  says so); not found, the absence must last `phantom_after_s` before `vanished` -> PHANTOM (CLOSED with
  cause not_found when we were closing it). A position closed while still opening, with nothing known
  filled, is left to its entry's outcome (the entry lookup).
* OPENING positions are left to the order stream (their entry's own updates decide).

The scheduler (issue 5) runs passes on an interval and adds adoption, mismatch and orphan handling.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, Literal, get_args

from loguru import logger

from exchange.port import Fill, PositionSnapshot
from lifecycle.account import Account, AccountCommands, AccountView
from lifecycle.causes import classify_close
from lifecycle.config_fields import check_limits, setting
from lifecycle.domain import CloseCause, CloseReason, Position, Side
from lifecycle.errors import DuplicateLivePosition
from lifecycle.events import CloseRequested, Flat, Vanished
from lifecycle.guards.predicates import ABSENCE_CONFIRMATIONS_REQUIRED, is_outside_grace_window
from lifecycle.machines.states import FLATTENABLE, PROTECTED, PositionState
from lifecycle.record_kinds import UntrackedPosition

UntrackedPolicy = Literal["alert", "adopt"]  # alert: record and report, touch nothing (the default)
UNTRACKED_POLICIES: tuple[str, ...] = get_args(UntrackedPolicy)


@dataclass(frozen=True)
class ReconcileConfig:
    """How reconciliation weighs REST against the stream; also the `[reconcile]` section of the settings.

    `grace_ms`: our own order activity on a position this recent defers an absence (REST lags our orders).
    `untracked`: positions nobody here tracks (`UNTRACKED_POLICIES`).
    `phantom_after_s`: a REST-only absence (no fill, no live stream speaking for it) this long: PHANTOM.
    `stream_doubt_s`: REST (confirmed) lacks what a healthy stream shows, with no fill to prove a close:
    after this long the stream is resubscribed (a silent wedge), and its fresh snapshot decides."""

    grace_ms: int = setting(5000, ge=0, le=600_000)
    untracked: UntrackedPolicy = "alert"
    phantom_after_s: float = setting(60.0, ge=0, le=86400)
    stream_doubt_s: float = setting(30.0, gt=0, le=3600)

    def __post_init__(self) -> None:
        check_limits(self, "reconcile")
        if self.untracked not in UNTRACKED_POLICIES:
            raise ValueError(f"untracked must be one of {', '.join(UNTRACKED_POLICIES)}, got {self.untracked!r}")


@dataclass
class SyncReport:
    checked: int = 0
    present: int = 0
    in_grace: int = 0  # absent, but we acted on it too recently to believe REST
    unconfirmed: int = 0  # absent once, present on the targeted query
    stream_disagrees: int = 0  # absent on REST, shown by a healthy private stream
    closed: list[str] = field(default_factory=list)  # position ids that reached a terminal state
    untracked: int = 0  # positions on the exchange nobody here tracks (confirmed twice)
    reduced: int = 0  # positions REST shows smaller than recorded (confirmed twice), taken in
    adopted: list[str] = field(default_factory=list)
    rest_calls: int = 0
    snapshot: list[PositionSnapshot] = field(default_factory=list, repr=False)  # the pass's REST positions


class Reconciler:
    def __init__(self, view: AccountView, commands: AccountCommands, config: ReconcileConfig | None = None, *,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Passes over one account, seen through its read-only `view` and acted on through `commands`
        (`lifecycle.account`); `monotonic` and `sleep` are the clock the countdowns and the settle loop
        use (a test injects its own and advances it instead of waiting).

        A pass that finds REST (confirmed by a targeted query) without a position a healthy stream shows
        doubts the stream at once and probes its listen key. With a closing fill on REST the close is proven:
        the stream is resubscribed and the position settled in the same pass. Without one, REST may lag:
        `stream_doubt_s` is how long that disagreement may last before the stream is resubscribed anyway
        (a wedge: connected, key alive, nothing delivered).

        `phantom_after_s`: a position that REST keeps not showing (every pass confirmed by a targeted
        query), with no closing fill and no live stream speaking for it, ends PHANTOM only once that has
        lasted this long: a REST answer lagging an open (or a stream that is down) cannot end a live
        position, and cancel its stop, on one look."""
        self.config = config = config or ReconcileConfig()
        self.grace_ms, self.untracked = config.grace_ms, config.untracked
        self.phantom_after_s, self.stream_doubt_s = config.phantom_after_s, config.stream_doubt_s
        self.view, self.commands = view, commands
        self.monotonic, self.sleep = monotonic, sleep
        self._absent_since: dict[str, float] = {}  # position id -> first confirmed REST absence, no fill
        self._alerted: set[tuple[str, Side, Decimal]] = set()  # untracked positions already reported
        self._doubt_since: dict[str, tuple[float, int]] = {}  # position id -> (when REST began to disagree,
        # the client generation then): one recreate per generation, however many positions doubt it
        self._lock = asyncio.Lock()  # one pass at a time (scheduler jobs, resync hooks, the aged check)

    @classmethod
    def of(cls, live: Account, config: ReconcileConfig | None = None, *,
           monotonic: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, **settings: Any) -> Reconciler:
        """A reconciler over a live engine's two faces; `settings` override fields of `config`."""
        config = replace(config or ReconcileConfig(), **settings)
        return cls(live.account_view, live.commands, config, monotonic=monotonic, sleep=sleep)

    def absence_pending(self, position_id: str) -> bool:
        """REST no longer shows the position and nothing explains it yet (its phantom countdown runs)."""
        return position_id in self._absent_since

    def attach(self) -> Reconciler:
        """Run after every stream resync whose snapshot lacks a tracked position (a close the stream
        missed while it was down), until those positions are settled or the stream speaks for them."""
        self.commands.after_resync(self._settle)
        return self

    def detach(self) -> None:
        self.commands.after_resync(self._settle, on=False)

    async def _settle(self, passes: int = 10) -> None:
        for _ in range(passes):
            await self.sync()
            unsettled = [p.id for p in self.view.positions() if self.view.missing_after_resync(p.id)]
            if not unsettled:
                return
            await self.sleep(max(self.grace_ms / 1000, 0.2))
        logger.warning("{}: {} position(s) missing from REST after a resync, with no closing fill; left to "
                       "the next reconciliation", self.view.account, len(unsettled))

    async def sync(self) -> SyncReport:
        async with self._lock:
            return await self._sync()

    async def _sync(self) -> SyncReport:
        view, commands, report = self.view, self.commands, SyncReport()
        tracked = view.positions(FLATTENABLE)
        report.rest_calls += 1
        snapshot = await commands.venue_positions()
        report.snapshot = snapshot
        # One pass over the venue's list, looked up by key after: a scan per tracked position made a sync of
        # 500 positions 250,000 comparisons on the event loop every tick (bench.burst's profile: 36 ms).
        shown: dict[tuple[str, Side | None], PositionSnapshot] = {}
        for s in snapshot:
            shown.setdefault((s.symbol, s.side), s)  # the first one, as a scan would have found
        for pid in [pid for pid in self._doubt_since if view.position(pid) is None]:
            del self._doubt_since[pid]  # ended meanwhile
        for pid in [pid for pid in self._absent_since if view.position(pid) is None]:
            del self._absent_since[pid]
        for position in tracked:
            report.checked += 1
            if (position.symbol, position.side) in shown:
                report.present += 1
                self._doubt_since.pop(position.id, None)
                self._absent_since.pop(position.id, None)
                if view.missing_after_resync(position.id):
                    report.rest_calls += 1
                    again = await commands.venue_positions([position.symbol])
                    if any(s.symbol == position.symbol and s.side is position.side for s in again):
                        commands.settled(position.id)  # REST shows it twice: the resync's absence was stale
                if abs(shown[(position.symbol, position.side)].amount) < position.quantity:
                    await self._smaller(position, report)
                continue
            current = view.position(position.id)
            if current is None or current.state not in FLATTENABLE:
                continue  # ended meanwhile (the stream was faster)
            if not is_outside_grace_window(current.last_activity_at, view.now(), self.grace_ms):
                report.in_grace += 1
                self._doubt_since.pop(position.id, None)
                self._absent_since.pop(position.id, None)  # our own activity: the countdown starts over
                continue
            if not (view.stream_healthy() and view.stream_shows(current) is True):
                self._doubt_since.pop(position.id, None)  # the stream does not vouch: nothing to doubt it for
            report.rest_calls += 1
            again = await commands.venue_positions([position.symbol])
            if any(s.symbol == position.symbol and s.side is position.side for s in again):
                report.unconfirmed += 1
                self._absent_since.pop(position.id, None)
                continue
            if await self._absent(current, report):
                report.closed.append(position.id)
        for snap in snapshot:
            if snap.side is not None and view.live_position(snap.symbol, snap.side) is None:
                await self._untracked(snap, report)
        return report

    async def _smaller(self, position: Position, report: SyncReport) -> None:
        """REST shows less than we hold: a reduction the stream did not deliver (another client's partial
        close while the stream was silent). Outside our grace window and confirmed by a targeted query, it is
        taken in as the stream would have (`reduced`, the stop resized to what is left)."""
        view = self.view
        current = view.position(position.id)
        if current is None or current.state not in FLATTENABLE or not is_outside_grace_window(
                current.last_activity_at, view.now(), self.grace_ms):
            return
        report.rest_calls += 1
        again = [s for s in await self.commands.venue_positions([position.symbol])
                 if s.symbol == position.symbol and s.side is position.side]
        if not again or not 0 < abs(again[0].amount) < current.quantity:
            return
        # REST may lag or answer a stale snapshot (seed 000): an answer older than this position's entry, or
        # than a stream update showing another size, is not a reduction the stream missed.
        snap, entered, streamed = again[0], view.entry_time(position.id), view.stream_position(position.symbol)
        if (entered is not None and snap.at <= entered) or (
                streamed is not None and snap.at <= streamed.at and streamed.amount != snap.amount):
            return
        if self.commands.take_reduction(position.id, snap):
            report.reduced += 1
            logger.warning("{} {} {}: the exchange holds {}, we recorded {}: a reduction the stream did not "
                           "deliver", view.account, position.symbol, position.id, abs(again[0].amount),
                           current.quantity)

    async def _untracked(self, snap: PositionSnapshot, report: SyncReport) -> None:
        """A position on the exchange that nobody here tracks (opened by hand, or before a crash)."""
        view, commands = self.view, self.commands
        assert snap.side is not None
        if snap.symbol not in view.symbols:
            return  # not a symbol this engine trades: never ours to touch
        latest = view.stream_position(snap.symbol)
        if latest is not None and latest.side is not snap.side and latest.at >= snap.at:
            return  # the stream already says it is gone: REST lags (seed 000)
        report.rest_calls += 1
        again = await commands.venue_positions([snap.symbol])
        if not any(s.symbol == snap.symbol and s.side is snap.side for s in again):
            return  # not confirmed by the targeted query
        report.untracked += 1
        if self.untracked == "adopt":
            if view.live_position(snap.symbol, snap.side) is not None:
                return  # tracked meanwhile (our own open, or another pass)
            try:
                position = await commands.adopt(snap)
            except DuplicateLivePosition:
                return
            report.adopted.append(position.id)
            return
        key = (snap.symbol, snap.side, abs(snap.amount))
        if key in self._alerted:
            return
        self._alerted.add(key)
        commands.emit(UntrackedPosition(
            account=view.account, symbol=snap.symbol, position_id=None, at=view.now(),
            side=snap.side.value, quantity=abs(snap.amount), entry_price=snap.entry_price, policy=self.untracked))
        logger.warning("{} {}: an untracked {} position of {} (entry {}) is on the exchange; policy 'alert': "
                       "reported, not touched", view.account, snap.symbol, snap.side, abs(snap.amount),
                       snap.entry_price)

    async def _doubt_without_proof(self, position: Position) -> None:
        """REST (confirmed) lacks a position a healthy stream shows, with no fill to prove a close: probe the
        stream at once; resubscribe only if the disagreement outlasts `stream_doubt_s` (REST may lag)."""
        generation = self.view.generation
        since, seen = self._doubt_since.setdefault(position.id, (self.monotonic(), generation))
        lasted = self.monotonic() - since >= self.stream_doubt_s
        await self.commands.doubt_stream(f"REST does not show {position.symbol} {position.side.value}, the stream does",
                                resubscribe=lasted and seen == generation)
        if lasted:
            self._doubt_since.pop(position.id, None)

    async def _absent(self, position: Position, report: SyncReport) -> bool:
        view, commands = self.view, self.commands
        confirmations = ABSENCE_CONFIRMATIONS_REQUIRED
        closing = position.state is PositionState.CLOSING_BY_BOT
        if closing and position.quantity == 0:
            return False  # closed while opening, nothing known filled: the entry's own outcome decides
        # Also while we close it: the order that flattened it says why (our close, or a stop, a liquidation
        # that came first); an absence that no fill explains is not claimed as our close.
        fill, client_id = await self._closing_fill(position, report)
        shown_by_stream = view.stream_healthy() and view.stream_shows(position) is True
        if fill is not None and shown_by_stream:
            # REST proves a close the stream did not deliver: the stream is silent or wedged. Doubt it now,
            # probe and resubscribe it, and settle the position from REST in this same pass.
            await commands.doubt_stream(f"REST shows {position.symbol} closed by order {fill.order_id}, the stream "
                                    "did not", resubscribe=True)
        if fill is None:
            # Only REST says it is gone, and nothing closed it. REST may lag (an open it does not show yet),
            # and the stream may be down: a live stream that shows the position keeps it (it is probed at
            # once, and resubscribed if the disagreement lasts `stream_doubt_s`); otherwise the absence must
            # last phantom_after_s, confirmed on every pass, before it ends PHANTOM.
            vouched = shown_by_stream
            if vouched:
                self._absent_since.pop(position.id, None)
                report.stream_disagrees += 1
                await self._doubt_without_proof(position)
            now = self.monotonic()
            first = now if vouched else self._absent_since.setdefault(position.id, now)
            waited = now - first
            if vouched or waited < self.phantom_after_s:
                report.unconfirmed += 1
                logger.info("{} {} {}: absent on REST for {:.1f} s with no closing fill{}; kept", position.account,
                            position.symbol, position.id, waited,
                            " (the live stream shows it)" if vouched else
                            f" (phantom after {self.phantom_after_s:g} s unless it reappears or a fill explains it)")
                return False
            self._absent_since.pop(position.id, None)
            logger.warning("{} {} {}: absent on the exchange for {:.1f} s (confirmed on every pass), no closing "
                           "fill found: phantom", position.account, position.symbol, position.id, waited)
            outcome = await commands.fire_if(position.id, Vanished(confirmations=confirmations,
                                                                      grace_ms=self.grace_ms), only_in=FLATTENABLE)
            return outcome is not None
        trailing = position.trailing is not None and position.trailing.active
        cause = classify_close(client_id, position_id=position.id, trailing_was_active=trailing)
        if cause is CloseCause.BOT and not closing:
            # Our own close order for this very position flattened it (its client id says so): the bot closed
            # it, though the database does not know the close was asked for. The books lost that record (queued
            # while the database failed, dropped at a stop; review, seventh session: it ended CLOSED_EXTERNAL,
            # `unknown`). The request is written first, so the journal says what happened: CLOSING_BY_BOT, then
            # CLOSED with cause bot.
            logger.warning("{} {} {}: closed by our own close order {} whose request the database does not "
                           "have; the request is written again", position.account, position.symbol, position.id,
                           client_id)
            if await commands.fire_if(position.id, CloseRequested(reason=CloseReason.FOUND_FILLED),
                                      only_in=PROTECTED) is None:
                return False  # moved on meanwhile: the next pass looks again
        logger.info("{} {} {}: closed while the stream did not say so; closing fill {} ({})", position.account,
                    position.symbol, position.id, fill.order_id, cause)
        outcome = await commands.fire_if(position.id, Flat(
            cause=cause, exit_price=fill.price, exchange_order_id=fill.order_id, realized_pnl=fill.realized_pnl,
            fee=fill.fee, exchange_ts_ms=int(fill.at.timestamp() * 1000), cause_source="rest"), only_in=FLATTENABLE)
        return outcome is not None

    async def _closing_fill(self, position: Position, report: SyncReport) -> tuple[Fill | None, str | None]:
        """The newest fill on the closing side since the position was opened, and its order's client id."""
        report.rest_calls += 1
        found = await self.commands.closing_fill(position)
        return found if found is not None else (None, None)
