"""The garbage collector in the service: every collection timed, and young collections at quiet moments (issue 13).

A young collection walks every object allocated since the last one. The service raises the young threshold to
50,000 (`tune_gc`: CPython's 700 ran collections that walked every live position several times per burst), so a
collection walks tens of thousands of objects at once: 15-33 ms measured inside a 500-position cascade, wherever
the count ran out (docs/measurements.md). `QuietCollector` runs that collection while the loop has nothing to
do, so that a cascade starts with a nearly empty young generation:

* every `interval_s` a timer looks at the loop: if the timer fired on time (the loop was not stuck in a long
  step) and the loop's thread used less than `busy_share` of the interval's wall time, and the young generation
  holds at least `young_min` objects, it collects;
* it collects the generation CPython's own rule picks (`gc.collect(2)` when the middle generation's collections
  since the last full one exceed the third threshold, `gc.collect(1)` when the young collections since the last
  middle one exceed the second, else `gc.collect(0)`; strictly greater, as CPython). Collections run here
  instead of in CPython's automatic path, which would otherwise never fire on a quiet service and with it the
  full collections that only that path makes: they run here too, with CPython's other condition for them: not
  while the objects that moved into the old generation since the last full collection are fewer than a quarter
  of what it held after it (a full collection's pause grows with the heap: 183 ms for 2 million objects made
  after the start, measured by the review). Python code cannot read CPython's own two figures; this collector
  keeps its own: the survivors of its middle collections (the young and middle generations' sizes before, less
  what the collection found), and the old generation's size after each full collection it makes (one pass over
  it, then). Survivors of CPython's automatic collections (in bursts) are not counted: full collections come a
  little later than CPython's would. At the most one in 133 quiet collections (66.5 s at 0.5 s) is a full one;
* `gc.disable()` is respected; CPython's automatic collections stay on for everything the quiet ones miss (a
  burst longer than 50,000 allocations still gets one).

`GcTimes` times every collection (`gc.callbacks`) by generation; the metrics endpoint exposes the figures, and
`bench/burst.py` prints the collections that ran inside a cascade. Measured on CPython 3.11 (3.12 and 3.13 keep
the same three generations and rule). From 3.14 CPython's collector is incremental, with other generations and
thresholds: there this collector stands aside (`collect` does nothing) and CPython's own runs as it is.
"""
from __future__ import annotations

import asyncio
import gc
import sys
import time
from typing import Any

from loguru import logger

QUIET_INTERVAL_S = 0.5
QUIET_YOUNG_MIN = 5_000  # fewer young objects than this: not worth a collection (~1-3 ms for 5,000)
QUIET_LATE_S = 0.002  # the timer fired later than this: the loop was busy in a long step
QUIET_BUSY_SHARE = 0.5  # the loop's thread used this share of the interval's wall time or more: busy
GENERATIONAL = sys.version_info < (3, 14)  # CPython's three generations and their rule (see the docstring)


class GcTimes:
    """Collections and their pause by generation, since `install()` (`gc.callbacks`; one per process)."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.ms = [0.0, 0.0, 0.0]
        self.quiet = [0, 0, 0]  # of those, made by a QuietCollector
        self.longest_ms = 0.0
        self._started: float | None = None

    def install(self) -> GcTimes:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        started, self._started = self._started, None
        generation = info.get("generation")
        if started is None or generation not in (0, 1, 2):
            return
        took = (time.perf_counter() - started) * 1000
        self.collections[generation] += 1
        self.ms[generation] += took
        self.longest_ms = max(self.longest_ms, took)


GC_TIMES = GcTimes()  # installed by the service at start (`tune_gc`)


def pick_generation(old_pending: int = 0, old_total: int = 0) -> int:
    """The generation CPython's automatic collection would take now: its rule on the counts, and the old
    generation only once `old_pending` (objects moved into it since its last collection) reaches a quarter of
    `old_total` (what it held after that collection), as CPython's own figures decide it."""
    _, middle, old = gc.get_count()
    _, middle_threshold, old_threshold = gc.get_threshold()
    if old > old_threshold and old_pending >= old_total // 4:
        return 2
    if middle > middle_threshold:
        return 1
    return 0


class QuietCollector:
    """Young collections at quiet moments of the running loop (see the module docstring)."""

    def __init__(self, interval_s: float = QUIET_INTERVAL_S, young_min: int = QUIET_YOUNG_MIN,
                 late_s: float = QUIET_LATE_S, busy_share: float = QUIET_BUSY_SHARE,
                 times: GcTimes = GC_TIMES) -> None:
        if interval_s <= 0 or young_min < 1 or late_s < 0 or not 0 < busy_share <= 1:
            raise ValueError("QuietCollector: interval_s > 0, young_min >= 1, late_s >= 0, 0 < busy_share <= 1")
        self.interval_s, self.young_min, self.late_s, self.busy_share = interval_s, young_min, late_s, busy_share
        self.collected = [0, 0, 0]  # collections made here, by generation
        self.times = times
        self.skipped_busy = 0  # ticks that found the loop busy
        self.old_pending = 0  # objects its middle collections moved into the old generation since its last full one
        self.old_total = 0  # the old generation's size after its last full collection
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._cpu = 0.0
        self._wall = 0.0

    @property
    def running(self) -> bool:
        return self._handle is not None

    def start(self) -> QuietCollector:
        """Start ticking on the running loop (again after a stop; a second start does nothing)."""
        if self._handle is None:
            self._loop = asyncio.get_running_loop()
            self._schedule()
        return self

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self) -> None:
        assert self._loop is not None
        self._due = self._loop.time() + self.interval_s
        self._cpu, self._wall = time.thread_time(), time.perf_counter()
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        try:
            if self.quiet():
                self.collect()
            else:
                self.skipped_busy += 1
        except Exception as e:  # noqa: BLE001 - the next tick tries again; the service must not notice
            logger.warning("garbage collection at a quiet moment failed: {}: {}", type(e).__name__, e)
        finally:
            if self._handle is not None:  # not stopped meanwhile (a stop cancels and clears it)
                self._schedule()

    def quiet(self) -> bool:
        """The timer fired on time and the loop's thread was mostly idle since it was set."""
        assert self._loop is not None
        late = self._loop.time() - self._due
        wall = time.perf_counter() - self._wall
        share = (time.thread_time() - self._cpu) / wall if wall > 0 else 1.0
        return late <= self.late_s and share < self.busy_share

    def collect(self) -> int | None:
        """Collect now if the young generation is worth it: the generation collected, or None."""
        if not GENERATIONAL or not gc.isenabled() or gc.get_count()[0] < self.young_min:
            return None
        generation = pick_generation(self.old_pending, self.old_total)
        before = len(gc.get_objects(0)) + len(gc.get_objects(1)) if generation == 1 else 0
        found = gc.collect(generation)
        if generation == 1:
            self.old_pending += max(0, before - found)  # what survived moved into the old generation
        elif generation == 2:
            self.old_pending, self.old_total = 0, len(gc.get_objects(2))
        self.collected[generation] += 1
        self.times.quiet[generation] += 1
        return generation
