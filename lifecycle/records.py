"""Structured records as JSON lines, one file per record kind and UTC day: `closure-2026-12-02.jsonl`, ...

Every record carries `event` (its kind), `account`, `position_id`, `symbol` and `at` (None where a record
is about an account rather than a position). Files of a kind older than `retention_days` are deleted when
a new day's file is started (and at start). Writes are appended and flushed line by line, so a crash
loses at most the line being written.
"""
from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

REQUIRED = ("event", "account", "position_id", "symbol", "at")
_DATED = re.compile(r"^(?P<kind>.+)-(?P<day>\d{4}-\d{2}-\d{2})\.jsonl$")


class JsonlRecords:
    def __init__(self, directory: str | Path, *, retention_days: int | None = None,
                 today: Callable[[], date] = lambda: datetime.now(UTC).date()) -> None:
        if retention_days is not None and retention_days < 1:
            raise ValueError(f"retention_days must be >= 1, got {retention_days}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.retention_days = retention_days
        self.today = today
        self._lock = threading.Lock()
        self._day: date | None = None
        self.listeners: list[Callable[[dict[str, Any]], None]] = []  # called with each record written
        with self._lock:
            self._expire(self.today())  # at start too, not only when a new day's first record comes

    def emit(self, record: dict[str, Any]) -> None:
        record = dict(record)
        for key in REQUIRED:
            record.setdefault(key, None)
        if record["event"] is None:
            record["event"] = "record"
        if record["at"] is None:
            record["at"] = datetime.now(UTC).isoformat()
        line = json.dumps(record, sort_keys=True, default=str)
        with self._lock:
            day = self.today()
            if day != self._day:
                self._day = day
                self._expire(day)
            with open(self.directory / f"{record['event']}-{day.isoformat()}.jsonl", "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
                fh.flush()
        for listener in list(self.listeners):
            listener(record)

    def files(self, kind: str) -> list[Path]:
        """This kind's files, oldest day first."""
        found = [p for p in self.directory.glob(f"{kind}-*.jsonl") if (m := _DATED.match(p.name)) and
                 m.group("kind") == kind]
        return sorted(found)

    def read(self, kind: str) -> list[dict[str, Any]]:
        """Every record of a kind still kept, oldest first."""
        out: list[dict[str, Any]] = []
        for path in self.files(kind):
            out += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
        return out

    def _expire(self, today: date) -> None:
        if self.retention_days is None:
            return
        oldest = today - timedelta(days=self.retention_days - 1)  # retention_days = 1 keeps today only
        for path in self.directory.glob("*.jsonl"):
            m = _DATED.match(path.name)
            try:
                day = date.fromisoformat(m.group("day")) if m is not None else None
            except ValueError:  # not one of ours (x-2026-02-30.jsonl): left alone
                continue
            if day is not None and day < oldest:
                path.unlink(missing_ok=True)
