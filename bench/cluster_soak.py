"""Many accounts across several processes for minutes of moving prices (issue 14).

N accounts on the simulator (one process here), P `lifecycle run` processes sharing them over a scratch
PostgreSQL database with the default lease; one protected position with a trailing plan per account, opened
through its owner's control API; then a seeded random walk for the given minutes. Every 30 s the money
invariants are checked on every account (an account is a violation when it is still wrong 15 s after the
pass: a stop move in flight, or books behind the venue on a saturated machine, is not one). At the end:
violations, REST weight per account per minute (the simulator's counts, weighed with Binance's costs as ccxt
declares them), resident memory.

    .venv/bin/python -m bench.cluster_soak                  # 200 accounts, 4 processes, 5 minutes
    .venv/bin/python -m bench.cluster_soak --accounts 20 --processes 2 --minutes 1
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from collections import Counter
from decimal import Decimal as D
from pathlib import Path

from bench.pgscratch import scratch_database
from bench.rest_budget import LISTS, ORDERS, WEIGHT
from exchange.sim.server import SimServer
from tests.cluster import SYMBOLS, Cluster, wait_until


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def balanced(cluster: Cluster, names: set[str]) -> dict[str, str | None]:
    owners = await cluster.settled(names)
    if not owners:
        return {}
    counts = Counter(owners.values())
    return owners if max(counts.values()) - min(counts.get(n, 0) for n in names) <= 1 else {}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--volatility", type=float, default=0.0005, help="random-walk step per second")
    parser.add_argument("--keep", action="store_true", help="keep the logs (printed: their directory)")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    sim = await SimServer(mark_interval_s=1.0).start()
    names = {chr(ord("a") + i) for i in range(args.processes)}
    async with scratch_database(args.pg) as url:
        with contextlib.nullcontext(tempfile.mkdtemp(prefix="lifecycle-soak-")) if args.keep \
                else tempfile.TemporaryDirectory(prefix="lifecycle-soak-") as tmp:
            cluster = Cluster(sim, url, Path(tmp), lease_s=10.0, renew_s=2.0, margin_s=2.0,
                              sync_interval_s=None).setup(args.accounts)
            try:
                if args.keep:
                    print(f"logs in {tmp}", flush=True)
                began = time.monotonic()
                for name in sorted(names):
                    await cluster.spawn(name)
                for name in sorted(names):
                    await cluster.running(cluster.members[name], timeout=300)
                owners = await wait_until(lambda: balanced(cluster, names), "balanced", 300, every=1.0)
                print(f"{args.accounts} accounts on {args.processes} processes: balanced after "
                      f"{time.monotonic() - began:.1f} s: {dict(Counter(owners.values()))}", flush=True)
                mark = sim.venue.marks[SYMBOLS[0]]
                for i, account in enumerate(sorted(cluster.accounts)):
                    long = i % 2 == 0
                    member = cluster.members[owners[account]]
                    await asyncio.to_thread(member.api, "POST", "/positions", {
                        "account": account, "symbol": SYMBOLS[0], "side": "long" if long else "short",
                        "quantity": "0.01", "stop_loss_pct": "3",
                        "trailing_activation": str(mark * (D("1.001") if long else D("0.999"))),
                        "trailing_callback_pct": "0.5"})
                problems = await cluster.converged(60)
                print(f"opened {args.accounts} positions; invariants: {problems or 'ok'}", flush=True)
                sim.start_random_walk(volatility=args.volatility, seed=5)
                before, symbol_before = Counter(sim.calls), Counter(sim.symbol_calls)
                started = time.monotonic()
                violations = checks = 0
                while time.monotonic() - started < args.minutes * 60:
                    await asyncio.sleep(min(30.0, max(0.0, args.minutes * 60 - (time.monotonic() - started))))
                    checks += 1
                    checked = time.monotonic()
                    persisting = await cluster.violations()
                    pass_s = time.monotonic() - checked
                    checked = time.monotonic()  # the grace runs from the end of the pass (it can take seconds)
                    while persisting and time.monotonic() - checked < 15:  # only the accounts seen wrong again
                        await asyncio.sleep(1.0)
                        persisting = await cluster.violations(sorted({p.split(":", 1)[0] for p in persisting}))
                    violations += len(persisting)
                    for problem in persisting[:5]:
                        print(f"  violation: {problem}", flush=True)
                    print(f"{(time.monotonic() - started) / 60:.1f} min: {len(persisting)} violation(s); "
                          f"mark {sim.venue.marks[SYMBOLS[0]]}; one check of every account {pass_s:.1f} s; load "
                          f"{os.getloadavg()[0]:.1f}", flush=True)
                minutes = (time.monotonic() - started) / 60
                calls, symbol_calls = Counter(sim.calls), Counter(sim.symbol_calls)
                calls.subtract(before)
                symbol_calls.subtract(symbol_before)
                memory = {n: rss_mib(m.proc.pid) for n, m in sorted(cluster.members.items()) if m.alive}
                serving = await cluster.serving(names)
            finally:
                await cluster.stop()
    await sim.stop()

    def weight_of(key: str, n: int) -> float:
        one = symbol_calls.get(key, 0) if key in LISTS else 0
        return (n - one) * WEIGHT.get(key, 1) + one

    weight = sum(weight_of(k, n) for k, n in calls.items())
    orders = sum(n for k, n in calls.items() if k in ORDERS)
    print(f"{args.accounts} accounts, {args.processes} processes, {minutes:.1f} min of moving prices: "
          f"{violations} invariant violation(s) in {checks} checks")
    print(f"REST: {sum(calls.values()) / minutes:.0f} calls/min, {weight / minutes:.0f} weight/min in all = "
          f"{weight / minutes / args.accounts:.2f} weight/min per account; orders {orders / minutes:.1f}/min")
    for key, n in sorted(calls.items(), key=lambda kv: -weight_of(*kv))[:6]:
        if n:
            print(f"  {key:<30} {n / minutes:>8.1f} calls/min {weight_of(key, n) / minutes:>9.1f} weight/min")
    print(f"resident memory per process (MiB): {', '.join(f'{n} {v:.0f}' for n, v in memory.items())}; "
          f"accounts served: {', '.join(f'{n} {len(v)}' for n, v in sorted(serving.items()))}")


if __name__ == "__main__":
    asyncio.run(main())
