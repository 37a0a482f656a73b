"""Retrying: one backoff policy and one loop, used wherever a call is tried again.

`Backoff` says how long to wait before retry n; `until_done` awaits a call until it returns, retrying the
errors it is told to. The loops that need judgement between tries (is the position still closing? did the
attempt land after all?) keep their own loop but take their delays from a `Backoff`, so every wait in the
engine follows one rule: linear or doubling from a step, never below a floor, never above a cap.
"""
from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """The wait before retry `n` (1-based): `step_s * n` (`doubling`: `step_s * 2**(n-1)`), at least
    `floor_s`, at most `max_s`. `Backoff.fixed(s)`: always `s`."""

    step_s: float
    max_s: float = 30.0
    floor_s: float = 0.0
    doubling: bool = False

    def __post_init__(self) -> None:
        if self.step_s < 0 or self.floor_s < 0 or self.max_s < 0 or math.isnan(self.step_s):
            raise ValueError(f"a backoff's step, floor and cap must be >= 0, got {self}")

    @classmethod
    def fixed(cls, seconds: float) -> Backoff:
        return cls(step_s=seconds, max_s=seconds, floor_s=seconds)

    def delay(self, attempt: int) -> float:
        if attempt < 1:
            raise ValueError(f"attempts count from 1, got {attempt}")
        raw = self.step_s * (2 ** min(attempt - 1, 60) if self.doubling else attempt)
        return min(max(raw, self.floor_s), self.max_s)


class RetryAbandoned(Exception):
    """`until_done` stopped retrying because `give_up()` said so; `last` is the error of the last try."""

    def __init__(self, last: BaseException) -> None:
        super().__init__(f"retrying abandoned after {type(last).__name__}: {last}")
        self.last = last


async def until_done(call: Callable[[], Awaitable[T]], *, retry_on: tuple[type[BaseException], ...],
                     backoff: Backoff, attempts: int | None = None,
                     on_retry: Callable[[int, BaseException, float], None] | None = None,
                     give_up: Callable[[], bool] | None = None,
                     sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> T:
    """Await `call()` until it returns. An error in `retry_on` is reported (`on_retry(n, error, delay)`),
    waited out (`backoff.delay(n)`) and the call tried again; after `attempts` tries (None: no limit) the
    last error is raised. `give_up()`, asked after each wait, ends the retrying with `RetryAbandoned`. Any
    other error is raised at once."""
    if attempts is not None and attempts < 1:
        raise ValueError(f"attempts must be >= 1 (or None), got {attempts}")
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except retry_on as error:
            if attempts is not None and attempt >= attempts:
                raise
            delay = backoff.delay(attempt)
            if on_retry is not None:
                on_retry(attempt, error, delay)
            await sleep(delay)
            if give_up is not None and give_up():
                raise RetryAbandoned(error) from error
