"""The trailing-stop rule, as a pure function: watermark in, target stop (or none) out."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from lifecycle.domain import Side, TrailingState
from lifecycle.guards.predicates import is_stop_improvement


@dataclass(frozen=True, slots=True)
class TrailDecision:
    watermark: Decimal  # best mark since activation, after this mark
    target: Decimal | None  # the stop to move to, or None: leave the stop where it is


def trail(side: Side, state: TrailingState, current_stop: Decimal | None, mark: Decimal, now: datetime, *,
          tick: Decimal, min_step: Decimal, min_interval: timedelta) -> TrailDecision:
    """Follow the watermark at `callback_rate` percent behind it, never backwards, at most once per
    `min_interval`, and only when the stop improves by at least `min_step` (price units).

    The target is rounded away from the mark to the tick, so rounding never pulls it past the watermark's
    distance. Whether the target is on the safe side of the mark is the machine's guard to check.
    """
    if not state.active:
        raise ValueError("trail() needs an activated trailing stop")
    previous = state.watermark if state.watermark is not None else mark
    if side is Side.LONG:
        watermark = max(previous, mark)
        raw = watermark * (1 - state.callback_rate / 100)
    else:
        watermark = min(previous, mark)
        raw = watermark * (1 + state.callback_rate / 100)
    target = side.round_stop(raw, tick)
    if not is_stop_improvement(side, current_stop, target):
        return TrailDecision(watermark, None)
    if current_stop is not None and abs(target - current_stop) < min_step:
        return TrailDecision(watermark, None)
    if state.last_moved_at is not None and now - state.last_moved_at < min_interval:
        return TrailDecision(watermark, None)
    return TrailDecision(watermark, target)
