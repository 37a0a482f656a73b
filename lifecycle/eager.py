"""A future whose chosen callbacks run when it is answered, not one turn of the event loop later (issue 13).

asyncio runs a future's done callbacks in a later turn of the loop (`call_soon`). A transition's answer passed
through three of them (the repository's member future, the books' answer, the engine's swap), and in a
500-position cascade one turn of the loop lasts 20-50 ms: the acknowledgement of a durable write waited
turns for nothing (bench.burst). `EagerFuture.add_eager_callback` runs its callback inside `set_result` /
`set_exception` / `cancel` instead, in the order added, before the ordinary done callbacks are scheduled; an
exception from one is reported to the loop's exception handler (as asyncio does for a callback) and the
others still run. A KeyboardInterrupt or SystemExit from one is raised again, as asyncio lets it out of a
callback, but only once every other callback has run: a batch's members are never left half answered. On a
future already answered it falls back to an ordinary done callback: it never runs inside the
`add_eager_callback` call itself.

Only small, non-blocking bookkeeping belongs there (settling the next future, swapping a committed draft in):
it runs on the stack of whoever answers the future.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class EagerFuture(asyncio.Future[T]):
    def __init__(self, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(loop=loop)
        self._eager: list[Callable[[EagerFuture[T]], None]] = []

    def add_eager_callback(self, fn: Callable[[EagerFuture[T]], None]) -> None:
        if self.done():
            self.add_done_callback(fn)
        else:
            self._eager.append(fn)

    def set_result(self, result: T) -> None:
        super().set_result(result)
        self._answered()

    def set_exception(self, exception: type | BaseException) -> None:
        super().set_exception(exception)
        self._answered()

    def cancel(self, msg: Any | None = None) -> bool:
        cancelled = super().cancel(msg)
        if cancelled:
            self._answered()
        return cancelled

    def _answered(self) -> None:
        eager, self._eager = self._eager, []
        exiting: BaseException | None = None
        for fn in eager:
            try:
                fn(self)
            except (SystemExit, KeyboardInterrupt) as e:
                exiting = exiting or e
            except BaseException as e:  # noqa: BLE001 - as asyncio's Handle reports a callback's error
                self.get_loop().call_exception_handler({
                    "message": f"exception in an eager callback of {self!r}", "exception": e, "future": self})
        if exiting is not None:
            raise exiting


def when_answered(future: asyncio.Future[Any], fn: Callable[[Any], None]) -> None:
    """`fn(future)` as soon as `future` is answered: eagerly if it is an EagerFuture, else as a done callback."""
    if isinstance(future, EagerFuture):
        future.add_eager_callback(fn)
    else:
        future.add_done_callback(fn)
