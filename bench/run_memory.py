"""Memory of `lifecycle run` with N positions on the simulator.

The simulator (N symbols) runs in this process; `lifecycle run` runs as its own process with a TOML
configuration, exactly as deployed. N positions (half of them with a trailing stop) are opened through
the control API; the service process's resident memory (VmRSS, and its peak VmHWM) is read from /proc
when it has started, once every position is open and protected, and after a steady period with prices
moving. Then SIGTERM, and the exit code and time to stop are reported.

Run: python -m bench.run_memory [--positions 1000] [--steady-s 30]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from exchange.sim.server import SimServer
from exchange.sim.venue import Venue
from tests.livekit import many_symbols

TOKEN = "bench-token"


def memory(pid: int) -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--positions", type=int, default=1000)
    parser.add_argument("--steady-s", type=float, default=30.0)
    args = parser.parse_args()
    config = many_symbols(args.positions)
    sim = await SimServer(Venue(config), mark_interval_s=1.0).start()
    account = sim.venue.add_account("bench")
    directory = Path(tempfile.mkdtemp(prefix="lifecycle-memory-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    urls = "\n".join(f'"{k}" = "{v}"' for k, v in sim.ccxt_urls().items())
    symbols = ", ".join(f'"{s.symbol}"' for s in config.symbols)
    (directory / "lifecycle.toml").write_text(f'''
database_url = "sqlite:///{directory / 'lifecycle.sqlite'}"
log_dir = "{directory / 'logs'}"
[records]
dir = "{directory / 'records'}"
[api]
port = {port}
[[accounts]]
name = "bench"
symbols = [{symbols}]
api_key_env = "BENCH_KEY"
secret_env = "BENCH_SECRET"
rate_limit = false
[accounts.urls]
{urls}
''')
    env = {**os.environ, "BENCH_KEY": account.api_key, "BENCH_SECRET": account.secret, "LIFECYCLE_API_TOKEN": TOKEN,
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "lifecycle.app.cli", "run", "--config",
                                                str(directory / "lifecycle.toml"), env=env,
                                                stderr=asyncio.subprocess.DEVNULL)
    base, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        started = time.monotonic()
        while True:
            try:
                async with session.get(base + "/health") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        print(f"service up after {time.monotonic() - started:.1f} s; memory {memory(proc.pid)[0]:.0f} MiB (RSS)")
        gate = asyncio.Semaphore(25)

        async def open_one(i: int) -> None:
            spec = config.symbols[i]
            async with gate, session.post(base + "/positions", json={
                    "symbol": spec.symbol, "side": "long", "quantity": "1", "stop_loss_pct": "5",
                    "trailing": i % 2 == 0}) as r:
                assert r.status == 201, await r.text()

        opened = time.monotonic()
        await asyncio.gather(*(open_one(i) for i in range(args.positions)))
        while True:
            async with session.get(base + "/positions") as r:
                rows = await r.json()
            if sum(1 for p in rows if p["stop_price"] is not None) == args.positions:
                break
            await asyncio.sleep(0.5)
        rss, peak = memory(proc.pid)
        print(f"{args.positions} positions open and protected after {time.monotonic() - opened:.1f} s; "
              f"memory {rss:.0f} MiB (RSS), peak {peak:.0f} MiB")
        sim.start_random_walk(volatility=0.001, seed=3)
        await asyncio.sleep(args.steady_s)
        rss, peak = memory(proc.pid)
        async with session.get(base + "/metrics") as r:
            moves = next(line for line in (await r.text()).splitlines()
                         if line.startswith("lifecycle_stop_moves_total"))
        print(f"after {args.steady_s:.0f} s of moving prices ({moves}): memory {rss:.0f} MiB (RSS), "
              f"peak {peak:.0f} MiB")
    stopping = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = await proc.wait()
    print(f"SIGTERM: exit {code} after {time.monotonic() - stopping:.1f} s")
    await sim.stop()


if __name__ == "__main__":
    asyncio.run(main())
