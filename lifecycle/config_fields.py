"""Configuration fields stated once: a default and its limits on a frozen dataclass's field.

The engine's configuration objects (`LiveConfig`, `ScheduleConfig`, `ReconcileConfig`) are plain frozen
dataclasses whose fields are declared with `setting(default, gt=..., le=...)`. The same dataclass is the
section of the service's settings (`[live]`, `[schedule]`, `[reconcile]`): pydantic validates the section
into it, reading the limits from the field's metadata, so its messages name the key and the bound. Built
directly (a test, a benchmark, the chaos harness), `check_limits` in `__post_init__` refuses the same values.
"""
from __future__ import annotations

import operator
from dataclasses import field, fields
from typing import Any, TypeVar

T = TypeVar("T")

LIMITS = {"gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le}


def setting(default: T, **limits: float) -> T:
    """A field with its default and its limits, named as pydantic's `Field` names them (gt, ge, lt, le)."""
    unknown = set(limits) - set(LIMITS)
    if unknown:
        raise TypeError(f"unknown limit(s): {', '.join(sorted(unknown))}")
    return field(default=default, metadata=limits)


def check_limits(config: Any, what: str) -> None:
    """ValueError naming every field of the dataclass `config` outside its limits. None passes only for a
    field whose default is None ("unset", e.g. `max_age_s`)."""
    bad = [f"{f.name} = {getattr(config, f.name)!r}" for f in fields(config) if f.metadata
           and not (getattr(config, f.name) is None and f.default is None)
           and (getattr(config, f.name) is None
                or not all(LIMITS[kind](getattr(config, f.name), bound) for kind, bound in f.metadata.items()))]
    if bad:
        raise ValueError(f"invalid {what} setting(s): {', '.join(bad)}")
