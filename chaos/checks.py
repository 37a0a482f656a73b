"""The invariants a chaos run is judged by, each with the evidence that breaks it.

1. protection: every position of ours on the venue has exactly one working stop of ours at the recorded
   price and size (after the settle period), and no position stays without a stop longer than its bound:
   0 s after a cancel of ours (a move places first); `unprotected_healthy_s` (2 s) after an entry fill or a
   removal by the venue while no fault is on; after a fault, the protection audit's bound from the moment the
   faults cleared;
2. orders: no working order of ours for a position that is terminal or gone, no order duplicated;
3. books: every venue position of ours is a live row and every live row a venue position (after settling);
4. causes: a bot close ends CLOSED, never CLOSED_EXTERNAL; an external close carries the true cause (the
   flattening order's); PHANTOM only for a position that vanished without a fill; CANCELLED only when the
   entry never filled; someone else's position is never taken as ours (policy "alert");
5. latency: every close is committed within its bound: `healthy_s` (1 s) from the venue's flat when no fault
   is on; from the faults clearing, the fast sync plus the confirming queries; PHANTOM after `phantom_after_s`;
6. journal: every journal replays, one terminal row per terminal position and none for a live one, no
   command failed with anything but a refusal the situation explains, no background task crashed;
7. one live position per (account, symbol) on a one-way account; no trailing state for a terminal position;
8. one closure record (and closure row) per terminal position with its cause; no secret in any output.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from chaos.world import Run
from lifecycle.causes import classify_close
from lifecycle.domain import CloseCause
from lifecycle.machines.states import PositionState as S

INVARIANTS = {
    1: "protection: one stop each, never unprotected past the bound",
    2: "orders: none of ours for terminal or gone positions, none duplicated",
    3: "books: venue positions of ours == live rows",
    4: "causes: bot closes CLOSED, external ones with the true cause",
    5: "latency: every close committed within its bound",
    6: "journal: replays, one terminal row, no unexplained failure",
    7: "one live position per symbol; no trailing state when terminal",
    8: "one closure record per terminal position; no secret in any output",
}
# Failures of a command that the situation explains (a fault, a conflict the command itself caused, a
# position already ending); anything else is a defect.
EXPLAINED = {"PositionConflict", "DuplicateLivePosition", "StorageUnavailable", "InvalidEvent", "Retryable",
             "RateLimited", "Rejected", "StopWouldTrigger", "ReduceOnlyRejected", "OrderNotFound", "DuplicateOrder",
             "InsufficientMargin", "EngineStopping", "UnknownPosition", "TransitionRefused", "GuardRefused",
             "UndefinedTransition", "CommandRefused"}
STOP_CAUSES = {CloseCause.STOP_LOSS.value, CloseCause.TRAILING_STOP.value}


@dataclass
class Bounds:
    healthy_s: float  # a close noticed and committed, with nothing failing
    # A position without a stop, nothing failing: from the entry fill (its commit, up to the storage timeout,
    # then the stop's round trip) or a removal by the venue (noticed, then put back). Typically 20 ms (p50)
    # and 60 ms (p90) in the soak; 2 s leaves room for a loaded 2-core machine (a SQLite stall of a second
    # was seen there with no fault on).
    unprotected_healthy_s: float
    unprotected_after_fault_s: float  # the protection audit's bound, from the faults clearing
    close_after_fault_s: float  # fast sync + confirmation + cause lookup, from the faults clearing
    lookback_s: float = 1.0  # a fault that ended this recently still counts

    @classmethod
    def of(cls, run: Run) -> Bounds:
        t = run.tuning
        sync = t.schedule.fast_sync_interval_s
        audit = t.schedule.sync_interval_s
        return cls(
            healthy_s=1.0,
            unprotected_healthy_s=2.0,
            # seen by the audit (every sync_interval_s), 1 s of grace, a repair; no repair for
            # unprotected_close_after_s: closed at market (a second or so with retries)
            unprotected_after_fault_s=audit + 1.0 + t.live.unprotected_close_after_s + 2.0,
            close_after_fault_s=2 * sync + t.reconcile.grace_ms / 1000 + t.live.cause_wait_s
            + t.live.cause_rest_timeout_s + 1.5,
        )


@dataclass
class Violation:
    invariant: int
    message: str
    evidence: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"invariant {self.invariant} ({INVARIANTS[self.invariant]}): {self.message}"]
        lines += [f"    {e}" for e in self.evidence]
        return "\n".join(lines)


@dataclass
class Verdict:
    violations: list[Violation]
    checks: Counter[int]  # invariant -> how many individual checks ran


def _fault_end(run: Run, start: float, end: float, lookback: float) -> float | None:
    """The latest end of the blinding faults overlapping [start - lookback, end] (chained: a fault overlapping
    that one counts too); None when none did."""
    latest: float | None = None
    lo, hi = start - lookback, end
    changed = True
    while changed:
        changed = False
        for w_start, w_end, _ in run.windows:
            if w_start <= hi and w_end >= lo and (latest is None or w_end > latest):
                latest = w_end
                if w_end > hi:
                    hi = w_end
                    changed = True
    return latest


def judge(run: Run) -> Verdict:
    v: list[Violation] = []
    checks: Counter[int] = Counter()
    bounds = Bounds.of(run)
    ledger = run.ledger

    # --- the books agree with the venue once the faults cleared (tests.invariants) ----------------------
    # What that examined: each order of ours the venue ever had (duplicates, orphans), each venue position
    # (one stop at the recorded price and size), each stored position against the venue (and its journal).
    checks[2] += sum(1 for line in run.venue if line.startswith(("order lc-", "algo lc-")))
    checks[1] += sum(1 for line in run.venue if line.startswith("position ") and not line.endswith(": 0"))
    checks[3] += 1 + len(run.positions)
    for problem in run.venue_problems:
        invariant = (2 if any(w in problem for w in ("orphan", "still working", "take-profit", "used", "entries"))
                     else 6 if "journal" in problem else 1 if "stop" in problem else 3)
        v.append(Violation(invariant, f"not settled {run.tuning.settle_s:g} s after the faults cleared: {problem}"))

    # --- 1: unprotected intervals --------------------------------------------------------------------------
    for interval in ledger.intervals:
        checks[1] += 1
        end = interval.end
        if end is None:
            v.append(Violation(1, f"{interval.symbol} {interval.position_id} unprotected from "
                                  f"+{interval.start - run.t0:.3f}s to the end of the run ({interval.reason})"))
            continue
        length = end - interval.start
        fault_end = _fault_end(run, interval.start, end, bounds.lookback_s)
        if fault_end is None:
            allowed = 0.0 if interval.reason == "own_cancel" else bounds.unprotected_healthy_s
            what = "no fault on"
        else:
            allowed = max(fault_end, interval.start) + bounds.unprotected_after_fault_s - interval.start
            what = f"faults until +{fault_end - run.t0:.3f}s"
        if length > allowed + 1e-3:
            v.append(Violation(1, f"{interval.symbol} {interval.position_id} unprotected for {length:.3f} s "
                                  f"(+{interval.start - run.t0:.3f}s..+{end - run.t0:.3f}s, {interval.reason}, "
                                  f"{what}); bound {allowed:.3f} s"))

    # --- 2: no conditional order of ours for another position while one of ours holds the symbol ------------
    for stray in ledger.strays:
        checks[2] += 1
        end = stray.end if stray.end is not None else run.clear_at + run.tuning.settle_s
        fault_end = _fault_end(run, stray.start, end, bounds.lookback_s)
        allowed = bounds.unprotected_healthy_s if fault_end is None else (
            max(fault_end, stray.start) + bounds.unprotected_after_fault_s - stray.start)
        if stray.end is None or end - stray.start > allowed + 1e-3:
            v.append(Violation(2, f"{stray.symbol}: {stray.reason} (not of {stray.position_id}, which holds the "
                                  f"symbol) working from +{stray.start - run.t0:.3f}s for "
                                  f"{end - stray.start:.3f} s; bound {allowed:.3f} s"))

    # --- 4 and 5: how each position ended ----------------------------------------------------------------
    amended = {r.get("position_id"): r.get("cause") for r in run.records if r.get("event") == "closure_amended"}
    for p in run.positions:
        truth = ledger.flattened.get(p.id)
        journal = run.journals.get(p.id, [])
        terminal_rows = [e for e in journal if e.dest.is_terminal]
        checks[6] += 1
        if len(terminal_rows) != (1 if p.state.is_terminal else 0):
            v.append(Violation(6, f"{p.id} ({p.state.value}) has {len(terminal_rows)} terminal journal rows",
                               [_row(e) for e in journal]))
        if not p.state.is_terminal:
            continue
        checks[4] += 1
        evidence = [_row(e) for e in journal]
        if p.state is S.CANCELLED:
            if p.id in ledger.entry_filled:
                v.append(Violation(4, f"{p.id} ended CANCELLED but its entry filled on the venue", evidence))
            continue
        if truth is not None and truth.netted:
            # Our entry met someone else's opposite position (placed a moment before, or while ours was on its
            # way): the venue's position went flat with our own entry fill, and no fill after it explains the
            # flat. That other order's cause, unknown, or not found (PHANTOM) are all true (seed 506007).
            cause = p.close_cause.value if p.close_cause is not None else None
            ok_causes = {classify_close(truth.client_id, position_id=p.id, trailing_was_active=False).value,
                         CloseCause.UNKNOWN.value, CloseCause.NOT_FOUND.value}
            closed_unasked = p.state is S.CLOSED and not any(e.event == "close_requested" for e in journal)
            if closed_unasked or cause not in ok_causes:
                v.append(Violation(4, f"{p.id} (its entry netted against {truth.client_id}) ended {p.state.value} "
                                      f"with cause {cause}; allowed {sorted(ok_causes)}", evidence))
            continue
        if p.state is S.PHANTOM or p.close_cause is CloseCause.NOT_FOUND:
            if truth is not None and truth.client_id is not None:
                v.append(Violation(4, f"{p.id} ended {p.state.value} (not_found) but was flattened by "
                                      f"{truth.client_id}", evidence))
            elif truth is None:
                v.append(Violation(4, f"{p.id} ended {p.state.value} (not_found) but the venue never dropped a "
                                      f"position of it", evidence))
            continue
        if p.id in ledger.joined:  # one venue position, two holders: any order that reduced it may be ours
            cause = p.close_cause.value if p.close_cause is not None else None
            seen = [*ledger.reduced.get(p.id, []), *([truth.client_id] if truth is not None else [])]
            ok_causes = {classify_close(c or None, position_id=p.id, trailing_was_active=False).value for c in seen}
            if truth is not None and truth.client_id is None:
                ok_causes.add(CloseCause.NOT_FOUND.value)
            if not (cause in ok_causes or (cause in STOP_CAUSES and ok_causes & STOP_CAUSES)):
                v.append(Violation(4, f"{p.id} (its entry joined someone else's position on {p.symbol}) ended "
                                      f"{p.state.value} with cause {cause}; the orders that reduced the shared "
                                      f"position say {sorted(ok_causes)}", evidence))
            continue
        if truth is None:
            v.append(Violation(4, f"{p.id} ended {p.state.value} ({p.close_cause}) but the venue never flattened a "
                                  f"position of it" + (" (its entry never filled)" if p.id not in ledger.entry_filled
                                                       else ""), evidence))
            continue
        cause = p.close_cause.value if p.close_cause is not None else None
        if cause == CloseCause.UNKNOWN.value and p.id in amended:
            cause = amended[p.id]  # unknown when it ended, explained later by a closure_amended record
        expected = classify_close(truth.client_id, position_id=p.id, trailing_was_active=False).value
        if truth.client_id is None:
            expected = CloseCause.NOT_FOUND.value
        if expected == CloseCause.BOT.value:
            if p.state is not S.CLOSED:
                v.append(Violation(4, f"{p.id}: our close {truth.client_id} flattened it, but it ended "
                                      f"{p.state.value} ({cause})", evidence))
        elif not (cause == expected or (expected in STOP_CAUSES and cause in STOP_CAUSES) or (
                # Vanished with no fill, but the stream showed it flat (an account update that lists it at 0):
                # the engine ends it at once with cause unknown (amended should a fill turn up); PHANTOM is
                # for what only REST shows gone. Unknown is not a false cause (seed 400656).
                truth.client_id is None and cause == CloseCause.UNKNOWN.value and any(
                    (e.payload or {}).get("cause_source") == "none" for e in terminal_rows))):
            v.append(Violation(4, f"{p.id} ended {p.state.value} with cause {cause}; the venue says "
                                  f"{expected} (order {truth.client_id})", evidence))
        elif p.state is S.CLOSED and not any(e.event == "close_requested" for e in journal):
            v.append(Violation(4, f"{p.id} ended CLOSED (a bot close) but no close was ever requested and "
                                  f"{truth.client_id} flattened it", evidence))
        # 5: when it was committed
        checks[5] += 1
        committed = terminal_rows[0].at.timestamp() if terminal_rows else None
        if committed is None:
            continue
        fault_end = _fault_end(run, truth.at, truth.at + bounds.healthy_s, bounds.lookback_s)
        if truth.client_id is None:  # REST must disagree with the stream for stream_doubt_s, then phantom_after_s
            reconcile = run.tuning.reconcile
            allowed_until = (max(truth.at, fault_end or 0) + reconcile.stream_doubt_s + reconcile.phantom_after_s
                             + bounds.close_after_fault_s)
        elif fault_end is None:
            allowed_until = truth.at + bounds.healthy_s
        else:
            allowed_until = max(truth.at, fault_end) + bounds.close_after_fault_s
        if committed > allowed_until + 1e-3:
            v.append(Violation(5, f"{p.id} flattened at +{truth.at - run.t0:.3f}s by {truth.client_id}, committed "
                                  f"at +{committed - run.t0:.3f}s ({committed - truth.at:.3f} s); bound "
                                  f"+{allowed_until - run.t0:.3f}s", evidence))

    # --- 4: someone else's positions are not taken as ours ---------------------------------------------------
    for symbol, owner in ledger.owner.items():
        if owner == "foreign":
            checks[4] += 1
            live = [p for p in run.positions if p.symbol == symbol and not p.state.is_terminal
                    and p.state is not S.OPENING and p.id not in ledger.opened]  # OPENING: its entry decides
            if live:
                v.append(Violation(4, f"someone else's position on {symbol} is tracked as ours: "
                                      f"{[p.id for p in live]}"))
    for anomaly in ledger.anomalies:
        v.append(Violation(2, f"the venue saw: {anomaly}"))

    # --- 6: commands and background work ---------------------------------------------------------------------
    for outcome in run.outcomes:
        checks[6] += 1
        if outcome.error_type is not None and outcome.error_type not in EXPLAINED:
            v.append(Violation(6, f"{outcome.step.describe()}: failed with {outcome.error_type}: {outcome.error}"))
    for line in run.output.splitlines():
        if " failed: " in line and line.startswith("ERROR") and not any(
                f"failed: {name}" in line for name in EXPLAINED):
            checks[6] += 1
            v.append(Violation(6, f"a background task crashed: {line[:300]}"))
        elif "Traceback (most recent call last)" in line:
            v.append(Violation(6, "a traceback in the service's output", [line[:300]]))

    # --- 7 ------------------------------------------------------------------------------------------------------
    live_per_symbol = Counter(p.symbol for p in run.positions if not p.state.is_terminal)
    checks[7] += 1 + len(run.positions)
    for symbol, n in live_per_symbol.items():
        if n > 1:
            v.append(Violation(7, f"{n} live positions on {symbol}"))
    for position_id in run.trailing_left:
        v.append(Violation(7, f"terminal position {position_id} still has trailing state"))

    # --- 8 ------------------------------------------------------------------------------------------------------
    closure_records = Counter(r.get("position_id") for r in run.records if r.get("event") == "closure")
    for p in run.positions:
        if not p.state.is_terminal:
            continue
        checks[8] += 1
        if closure_records[p.id] != 1:
            v.append(Violation(8, f"{p.id} ({p.state.value}) has {closure_records[p.id]} closure records"))
        row = run.closures.get(p.id)
        if row is None or not row.get("cause"):
            v.append(Violation(8, f"{p.id} ({p.state.value}) has no closure row with a cause: {row}"))
    checks[8] += 1
    if run.stored_secret:
        v.append(Violation(8, "an API key or secret is stored in the database's files"))
    for secret in run.secrets:
        if secret and secret in run.output:
            v.append(Violation(8, "a secret appears in the service's output or records",
                               [_around(run.output, secret)]))
    return Verdict(v, checks)


def _row(entry: Any) -> str:
    payload = {k: v for k, v in (entry.payload or {}).items() if v is not None}
    return (f"journal #{entry.seq} {entry.at.strftime('%H:%M:%S.%f')[:-3]} {entry.event}: "
            f"{entry.source.value if entry.source else '-'} -> {entry.dest.value}"
            f"{' cause ' + str(entry.cause) if entry.cause else ''} {payload}")


def _around(text: str, secret: str) -> str:
    i = text.index(secret)
    return text[max(0, i - 80):i].replace(secret, "<secret>") + "<secret>" + text[i + len(secret):i + len(secret) + 40]
