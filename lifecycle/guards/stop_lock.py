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
import contextlib
import itertools
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
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
    waiting: dict[str, set[int]] = field(default_factory=dict)  # owner -> tickets still waiting or running
    users: int = 0  # callers waiting or running; the slot is dropped at zero


class StopLockRegistry:
    RELEASED_MEMORY = 100_000  # how many released positions are remembered (oldest forgotten first)

    def __init__(self) -> None:
        self._slots: dict[tuple[str, str], _Slot] = {}
        self._released: OrderedDict[str, None] = OrderedDict()  # owners, kept even while no slot exists
        self._tickets = itertools.count(1)

    def _slot(self, key: tuple[str, str]) -> _Slot:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        return slot

    def users(self, account: str, symbol: str) -> int:
        """How many callers hold or wait for the symbol's lock (0: free)."""
        slot = self._slots.get((account, symbol))
        return slot.users if slot is not None else 0

    def _done(self, key: tuple[str, str], slot: _Slot) -> None:
        slot.users -= 1
        if slot.users == 0 and self._slots.get(key) is slot:
            del self._slots[key]

    async def submit(
        self, account: str, symbol: str, owner: str, target: T, apply: Callable[[T], Awaitable[R]]
    ) -> Mutation[R]:
        """Run `apply(target)` under the symbol's lock, unless overtaken or released first.

        Exceptions from `apply` propagate unchanged: a failed exchange call is the caller's to handle,
        and is never reported as applied. A waiter that is cancelled simply leaves; the newest request
        still waiting (not the newest ever made) is the one that runs.
        """
        if owner in self._released:
            return Mutation(MutationStatus.RELEASED)
        key = (account, symbol)
        slot = self._slot(key)
        ticket = next(self._tickets)
        mine = slot.waiting.setdefault(owner, set())
        mine.add(ticket)
        slot.users += 1
        try:
            async with slot.lock:
                if owner in self._released:
                    return Mutation(MutationStatus.RELEASED)
                if ticket != max(mine):
                    return Mutation(MutationStatus.SUPERSEDED)
                return Mutation(MutationStatus.APPLIED, await apply(target))
        finally:
            mine.discard(ticket)
            if not mine and slot.waiting.get(owner) is mine:
                del slot.waiting[owner]
            self._done(key, slot)

    @contextlib.asynccontextmanager
    async def exclusive(self, account: str, symbol: str) -> AsyncIterator[None]:
        """Hold the symbol's lock for work that is not a coalescing move (terminal cleanup): it waits for
        the mutation in flight to finish, so a stop that move places is seen and cancelled."""
        key = (account, symbol)
        slot = self._slot(key)
        slot.users += 1
        try:
            async with slot.lock:
                yield
        finally:
            self._done(key, slot)

    def release(self, account: str, symbol: str, owner: str) -> None:
        """The owner is terminal: its waiting and future requests return RELEASED; a running call finishes."""
        self._released[owner] = None
        self._released.move_to_end(owner)
        while len(self._released) > self.RELEASED_MEMORY:
            self._released.popitem(last=False)

    def is_released(self, owner: str) -> bool:
        return owner in self._released

    def is_held(self, account: str, symbol: str, owner: str | None = None) -> bool:
        """True while a mutation for the symbol (or one of this owner's, not yet released) waits or runs."""
        slot = self._slots.get((account, symbol))
        if slot is None:
            return False
        if owner is None:
            return slot.users > 0
        return bool(slot.waiting.get(owner)) and owner not in self._released

    def held_keys(self) -> set[tuple[str, str]]:
        return set(self._slots)
