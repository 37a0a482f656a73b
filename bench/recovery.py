"""Restart recovery time for N open positions against the simulator (one per symbol, N symbols).

N protected positions are opened through the whole stack, the engine is stopped, and optionally a share
of their stops is removed on the venue meanwhile (lost while we were down). A new engine then starts on
the same SQLite file and the phases are timed: database open + rehydrate, streams subscribed, recovery
(REST snapshot reconciled with the database), and every check it started finished (missing stops put
back). The venue's books and the database are then checked against the invariants (tests/invariants.py).

Run: python -m bench.recovery [--positions 1000] [--lose-stops 0.1]
"""
from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from decimal import Decimal as D
from pathlib import Path

from loguru import logger

from db.repository import Repository
from exchange.ccxt_adapter import CcxtExchange
from exchange.sim.server import SimServer
from exchange.sim.venue import Venue
from lifecycle.domain import Side
from lifecycle.engine import Engine
from lifecycle.live import LiveEngine, OpenCommand
from lifecycle.reconciler import Reconciler
from tests.invariants import violations
from tests.livekit import FAST, Rig, many_symbols, settings_for


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--positions", type=int, default=1000)
    parser.add_argument("--lose-stops", type=float, default=0.1, help="share of stops removed while down")
    parser.add_argument("--batch", type=int, default=25, help="positions opened concurrently")
    args = parser.parse_args()
    logger.remove()
    logger.add(lambda m: print(m, end=""), level="ERROR")
    config = many_symbols(args.positions)
    symbols = [s.symbol for s in config.symbols]
    sim = await SimServer(Venue(config), mark_interval_s=1.0).start()
    account = sim.venue.add_account("bench")
    directory = Path(tempfile.mkdtemp(prefix="lifecycle-recovery-"))
    db = f"sqlite:///{directory / 'recovery.sqlite'}"
    rig = await Rig(sim, account, db, directory / "records", symbols=symbols).start()
    started = time.perf_counter()
    for i in range(0, len(symbols), args.batch):
        await asyncio.gather(*(rig.open(OpenCommand(s, Side.LONG, D(1), stop_loss_pct=D(5)))
                               for s in symbols[i:i + args.batch]))
    print(f"opened and protected {len(symbols)} positions in {time.perf_counter() - started:.1f} s")
    await rig.stop()

    stops = list(sim.venue.open_algos(account, None))
    lost = random.Random(7).sample(stops, int(len(stops) * args.lose_stops))
    for algo in lost:
        sim.venue.cancel_algo(account, algo.algo_id, None)
    print(f"engine stopped; {len(lost)} stops removed on the venue while it was down")

    requests = sim.requests
    t0 = time.perf_counter()
    repo = await Repository.open(db)
    exchange = await CcxtExchange(settings_for(sim, account)).start()
    engine = Engine(repo, canceller=exchange, records=rig.records)  # type: ignore[arg-type]
    loaded = await engine.rehydrate([account.name])
    t1 = time.perf_counter()
    live = await LiveEngine(engine, exchange, account=account.name, symbols=symbols, config=FAST).start()
    await live.wait_ready(timeout=60)
    t2 = time.perf_counter()
    Reconciler.of(live, grace_ms=5000).attach()
    counts = await live.recover()
    t3 = time.perf_counter()
    await live.idle(timeout=120)
    t4 = time.perf_counter()
    calls = sim.requests - requests
    restored = sum(1 for s in symbols if len(list(sim.venue.open_algos(account, s))) == 1)
    problems = await violations(sim, account, repo)
    print(f"restart with {loaded} live positions in the database: {counts}")
    print(f"  database open + rehydrate      {t1 - t0:7.2f} s")
    print(f"  streams subscribed             {t2 - t1:7.2f} s")
    print(f"  recovery (snapshot, decisions) {t3 - t2:7.2f} s")
    print(f"  its checks finished            {t4 - t3:7.2f} s ({len(lost)} stops put back)")
    print(f"  total                          {t4 - t0:7.2f} s; {calls} REST calls; "
          f"{restored}/{len(symbols)} symbols with exactly one stop")
    print(f"  invariants: {'all hold' if not problems else problems[:5]}")
    await live.stop()
    await exchange.close()
    await repo.close()
    await sim.stop()


if __name__ == "__main__":
    asyncio.run(main())
