"""Collections at quiet moments (lifecycle/app/garbage.py): CPython's rule for the generation, the old generation's
full collections kept, a busy loop left alone, `gc.disable()` respected, a failing tick that keeps ticking.

Each test sets the collector's thresholds and counts itself (a full collection first, then young thresholds too
high for an automatic collection to run inside the test), and puts CPython's thresholds back afterwards."""
from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator

import pytest

from lifecycle.app.garbage import GcTimes, QuietCollector, pick_generation


@pytest.fixture
def thresholds() -> Iterator[None]:
    """No automatic collection inside the test (young threshold 10**7), middle and old thresholds of 2; counts
    from zero."""
    saved, enabled = gc.get_threshold(), gc.isenabled()
    gc.enable()
    gc.collect()
    gc.set_threshold(10**7, 2, 2)
    try:
        yield
    finally:
        gc.set_threshold(*saved)
        if not enabled:
            gc.disable()


def _young(n: int) -> list[list[int]]:
    return [[i] for i in range(n)]  # n tracked objects, kept alive by the caller


def test_the_generation_collected_follows_cpythons_rule_full_collections_included(thresholds: None) -> None:
    """Young collections, a middle one once more than 2 young ones ran since the last, a full one once more than
    2 middle ones ran since the last (CPython: strictly greater). Stopping the automatic path's collections must
    not stop the full ones: a review of the first version found garbage in cycles piling up without them."""
    collector = QuietCollector(young_min=100)
    times = GcTimes().install()
    kept = []
    try:
        picked = []
        for _ in range(13):
            kept.append(_young(200))
            picked.append(collector.collect())
        assert picked == [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 2]
        assert collector.collected == [9, 3, 1] and times.collections == [9, 3, 1]
        assert gc.get_count()[1:] == (0, 0)  # the full collection reset the older counts, as CPython's does
    finally:
        gc.callbacks.remove(times._callback)


def test_cycles_are_freed_by_the_quiet_collections_alone(thresholds: None) -> None:
    """Garbage in cycles that survives into the old generation is freed by the full collections the quiet ones
    make, with CPython's automatic path never running (its young threshold never reached)."""

    class Node:
        def __init__(self) -> None:
            self.me = self

    collector = QuietCollector(young_min=100)
    for _ in range(14):
        survivors = [Node() for _ in range(200)]  # alive through this round's collection: they age
        collector.collect()
        del survivors  # garbage now, in cycles: only a collection of the generation they are in frees them
    # Rounds 4, 8 and 12 were middle collections: their nodes reached the old generation, and only round 13's full
    # collection freed them. Left: round 13's (old now) and round 14's (middle). Without full collections: 1,000.
    assert collector.collected == [10, 3, 1]
    assert sum(isinstance(o, Node) for o in gc.get_objects()) == 400
    gc.collect()
    assert not any(isinstance(o, Node) for o in gc.get_objects())


def test_too_few_young_objects_and_a_disabled_collector_collect_nothing(thresholds: None) -> None:
    collector = QuietCollector(young_min=10_000)
    kept = _young(100)
    assert collector.collect() is None and collector.collected == [0, 0, 0]
    kept += _young(20_000)
    gc.disable()
    try:
        assert collector.collect() is None and collector.collected == [0, 0, 0]
    finally:
        gc.enable()
    assert collector.collect() == 0 and collector.collected == [1, 0, 0]


async def _until(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_a_loop_stuck_in_a_long_step_or_busy_in_short_ones_is_not_collected_on(thresholds: None) -> None:
    collector = QuietCollector(interval_s=0.05, young_min=1).start()
    try:
        await _until(lambda: sum(collector.collected) >= 1)  # a quiet loop: collected on
        collected = sum(collector.collected)
        skipped = collector.skipped_busy
        spin_until = time.perf_counter() + 0.2
        while time.perf_counter() < spin_until:  # one long step: the tick fires late
            pass
        await asyncio.sleep(0)
        await _until(lambda: collector.skipped_busy > skipped)
        assert sum(collector.collected) == collected
        skipped = collector.skipped_busy
        spin_until = time.perf_counter() + 0.3
        while time.perf_counter() < spin_until:  # busy in short steps of ~1 ms: the ticks come on time
            step = time.perf_counter() + 0.001
            while time.perf_counter() < step:
                pass
            await asyncio.sleep(0)
        assert collector.skipped_busy > skipped and sum(collector.collected) == collected
        await _until(lambda: sum(collector.collected) > collected)  # quiet again: collected on
    finally:
        collector.stop()


async def test_a_failing_tick_keeps_the_collector_ticking_and_a_stop_stops_it(
        thresholds: None, monkeypatch: pytest.MonkeyPatch) -> None:
    collector = QuietCollector(interval_s=0.02, young_min=1)
    failures = []

    def failing() -> int | None:
        failures.append(1)
        raise RuntimeError("boom")

    monkeypatch.setattr(collector, "collect", failing)
    collector.start()
    try:
        await _until(lambda: len(failures) >= 2)  # it raised, and ticked again
        monkeypatch.undo()
        await _until(lambda: sum(collector.collected) >= 1)
    finally:
        collector.stop()
    assert not collector.running
    collected = sum(collector.collected)
    collector._tick()  # a tick already running when the stop came: it does not set a timer again
    assert not collector.running
    collector.start().start()  # again after a stop; a second start does not make a second timer
    try:
        await _until(lambda: sum(collector.collected) > collected)
    finally:
        collector.stop()


def test_bad_settings_are_refused() -> None:
    for bad in ({"interval_s": 0}, {"young_min": 0}, {"late_s": -1}, {"busy_share": 0}, {"busy_share": 1.5}):
        with pytest.raises(ValueError):
            QuietCollector(**bad)


def test_pick_generation_reads_the_counts_as_they_are(thresholds: None) -> None:
    assert pick_generation() == 0


def test_a_full_collection_waits_until_a_quarter_of_the_old_generation_is_new(thresholds: None) -> None:
    """Review of 3300299: the count alone made a full collection every 133 quiet ones, its pause growing with the
    heap (183 ms with 2 million objects). CPython also waits until what moved into the old generation since its
    last full collection is a quarter of what it held after it; so does the collector now."""
    collector = QuietCollector(young_min=100)
    old = _young(40_000)  # long-lived: in the old generation after the first full collection
    rounds = []
    while collector.collected[2] == 0:
        rounds.append(_young(200))
        collector.collect()
    assert collector.old_total >= 40_000 and collector.old_pending == 0
    for _ in range(40):  # three full cycles of the count's rule, few survivors each: no second full collection
        rounds.append(_young(200))
        collector.collect()
    assert collector.collected[2] == 1 and 0 < collector.old_pending < collector.old_total // 4
    for _ in range(60):  # many survivors: once a quarter of the old generation is new, the full collection comes
        rounds.append(_young(3_000))
        collector.collect()
        if collector.collected[2] == 2:
            break
    assert collector.collected[2] == 2 and collector.old_pending == 0
    del old, rounds


def test_a_loop_busy_half_the_time_is_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review of 3300299: 1 ms of work and 1 ms of sleep in turn gave a share of exactly 0.5, taken for quiet."""
    import lifecycle.app.garbage as garbage

    class Clock:
        now = 10.0
        cpu = 4.0

        @staticmethod
        def perf_counter() -> float:
            return Clock.now

        @staticmethod
        def thread_time() -> float:
            return Clock.cpu

    class Loop:
        @staticmethod
        def time() -> float:
            return 100.0

    monkeypatch.setattr(garbage, "time", Clock)
    collector = QuietCollector(interval_s=0.5)
    collector._loop = Loop()  # type: ignore[assignment]
    collector._due, collector._wall, collector._cpu = 100.0, 9.5, 3.75  # 0.25 s of CPU in 0.5 s
    assert not collector.quiet()
    collector._cpu = 3.76
    assert collector.quiet()
