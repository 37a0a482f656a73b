"""Trailing: the watermark watch on every mark, and one stop-move worker per position.

Marks move the watermark in memory; `trail()` decides the target; moves go through `Stops.request` (the
symbol's stop lock), coalesced to the newest wanted target. The watches are indexed by symbol (the hot
path: one lookup per mark); a position's watch is dropped at its terminal transition (`forget`).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from decimal import Decimal

from loguru import logger

from exchange.port import MarkPrice
from lifecycle.domain import Position, Side
from lifecycle.events import TsActivated
from lifecycle.guards.predicates import is_activation_crossed
from lifecycle.live.context import LiveContext, S
from lifecycle.live.stops import StopResult, Stops
from lifecycle.machines.states import PROTECTED
from lifecycle.trailing import trail


@dataclass(slots=True)
class Watch:
    """Per position: the in-memory watermark and the stop-move worker with its newest wanted target."""

    position_id: str
    watermark: Decimal | None
    activating: bool = False
    deferred: bool = False  # a target was held back by the minimum interval: re-evaluate on every mark
    want: tuple[Decimal, Decimal] | None = None  # (target, watermark), newest wins
    worker: asyncio.Task[None] | None = None


class TrailingWatch:
    """One account's trailing stops (see the module docstring)."""

    def __init__(self, ctx: LiveContext, stops: Stops) -> None:
        self.ctx = ctx
        self.stops = stops
        self.watches: dict[str, dict[str, Watch]] = {}  # symbol -> position id -> watch

    def forget(self, position: Position) -> None:
        watches = self.watches.get(position.symbol)
        if watches is not None:
            watches.pop(position.id, None)

    def watch_position(self, position: Position) -> None:
        if position.trailing is None or position.state not in PROTECTED:
            return
        # deferred: the first mark evaluates the rule even without a new extreme, so a move that was due
        # when the process stopped (activated, stop not yet moved) is made at once after a restart.
        self.watches.setdefault(position.symbol, {})[position.id] = Watch(position.id, position.trailing.watermark,
                                                                          deferred=True)

    def follow(self, watch: Watch, symbol: str, mark: Decimal) -> None:
        """The hot path, once per mark per trailing position: cheap unless the watermark improves."""
        position = self.ctx.engine.positions.get(watch.position_id)
        if position is None:
            self.watches.get(symbol, {}).pop(watch.position_id, None)
            return
        trailing = position.trailing
        if trailing is None:
            return
        if position.state is S.OPEN:
            if not watch.activating and is_activation_crossed(position.side, trailing.activation_price, mark):
                watch.activating = True
                self.ctx.spawn(self.activate(watch, mark), f"trailing activation of {position.id}")
            return
        if position.state is not S.TS_ACTIVE:
            return
        best = watch.watermark
        if best is None or (mark > best if position.side is Side.LONG else mark < best):
            watch.watermark = best = mark
        elif not watch.deferred:
            return
        now = self.ctx.engine.clock()
        if not self.ctx.recovered.is_set():
            watch.deferred = True  # no order before restart recovery; the first mark after it decides
            return
        decision = trail(position.side, trailing, position.stop_price, best, now, tick=self.ctx.tick(symbol),
                         min_step=(position.stop_price or best) * self.ctx.config.trail_min_step_pct / 100,
                         min_interval=self.ctx.min_interval)
        if decision.target is None:
            moved = trailing.last_moved_at
            watch.deferred = moved is not None and now - moved < self.ctx.min_interval
            return
        watch.deferred = False
        self.want_stop(watch, decision.target, decision.watermark)

    async def activate(self, watch: Watch, mark: Decimal) -> None:
        try:
            outcome = await self.ctx.engine.fire_if(watch.position_id, TsActivated(mark=mark), only_in={S.OPEN})
        finally:
            watch.activating = False
        if outcome is not None:
            position = self.ctx.engine.positions[watch.position_id]
            logger.info("{} {} {} trailing stop active at mark {}", self.ctx.account, position.symbol, position.id,
                        mark)
            watch.watermark = mark
            watch.deferred = True  # evaluate at once with the newest mark
            self.follow(watch, position.symbol, self.ctx.marks.get(position.symbol, mark))

    def want_stop(self, watch: Watch, target: Decimal, watermark: Decimal) -> None:
        watch.want = (target, watermark)
        if watch.worker is None or watch.worker.done():
            watch.worker = self.ctx.spawn(self.move_worker(watch), f"stop mover of {watch.position_id}")

    async def move_worker(self, watch: Watch) -> None:
        while watch.want is not None:
            target, watermark = watch.want
            watch.want = None
            if await self.stops.request(watch.position_id, target, watermark, "trail") is StopResult.TOO_SOON:
                watch.deferred = True  # the next mark after the interval moves it

    def on_mark(self, mark: MarkPrice) -> None:
        self.ctx.marks[mark.symbol] = mark.price
        watches = self.watches.get(mark.symbol)
        if watches and not self.ctx.draining:  # a stopping engine starts no stop move
            for watch in list(watches.values()):
                self.follow(watch, mark.symbol, mark.price)
