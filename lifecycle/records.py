"""Structured records as JSON lines, one file per record kind and UTC day: `closure-2026-12-02.jsonl`, ...

Every record carries `event` (its kind), `account`, `position_id`, `symbol` and `at` (None where a record
is about an account rather than a position). Files of a kind older than `retention_days` are deleted when
a new day's file is started (and at start).

Records are books, not protection (invariant 8): `emit` only queues the line and returns; a writer thread
appends the queue in order, off the event loop. A write that fails (a full disk, a removed directory) is
cut back to where it started (no torn line), retried with a growing delay, and the failure is reported by
`failing` (health goes `degraded`) until the lines are written; nothing is dropped unless `max_pending`
lines wait at once (then the oldest go, counted in `dropped` and logged). `flush()` waits for the queue,
`close()` flushes at shutdown and says what could not be written.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from loguru import logger

from lifecycle.record_kinds import Record

REQUIRED = ("event", "account", "position_id", "symbol", "at")
STALLED_AFTER_S = 5.0  # a write that has not returned for this long makes `failing` say so
_DATED = re.compile(r"^(?P<kind>.+)-(?P<day>\d{4}-\d{2}-\d{2})\.jsonl$")


class JsonlRecords:
    def __init__(self, directory: str | Path, *, retention_days: int | None = None,
                 today: Callable[[], date] = lambda: datetime.now(UTC).date(),
                 max_pending: int = 1_000_000, retry_max_s: float = 2.0, instance: str | None = None) -> None:
        """`instance`: the service process's name in a cluster (issue 14), written into every record: several
        processes append to the same files (each group of lines in one O_APPEND write)."""
        if retention_days is not None and retention_days < 1:
            raise ValueError(f"retention_days must be >= 1, got {retention_days}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.retention_days = retention_days
        self.today = today
        self.max_pending = max_pending
        self.retry_max_s = retry_max_s
        self.instance = instance
        self.listeners: list[Callable[[dict[str, Any]], None]] = []  # called with each record emitted
        self._failed: str | None = None  # why the last write failed, while lines wait
        self._writing: tuple[float, str] | None = None  # (monotonic start, kind) of the write in progress
        self.written = 0
        self.dropped = 0
        self._pending: deque[tuple[int, date, str, str]] = deque()  # (sequence, day, kind, line)
        self._seq = 0
        self._cv = threading.Condition()
        self._writer: threading.Thread | None = None
        self._day: date | None = None
        # Positions with a closure record (written here, or found by `remember_closures`): one record each.
        self._closed: OrderedDict[str, None] = OrderedDict()
        self._expire(self.today())  # at start too, not only when a new day's first record comes

    def remember_closures(self, position_ids: Iterable[str | None]) -> None:
        """Positions whose closure record an earlier process already wrote (read at start): a close of one of
        them again (its terminal commit was lost in a crash while the books were behind, the record was not)
        writes no second record."""
        for position_id in position_ids:
            if position_id:
                self._closed[position_id] = None
        while len(self._closed) > 100_000:
            self._closed.popitem(last=False)

    def emit(self, record: Record | Mapping[str, Any]) -> None:
        """Queue one record (never blocks on the disk, never raises for it) and tell the listeners."""
        record = record.as_record() if isinstance(record, Record) else dict(record)
        for key in REQUIRED:
            record.setdefault(key, None)
        if self.instance is not None:
            record.setdefault("instance", self.instance)
        if record["event"] is None:
            record["event"] = "record"
        if record["at"] is None:
            record["at"] = datetime.now(UTC).isoformat()
        if record["event"] == "closure" and record["position_id"]:
            if record["position_id"] in self._closed:
                logger.warning("records: {} already has a closure record (written before a crash that lost its "
                               "terminal commit); not written twice", record["position_id"])
                return
            self.remember_closures([record["position_id"]])
        line = json.dumps(record, sort_keys=True, default=str)
        with self._cv:
            if len(self._pending) >= self.max_pending:
                self._pending.popleft()
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 10_000 == 0:
                    logger.error("records: {} line(s) dropped: {} lines wait for a disk that fails ({})",
                                 self.dropped, self.max_pending, self.failing)
            self._seq += 1
            self._pending.append((self._seq, self.today(), str(record["event"]), line))
            if self._writer is None:
                self._writer = threading.Thread(target=self._run, name="records-writer", daemon=True)
                self._writer.start()
            self._cv.notify_all()
        for listener in list(self.listeners):
            try:
                listener(record)
            except Exception as e:  # noqa: BLE001 - a listener (metrics, the live page) is books: never the emitter's
                logger.error("records: a listener failed on a {} record: {}: {}", record["event"], type(e).__name__, e)

    @property
    def failing(self) -> str | None:
        """Why records are not being written, while that lasts: the last write failed (its lines wait and are
        retried), or a write has not returned for STALLED_AFTER_S (a disk or mount that hangs: no error ever
        comes; review, seventh session: /health said ok with the lines stuck). None while all is well."""
        if self._failed is not None:
            return self._failed
        writing = self._writing
        if writing is not None and (stuck := time.monotonic() - writing[0]) >= STALLED_AFTER_S:
            return f"{writing[1]}: a write has not returned for {stuck:.0f} s"
        return None

    @property
    def pending(self) -> int:
        with self._cv:
            return len(self._pending)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued line is on disk (True) or `timeout` passed (False)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cv.wait(remaining)
        return True

    def close(self, timeout: float = 5.0) -> int:
        """Flush at shutdown; returns (and logs) how many lines could not be written."""
        self.flush(timeout)
        left = self.pending
        if left:
            logger.error("records: {} line(s) could not be written before stopping ({})", left, self.failing)
        return left

    # --- the writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        delay = 0.05
        while True:
            with self._cv:
                while not self._pending:
                    if not self._cv.wait(timeout=2.0) and not self._pending:
                        self._writer = None  # idle: the next emit starts a new writer
                        return
                batch = list(itertools.islice(self._pending, 1000))  # not a copy of the whole queue
            # Consecutive lines of one file are written together.
            day, kind = batch[0][1], batch[0][2]
            taken = _prefix(batch, day, kind)
            group = [line for _, _, _, line in taken]
            self._writing = (time.monotonic(), kind)
            try:
                self._append(day, kind, group)
            except OSError as e:
                self._writing = None
                with self._cv:
                    if self._failed is None:
                        logger.error("records: cannot write {} ({}); lines wait in memory and are retried",
                                     kind, e.strerror or type(e).__name__)
                    self._failed = f"{kind}: {e.strerror or type(e).__name__}"
                    self._cv.notify_all()
                time.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
                continue
            self._writing = None
            delay = 0.05
            with self._cv:
                last = taken[-1][0]
                while self._pending and self._pending[0][0] <= last:  # by sequence: emit() may have dropped some
                    self._pending.popleft()
                self.written += len(group)
                if self._failed is not None:
                    logger.warning("records: writing again; every waiting line is written")
                    self._failed = None
                self._cv.notify_all()

    def _append(self, day: date, kind: str, lines: list[str]) -> None:
        if day != self._day:
            self._day = day
            self._expire(day)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{kind}-{day.isoformat()}.jsonl"
        data = memoryview("".join(line + "\n" for line in lines).encode("utf-8"))
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                while data:
                    data = data[os.write(fd, data):]
            except OSError:
                try:  # no torn line: cut the file back to where this write started
                    os.ftruncate(fd, start)
                except OSError:
                    pass
                raise
        finally:
            os.close(fd)

    def files(self, kind: str) -> list[Path]:
        """This kind's files, oldest day first (after writing what is queued)."""
        self.flush()
        found = [p for p in self.directory.glob(f"{kind}-*.jsonl") if (m := _DATED.match(p.name)) and
                 m.group("kind") == kind]
        return sorted(found)

    def read_since(self, kind: str, day: date) -> list[dict[str, Any]]:
        """The records of a kind in the files of `day` and later (after writing what is queued); a torn or
        unreadable line is skipped."""
        out: list[dict[str, Any]] = []
        for path in self.files(kind):
            m = _DATED.match(path.name)
            if m is None or date.fromisoformat(m.group("day")) < day:
                continue
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def read(self, kind: str) -> list[dict[str, Any]]:
        """Every record of a kind still kept, oldest first (after writing what is queued)."""
        out: list[dict[str, Any]] = []
        for path in self.files(kind):
            out += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
        return out

    def _expire(self, today: date) -> None:
        if self.retention_days is None:
            return
        if not self.directory.exists():
            return
        oldest = today - timedelta(days=self.retention_days - 1)  # retention_days = 1 keeps today only
        for path in self.directory.glob("*.jsonl"):
            m = _DATED.match(path.name)
            try:
                day = date.fromisoformat(m.group("day")) if m is not None else None
            except ValueError:  # not one of ours (x-2026-02-30.jsonl): left alone
                continue
            if day is not None and day < oldest:
                try:
                    path.unlink(missing_ok=True)
                except OSError as e:  # retention is housekeeping: it never stops a write
                    logger.warning("records: cannot delete {}: {}", path.name, e.strerror)


def _prefix(batch: list[tuple[int, date, str, str]], day: date, kind: str) -> list[tuple[int, date, str, str]]:
    """The leading items of `batch` that go to the same file."""
    out = []
    for item in batch:
        if item[1] != day or item[2] != kind:
            break
        out.append(item)
    return out
