"""Waiting on a condition with a deadline, for tests without a rig (a rig has `Rig.until`).

Tests never sleep to wait for something to happen: they wait for the thing itself, and fail with a message
naming it when it does not come in time. A sleep in a test either paces a simulated market or lets time pass
to show that something does not happen, and says so in a comment.
"""
from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


async def until(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, what: str = "condition",
                interval: float = 0.005) -> float:
    """Wait until `predicate()` (a plain or an async callable) is true; returns the seconds it took."""
    started = time.monotonic()
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(interval)


class ManualClock:
    """A monotonic clock a test moves by hand (`advance`), for components that take one injected: time
    that must pass for a countdown passes at once, and nothing else depends on the wall."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
