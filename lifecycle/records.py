"""Structured records as JSON lines, one file per record kind (closure.jsonl, ...)."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any


class JsonlRecords:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def emit(self, record: dict[str, Any]) -> None:
        kind = str(record.get("event", "record"))
        line = json.dumps(record, sort_keys=True, default=str)
        with self._lock, open(self.directory / f"{kind}.jsonl", "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()

    def read(self, kind: str) -> list[dict[str, Any]]:
        path = self.directory / f"{kind}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
