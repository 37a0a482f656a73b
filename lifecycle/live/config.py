"""The live engine's configuration, the open command, and its counters."""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from decimal import Decimal

from lifecycle.config_fields import check_limits, setting
from lifecycle.domain import Side, TrailingState
from lifecycle.errors import InvalidEvent


@dataclass(frozen=True)
class LiveConfig:
    """The live engine's configuration; also the `[live]` section of the service's settings (its keys are
    these fields' names)."""

    # when an open command gives none (and after a restart)
    default_stop_loss_pct: Decimal = setting(Decimal("1"), gt=0, lt=100)
    # a trailing move must improve the stop by this % of it
    trail_min_step_pct: Decimal = setting(Decimal("0.02"), ge=0, lt=100)
    # at most one trailing move per position per interval
    trail_min_interval_s: float = setting(1.0, ge=0, le=3600)
    cause_wait_s: float = setting(0.5, ge=0, le=10)  # how long a flat waits for the fill that explains it
    cause_rest_timeout_s: float = setting(2.0, gt=0, le=60)  # then REST is asked for the fill, at most this long
    # a position no repair can protect this long is closed at market
    unprotected_close_after_s: float = setting(10.0, ge=0, le=3600)
    close_retries: int = setting(3, ge=0, le=100)  # a rejected bot close is retried this many times
    stop_retries: int = setting(3, ge=0, le=100)  # a stop placement failing transiently is retried this many times
    retry_backoff_s: float = setting(0.5, ge=0, le=60)

    def __post_init__(self) -> None:
        check_limits(self, "live engine")


@dataclass(frozen=True)
class OpenCommand:
    symbol: str
    side: Side
    quantity: Decimal
    entry_price: Decimal | None = None  # None: market entry; else a limit entry at this price
    stop_loss_pct: Decimal | None = None  # distance of the initial stop from the entry price, percent
    trailing_activation: Decimal | None = None  # price at which the trailing stop activates
    trailing_callback_pct: Decimal | None = None  # how far behind the watermark the stop trails, percent
    take_profit: Decimal | None = None  # price of an optional reduce-only take-profit for the whole size

    def __post_init__(self) -> None:
        if not self.symbol:
            raise InvalidEvent("symbol is required")
        if not self.quantity.is_finite() or self.quantity <= 0:
            raise InvalidEvent(f"quantity must be > 0, got {self.quantity}")
        for name in ("entry_price", "trailing_activation", "take_profit"):
            value = getattr(self, name)
            if value is not None and (not value.is_finite() or value <= 0):
                raise InvalidEvent(f"{name} must be > 0, got {value}")
        if self.stop_loss_pct is not None and not (Decimal(0) < self.stop_loss_pct < Decimal(100)):
            raise InvalidEvent(f"stop_loss_pct must be in (0, 100), got {self.stop_loss_pct}")
        if (self.trailing_activation is None) != (self.trailing_callback_pct is None):
            raise InvalidEvent("trailing_activation and trailing_callback_pct go together")

    def trailing(self) -> TrailingState | None:
        if self.trailing_activation is None or self.trailing_callback_pct is None:
            return None
        try:
            return TrailingState(activation_price=self.trailing_activation, callback_rate=self.trailing_callback_pct)
        except ValueError as e:
            raise InvalidEvent(str(e)) from None


@dataclass
class Tally:
    """A bounded running summary (count, sum, max, the newest `keep` values): never grows with the run."""

    keep: int = 1000
    count: int = 0
    total: float = 0.0
    largest: float = 0.0
    recent: deque[float] = field(default_factory=deque)

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.largest = max(self.largest, value)
        self.recent.append(value)
        while len(self.recent) > self.keep:
            self.recent.popleft()


@dataclass
class LiveStats:
    stop_moves: int = 0
    stop_move_failures: int = 0
    stops_crossed: int = 0
    exchange_errors: int = 0
    unprotected_ms: Tally = field(default_factory=Tally)  # one value per cancel-then-place fallback
    calls_per_move: Tally = field(default_factory=Tally)
    protection_repairs: Counter[str] = field(default_factory=Counter)  # what the protection audit repaired
    audits: int = 0
    cause_sources: Counter[str] = field(default_factory=Counter)  # where closure causes came from
    closures_amended: int = 0
    orphans_cancelled: int = 0  # working orders of ours cancelled by the orphan sweep
