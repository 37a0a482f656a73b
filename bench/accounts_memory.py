"""Resident memory of one `lifecycle run` process serving 1, 10, 100 accounts on the simulator (issue 14).

For each N: the simulator (its six symbols, N accounts, each with its own key) runs in this process; one
`lifecycle run` process is started with N accounts in its TOML configuration, exactly as deployed; once
/health answers for every account, its resident memory (VmRSS) is read from /proc, then it is stopped with
SIGTERM. The per-account figure is the slope between consecutive N. The accounts of one process share one
copy of the exchange's markets (exchange/ccxt_adapter.py).

Run: python -m bench.accounts_memory [--accounts 1 10 100]
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

from bench.run_memory import memory
from exchange.sim.server import SimServer

TOKEN = "bench-token"


async def measure(accounts: int) -> tuple[float, float]:
    """(RSS in MiB once every account is up, seconds to start)."""
    sim = await SimServer(mark_interval_s=1.0).start()
    directory = Path(tempfile.mkdtemp(prefix="lifecycle-accounts-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    urls = "\n".join(f'"{k}" = "{v}"' for k, v in sim.ccxt_urls().items())
    env = {**os.environ, "LIFECYCLE_API_TOKEN": TOKEN, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    blocks = []
    for i in range(accounts):
        account = sim.venue.add_account(f"acc{i:03d}")
        env[f"ACC{i:03d}_KEY"], env[f"ACC{i:03d}_SECRET"] = account.api_key, account.secret
        blocks.append(f'''
[[accounts]]
name = "acc{i:03d}"
symbols = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
api_key_env = "ACC{i:03d}_KEY"
secret_env = "ACC{i:03d}_SECRET"
rate_limit = false
[accounts.urls]
{urls}
''')
    (directory / "lifecycle.toml").write_text(f'''
database_url = "sqlite:///{directory / 'lifecycle.sqlite'}"
log_dir = "{directory / 'logs'}"
[records]
dir = "{directory / 'records'}"
[api]
port = {port}
''' + "".join(blocks))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "lifecycle.app.cli", "run", "--config",
                                                str(directory / "lifecycle.toml"), env=env,
                                                stderr=asyncio.subprocess.DEVNULL)
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
            while True:
                if proc.returncode is not None:
                    raise SystemExit(f"the service exited with {proc.returncode}")
                try:
                    async with session.get(f"http://127.0.0.1:{port}/health") as r:
                        health = await r.json()
                        if r.status == 200 and len(health.get("accounts", {})) == accounts and \
                                all(a["streams_healthy"] for a in health["accounts"].values()):
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
        took = time.monotonic() - started
        await asyncio.sleep(3)  # the first sync and audit passes have run
        return memory(proc.pid)[0], took
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
        await sim.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, nargs="+", default=[1, 10, 100])
    args = parser.parse_args()
    previous: tuple[int, float] | None = None
    for n in args.accounts:
        rss, took = await measure(n)
        slope = "" if previous is None else \
            f"; {(rss - previous[1]) / (n - previous[0]):.2f} MiB per extra account since {previous[0]}"
        print(f"{n:4d} account(s): {rss:6.1f} MiB resident, every account up after {took:5.1f} s{slope}")
        previous = (n, rss)


if __name__ == "__main__":
    asyncio.run(main())
