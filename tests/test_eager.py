"""EagerFuture (lifecycle/eager.py): callbacks that run when the future is answered, not a loop turn later."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lifecycle.eager import EagerFuture, when_answered


@pytest.mark.parametrize("answer", ["result", "exception", "cancel"])
async def test_eager_callbacks_run_inside_the_answer_in_order_before_the_ordinary_ones(answer: str) -> None:
    future: EagerFuture[int] = EagerFuture()
    seen: list[str] = []
    future.add_done_callback(lambda f: seen.append("ordinary"))
    future.add_eager_callback(lambda f: seen.append("first"))
    when_answered(future, lambda f: seen.append("second"))
    if answer == "result":
        future.set_result(1)
    elif answer == "exception":
        future.set_exception(ValueError("no"))
    else:
        assert future.cancel()
    assert seen == ["first", "second"]  # before set_result returned; the ordinary callback is still scheduled
    await asyncio.sleep(0)
    assert seen == ["first", "second", "ordinary"]
    if answer == "result":
        assert await future == 1
    elif answer == "exception":
        with pytest.raises(ValueError):
            await future
    else:
        assert future.cancelled()


async def test_a_failing_eager_callback_is_reported_and_the_others_still_run() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        future: EagerFuture[None] = EagerFuture()
        seen: list[str] = []

        def boom(_: object) -> None:
            raise RuntimeError("listener bug")

        future.add_eager_callback(boom)
        future.add_eager_callback(lambda f: seen.append("after"))
        future.set_result(None)  # does not raise: the answer stands
        assert seen == ["after"] and future.done()
        assert len(reported) == 1 and isinstance(reported[0]["exception"], RuntimeError)
    finally:
        loop.set_exception_handler(None)


async def test_on_a_future_already_answered_an_eager_callback_is_an_ordinary_one() -> None:
    future: EagerFuture[int] = EagerFuture()
    future.set_result(3)
    seen: list[int] = []
    future.add_eager_callback(lambda f: seen.append(f.result()))
    assert seen == []  # never inside add_eager_callback itself
    await asyncio.sleep(0)
    assert seen == [3]


async def test_an_ordinary_future_gets_an_ordinary_callback() -> None:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    seen: list[int] = []
    when_answered(future, lambda f: seen.append(f.result()))
    future.set_result(4)
    assert seen == []
    await asyncio.sleep(0)
    assert seen == [4]
