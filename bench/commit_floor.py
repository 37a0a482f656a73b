"""The floor under a single close's durable write, on this machine, with nothing of ours around it: the disk's
own `fdatasync` of a 4 KiB write, and SQLite's COMMIT of a transaction that changes 8 pages (what a terminal
transition writes: the position, the journal, the closure and their indexes) in WAL mode with
synchronous=FULL, as the service runs it. Each back to back, then spaced as a single close's commits are in
bench.closure_latency (one every ~10 ms: an idle disk and CPU answer slower than a busy one), then next to a
process that keeps one core busy (the event loop parsing frames while the writer thread commits).

Why it exists: the single-close target of issue 13 (detection p99 <= 2.5x the simulator's round trip p99)
leaves the engine's whole part, after the flat reaches it, 1.5x that round trip (0.85-0.95 ms at p99 here,
bench.closure_latency prints it); this prints what the durable commit alone costs at p99.

Run: python -m bench.commit_floor [--commits 2000] [--pace-ms 10]
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import random
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

PAGES = 8


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _spin() -> None:
    while True:
        pass


@contextlib.contextmanager
def _busy_core(busy: bool) -> Iterator[None]:
    if not busy:
        yield
        return
    spinner = multiprocessing.Process(target=_spin, daemon=True)
    spinner.start()
    try:
        yield
    finally:
        spinner.kill()
        spinner.join()


def fdatasync_times(directory: Path, n: int, pace_s: float) -> list[float]:
    fd = os.open(directory / "raw", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, bytes(1 << 20))
        os.fsync(fd)
        block = os.urandom(4096)
        times = []
        for i in range(n):
            time.sleep(pace_s)
            os.pwrite(fd, block, (i % 256) * 4096)
            started = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - started)
        return times
    finally:
        os.close(fd)


def commit_times(directory: Path, n: int, pace_s: float) -> list[float]:
    conn = sqlite3.connect(directory / "floor.sqlite", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, b BLOB)")
        conn.execute("BEGIN")
        conn.executemany("INSERT OR REPLACE INTO t VALUES (?, ?)", ((i, os.urandom(3000)) for i in range(2000)))
        conn.execute("COMMIT")
        times = []
        for _ in range(n):
            time.sleep(pace_s)
            conn.execute("BEGIN")
            for row in random.sample(range(2000), PAGES):  # a 3,000-byte row fills a page: 8 pages changed
                conn.execute("UPDATE t SET b = ? WHERE id = ?", (os.urandom(3000), row))
            started = time.perf_counter()
            conn.execute("COMMIT")
            times.append(time.perf_counter() - started)
        return times
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--commits", type=int, default=2000)
    parser.add_argument("--pace-ms", type=float, default=10.0, help="the spacing of the paced runs")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="commit-floor-"))
    measures: list[tuple[str, Callable[[Path, int, float], list[float]]]] = [
        ("fdatasync of a 4 KiB write", fdatasync_times), (f"SQLite COMMIT of {PAGES} pages, WAL, synchronous=FULL",
                                                          commit_times)]
    print(f"{args.commits} each, in {directory}")
    pace_s = args.pace_ms / 1000
    for busy, paced in ((False, False), (False, True), (True, True)):
        how = ", ".join(([f"one every {args.pace_ms:g} ms"] if paced else ["back to back"])
                        + (["one core busy"] if busy else []))
        with _busy_core(busy):
            for name, measure in measures:
                ms = [t * 1000 for t in measure(directory, args.commits, pace_s if paced else 0.0)]
                print(f"  {name}, {how}: p50 {pct(ms, 50):.3f} ms  p99 {pct(ms, 99):.3f} ms  max {max(ms):.3f} ms")


if __name__ == "__main__":
    main()
