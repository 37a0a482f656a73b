"""What the periodic jobs (reconciliation, the scheduler) see of one account's live engine.

Two narrow faces instead of the engine itself (issue 15):

* `AccountView` only reads: the account's live positions, what its private stream has shown and whether
  the stream is trusted, the client generation, protection status. Nothing on it changes anything.
* `AccountCommands` is everything the jobs may do: query the venue (REST), fire an event at a position,
  doubt the stream, take in a reduction, adopt, close, audit protection, sweep orphans, emit a record.

`lifecycle.live.LiveEngine` provides both (`live.account_view`, `live.commands`); the jobs import neither
the live engine nor the exchange adapter, and a test can hand them anything that speaks these protocols.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from exchange.port import Fill, PositionSnapshot
from lifecycle.domain import CloseReason, Position, Side
from lifecycle.events import Event
from lifecycle.journal import Outcome
from lifecycle.machines.states import PositionState


@dataclass(frozen=True, slots=True)
class OrphanSweep:
    """One orphan sweep's counts: ours cancelled, not ours left alone, ours left for the next sweep."""

    cancelled: int = 0
    foreign: int = 0
    undecided: int = 0  # the database could not say whether the position is live


class AccountView(Protocol):
    """Read-only view of one account's live engine."""

    @property
    def account(self) -> str: ...

    @property
    def symbols(self) -> list[str]: ...

    @property
    def generation(self) -> int:
        """The exchange client's generation (a recreate increments it)."""
        ...

    @property
    def stop_move_failures(self) -> int: ...

    def now(self) -> datetime:
        """The engine's clock (wall time, for grace windows against `last_activity_at`)."""
        ...

    def positions(self, states: Collection[PositionState] | None = None) -> list[Position]:
        """This account's live positions, optionally only those in `states`."""
        ...

    def position(self, position_id: str) -> Position | None: ...

    def live_position(self, symbol: str, side: Side) -> Position | None: ...

    def stream_healthy(self) -> bool: ...

    def stream_shows(self, position: Position) -> bool | None: ...

    def stream_position(self, symbol: str) -> PositionSnapshot | None:
        """The private stream's latest position update for `symbol`, if any."""
        ...

    def missing_after_resync(self, position_id: str) -> bool: ...

    def entry_time(self, position_id: str) -> datetime | None: ...

    def unprotected(self) -> list[Position]: ...


class AccountCommands(Protocol):
    """What the periodic jobs may do to one account."""

    async def venue_positions(self, symbols: list[str] | None = None) -> list[PositionSnapshot]:
        """The venue's positions (REST), optionally only for `symbols`."""
        ...

    async def closing_fill(self, position: Position) -> tuple[Fill, str | None] | None:
        """From REST: the fill that closed `position`, and its order's client id."""
        ...

    async def fire_if(self, position_id: str, event: Event | Callable[[], Event | None], *,
                      only_in: Collection[PositionState]) -> Outcome | None:
        ...

    async def doubt_stream(self, reason: str, *, resubscribe: bool) -> None: ...

    def settled(self, position_id: str) -> None: ...

    def take_reduction(self, position_id: str, snap: PositionSnapshot) -> bool: ...

    async def adopt(self, snap: PositionSnapshot) -> Position: ...

    async def close(self, position_id: str, reason: CloseReason) -> bool: ...

    async def check_protection(self) -> list[str]: ...

    async def audit_protection(self) -> dict[str, int]: ...

    async def sweep_orphans(self) -> OrphanSweep: ...

    def emit(self, record: Any) -> None: ...

    def after_resync(self, hook: Callable[[], Awaitable[Any]], *, on: bool = True) -> None:
        """Run `hook` after every stream resync whose snapshot lacks a tracked position (`on=False`
        removes it)."""
        ...


class Account(Protocol):
    """Anything that offers both faces (the live engine)."""

    @property
    def account_view(self) -> AccountView: ...

    @property
    def commands(self) -> AccountCommands: ...
