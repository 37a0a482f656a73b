"""Protection: memory's own check every tick, the venue-wide protection audit, repairs, and health.

Every sync tick, each position that memory knows to hold exposure without a working stop of ours for
longer than a grace second gets a CRITICAL line and a repair under the symbol lock. The audit compares the
venue's own lists with the books: for every position of ours the venue shows, exactly one working stop of
ours at the recorded price and size; what is not so is repaired and recorded. A position no repair can
protect for `unprotected_close_after_s` is closed at market.
"""
from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from loguru import logger

from exchange import errors as xerr
from exchange.port import OrderSnapshot, PositionSnapshot, StreamHealth
from lifecycle.client_ids import parse_client_id
from lifecycle.domain import CloseReason, OrderPurpose, OrderStatus, Position
from lifecycle.errors import OrderAlreadyGone
from lifecycle.live.closing import Closing
from lifecycle.live.context import UNPROTECTED_GRACE_S, LiveContext, S, short
from lifecycle.live.opening import Opening
from lifecycle.live.stops import StopResult, Stops
from lifecycle.live.stream_view import StreamView
from lifecycle.machines.states import PROTECTED
from lifecycle.record_kinds import ProtectionRepair


class Protection:
    """One account's protection checks and repairs (see the module docstring)."""

    def __init__(self, ctx: LiveContext, view: StreamView, stops: Stops, opening: Opening,
                 closing: Closing) -> None:
        self.ctx = ctx
        self.view = view
        self.stops = stops
        self.opening = opening
        self.closing = closing
        self.repairs: dict[str, asyncio.Task[Any]] = {}  # protection repairs in flight, by position

    def unprotected(self) -> list[Position]:
        """Positions of ours that memory knows to hold exposure without a working stop of ours: OPEN or
        TS_ACTIVE without one, or OPENING with an entry fill that was not taken in."""
        out = []
        for position in list(self.ctx.engine.positions.values()):
            if position.account != self.ctx.account:
                continue
            if position.state in PROTECTED:
                if not any(o.purpose is OrderPurpose.STOP and o.client_id not in self.ctx.gone
                           for o in position.working_orders()):
                    out.append(position)
            elif position.state is S.OPENING and (runtime := self.ctx.peek(position.id)) is not None and \
                    runtime.entry_fill is not None and position.id not in self.opening.entry_tasks:
                out.append(position)
        return out

    def unprotected_longer_than(self, grace_s: float) -> list[Position]:
        """`unprotected()`, less the positions first seen so less than `grace_s` ago (a stop being placed
        right now, an entry filled a moment ago)."""
        now = self.ctx.monotonic()
        found = self.unprotected()
        ids = {p.id for p in found}
        for pid, runtime in self.ctx.positions.items():
            if pid not in ids:
                runtime.unprotected_since = None
        late = []
        for position in found:
            runtime = self.ctx.runtime(position.id)
            if runtime.unprotected_since is None:
                runtime.unprotected_since = now
            if now - runtime.unprotected_since >= grace_s:
                late.append(position)
        return late

    async def check_protection(self, *, grace_s: float = UNPROTECTED_GRACE_S) -> list[str]:
        """Every sync tick: a CRITICAL line for each position unprotected longer than `grace_s` (repeated
        while it lasts), and a repair under the symbol lock. Returns the ids found unprotected."""
        now = self.ctx.monotonic()
        late = []
        for position in self.unprotected_longer_than(grace_s):
            since = self.ctx.runtime(position.id).unprotected_since or now
            late.append(position.id)
            logger.critical("{} {} {}: UNPROTECTED for {:.1f} s: {} {} with no working stop of ours; repairing",
                            self.ctx.account, position.symbol, position.id, now - since, position.state.value,
                            position.quantity)
        if not self.ctx.recovered.is_set() or self.ctx.stopped:
            return late
        for position_id in late:
            running = self.repairs.get(position_id)
            if running is not None and not running.done():
                continue  # still at it (a placement that hangs, a lock held): never two at once
            # In the background: a repair waits for the symbol's lock and the venue, and must never hold up
            # the tick that checks every other position.
            task = self.ctx.spawn(self.repair_quietly(position_id), f"protection repair of {position_id}",
                               essential=True)
            if task is not None:
                self.repairs[position_id] = task

                def forget(t: asyncio.Task[Any], pid: str = position_id) -> None:
                    if self.repairs.get(pid) is t:
                        self.repairs.pop(pid, None)

                task.add_done_callback(forget)
        return late

    async def repair_quietly(self, position_id: str) -> None:
        try:
            await self.repair_protection(position_id, "no working stop known")
        except Exception as e:  # noqa: BLE001 - the next tick tries again; the CRITICAL line goes on
            logger.error("{} {}: protection repair failed: {}: {}", self.ctx.account, position_id, type(e).__name__,
                         short(e))

    async def audit_protection(self, positions: list[PositionSnapshot] | None = None) -> dict[str, int]:
        """The protection audit: for every position of ours the venue shows, exactly one working stop of
        ours at the recorded price and size; what is not so is repaired under the symbol lock (missing:
        placed; extra: cancelled; wrong price or size: synced; an entry fill not taken in: taken in and
        protected), each repair recorded. Uses the venue's own lists, not memory."""
        counts = {"checked": 0, "repaired": 0}
        if not self.ctx.recovered.is_set() or self.ctx.stopped:
            return counts
        self.ctx.stats.audits += 1
        listed_at = self.ctx.engine.clock()
        snapshot = positions if positions is not None else await self.ctx.exchange.positions()
        shown = {(s.symbol, s.side) for s in snapshot}
        stops: dict[str, list[OrderSnapshot]] = {}
        listing = await self.ctx.list_open_orders()
        for order in listing:
            ours = parse_client_id(order.client_id)
            if ours is not None and ours.purpose is OrderPurpose.STOP:
                stops.setdefault(ours.position_id, []).append(order)
        self.settle_vanished_entries({o.client_id for o in listing if o.client_id}, listed_at)
        for position in [p for p in list(self.ctx.engine.positions.values()) if p.account == self.ctx.account]:
            if (position.symbol, position.side) not in shown:
                continue  # absence is reconciliation's to settle
            counts["checked"] += 1
            if position.state is S.OPENING:
                if await self.audit_opening(position):
                    counts["repaired"] += 1
                continue
            if position.state not in PROTECTED:
                continue  # a close in flight keeps its stop until the flat
            mine = stops.get(position.id, [])
            recorded = {o.client_id for o in position.working_orders() if o.purpose is OrderPurpose.STOP}
            if len(mine) == 1 and recorded == {mine[0].client_id} and position.stop_price is not None and \
                    mine[0].trigger_price == position.stop_price and mine[0].quantity == position.quantity:
                continue  # (a recorded stop the venue no longer lists, beside the right one, is repaired below:
                # the books would call it working forever; soak seed 506514, its cancel failed in an outage)
            moved = position.updated_at >= listed_at - timedelta(seconds=1)  # a transition (a move) since
            if mine and recorded and moved and all(o.client_id in recorded or o.client_id in self.ctx.own_cancels
                                                   for o in mine):
                continue  # a move since the listing began explains it (its stops are ours, known); looked at again
                # by the next audit. A stop nobody here knows is repaired whatever moved.
            why = (f"{len(mine)} working stop(s) of ours on the venue, recorded {position.stop_price} x "
                   f"{position.quantity}")
            if await self.repair_protection(position.id, why):
                counts["repaired"] += 1
        return counts

    def settle_vanished_entries(self, working: set[str], listed_at: datetime) -> None:
        """Entries our books have working that the venue no longer lists (filled or cancelled while the stream
        was down, or an update lost): their own state, looked up by client id, settles the position. Not an
        entry being sent, nor one placed after the listing began."""
        for position in list(self.ctx.engine.positions.values()):
            if position.account != self.ctx.account or self.ctx.entry_done(position.id) or position.id in \
                    self.ctx.placing or position.id in self.opening.entry_lookups or position.quantity > 0 or \
                    position.state not in (S.OPENING, S.CLOSING_BY_BOT):
                continue
            entry = next((o for o in position.working_orders() if o.purpose is OrderPurpose.ENTRY), None)
            if entry is None or entry.client_id in working or position.created_at >= listed_at - timedelta(seconds=1):
                continue
            logger.info("{} {} {}: entry {} no longer listed by the venue; looking it up", self.ctx.account,
                        position.symbol, position.id, entry.client_id)
            self.ctx.spawn(self.opening.find_entry(position.id, entry), f"entry lookup of {position.id}")

    async def audit_quietly(self, when: str) -> None:
        await self.ctx.recovered.wait()
        try:
            counts = await self.audit_protection()
        except xerr.ExchangeError as e:
            logger.warning("{}: protection audit {} failed on the exchange: {}", self.ctx.account, when, short(e))
            return
        if counts["repaired"]:
            logger.warning("{}: protection audit {}: {}", self.ctx.account, when, counts)

    async def audit_opening(self, position: Position) -> bool:
        """The venue shows a position where ours is still OPENING: if its entry filled and nothing is taking
        that fill in (an update lost, or a failure while taking it in), take it in now (it gets its stop)."""
        if position.id in self.opening.entry_tasks or \
                self.ctx.engine.clock() - position.created_at < timedelta(seconds=2):
            return False  # being taken in, or the stream is about to deliver it
        entry = next((o for o in position.orders.values() if o.purpose is OrderPurpose.ENTRY), None)
        runtime = self.ctx.runtime(position.id)
        fill = runtime.entry_fill
        if entry is not None and (fill is None or not fill.status.is_final):
            try:  # the venue's word now: a partial fill may have ended meanwhile, or a fill been missed
                found = await self.ctx.exchange.order_by_client_id(position.symbol, entry.client_id)
            except (xerr.ExchangeError, OrderAlreadyGone) as e:
                logger.warning("{} {} {}: audit: entry lookup failed: {}", self.ctx.account, position.symbol,
                               position.id, short(e))
                found = None
            if found is not None and found.filled > 0:
                fill = found
        if fill is None or position.id in self.opening.entry_tasks:
            return False
        if not fill.status.is_final:
            runtime.trimming = False  # a cancel of the rest that failed: send it again
        kind = "entry_taken_in" if fill.status.is_final else "entry_rest_cancelled"
        self.repaired(position, kind, f"entry {fill.client_id} filled {fill.filled}, position OPENING")
        runtime.entry_done = False
        self.opening.handle_entry_update(position.id, fill)
        return True

    async def repair_protection(self, position_id: str, why: str) -> bool:
        """Under the symbol lock (no move in flight): compare with the venue's open orders for the symbol and
        make it one working stop at the recorded price and size. True if something was repaired."""
        position = self.ctx.engine.positions.get(position_id)
        if position is None:
            return False
        if position.state is S.OPENING:
            return await self.audit_opening(position)
        async with self.ctx.engine.locks.exclusive(self.ctx.account, position.symbol):
            position = self.ctx.engine.positions.get(position_id)
            if position is None or position.state not in PROTECTED:
                return False
            fresh = [o for o in await self.ctx.exchange.open_orders(position.symbol)
                     if (ours := parse_client_id(o.client_id)) is not None and ours.position_id == position_id
                     and ours.purpose is OrderPurpose.STOP]
            on_venue = {o.client_id for o in fresh}
            for order in [o for o in position.working_orders() if o.purpose is OrderPurpose.STOP]:
                if order.client_id not in on_venue:  # recorded, not working on the venue any more
                    self.ctx.gone[order.client_id] = None
                    await self.ctx.set_order_status(position_id, order.client_id, OrderStatus.EXPIRED)
            for snapshot in fresh:
                if snapshot.client_id not in position.orders:  # working, never recorded (or the record was lost)
                    await self.ctx.track(position, snapshot.client_id or "", OrderPurpose.STOP, snapshot.quantity,
                                      snapshot.trigger_price or Decimal(0), snapshot)
            position = self.ctx.engine.positions.get(position_id)
            if position is None or position.state not in PROTECTED:
                return False
            matching = [o for o in fresh if position.stop_price is not None and
                        o.trigger_price == position.stop_price and o.quantity == position.quantity]
            if len(fresh) == 1 and matching:
                return False  # the venue matches now (a move finished between the listing and the lock)
            if matching:
                keep = matching[0].client_id
                for order in [o for o in position.working_orders()
                              if o.purpose is OrderPurpose.STOP and o.client_id != keep]:
                    await self.ctx.cancel_tracked(order)
                self.repaired(position, "extra_cancelled", f"{why}; kept {keep}, cancelled {len(fresh) - 1}")
                return True
            if position.stop_price is None:
                target = self.stops.initial_target(position, from_mark_if_crossed=True)
                result = await self.stops.apply(position_id, target, None, "initial")
                kind = "placed"
            else:
                result = await self.stops.apply(position_id, None, None, "sync")
                kind = "placed" if not fresh else "synced"
        if result in (StopResult.FAILED, StopResult.SKIPPED):
            kind = "failed"
            self.escalate(position, why)
        self.repaired(position, kind, f"{why}: {result}")
        return kind != "failed"

    def escalate(self, position: Position, why: str) -> None:
        """A repair that cannot put a stop back: once the position has been unprotected for
        `unprotected_close_after_s`, it is closed at market (reason `unprotected`), as an initial stop that
        cannot be placed is: exposure nobody can protect is not kept."""
        runtime = self.ctx.peek(position.id)
        since = runtime.unprotected_since if runtime is not None else None
        if since is None or self.ctx.monotonic() - since < self.ctx.config.unprotected_close_after_s:
            return
        logger.critical("{} {} {}: UNPROTECTED for {:.0f} s and no stop can be placed ({}); closing at market",
                        self.ctx.account, position.symbol, position.id, self.ctx.monotonic() - since, why)
        self.ctx.spawn(self.closing.close_now(position.id, CloseReason.UNPROTECTED),
                       f"unprotected close of {position.id}", essential=True)

    def repaired(self, position: Position, kind: str, detail: str) -> None:
        self.ctx.stats.protection_repairs[kind] += 1
        logger.warning("{} {} {}: protection audit repaired: {} ({})", self.ctx.account, position.symbol, position.id,
                       kind, detail)
        self.ctx.engine.records.emit(ProtectionRepair(
            account=self.ctx.account, symbol=position.symbol, position_id=position.id, at=self.ctx.engine.clock(),
            repair=kind, detail=detail, state=position.state.value, stop_price=position.stop_price,
            quantity=position.quantity))

    def health_reasons(self) -> list[str]:
        """Why this account is not `ok` (empty when it is): storage, records, protection, streams, key."""
        reasons = []
        books = self.ctx.engine.books
        if books.behind:
            reasons.append(f"storage failing: {books.failing or 'catching up'} ({books.behind} write(s) waiting)")
        records_failing = getattr(self.ctx.engine.records, "failing", None)
        if records_failing:
            reasons.append(f"records not written: {records_failing}")
        for position in self.unprotected_longer_than(UNPROTECTED_GRACE_S):
            reasons.append(f"unprotected: {position.symbol} {position.id} ({position.state.value})")
        health = self.ctx.exchange.health
        for name in ("positions", "orders", "marks"):
            state = health.get(name)
            if state is not None and state is not StreamHealth.HEALTHY:
                reasons.append(f"stream {name} {state.value}")
        if self.view.doubted is not None:
            reasons.append(f"stream doubted: {self.view.doubted}")
        auth = self.ctx.exchange.auth_failure
        if auth:
            reasons.append(f"exchange key refused: {auth}")
        return reasons
