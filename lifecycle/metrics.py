"""In-process counters; exported by the service's metrics endpoint once it exists."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Metrics:
    transitions: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (source, event, dest)
    refused: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (state, event, why)
    action_failures: Counter[str] = field(default_factory=Counter)  # action type
