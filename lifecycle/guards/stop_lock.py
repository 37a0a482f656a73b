"""One stop mutation per (account, symbol) at a time; waiting requests coalesce to the newest.

Seed 003: two trailing updates for one symbol raced between cancel and create. Here every code path
that creates, moves or cancels a stop goes through `submit`, which holds the symbol's lock around the
exchange call. A request that is overtaken by a newer one from the same position while waiting is not
sent at all (`SUPERSEDED`): only the newest target matters. After the position reaches a terminal
state, `release` makes its waiting requests return `RELEASED` without touching the exchange.

Coalescing is per position (the owner), not per symbol: in hedge mode a long and a short on one
symbol share the lock but never drop each other's requests.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MutationStatus(StrEnum):
    APPLIED = "applied"  # `apply` ran and returned; its result is in `result`
    SUPERSEDED = "superseded"  # a newer target from the same owner arrived while this one waited
    RELEASED = "released"  # the owner's lock was released (terminal) before this one's turn


@dataclass(frozen=True, slots=True)
class Mutation(Generic[R]):
    status: MutationStatus
    result: R | None = None

    @property
    def applied(self) -> bool:
        return self.status is MutationStatus.APPLIED


@dataclass(slots=True)
class _Slot:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    latest: dict[str, int] = field(default_factory=dict)  # owner -> newest ticket
    released: set[str] = field(default_factory=set)
    users: int = 0  # callers waiting or running; the slot is dropped at zero
    tickets: int = 0


class StopLockRegistry:
    def __init__(self) -> None:
        self._slots: dict[tuple[str, str], _Slot] = {}

    async def submit(
        self, account: str, symbol: str, owner: str, target: T, apply: Callable[[T], Awaitable[R]]
    ) -> Mutation[R]:
        """Run `apply(target)` under the symbol's lock, unless overtaken or released first.

        Exceptions from `apply` propagate unchanged: a failed exchange call is the caller's to handle,
        and is never reported as applied.
        """
        key = (account, symbol)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        if owner in slot.released:
            return Mutation(MutationStatus.RELEASED)
        slot.tickets += 1
        ticket = slot.latest[owner] = slot.tickets
        slot.users += 1
        try:
            async with slot.lock:
                if owner in slot.released:
                    return Mutation(MutationStatus.RELEASED)
                if slot.latest.get(owner) != ticket:
                    return Mutation(MutationStatus.SUPERSEDED)
                return Mutation(MutationStatus.APPLIED, await apply(target))
        finally:
            slot.users -= 1
            if slot.latest.get(owner) == ticket:
                del slot.latest[owner]
            if slot.users == 0 and self._slots.get(key) is slot:
                del self._slots[key]

    def release(self, account: str, symbol: str, owner: str) -> None:
        """The owner is terminal: its waiting requests return RELEASED; a running call finishes."""
        slot = self._slots.get((account, symbol))
        if slot is not None:
            slot.released.add(owner)

    def is_held(self, account: str, symbol: str, owner: str | None = None) -> bool:
        """True while a mutation for the symbol (or for this owner's position) waits or runs."""
        slot = self._slots.get((account, symbol))
        if slot is None:
            return False
        if owner is None:
            return slot.users > 0
        return owner in slot.latest and owner not in slot.released

    def held_keys(self) -> set[tuple[str, str]]:
        return set(self._slots)
