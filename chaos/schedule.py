"""What a chaos schedule is, and how a seed (or hypothesis) turns into one.

A schedule is a timeline over a second or two of real time: commands (opens of every kind, closes, repeated
and concurrent ones, reopens), market moves (walks, gaps through stops and activation prices, spikes), other
actors on the venue (liquidation, ADL, settlement, manual closes, opens and flips by another client, foreign
orders, partial fills, cancels by the venue, funding, a position vanishing), venue faults as overlapping
windows (latency, timeouts, 5xx, 429/418, lost answers, stale snapshots, silent, dropped and refused
streams, duplicated, reordered and delayed events, expired listen keys, -2021 / -4045 refusals, bad frames),
storage faults (a full disk, driver errors, PostgreSQL cut off) and, in a share of schedules, a SIGKILL of
the service process followed by a restart.

One generator, two sources of choices: `random.Random(seed)` for the derandomized, seed-addressed mode (same
seed, same schedule, in CI and in the soak), and hypothesis' `st.randoms(use_true_random=False)` for the
exploring mode, where every choice is recorded by hypothesis and a failing schedule shrinks (fewer steps,
smaller numbers, the first of each list).

Every fault is a window `[at, at + dur]`: the ones that count calls (5xx, timeouts, ...) are switched off again
at the window's end, so that "after the faults clear" is a time the checks know.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
QTY = {"BTCUSDT": "0.010", "ETHUSDT": "0.10", "SOLUSDT": "1"}  # a small, valid size per symbol

# Each kind with its category (the coverage matrix groups by these) and its weight in the generator.
COMMANDS = {"open": 12, "close": 5, "open_twice": 2, "close_twice": 2, "reopen": 2}
MARKET = {"move": 10, "gap_stop": 4, "gap_activation": 3, "spike": 3}
ACTORS = {"liquidation": 2, "adl": 1, "settlement": 1, "manual_close": 2, "manual_open": 2, "flip": 2,
          "foreign_order": 1, "partial_entry": 2, "manual_reduce": 2, "venue_cancel": 3, "funding": 1, "vanish": 1}
VENUE = {"latency": 2, "timeouts": 2, "http_5xx": 3, "rate_limit": 2, "ip_ban": 1, "lost_answers": 3,
         "stale_positions": 2, "ws_silent": 2, "stream_down": 2, "drop_streams": 2, "duplicate_events": 2,
         "reorder_events": 2, "delay_fills": 2, "expire_key": 1, "expire_key_notice": 1, "reject_stops": 2,
         "single_stop": 2, "reject_orders": 1, "bad_frame": 2}
STORAGE = {"disk_full": 2, "db_error": 3, "pg_outage": 2}
CATEGORIES = {"command": COMMANDS, "market": MARKET, "actor": ACTORS, "venue fault": VENUE,
              "storage fault": STORAGE, "process fault": {"kill": 0}}
WINDOWED = {"latency", "timeouts", "http_5xx", "rate_limit", "ip_ban", "lost_answers", "stale_positions",
            "ws_silent", "stream_down", "duplicate_events", "reorder_events", "delay_fills", "reject_stops",
            "single_stop", "reject_orders", "disk_full", "db_error", "pg_outage"}
# Faults that keep the engine from seeing or doing something on time: while one of them is on (and a while
# after), the healthy bounds do not apply, the fault-clearing ones do (chaos.checks).
BLINDING = WINDOWED | {"drop_streams", "expire_key", "expire_key_notice", "bad_frame", "kill"}


@dataclass(frozen=True)
class Step:
    at_ms: int
    kind: str
    args: tuple[tuple[str, Any], ...] = ()
    dur_ms: int = 0  # windows: how long the fault stays on

    @property
    def a(self) -> dict[str, Any]:
        return dict(self.args)

    @property
    def end_ms(self) -> int:
        return self.at_ms + self.dur_ms

    def describe(self) -> str:
        args = " ".join(f"{k}={v}" for k, v in self.args)
        window = f" for {self.dur_ms} ms" if self.kind in WINDOWED else ""
        return f"+{self.at_ms / 1000:6.3f}s  {self.kind}{' ' + args if args else ''}{window}"


@dataclass(frozen=True)
class Schedule:
    seed: int | None
    symbols: tuple[str, ...]
    steps: tuple[Step, ...]
    database: str = "sqlite"  # or "postgres"
    kill_at_ms: int | None = None  # SIGKILL of the service process (run as a real process) at this time
    length_ms: int = 1000  # the last step's time, about
    notes: tuple[str, ...] = field(default=())

    @property
    def clear_ms(self) -> int:
        """When every fault window has ended (and the kill's restart begun)."""
        ends = [s.end_ms for s in self.steps if s.kind in WINDOWED] + [self.kill_at_ms or 0]
        return max([0, *ends])

    def kinds(self) -> set[str]:
        kinds = {s.kind for s in self.steps}
        if self.kill_at_ms is not None:
            kinds.add("kill")
        return kinds

    def timeline(self) -> str:
        head = (f"schedule seed={self.seed} database={self.database} symbols={','.join(self.symbols)} "
                f"length={self.length_ms} ms" + (f" kill at +{self.kill_at_ms / 1000:.3f}s" if self.kill_at_ms
                                                 is not None else ""))
        lines = [head, *(f"  {s.describe()}" for s in self.steps)]
        if self.kill_at_ms is not None:
            lines.append(f"  +{self.kill_at_ms / 1000:6.3f}s  kill (SIGKILL the service, start a new one)")
        return "\n".join(lines)

    def without(self, index: int) -> Schedule:
        """The same schedule without its step `index` (shrinking)."""
        return Schedule(None, self.symbols, self.steps[:index] + self.steps[index + 1:], self.database,
                        self.kill_at_ms, self.length_ms, self.notes)


class Chooser:
    """Where a schedule's choices come from: `random.Random(seed)` (seeded mode) or hypothesis' `draw`."""

    def integer(self, low: int, high: int) -> int: raise NotImplementedError
    def choice(self, options: list[Any]) -> Any: raise NotImplementedError
    def unit(self) -> float: raise NotImplementedError  # in [0, 1)
    def chance(self, p: float) -> bool: raise NotImplementedError
    def many(self, low: int, high: int, make: Any) -> list[Any]: raise NotImplementedError


class _Seeded(Chooser):
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def choice(self, options: list[Any]) -> Any:
        return self.rng.choice(options)

    def unit(self) -> float:
        return self.rng.random()

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def many(self, low: int, high: int, make: Any) -> list[Any]:
        return [make(self) for _ in range(self.rng.randint(low, high))]


class _Drawn(Chooser):
    """Every choice a hypothesis draw: integers shrink to their low end, lists to fewer elements, `chance`
    to False, `choice` to the first option."""

    def __init__(self, draw: Any) -> None:
        self.draw = draw

    def integer(self, low: int, high: int) -> int:
        return int(self.draw(st.integers(low, high)))

    def choice(self, options: list[Any]) -> Any:
        return self.draw(st.sampled_from(options))

    def unit(self) -> float:
        return int(self.draw(st.integers(0, 999))) / 1000

    def chance(self, p: float) -> bool:
        return int(self.draw(st.integers(0, 999))) >= round(1000 * (1 - p))

    def many(self, low: int, high: int, make: Any) -> list[Any]:
        element = st.composite(lambda draw: make(_Drawn(draw)))()
        return list(self.draw(st.lists(element, min_size=low, max_size=high)))


def _weighted(rng: Chooser, table: dict[str, int]) -> str:
    total = sum(table.values())
    pick = rng.integer(1, total)
    for kind, weight in table.items():
        pick -= weight
        if pick <= 0:
            return kind
    raise AssertionError("unreachable")


def _pct(rng: Chooser, low: float, high: float) -> str:
    """A percentage as a short decimal string (readable timelines, exact Decimals later)."""
    return f"{low + (high - low) * rng.unit():.2f}"


def _open_args(rng: Chooser, symbol: str) -> tuple[tuple[str, Any], ...]:
    args: list[tuple[str, Any]] = [("symbol", symbol), ("side", rng.choice(["long", "short"])),
                                   ("stop_pct", _pct(rng, 0.3, 2.0))]
    entry = rng.choice(["market", "market", "limit"])
    args.append(("entry", entry))
    if entry == "limit":  # below the mark for a long (rests), or marketable now and then
        args.append(("limit_pct", _pct(rng, -0.2, 0.6)))
    if rng.chance(0.5):
        args += [("activation_pct", _pct(rng, 0.05, 0.8)), ("callback_pct", _pct(rng, 0.2, 1.0))]
    if rng.chance(0.3):
        args.append(("tp_pct", _pct(rng, 0.3, 2.0)))
    return tuple(args)


def _step_args(rng: Chooser, kind: str, symbols: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
    symbol = rng.choice(list(symbols))
    if kind in {"open", "open_twice", "reopen"}:
        return _open_args(rng, symbol)
    if kind in {"close", "close_twice", "liquidation", "adl", "settlement", "manual_close", "foreign_order",
                "partial_entry", "funding", "vanish"}:
        return (("symbol", symbol),)
    if kind == "move":
        return (("symbol", symbol), ("pct", _pct(rng, -1.0, 1.0)))
    if kind in {"gap_stop", "gap_activation"}:
        return (("symbol", symbol), ("beyond_pct", _pct(rng, 0.0, 0.5)))
    if kind == "spike":
        return (("symbol", symbol), ("pct", rng.choice(["-", ""]) + _pct(rng, 0.5, 3.0)),
                ("back_ms", rng.integer(20, 300)))
    if kind == "manual_open":
        return (("symbol", symbol), ("side", rng.choice(["long", "short"])))
    if kind == "flip":
        return (("symbol", symbol),)
    if kind == "manual_reduce":
        return (("symbol", symbol), ("fraction", rng.choice(["0.3", "0.5"])))
    if kind == "venue_cancel":
        return (("symbol", symbol), ("what", rng.choice(["stop", "stop", "take_profit", "entry"])))
    if kind == "latency":
        return (("ms", rng.choice([50, 150, 400])),)
    if kind in {"timeouts", "http_5xx", "rate_limit", "ip_ban", "reject_orders"}:
        return (("n", rng.integer(1, 6)),)
    if kind == "lost_answers":
        return (("n", rng.integer(1, 3)), ("on", rng.choice(["", "POST /fapi/v1/order", "POST /fapi/v1/algoOrder",
                                                             "DELETE /fapi/v1/algoOrder"])))
    if kind == "reject_stops":
        return (("n", rng.integer(1, 4)),)
    if kind == "delay_fills":
        return (("s", rng.choice(["0.3", "0.8"])),)
    if kind == "bad_frame":
        return (("frame", rng.choice(["not json", "{\"e\": \"ORDER_TRADE_UPDATE\", \"o\": {\"s\": 5}}",
                                      "{\"e\": \"ACCOUNT_UPDATE\", \"a\": null}", "[1, 2", "{\"e\": \"NOPE\"}"])),)
    return ()


def generate(rng: random.Random | Chooser, *, seed: int | None = None, kill: bool | None = None,
             database: str | None = None) -> Schedule:
    """A schedule from a source of choices (`random.Random(seed)`, or a hypothesis `Chooser`)."""
    c = _Seeded(rng) if isinstance(rng, random.Random) else rng
    symbols = tuple(SYMBOLS[:c.integer(1, len(SYMBOLS))])
    length = c.integer(300, 1800)
    if database is None:
        database = "postgres" if c.chance(0.2) else "sqlite"
    if kill is None:
        kill = c.chance(0.1)
    db = database
    # Most schedules start with an open per symbol.
    steps: list[Step] = []
    for symbol in symbols:
        if c.chance(0.85):
            steps.append(Step(c.integer(0, 150), "open", _open_args(c, symbol)))

    def one(c: Chooser) -> Step:
        category = _weighted(c, {"command": 6, "market": 5, "actor": 4, "venue fault": 5, "storage fault": 1})
        table = {k: v for k, v in CATEGORIES[category].items() if not (k == "pg_outage" and db != "postgres")}
        kind = _weighted(c, table)
        at = c.integer(0, length)
        dur = c.integer(100, 1200) if kind in WINDOWED else 0
        if kind == "timeouts":
            dur = max(dur, 400)
        return Step(at, kind, _step_args(c, kind, symbols), dur)

    steps += c.many(1, 12, one)
    steps.sort(key=lambda s: (s.at_ms, s.kind))
    kill_at = c.integer(50, length) if kill else None
    return Schedule(seed, symbols, tuple(steps), database, kill_at, length)


def for_seed(seed: int, *, kill_every: int = 10, postgres_every: int = 5) -> Schedule:
    """The schedule a seed addresses. Every `kill_every`-th seed kills the service process, every
    `postgres_every`-th (offset by one) runs on PostgreSQL: a run of N consecutive seeds has exact shares."""
    rng = random.Random(seed)
    kill = kill_every > 0 and seed % kill_every == 0
    database = "postgres" if postgres_every > 0 and seed % postgres_every == 1 else "sqlite"
    return generate(rng, seed=seed, kill=kill, database=database)


def schedules(*, kill: bool | None = False, database: str | None = "sqlite") -> st.SearchStrategy[Schedule]:
    """Hypothesis strategy: every choice of `generate` is a hypothesis draw (steps a list), so failures
    shrink to fewer steps, smaller numbers and the first option of every choice."""
    return st.composite(lambda draw: generate(_Drawn(draw), kill=kill, database=database))()
