"""Records: one JSON-lines file per kind and UTC day, every record with the keys that identify it, old days
deleted after the retention period."""
from __future__ import annotations

import os
import time
from datetime import date
from pathlib import Path

import pytest

import lifecycle.records as records_module
from lifecycle.records import REQUIRED, JsonlRecords


def test_files_rotate_daily_and_old_days_are_deleted(tmp_path: Path) -> None:
    day = [date(2026, 12, 1)]
    records = JsonlRecords(tmp_path, retention_days=2, today=lambda: day[0])
    records.emit({"event": "closure", "account": "a", "symbol": "BTCUSDT", "position_id": "p1", "at": "t1"})
    day[0] = date(2026, 12, 2)
    records.emit({"event": "closure", "account": "a", "symbol": "BTCUSDT", "position_id": "p2", "at": "t2"})
    records.emit({"event": "recovery", "account": "a"})
    assert records.flush()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "closure-2026-12-01.jsonl", "closure-2026-12-02.jsonl", "recovery-2026-12-02.jsonl"]
    assert [r["position_id"] for r in records.read("closure")] == ["p1", "p2"]
    day[0] = date(2026, 12, 3)  # 2026-12-01 is now older than two days
    records.emit({"event": "closure", "account": "a", "symbol": "ETHUSDT", "position_id": "p3", "at": "t3"})
    assert [r["position_id"] for r in records.read("closure")] == ["p2", "p3"]
    assert not (tmp_path / "closure-2026-12-01.jsonl").exists()


def test_every_record_carries_its_identifying_keys(tmp_path: Path) -> None:
    records = JsonlRecords(tmp_path)
    records.emit({"event": "recovery", "account": "a", "positions": 3})
    [record] = records.read("recovery")
    assert set(REQUIRED) <= set(record) and record["at"] and record["positions"] == 3


def test_a_kind_whose_name_prefixes_another_is_read_alone(tmp_path: Path) -> None:
    records = JsonlRecords(tmp_path)
    records.emit({"event": "stop", "account": "a"})
    records.emit({"event": "stop_move", "account": "a"})
    assert len(records.read("stop")) == 1 and len(records.read("stop_move")) == 1


def test_retention_below_one_day_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="retention_days"):
        JsonlRecords(tmp_path, retention_days=0)


def test_a_closure_already_recorded_before_a_crash_is_not_written_twice(tmp_path: Path) -> None:
    """Seed 100450 (a rare interleaving): a close whose record was written but whose terminal commit was lost
    (the books behind, then SIGKILL) is closed again after the restart; the closure record is written once."""
    first = JsonlRecords(tmp_path)
    first.emit({"event": "closure", "position_id": "p1", "account": "a", "symbol": "BTCUSDT", "state": "CLOSED"})
    first.close(5)
    second = JsonlRecords(tmp_path)  # the next process
    second.remember_closures(r.get("position_id") for r in second.read("closure"))
    second.emit({"event": "closure", "position_id": "p1", "account": "a", "symbol": "BTCUSDT", "state": "CLOSED"})
    second.emit({"event": "closure", "position_id": "p2", "account": "a", "symbol": "BTCUSDT", "state": "CLOSED"})
    second.emit({"event": "closure", "position_id": "p2", "account": "a", "symbol": "BTCUSDT", "state": "CLOSED"})
    second.close(5)
    assert sorted(r["position_id"] for r in second.read("closure")) == ["p1", "p2"]


def test_a_write_that_never_returns_is_reported_as_failing_until_it_does(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A records disk that hangs raises no error: the write just does not return. `failing` (and so /health and
    lifecycle_records_failing) said nothing while the lines waited (review, seventh session). A FIFO without a
    reader stands for the disk: opening it to write blocks until a reader comes."""
    monkeypatch.setattr(records_module, "STALLED_AFTER_S", 0.2, raising=False)
    day = date(2026, 12, 5)
    records = JsonlRecords(tmp_path, today=lambda: day)
    fifo = tmp_path / f"transition-{day.isoformat()}.jsonl"
    os.mkfifo(fifo)
    records.emit({"event": "transition", "position_id": "p1"})
    deadline = time.monotonic() + 5
    while records.failing is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert records.failing is not None and records.failing.startswith("transition: a write has not returned for")
    assert records.pending == 1
    # The disk answers again: the blocked open returns (a pipe cannot be appended to: that attempt fails and is
    # retried), and the file is a file again.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fifo.unlink()
        assert records.flush(5.0)
    finally:
        os.close(reader)
    assert records.failing is None and records.pending == 0
    assert '"position_id": "p1"' in fifo.read_text()
