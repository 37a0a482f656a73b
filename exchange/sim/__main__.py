"""Run the venue simulator on its own: python -m exchange.sim [--rest-port 8710] [--ws-port 8711].

It prints, as JSON, where it listens, the symbols it serves, its account's key and secret (from SIM_API_KEY
and SIM_SECRET when they are set, else made up and printed), the ccxt URL overrides and the control endpoints.
`lifecycle init --sim` writes a configuration for these defaults."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal

from exchange.sim.server import DEFAULT_HOST, DEFAULT_REST_PORT, DEFAULT_WS_PORT, KEY_ENV, SECRET_ENV, SimServer
from exchange.sim.venue import Venue, VenueConfig


async def main() -> None:
    parser = argparse.ArgumentParser(description="Binance USDⓈ-M futures simulator for the ccxt binanceusdm client")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--rest-port", type=int, default=DEFAULT_REST_PORT)
    parser.add_argument("--ws-port", type=int, default=DEFAULT_WS_PORT)
    parser.add_argument("--random-walk", type=float, default=0.001, metavar="VOLATILITY",
                        help="relative step of the seeded random walk each second (0 to hold prices)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--symbols", type=int, default=6,
                        help="how many symbols: the six real ones, then synthetic X007USDT... (mark 100)")
    parser.add_argument("--accounts", type=int, default=1,
                        help="how many accounts: 'sim' (the key above), then sim2, sim3... with made-up keys, all "
                             "printed (several service processes sharing them: README, Scale out)")
    args = parser.parse_args()
    if args.accounts < 1:
        parser.error("--accounts must be at least 1")
    if args.symbols < 1:
        parser.error("--symbols must be at least 1")
    sim = await SimServer(Venue(VenueConfig.with_symbols(args.symbols)), host=args.host).start(args.rest_port,
                                                                                            args.ws_port)
    chosen = bool(os.environ.get(KEY_ENV) and os.environ.get(SECRET_ENV))
    account = sim.venue.add_account("sim", api_key=os.environ.get(KEY_ENV) if chosen else None,
                                    secret=os.environ.get(SECRET_ENV) if chosen else None)
    more = [sim.venue.add_account(f"sim{i}") for i in range(2, args.accounts + 1)]
    if args.random_walk > 0:
        sim.start_random_walk(volatility=args.random_walk, seed=args.seed)
    print(json.dumps({
        "rest_url": sim.rest_url,
        "ws_url": sim.ws_url,
        "symbols": [s.symbol for s in sim.venue.config.symbols],
        "api_key": account.api_key,
        "secret": account.secret,  # a throw-away key of this simulator process, printed on purpose
        "key_from": f"{KEY_ENV} and {SECRET_ENV}" if chosen else f"made up ({KEY_ENV}, {SECRET_ENV} not both set)",
        "ccxt_url_overrides": sim.ccxt_urls(),
        **({"more_accounts": [{"name": a.name, "api_key": a.api_key, "secret": a.secret} for a in more]}
           if more else {}),
        "control": f"{sim.rest_url}/_sim/<state|mark|faults|liquidation|adl|settlement|manual|drop_streams|"
                   "expire_listen_keys|revoke_key|account|symbols|burst>",
    }, indent=2), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await sim.stop()


if __name__ == "__main__":
    asyncio.run(main())
