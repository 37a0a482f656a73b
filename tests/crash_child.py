"""A service process for the crash and shutdown tests (run by tests/test_crash.py, not by pytest itself).

    python -m tests.crash_child --urls JSON --db URL --records DIR --symbols BTCUSDT,ETHUSDT --do STEP

The simulator's key and secret come from LIFECYCLE_SIM_API_KEY / LIFECYCLE_SIM_SECRET (never from the
command line). The process runs the real `Service` (streams, recovery, scheduler); once started it prints `READY`,
carries out STEP (`open:<SYMBOL>:<activation>` a long with a 1 % stop and a trailing plan, `close:<position id>`, or
`idle`), prints `DONE <position id>` and runs until SIGINT/SIGTERM, like `lifecycle run` would. The
test process drives the simulator and kills or signals this one at a chosen REST call.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from decimal import Decimal as D
from pathlib import Path

from loguru import logger

from exchange.ccxt_adapter import ExchangeSettings
from exchange.secret import Secret
from lifecycle.app.service import AccountConfig, Service, ServiceConfig
from lifecycle.domain import CloseReason, Side
from lifecycle.live import LiveConfig, OpenCommand
from lifecycle.reconciler import ReconcileConfig
from scheduler.jobs import ScheduleConfig

# Quick retries so that a test does not wait; trailing moves at once.
LIVE = LiveConfig(trail_min_interval_s=0, retry_backoff_s=0.05, cause_wait_s=0.3)
SCHEDULE = ScheduleConfig(sync_interval_s=1.0, fast_sync_interval_s=0.5, orphan_interval_s=1.0)


def service_config(urls: dict[str, str], api_key: str, secret: str, db: str, records: Path,
                   symbols: list[str], drain_s: float = 10.0) -> ServiceConfig:
    settings = ExchangeSettings(api_key=Secret(api_key), secret=Secret(secret), urls=urls, user_probe_after_s=0.5,
                                market_silent_after_s=5.0, backoff_initial_s=0.05, backoff_max_s=0.2,
                                rate_limit=False)
    return ServiceConfig(accounts=(AccountConfig("crash", settings, tuple(symbols)),), database_url=db,
                         records_dir=records, live=LIVE, schedule=SCHEDULE, reconcile=ReconcileConfig(grace_ms=0),
                         recovery_retry_s=0.2,
                         shutdown_drain_s=drain_s)


def open_command(symbol: str, activation: D) -> OpenCommand:
    return OpenCommand(symbol, Side.LONG, D("0.010") if symbol == "BTCUSDT" else D("0.10"), stop_loss_pct=D(1),
                       trailing_activation=activation, trailing_callback_pct=D("0.5"))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--urls", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--records", required=True, type=Path)
    parser.add_argument("--symbols", default="BTCUSDT")
    parser.add_argument("--do", default="idle")
    parser.add_argument("--drain-s", type=float, default=10.0)
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="DEBUG", format="{time:HH:mm:ss.SSS} {level:<7} {message}")
    config = service_config(json.loads(args.urls), os.environ["LIFECYCLE_SIM_API_KEY"],
                            os.environ["LIFECYCLE_SIM_SECRET"], args.db, args.records, args.symbols.split(","),
                            args.drain_s)

    async def step(service: Service) -> None:
        live = service.accounts["crash"].live
        assert live is not None
        print("READY", flush=True)
        action, _, arg = args.do.partition(":")
        done = ""
        if action == "open":
            symbol, _, activation = arg.partition(":")
            done = (await live.open(open_command(symbol, D(activation)))).id
        elif action == "close":
            await live.close(arg, CloseReason.SIGNAL)
            done = arg
        print(f"DONE {done}", flush=True)

    await Service(config).run(after_start=step)
    print("STOPPED", flush=True)

if __name__ == "__main__":
    asyncio.run(main())
