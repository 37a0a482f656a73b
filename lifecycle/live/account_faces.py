"""The live engine's two faces for the periodic jobs (`lifecycle.account`): a read-only view and commands.

Each is a thin set of delegations to the parts that own the answer; nothing here keeps state of its own.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from datetime import datetime
from typing import Any

from exchange.port import Fill, PositionSnapshot
from lifecycle.account import OrphanSweep
from lifecycle.domain import CloseReason, Position, Side
from lifecycle.events import Event
from lifecycle.journal import Outcome
from lifecycle.live.closing import Closing
from lifecycle.live.context import LiveContext
from lifecycle.live.opening import Opening
from lifecycle.live.orphans import Orphans
from lifecycle.live.protection import Protection
from lifecycle.live.stream_view import StreamView
from lifecycle.machines.states import PositionState


class LiveAccountView:
    """`lifecycle.account.AccountView` over one account's live engine: reads only."""

    def __init__(self, ctx: LiveContext, view: StreamView, opening: Opening, protection: Protection) -> None:
        self._ctx, self._view, self._opening, self._protection = ctx, view, opening, protection

    @property
    def account(self) -> str:
        return self._ctx.account

    @property
    def symbols(self) -> list[str]:
        return list(self._ctx.symbols)

    @property
    def generation(self) -> int:
        return self._ctx.exchange.generation

    @property
    def stop_move_failures(self) -> int:
        return self._ctx.stats.stop_move_failures

    def now(self) -> datetime:
        return self._ctx.engine.clock()

    def positions(self, states: Collection[PositionState] | None = None) -> list[Position]:
        return [p for p in self._ctx.engine.positions.values()
                if p.account == self._ctx.account and (states is None or p.state in states)]

    def position(self, position_id: str) -> Position | None:
        found = self._ctx.engine.positions.get(position_id)
        return found if found is not None and found.account == self._ctx.account else None

    def live_position(self, symbol: str, side: Side) -> Position | None:
        return self._ctx.engine.live_position(self._ctx.account, symbol, side)

    def stream_healthy(self) -> bool:
        return self._view.stream_healthy()

    def stream_shows(self, position: Position) -> bool | None:
        return self._view.stream_shows(position)

    def stream_position(self, symbol: str) -> PositionSnapshot | None:
        return self._view.live.get(symbol)

    def missing_after_resync(self, position_id: str) -> bool:
        return self._view.missing_after_resync(position_id)

    def entry_time(self, position_id: str) -> datetime | None:
        return self._opening.entry_time(position_id)

    def unprotected(self) -> list[Position]:
        return self._protection.unprotected()


class LiveAccountCommands:
    """`lifecycle.account.AccountCommands` over one account's live engine."""

    def __init__(self, ctx: LiveContext, view: StreamView, opening: Opening, closing: Closing,
                 protection: Protection, orphans: Orphans) -> None:
        self._ctx, self._view, self._opening, self._closing = ctx, view, opening, closing
        self._protection, self._orphans = protection, orphans

    async def venue_positions(self, symbols: list[str] | None = None) -> list[PositionSnapshot]:
        return await self._ctx.exchange.positions(symbols)

    async def closing_fill(self, position: Position) -> tuple[Fill, str | None] | None:
        return await self._view.rest_closing_fill(position)

    async def fire_if(self, position_id: str, event: Event | Callable[[], Event | None], *,
                      only_in: Collection[PositionState]) -> Outcome | None:
        return await self._ctx.engine.fire_if(position_id, event, only_in=only_in)

    async def doubt_stream(self, reason: str, *, resubscribe: bool) -> None:
        await self._view.doubt_stream(reason, resubscribe=resubscribe)

    def settled(self, position_id: str) -> None:
        self._view.settled(position_id)

    def take_reduction(self, position_id: str, snap: PositionSnapshot) -> bool:
        return self._closing.take_reduction(position_id, snap)

    async def adopt(self, snap: PositionSnapshot) -> Position:
        return await self._opening.adopt(snap)

    async def close(self, position_id: str, reason: CloseReason) -> bool:
        return await self._closing.close(position_id, reason)

    async def check_protection(self) -> list[str]:
        return await self._protection.check_protection()

    async def audit_protection(self) -> dict[str, int]:
        return await self._protection.audit_protection()

    async def sweep_orphans(self) -> OrphanSweep:
        return await self._orphans.sweep()

    def emit(self, record: Any) -> None:
        self._ctx.engine.records.emit(record)

    def after_resync(self, hook: Callable[[], Awaitable[Any]], *, on: bool = True) -> None:
        hooks = self._ctx.after_resync
        if on and hook not in hooks:
            hooks.append(hook)
        elif not on and hook in hooks:
            hooks.remove(hook)
