"""Takeover time after SIGKILL (issue 14): N `lifecycle run` processes share the accounts of one PostgreSQL
database; one process that owns accounts is killed at a time, and the time from the kill until every one
of its accounts is held by a survivor *and* served by it (started: restart recovery done) is measured. The
killed process is then started again and the accounts rebalance before the next kill. Half the accounts
hold a protected position; the money invariants are checked after every takeover.

    .venv/bin/python -m bench.takeover                       # 30 accounts, 3 processes, 10 kills, default lease
    .venv/bin/python -m bench.takeover --kills 3 --lease-s 3 --renew-s 0.5 --margin-s 0.5

Prints p50/max of the takeover time against the target (lease + 5 s).

A process killed on the same host as its successors is seen to be dead (its pid is gone) and its leases are
taken at once. A process on another host cannot be seen: `--freeze` stops the victim with SIGSTOP instead
(alive, silent, as a dead or unreachable machine looks from here), so the takeover waits for the lease to
expire plus the margin: the bound for a crash elsewhere. The frozen process is SIGKILLed after the takeover.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import signal
import statistics
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path

from bench.pgscratch import scratch_database
from exchange.sim.server import SimServer
from tests.cluster import SYMBOLS, Cluster, wait_until


async def balanced(cluster: Cluster, names: set[str]) -> dict[str, str | None]:
    owners = await cluster.settled(names)
    if not owners:
        return {}
    counts = Counter(owners.values())
    return owners if max(counts.values()) - min(counts.get(n, 0) for n in names) <= 1 else {}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=30)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--lease-s", type=float, default=10.0)
    parser.add_argument("--renew-s", type=float, default=2.0)
    parser.add_argument("--margin-s", type=float, default=2.0)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--freeze", action="store_true", help="SIGSTOP the victim (a process on another host)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    sim = await SimServer(mark_interval_s=1.0).start()
    names = {chr(ord("a") + i) for i in range(args.processes)}
    times: list[float] = []
    async with scratch_database(args.pg) as url:
        with tempfile.TemporaryDirectory() as tmp:
            cluster = Cluster(sim, url, Path(tmp), lease_s=args.lease_s, renew_s=args.renew_s,
                              margin_s=args.margin_s).setup(args.accounts)
            try:
                for name in sorted(names):
                    await cluster.running(await cluster.spawn(name))
                owners = await wait_until(lambda: balanced(cluster, names), "balanced", 120)
                for account in sorted(cluster.accounts)[::2]:
                    member = cluster.members[owners[account]]
                    await asyncio.to_thread(member.api, "POST", "/positions", {
                        "account": account, "symbol": SYMBOLS[0], "side": "long", "quantity": "0.01",
                        "stop_loss_pct": "2"})
                assert await cluster.converged() == [], "invariants before the first kill"
                for kill in range(args.kills):
                    owners = await cluster.owners()
                    victim = rng.choice(sorted({o for o in owners.values() if o}))
                    lost = sorted(a for a, o in owners.items() if o == victim)
                    member = cluster.members[victim]
                    killed = time.monotonic()
                    if args.freeze:
                        member.signal(signal.SIGSTOP)
                    else:
                        member.signal(signal.SIGKILL)
                        await member.wait()
                    survivors = names - {victim}
                    await wait_until(partial(cluster.settled, survivors), f"takeover of {victim}'s accounts",
                                     120, every=0.05)
                    took = time.monotonic() - killed
                    times.append(took)
                    if args.freeze:
                        member.signal(signal.SIGKILL)
                        await member.wait()
                    problems = await cluster.converged(30)
                    what = "freeze" if args.freeze else "kill"
                    print(f"{what} {kill + 1}: {victim} ({len(lost)} accounts) taken over in {took:.2f} s; "
                          f"invariants: {problems or 'ok'}", flush=True)
                    await cluster.running(await cluster.spawn(victim))
                    await wait_until(lambda: balanced(cluster, names), "balanced again", 120)
            finally:
                await cluster.stop()
    await sim.stop()
    target = args.lease_s + 5
    how = "SIGSTOP (as a crash on another host)" if args.freeze else "SIGKILL (same host)"
    print(f"takeover after {how}, {args.accounts} accounts on {args.processes} processes, lease {args.lease_s:g} s "
          f"(margin {args.margin_s:g} s, renew {args.renew_s:g} s), {len(times)} kills: "
          f"p50 {statistics.median(times):.2f} s, max {max(times):.2f} s; target <= {target:g} s")


if __name__ == "__main__":
    asyncio.run(main())
