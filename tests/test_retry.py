"""The one retry helper (lifecycle/retry.py): its backoff rule and its loop."""
from __future__ import annotations

import pytest

from lifecycle.retry import Backoff, RetryAbandoned, until_done


class Flaky:
    """Fails with the given errors in turn, then answers."""

    def __init__(self, *errors: BaseException, answer: str = "done") -> None:
        self.errors, self.answer, self.calls = list(errors), answer, 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.answer


class Sleeps:
    def __init__(self) -> None:
        self.waited: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waited.append(seconds)


def test_the_backoff_grows_linearly_or_doubling_between_its_floor_and_its_cap() -> None:
    assert [Backoff(0.5, max_s=2.0).delay(n) for n in range(1, 6)] == [0.5, 1.0, 1.5, 2.0, 2.0]
    assert [Backoff(0.25, max_s=1.5, doubling=True).delay(n) for n in range(1, 6)] == [0.25, 0.5, 1.0, 1.5, 1.5]
    assert Backoff(0.0, floor_s=0.05).delay(3) == 0.05
    assert [Backoff.fixed(2.0).delay(n) for n in (1, 7)] == [2.0, 2.0]
    assert Backoff(1.0, max_s=30.0, doubling=True).delay(10_000) == 30.0  # no overflow however long it lasts
    with pytest.raises(ValueError):
        Backoff(-1.0)
    with pytest.raises(ValueError):
        Backoff(1.0).delay(0)


async def test_until_done_retries_what_it_is_told_to_and_reports_each_retry() -> None:
    call, sleeps, seen = Flaky(TimeoutError("a"), TimeoutError("b")), Sleeps(), []
    result = await until_done(call, retry_on=(TimeoutError,), backoff=Backoff(0.1), sleep=sleeps,
                              on_retry=lambda n, e, d: seen.append((n, str(e), d)))
    assert (result, call.calls) == ("done", 3)
    assert seen == [(1, "a", 0.1), (2, "b", 0.2)] and sleeps.waited == [0.1, 0.2]


async def test_until_done_raises_other_errors_at_once_and_the_last_one_after_its_attempts() -> None:
    call = Flaky(KeyError("not retried"))
    with pytest.raises(KeyError):
        await until_done(call, retry_on=(TimeoutError,), backoff=Backoff(0.1), sleep=Sleeps())
    assert call.calls == 1
    call = Flaky(TimeoutError("1"), TimeoutError("2"), TimeoutError("3"))
    with pytest.raises(TimeoutError, match="2"):
        await until_done(call, retry_on=(TimeoutError,), backoff=Backoff(0.1), attempts=2, sleep=Sleeps())
    assert call.calls == 2


async def test_until_done_stops_when_told_to_give_up_after_a_wait() -> None:
    call, asked = Flaky(*(TimeoutError(str(n)) for n in range(10))), []

    def give_up() -> bool:  # keep going once, then give up
        asked.append(1)
        return len(asked) > 1

    with pytest.raises(RetryAbandoned) as abandoned:
        await until_done(call, retry_on=(TimeoutError,), backoff=Backoff(0.1), sleep=Sleeps(), give_up=give_up)
    assert call.calls == 2 and str(abandoned.value.last) == "1"


def test_a_config_field_refuses_none_unless_none_is_its_default() -> None:
    from lifecycle.reconciler import ReconcileConfig
    from scheduler.jobs import ScheduleConfig

    with pytest.raises(ValueError, match="grace_ms"):
        ReconcileConfig(grace_ms=None)  # type: ignore[arg-type]
    assert ScheduleConfig(max_age_s=None).max_age_s is None  # "unset" is its default
