"""The money invariants, checked against the venue simulator's own books and the database (not against
what the engine believes): used after crashes, restarts and shutdowns."""
from __future__ import annotations

from collections import Counter

from db.repository import Repository
from exchange.sim.server import SimServer
from exchange.sim.venue import Account, SimAlgo, SimOrder
from lifecycle.client_ids import parse_client_id
from lifecycle.domain import OrderPurpose, Side
from lifecycle.machines.states import PositionState as S
from lifecycle.replay import ReplayMismatch, replay

PROTECTED = {S.OPEN, S.TS_ACTIVE}


async def violations(sim: SimServer, account: Account, repo: Repository,
                     ignore_symbols: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Everything that is wrong, as sentences; an empty list when

    * no order was duplicated: per position at most one entry filled, and no client id acted twice;
    * every position open on the venue is live in the database, in OPEN or TS_ACTIVE, with the venue's
      size, and has exactly one working stop of ours on the venue for that size, on the closing side, at
      the price the database records, and the database tracks exactly that stop;
    * no order of ours works on the venue for a position that is not live there and in the database, and
      a live position has no other working order than its stop, one take-profit, and (only while
      OPENING) its entry; a live position that the venue does not hold is an OPENING one with a resting
      entry (anything else is a lost close or a phantom);
    * every position's journal replays to its stored state.

    `ignore_symbols`: symbols where the venue position belongs to someone else (opened by another client);
    what the engine does about those is its untracked policy, not these invariants.
    """
    problems: list[str] = []
    venue = sim.venue
    stored = {p.id: p for p in await repo.list_positions([account.name])}
    live = {p.id: p for p in await repo.load_live([account.name])}

    # A client id names one logical order (derived from the position's journal sequence), so placing it
    # again after a crash or a lost answer is how duplicates are refused. Sent again after its earlier order
    # ended without acting (cancelled or expired by someone else) is fine; two that acted are a duplicate.
    uses: Counter[str] = Counter()
    entries_filled: Counter[str] = Counter()
    for sim_order in account.orders.values():
        parsed = parse_client_id(sim_order.client_id)
        if parsed is None:
            continue
        if sim_order.orig_type is None and sim_order.filled > 0:  # placed by us (not a stop triggering), and it acted
            uses[sim_order.client_id] += 1
        if parsed.purpose is OrderPurpose.ENTRY and sim_order.filled > 0:
            entries_filled[parsed.position_id] += 1
    for algo in account.algos.values():
        if parse_client_id(algo.client_id) is not None and algo.status in ("TRIGGERING", "TRIGGERED", "FINISHED"):
            uses[algo.client_id] += 1
    problems += [f"client id {cid} used {n} times" for cid, n in uses.items() if n > 1]
    problems += [f"position {pid}: {n} entries filled" for pid, n in entries_filled.items() if n > 1]

    working: list[SimOrder | SimAlgo] = [*venue.open_orders(account, None), *venue.open_algos(account, None)]
    stops_by_position: dict[str, list] = {}
    for order in working:
        parsed = parse_client_id(order.client_id)
        if parsed is None:
            continue
        if parsed.position_id not in live:
            state = stored[parsed.position_id].state.value if parsed.position_id in stored else "unknown"
            problems.append(f"orphan {parsed.purpose.value} order {order.client_id} (position {state})")
            continue
        if parsed.purpose is OrderPurpose.STOP:
            stops_by_position.setdefault(parsed.position_id, []).append(order)

    for symbol, sim_position in account.positions.items():
        if sim_position.amount == 0 or symbol in ignore_symbols:
            continue
        side = Side.LONG if sim_position.amount > 0 else Side.SHORT
        size = abs(sim_position.amount)
        holders = [p for p in live.values() if p.symbol == symbol and p.side is side]
        if len(holders) != 1:
            problems.append(f"{symbol} {side.value} {size} on the venue: {len(holders)} live positions in the database")
            continue
        p = holders[0]
        if p.state not in PROTECTED:
            problems.append(f"{symbol}: position {p.id} is {p.state.value} while the venue holds {size}")
        if p.quantity != size:
            problems.append(f"{symbol}: database size {p.quantity}, venue size {size}")
        stops = stops_by_position.get(p.id, [])
        if len(stops) != 1:
            problems.append(f"{symbol}: {len(stops)} working stops of position {p.id} on the venue (want 1)")
            continue
        stop = stops[0]
        closing = "SELL" if side is Side.LONG else "BUY"
        if stop.side != closing or not (stop.close_position or stop.qty == size):
            problems.append(f"{symbol}: stop {stop.client_id} is {stop.side} {stop.qty}, want {closing} {size}")
        if p.stop_price is None or stop.trigger != p.stop_price:
            problems.append(f"{symbol}: stop at {stop.trigger} on the venue, {p.stop_price} in the database")
        tracked = {o.client_id for o in p.orders.values() if o.purpose is OrderPurpose.STOP}
        if tracked != {stop.client_id}:
            problems.append(f"{symbol}: database tracks stops {sorted(tracked)}, venue works {stop.client_id}")

    held = {(s, Side.LONG if sp.amount > 0 else Side.SHORT) for s, sp in account.positions.items() if sp.amount != 0}
    ours_working: dict[str, list] = {}
    for order in working:
        parsed = parse_client_id(order.client_id)
        if parsed is not None and parsed.position_id in live:
            ours_working.setdefault(parsed.position_id, []).append((parsed.purpose, order))
    for p in live.values():
        orders = ours_working.get(p.id, [])
        entries = [o for purpose, o in orders if purpose is OrderPurpose.ENTRY]
        if (p.symbol, p.side) not in held and not (p.state is S.OPENING and entries):
            problems.append(f"position {p.id} is {p.state.value} in the database, flat on the venue"
                            + (" (a lost close)" if p.state is S.CLOSING_BY_BOT else ""))
        for purpose, order in orders:
            if purpose is OrderPurpose.ENTRY and p.state is not S.OPENING:
                problems.append(f"entry {order.client_id} still working while {p.id} is {p.state.value}")
            elif purpose is OrderPurpose.CLOSE:
                problems.append(f"close {order.client_id} of {p.id} still working")
        if sum(1 for purpose, _ in orders if purpose is OrderPurpose.TAKE_PROFIT) > 1:
            problems.append(f"position {p.id} has more than one take-profit working")

    for pid, p in stored.items():
        try:
            replayed = await replay(await repo.journal(pid))
        except ReplayMismatch as e:
            problems.append(f"journal of {pid}: {e}")
            continue
        if replayed.state is not p.state:
            problems.append(f"journal of {pid} replays to {replayed.state.value}, stored {p.state.value}")
    return problems
